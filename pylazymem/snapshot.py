"""Checkpoint and lazy restore with working sets (file format: docs/snapshot-format.md).

checkpoint() writes a region's pages to a content-addressed store (zero and untouched pages take
no bytes, identical pages are stored once) with the working set laid out first; restore() maps a
new region whose pages are deferred updates served from that store, prefetches the working set,
returns, and lets the fault path and a background thread bring in the rest.
"""
import errno
import fcntl
import json
import os
import re
import threading

import numpy as np

# Writers replace files whole through locked temporaries (checkpoint, save, compact).
from ._atomic import _abandon, _commit, _temporary
# The file reader (format constants, checks, inspect, page_sources) is a module of its own
# below this one: it needs no compiled code and the page server uses it too.
from ._snapfile import (  # noqa: F401  (inspect, inspect_tables, page_sources re-exported)
    _SECTIONS,
    _SECTIONS_V3,
    FLAG_COMPRESSED,
    FLAG_PARENT,
    CODECS,
    ENTRY_LEN_MASK,
    _check_index,
    MAGIC,
    PARENT,
    VERSION_3,
    _header_struct,
    MAP_DTYPE,
    PREFETCH_MODES,
    MAX_STORED,
    PARENT,
    STORED,
    UNTOUCHED,
    VERSION,
    ZERO,
    SnapshotError,
    SnapshotInfo,
    _fail,
    _info,
    _open,
    _parse_manifest,
    _Parsed,
    _read,
    _xxh3,
    inspect,
    inspect_tables,
    page_sources,
)


# ---- checkpoint --------------------------------------------------------------------------

def _working_set_arg(region, working_set):
    from ._errors import InvalidArgumentError
    if isinstance(working_set, str):
        if working_set == "auto":
            return region.working_set()
        if working_set == "none":
            return np.zeros(0, np.uint64)
        raise InvalidArgumentError("working_set must be 'auto', 'none' or page indices, not %r"
                                   % working_set)
    # integers only, as everywhere page indices are taken: 1.7 was truncated to page 1, "3"
    # taken as page 3, and 2**64 raised a bare OverflowError
    return _in_region(_page_indices(working_set), region.npages)


def _json_dtype(dtype):
    return np.lib.format.dtype_to_descr(dtype)


def _codec_arg(compress):
    """The codec number of compress= (None: an uncompressed, version 2 file)."""
    from ._errors import InvalidArgumentError, UnavailableError
    if compress is None:
        return None
    if not isinstance(compress, str) or compress not in CODECS or compress == "raw":
        raise InvalidArgumentError("compress must be None, 'zstd' or 'lz4', not %r"
                                   % (compress,))
    from ._binding import lib
    if not lib.lm_codec_available(CODECS[compress]):
        raise UnavailableError("compress=%r: this build of the core has no %s (install its "
                               "-dev package and rebuild: bash scripts/setup.sh)"
                               % (compress, compress))
    return CODECS[compress]


def checkpoint(region, path, working_set="auto", progress=None, durable=True, parent=None,
               compress=None, background=False):
    """Write the region's state to `path` atomically; returns its SnapshotInfo.

    working_set: "auto" (the current window, Region.working_set()), "none", or page indices
    in the order they should be prefetched. progress: called as progress(done_bytes, total).
    durable: fsync the file and its directory before returning (a crash after return keeps
    the new snapshot). With durable=False the replacement is still atomic (rename), but a
    machine crash soon after may leave the old snapshot or none instead of the new one.
    compress: None (the default: pages stored as they are, format version 2), "zstd" or "lz4":
    each stored page compressed on its own (format version 3; a page that does not shrink is
    stored raw), in C on every CPU, signatures still of the uncompressed contents.
    Stores racing with the checkpoint may or may not be in it; where the kernel tracks stores
    exactly (Region.dirty_tracking "wp-async"), a page stored to between its hash and its
    write is found in the file and the file written again; stored to again, the region is
    taken as it was at a pause, as background=True does, and waited for (BusyError where that
    cannot be done). Without that tracking, checkpoint a quiescent region: such a page's
    bytes may not be its signature (restore(verify=True) refuses it). A checkpoint that fails
    leaves the region's dirty pages as they were.
    parent: an earlier snapshot of this region (a path, or its SnapshotInfo): the new file
    holds only the pages that differ from it and refers to it, by content id, for the rest
    (an incremental checkpoint; restore() follows the chain, compact() folds it into one
    file). Pages unchanged since the parent was taken from or restored into this region are
    known without reading them (Region.dirty_tracking); the others are compared by contents.
    background: return a CheckpointHandle after a pause (the program's threads stop for one
    mremap, well under a millisecond for a GiB) instead of the SnapshotInfo: the file holds the
    region exactly as it was at the pause, while the program goes on storing to it; the handle
    says how far the writing is, and wait() returns the SnapshotInfo or raises what went wrong
    (the previous file at `path` is then untouched). docs/design.md, "Background checkpoints".
    """
    codec = _codec_arg(compress)
    region._check_open()
    path = os.fsdecode(path)
    if background:
        return _start_background(region, path, working_set, progress, durable, parent, codec)
    with region._epoch_owner():
        chain = _open_parent(region, path, parent) if parent is not None else None
        try:
            return _checkpoint(region, path, working_set, progress, durable, chain, codec)
        except _Changed as e:   # stored to under every attempt (the epoch was put back)
            changed = e.pages
        finally:
            if chain is not None:
                chain.close()
    # A region stored to all the time: the file is taken as the region was at a pause, as
    # background=True does (the stores go on, each page saved before its first store lands),
    # and waited for. Where that cannot be done, BusyError says what to do.
    from ._errors import BusyError, InvalidArgumentError, UnavailableError
    try:
        handle = _start_background(region, path, working_set, progress, durable, parent, codec)
    except (UnavailableError, InvalidArgumentError) as e:
        raise BusyError(errno.EBUSY, "checkpoint of %s: pages were stored to while they were "
                        "written, %d times in a row (%d pages the last time, first %s), and "
                        "the region as at a pause cannot be taken here (%s): stop the threads "
                        "that store to it meanwhile; the file at that path is unchanged"
                        % (path, CHANGED_ATTEMPTS, changed.size, changed[:8].tolist(), e)
                        ) from None
    return handle.wait()


def _start_background(region, path, working_set, progress, durable, parent, codec,
                      _test_copy=None):
    """checkpoint(background=True): what can fail early fails here; _bgckpt pauses and runs
    the checkpoint (_checkpoint with the frozen view) on its thread. _test_copy: tests' copy of
    the region taken inside the pause (lm_freeze_begin)."""
    from . import _bgckpt
    from ._errors import InvalidArgumentError

    if region._empty_unknown or region._server_sock is not None:
        raise InvalidArgumentError("checkpoint(background=True): not of a region a page server "
                                   "serves (checkpoint it in the foreground)")
    # The thread that writes the file resolves nothing: a chdir() meanwhile changes no path.
    path = os.path.abspath(path)
    if parent is not None:
        parent = os.path.abspath(os.fsdecode(getattr(parent, "path", parent)))
    with region._epoch_owner():
        chain = _open_parent(region, path, parent) if parent is not None else None
        try:
            ws = _working_set_arg(region, working_set)
            # What the region holds is named as at the pause (an alloc() after it is not in
            # this file): taken here, just before it.
            named = ({k: dict(v) for k, v in region._arrays.items()},
                     dict(region._manifest_extra))

            def write(frozen, progress_cb):
                return _checkpoint(region, path, ws, progress_cb, durable, chain, codec,
                                   frozen=frozen, named=named)
        except BaseException:
            if chain is not None:
                chain.close()
            raise
        # It owns the chain from here: closes it when the checkpoint ends, or when it fails
        # before the checkpoint's thread has taken it over (never under that thread).
        return _bgckpt.start(region, path, chain, write, progress, _test_copy)


def _open_parent(region, path, parent):
    """The parent chain of an incremental checkpoint, checked against the region and the
    target path."""
    from . import _chain
    from ._errors import InvalidArgumentError

    open_chain, MAX_DEPTH = _chain.open_chain, _chain.MAX_DEPTH
    ppath = os.fsdecode(getattr(parent, "path", parent))
    if os.path.abspath(ppath) == os.path.abspath(path) or (
            os.path.exists(path) and os.path.exists(ppath) and os.path.samefile(path, ppath)):
        raise InvalidArgumentError("checkpoint(parent=%r): the parent is the file being "
                                   "written, which would replace it (write the child to another "
                                   "path)" % ppath)
    chain = open_chain(ppath, signatures=True)
    for layer in chain.layers[1:]:
        # An ancestor replaced by its own descendant: the chain would name a file that is no
        # longer the one it checked (and a cycle), and nothing of it could be restored.
        if os.path.abspath(layer.path) == os.path.abspath(path) or (
                os.path.exists(path) and os.path.samefile(layer.path, path)):
            chain.close()
            raise InvalidArgumentError("checkpoint(parent=%r): %s is in the parent's chain, and "
                                       "writing it would break the chain (write the child to "
                                       "another path, or compact the chain first)"
                                       % (ppath, layer.path))
    if len(chain.layers) >= MAX_DEPTH:
        chain.close()
        raise SnapshotError("%s: chain of parents deeper than %d files with the new one (compact "
                            "it first: pylazymem compact)" % (ppath, MAX_DEPTH))
    h = chain.leaf.header
    if (h["npages"], h["page_size"]) != (region.npages, region.page_size):
        chain.close()
        raise InvalidArgumentError("checkpoint(parent=%r): the parent holds %d pages of %d bytes, "
                                   "the region %d of %d" % (ppath, h["npages"], h["page_size"],
                                                            region.npages, region.page_size))
    return chain


def _content_ids(chain):
    """The content ids whose pages the chain's leaf holds: its own and those of earlier
    versions of the file with the same pages (a working set rewritten: same_pages_as)."""
    return getattr(chain, "content_ids", None) or frozenset([chain.content_id])


# Attempts of a foreground checkpoint whose pages were changed under it (below), before it
# takes the region as at a pause (the background checkpoint's way).
CHANGED_ATTEMPTS = 2


class _Changed(Exception):
    """Pages were stored to while a foreground checkpoint wrote them, and their bytes in the
    file are not what their signature says (_changed_entries)."""

    def __init__(self, pages):
        self.pages = pages


def _checkpoint(region, path, working_set, progress, durable, chain, codec, frozen=None,
                named=None):
    """The checkpoint itself. frozen: (freeze, clean) of a background checkpoint (_bgckpt):
    the core reads every page as it was at the pause, whose epoch ended there (clean is what
    it knew unchanged since the parent, or None); working_set is then page indices already.
    named: (arrays, manifest extra) as they were at the pause; else the region's now."""
    if frozen is not None:
        return _write_checkpoint(region, path, working_set, progress, durable, chain, codec,
                                 frozen, named, False)
    from ._binding import ffi, lib
    from ._errors import RegionClosedError

    region._prepare_checkpoint()   # records up to date with what a page server filled
    ws = _working_set_arg(region, working_set)
    # A new dirty-tracking epoch starts before any page is read: a store from here on is the
    # next checkpoint's. Until this file is whole, no snapshot is the epoch's; if it fails,
    # the epoch that ended is put back (its changes would be missing from dirty_pages() and
    # from the next incremental checkpoint's plan otherwise).
    epoch, dirty = region._take_dirty()
    clean = None
    if dirty is not None and chain is not None and epoch in _content_ids(chain):
        clean = ~dirty
    # Where the kernel tracks stores exactly (async write-protect), the pages stored to while
    # they were written are known, and checked in the file: a store landing between a page's
    # hash (the plan) and its write, or during the write, left a page whose bytes are not
    # its signature (restore(verify=True) poisons it; without verify it is served as it is,
    # and deduplication may have given other pages those bytes). Such a file is written
    # again; a region stored to all the time gets BusyError (background=True is the way).
    with region._use() as lm:
        verify = lib.lm_dirty_mode(lm) == lib.LM_DIRTY_WP_ASYNC
    try:
        for attempt in range(CHANGED_ATTEMPTS):
            try:
                return _write_checkpoint(region, path, ws, progress, durable, chain, codec,
                                         (None, clean), named, verify)
            except _Changed as e:
                if attempt == CHANGED_ATTEMPTS - 1:
                    raise   # checkpoint() takes the region as at a pause instead
    except BaseException:
        if region._epoch_id is None:
            region._epoch_id = epoch
        if dirty is not None:
            try:
                with region._use(report=False) as lm:
                    lib.lm_dirty_putback(lm, ffi.from_buffer("uint64_t[]", dirty))
            except RegionClosedError:
                pass
        raise


def _write_checkpoint(region, path, ws, progress, durable, chain, codec, frozen, named,
                      verify):
    """Plan and write the file. frozen: (freeze or None, clean). verify: check the pages
    stored to since the epoch began in the written store (raises _Changed)."""
    from ._binding import check, ffi, lib

    npages, ps = region.npages, region.page_size
    fz, clean = frozen
    if fz is None:
        read_page = region._page_bytes
    else:
        def read_page(page):
            out = ffi.new("char[]", ps)
            with region._use():
                check(lib.lm_freeze_page_read(fz, page, out), "page_read")
            return ffi.buffer(out)[:]
    if chain is not None:
        pcls, psigs = chain.page_classes()
    pmap = np.empty(npages, MAP_DTYPE)
    sigs = np.empty(npages, "<u8")
    store_pages = np.empty(npages, np.uint64)
    nstored_p = ffi.new("uint64_t *")
    c_map = ffi.from_buffer("struct lm_snap_page[]", pmap)
    c_pages = ffi.from_buffer("uint64_t[]", store_pages)

    def plan(compare):
        with region._poisoned_named(0, npages, "checkpoint"), region._use() as lm:
            args = (lm, ffi.from_buffer("uint64_t[]", ws), ws.size, c_map,
                    ffi.from_buffer("uint64_t[]", sigs), c_pages, nstored_p, compare)
            if chain is None:
                rc = lib.lm_ckpt_plan(*args)
            else:
                rc = lib.lm_ckpt_plan_parent(
                    *args, ffi.from_buffer("uint8_t[]", pcls), ffi.from_buffer("uint64_t[]", psigs),
                    ffi.NULL if clean is None else ffi.from_buffer("uint64_t[]", clean))
            if rc == -errno.EBADMSG:   # the source snapshot of a restored region is damaged
                raise SnapshotError("checkpoint: the region's source snapshot cannot be used: %s"
                                    % ffi.string(lib.lm_last_op()).decode())
            check(rc, "checkpoint")
        return nstored_p[0]

    def compare(out):
        with region._use() as lm:
            out.append(lib.lm_ckpt_compare(lm, c_map, c_pages, nstored))
            if out[0] < 0:
                out.append(ffi.string(lib.lm_last_op()).decode())

    # Pages with equal signatures share a store entry. Their contents are compared while the
    # store is written (another thread; the GIL is released in both calls), not before: a
    # difference (a 64-bit hash collision, never seen) makes the plan again, comparing as it
    # goes, and the store is written again.
    nstored = plan(False)
    if chain is not None and clean is not None:
        # A page written since the parent was taken whose signature is still its parent
        # page's was mapped to the parent: compare its contents (a 64-bit hash collision must
        # not lose a change). Such pages are rare (a page written back to what it held).
        # Without tracking (clean is None) every page is such a page, and reading the parent
        # again would cost a full read: there a page equal by signature to its own earlier
        # version is taken as unchanged (docs/snapshot-format.md, "Parents and chains").
        suspect = np.flatnonzero(pmap == PARENT)
        bits = np.unpackbits(clean.view(np.uint8), bitorder="little")[:npages]
        suspect = suspect[bits[suspect] == 0]
        differ = _differs_from_parent(read_page, ps, chain, suspect)
        if differ.size:   # a collision: those pages are not the parent's
            pcls[differ] = lib.LM_PARENT_UNKNOWN
            nstored = plan(False)
    ws = _dedup_keep_order(ws, npages)   # as lm_ckpt_plan placed them: first mention wins
    arrays, extra = named if named is not None else (region._arrays, region._manifest_extra)
    extra = dict(extra)
    # A restored chain's own link is not this file's, nor are the content ids of the earlier
    # versions of the file it was restored from: this file's pages differ from theirs, and a
    # child's restore trusts that list (_chain._content_ids).
    extra.pop("parent", None)
    extra.pop("same_pages_as", None)
    parent_id = 0
    if chain is not None:
        parent_id = chain.content_id
        extra["parent"] = {"path": os.path.relpath(
            os.path.abspath(chain.layers[0].path), os.path.dirname(os.path.abspath(path)))}
    manifest = _manifest_bytes(arrays, extra)
    _check_manifest(manifest, npages, ps, path)
    header_bytes = max(4096, ps)

    fd, tmp = _temporary(path)
    index = None
    try:
        for attempt in (0, 1):
            h = _layout(npages, ps, nstored, ws.size, len(manifest), parent_id=parent_id)
            result = []
            checker = None
            if attempt == 0 and nstored:
                checker = threading.Thread(target=compare, args=(result,), daemon=True)
                checker.start()
            try:
                if codec is None:
                    _write_store(region, fd, store_pages, nstored, header_bytes,
                                 h["file_bytes"], progress)
                else:
                    index, store_bytes = _write_store_packed(region, fd, store_pages, nstored,
                                                             header_bytes, h["file_bytes"],
                                                             codec, progress)
                    h = _layout(npages, ps, nstored, ws.size, len(manifest),
                                parent_id=parent_id, store_bytes=store_bytes)
            finally:
                if checker is not None:
                    checker.join()
            if not result or result[0] == 0:
                break
            if result[0] < 0:
                check(result[0], "checkpoint: %s" % result[1])
            nstored = plan(True)   # a collision: lay the store out again, comparing
        if verify:
            changed = _changed_pages(region, fd, pmap, sigs, header_bytes, index, ps)
            if changed.size:
                raise _Changed(changed)
        _write_tables(fd, h, header_bytes, ps, pmap, ws, manifest, sigs[:nstored], index)
        # The last report comes before the file replaces the old one: a callback that raises
        # here, like one that raises earlier, leaves the previous file at `path`.
        if progress is not None:
            progress(h["file_bytes"], h["file_bytes"])
    except BaseException:
        _abandon(fd, tmp)
        raise
    _commit(fd, tmp, path, durable)
    region._epoch_id = h["header_xxh3"]   # the next incremental checkpoint's parent
    # What inspect() would say of the file, from what was just written.
    counts = np.bincount(pmap[pmap < STORED], minlength=STORED)
    inherit = int(np.count_nonzero(pmap == PARENT))
    h.update(page_size=ps, parent_pages=inherit,
             counts=(int(counts[UNTOUCHED]), int(counts[ZERO]),
                     npages - int(counts[UNTOUCHED]) - int(counts[ZERO]) - inherit))
    return _info(path, _Parsed(h, pmap, ws.astype(np.uint64), _parse_manifest(manifest, h, path),
                               index=None if index is None else _check_index(index, h, path)))


def _check_manifest(manifest, npages, ps, path):
    """What a reader will check of the manifest, checked before the file is written: a
    writer must not replace a good file with one no reader accepts."""
    from ._errors import InvalidArgumentError
    try:
        _parse_manifest(manifest, {"npages": npages, "page_size": ps}, path)
    except SnapshotError as e:
        raise InvalidArgumentError("%s (nothing was written: the file at that path is "
                                   "unchanged)" % e) from None


def _differs_from_parent(read_page, ps, chain, pages, batch=1024):
    """Those of `pages` whose contents (read_page(p): the region's, without faulting it in)
    differ from the parent's."""
    out = []
    for i in range(0, pages.size, batch):
        part = pages[i:i + batch]
        theirs = chain.read_pages(part)
        for j, p in enumerate(part):
            if read_page(int(p)) != theirs[j * ps:(j + 1) * ps]:
                out.append(int(p))
    return np.array(out, np.int64)


def write_arrays(path, arrays, extra=None, working_set=None, durable=True, page_size=None,
                 compress=None):
    """Write named arrays (name -> C-contiguous numpy array) straight to a snapshot file, as
    checkpoint() of a region holding them page-aligned in this order would (zero pages take
    no entry, equal pages one, signatures beside them, no working set), without the region:
    no second copy of the data in memory, no faults. extra: manifest keys beside the arrays
    (plm.save's state tree). compress: as checkpoint(). Returns the SnapshotInfo of the file."""
    from ._binding import PAGE_SIZE

    codec = _codec_arg(compress)
    ps = page_size or PAGE_SIZE
    ws_in = None if working_set is None else _page_indices(working_set)
    placed, offset = {}, 0
    for name, a in arrays.items():
        offset = -(-offset // ps) * ps
        placed[name] = {"offset": offset, "dtype": a.dtype, "shape": a.shape}
        offset += a.nbytes
    npages = max(1, -(-offset // ps))
    pmap = np.full(npages, UNTOUCHED, MAP_DTYPE)
    entry_of = {}            # signature -> store entries with it (a collision gets its own)
    sigs, sources = [], []   # per store entry: signature, (array name, page of that array)
    flats = {name: _flat_bytes(a) for name, a in arrays.items()}
    for name, flat in flats.items():
        first = placed[name]["offset"] // ps
        whole = flat.size // ps
        nonzero = np.ones(whole + (flat.size % ps > 0), bool)
        if whole:
            nonzero[:whole] = flat[:whole * ps].view(np.uint64).reshape(whole, -1).any(axis=1)
        mv = memoryview(flat)
        for i in range(nonzero.size):
            # whole pages are hashed in place; only a partial last page is copied (padded)
            page = mv[i * ps:(i + 1) * ps] if i < whole else _page_bytes(flat, i, ps)
            if not nonzero[i] or (i == whole and not page.strip(b"\0")):
                pmap[first + i] = ZERO
                continue
            sig = _page_signature(page)
            for e in entry_of.get(sig, ()):
                src_name, src_page = sources[e]
                if _page_bytes(flats[src_name], src_page, ps) == bytes(page):
                    pmap[first + i] = STORED + e
                    break
            else:
                entry_of.setdefault(sig, []).append(len(sigs))
                pmap[first + i] = STORED + len(sigs)
                sigs.append(sig)
                sources.append((name, i))
    nstored = len(sigs)
    if nstored > MAX_STORED:
        raise SnapshotError("%s: %d distinct pages: more than a snapshot holds" % (path, nstored))
    ws = np.zeros(0, np.uint64)
    if ws_in is not None:
        ws = _dedup_keep_order(_in_region(ws_in, npages), npages)
        # the working set's entries first, in its order; the others stay in address order
        stored = pmap >= STORED
        used = np.concatenate([pmap[ws][stored[ws]], pmap[stored]]).astype(np.int64) - STORED
        _, firsts = np.unique(used, return_index=True)
        order = used[np.sort(firsts)]
        new_of_old = np.empty(nstored, np.int64)
        new_of_old[order] = np.arange(nstored)
        pmap[stored] = (new_of_old[pmap[stored].astype(np.int64) - STORED] + STORED
                        ).astype(MAP_DTYPE)
        sigs = [sigs[e] for e in order]
        sources = [sources[e] for e in order]
    manifest = _manifest_bytes(placed, extra)
    _check_manifest(manifest, npages, ps, path)
    h = _layout(npages, ps, nstored, ws.size, len(manifest))
    header_bytes = h["store_offset"]
    fd, tmp = _temporary(path)
    packer = None if codec is None else _Packer(fd, header_bytes, ps, codec, nstored)
    try:
        # Runs of entries that are consecutive pages of one array are one slice of it.
        iov, at, e = [], header_bytes, 0
        while e < nstored:
            name, i = sources[e]
            n = 1
            while e + n < nstored and sources[e + n] == (name, i + n):
                n += 1
            flat = flats[name]
            if (i + n) * ps <= flat.size:
                iov.append(memoryview(flat)[i * ps:(i + n) * ps])
            else:   # the run ends with the array's partial last page: pad it
                iov.append(memoryview(flat)[i * ps:(i + n - 1) * ps])
                iov.append(_page_bytes(flat, i + n - 1, ps))
            e += n
            if packer is not None:
                for b in iov:
                    packer.add(b)
                iov = []
            elif len(iov) >= 512 or e == nstored:
                at = _pwritev_all(fd, iov, at)
                iov = []
        index = None
        if packer is not None:
            index, store_bytes = packer.finish()
            h = _layout(npages, ps, nstored, ws.size, len(manifest), store_bytes=store_bytes)
        _write_tables(fd, h, header_bytes, ps, pmap, ws, manifest, np.array(sigs, dtype="<u8"),
                      index)
    except BaseException:
        _abandon(fd, tmp)
        raise
    _commit(fd, tmp, path, durable)
    return inspect(path)


_page_signature = _xxh3   # a page's signature (its own name: a test makes every page collide)


class _Packer:
    """Compressed store entries written one after the other from `offset`: pages handed in
    (whole pages, any number at a time) are gathered into batches of BATCH pages, each
    compressed by lm_pack_pages (C, every CPU, the GIL released) and written."""

    BATCH = 2048

    def __init__(self, fd, offset, ps, codec, nstored):
        from ._binding import ffi
        self.fd, self.at, self.ps, self.codec = fd, offset, ps, codec
        self.start = offset
        self.index = np.empty(nstored, "<u4")
        self.done = 0                       # entries packed
        self.stage = np.empty(self.BATCH * ps, np.uint8)
        self.out = np.empty(self.BATCH * ps, np.uint8)
        self.fill = 0                       # pages staged
        self._out_bytes = ffi.new("uint64_t *")

    def add(self, buf):
        mv = memoryview(buf).cast("B")
        pages = len(mv) // self.ps
        i = 0
        while i < pages:
            k = min(pages - i, self.BATCH - self.fill)
            self.stage[self.fill * self.ps:(self.fill + k) * self.ps] = np.frombuffer(
                mv[i * self.ps:(i + k) * self.ps], np.uint8)
            self.fill += k
            i += k
            if self.fill == self.BATCH:
                self._flush()

    def _flush(self):
        from ._binding import check, ffi, lib
        if not self.fill:
            return
        n = self.fill
        check(lib.lm_pack_pages(ffi.from_buffer(self.stage), n, self.ps, self.codec, 0, 0,
                                ffi.from_buffer(self.out),
                                ffi.from_buffer("uint32_t[]", self.index[self.done:self.done + n]),
                                self._out_bytes), "compress")
        nbytes = int(self._out_bytes[0])
        _pwrite_all(self.fd, memoryview(self.out)[:nbytes], self.at)
        self.at += nbytes
        self.done += n
        self.fill = 0

    def finish(self):
        """(entry index, store bytes)."""
        self._flush()
        assert self.done == self.index.size, "packed %d entries of %d" % (self.done,
                                                                          self.index.size)
        return self.index, self.at - self.start


def _flat_bytes(a):
    return a.reshape(-1).view(np.uint8) if a.nbytes else np.zeros(0, np.uint8)


def _pwritev_all(fd, iov, offset):
    """Write the buffers one after the other at `offset`; returns the offset after them."""
    for b in iov:
        _pwrite_all(fd, b, offset)
        offset += len(b)
    return offset


def _page_bytes(flat, i, ps):
    """Page i of a byte array, the last one padded with zeros to a whole page."""
    page = flat[i * ps:(i + 1) * ps].tobytes()
    return page if len(page) == ps else page + bytes(ps - len(page))


def _manifest_bytes(arrays, extra):
    """The manifest: the named arrays, and what the writer of the state added (arrays.py's
    "state" tree); the reader keeps keys it does not know, so a restored region's extras
    survive the next checkpoint."""
    man = dict(extra or {})
    man["pylazymem"] = _version()
    man["arrays"] = {n: {"offset": a["offset"], "dtype": _json_dtype(a["dtype"]),
                         "shape": list(a["shape"])} for n, a in arrays.items()}
    # Not sort_keys: the state tree's dicts keep the order they were saved in.
    return json.dumps(man).encode()


def _write_tables(fd, h, header_bytes, ps, pmap, ws, manifest, sigs, index=None):
    """Everything after the store ((entry index,) page map, working set, manifest,
    signatures), then the header with its checksums last: a file is whole only once its
    header is. The version and flags are _layout's (h). The file is cut at its end (a
    compressed store written again shorter, after a hash collision, leaves nothing behind)."""
    version = h["version"]
    hs, fields, _, checked = _header_struct(version)
    tail = (b"" if index is None else np.ascontiguousarray(index, "<u4").tobytes()) \
        + pmap.tobytes() + ws.astype("<u8").tobytes() + manifest
    sigs_raw = np.ascontiguousarray(sigs, dtype="<u8").tobytes()
    h["tables_xxh3"] = _xxh3(tail)
    h["sigs_xxh3"] = _xxh3(sigs_raw)
    h["header_xxh3"] = 0
    raw = bytearray(header_bytes)
    hs.pack_into(raw, 0, MAGIC, version, header_bytes, ps, h["flags"], *(h[f] for f in fields))
    h["header_xxh3"] = _xxh3(bytes(raw[:checked]))
    hs.pack_into(raw, 0, MAGIC, version, header_bytes, ps, h["flags"], *(h[f] for f in fields))
    _pwrite_all(fd, tail + sigs_raw, h["index_offset" if version == VERSION_3 else "map_offset"])
    _pwrite_all(fd, raw, 0)
    os.ftruncate(fd, h["file_bytes"])


def _layout(npages, ps, nstored, nws, manifest_bytes, parent_id=0, store_bytes=None):
    """Header fields of a file with these sections: sizes and offsets, in section order.
    Version 2 unless the file has a parent (parent_id) or a compressed store (store_bytes:
    the entries' compressed lengths added up; an entry index follows the store)."""
    compressed = store_bytes is not None
    v3 = bool(parent_id) or compressed
    sizes = {"store": store_bytes if compressed else nstored * ps,
             "index": nstored * 4 if compressed else 0,
             "map": npages * MAP_DTYPE.itemsize, "ws": nws * 8,
             "manifest": manifest_bytes, "sigs": nstored * 8}
    h = {"npages": npages, "nstored": nstored, "nws": nws, "parent_id": parent_id,
         "version": VERSION_3 if v3 else VERSION,
         "flags": (FLAG_PARENT if parent_id else 0) | (FLAG_COMPRESSED if compressed else 0)}
    offset = max(4096, ps)
    for name in _SECTIONS_V3 if v3 else _SECTIONS:
        h[name + "_offset"], h[name + "_bytes"] = offset, sizes[name]
        offset += sizes[name]
    h["file_bytes"] = offset
    return h


def _changed_pages(region, fd, pmap, sigs, header_bytes, index, ps):
    """Pages stored to since the epoch began (the dirty bitmap, not reset) whose store entry
    in the file just written does not hash to its signature: read back (the page cache) and
    hashed, entry by entry; none where nothing was stored to (one page-table scan)."""
    from ._binding import check, ffi, lib
    words = np.zeros(-(-region.npages // 64), np.uint64)
    with region._use() as lm:
        check(lib.lm_dirty_bitmap(lm, ffi.from_buffer("uint64_t[]", words)), "checkpoint")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:region.npages].astype(bool)
    pages = np.flatnonzero(bits & (pmap >= STORED) & (pmap != PARENT))
    if not pages.size:
        return pages
    entries = np.unique(pmap[pages].astype(np.int64) - STORED)
    bad = []
    if index is None:
        for e in entries.tolist():
            data = os.pread(fd, ps, header_bytes + e * ps)
            if len(data) != ps or _xxh3(data) != int(sigs[e]):
                bad.append(e)
    else:
        lengths = (index & ENTRY_LEN_MASK).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        page = bytearray(ps)
        for e in entries.tolist():
            n = int(lengths[e])
            data = os.pread(fd, n, header_bytes + int(offsets[e]))
            if len(data) != n or lib.lm_unpack_entry(ffi.from_buffer(data), n, int(index[e]),
                                                     ps, ffi.from_buffer(page)) < 0 \
                    or _xxh3(bytes(page)) != int(sigs[e]):
                bad.append(e)
    if not bad:
        return pages[:0]
    return pages[np.isin(pmap[pages].astype(np.int64) - STORED, bad)]


def _write_store_packed(region, fd, store_pages, nstored, header_bytes, total, codec,
                        progress):
    """The store of a compressed checkpoint (lm_ckpt_write_packed, in chunks for progress):
    returns (entry index, store bytes)."""
    from ._binding import check, ffi, lib

    ps = region.page_size
    chunk = max(1, (64 << 20) // ps)
    index = np.empty(nstored, "<u4")
    written = ffi.new("uint64_t *")
    at = header_bytes
    with region._poisoned_named(0, region.npages, "checkpoint"), region._use() as lm:
        for i in range(0, nstored, chunk):
            n = min(chunk, nstored - i)
            check(lib.lm_ckpt_write_packed(lm, fd, at,
                                           ffi.from_buffer("uint64_t[]", store_pages[i:i + n]),
                                           n, codec, 0,
                                           ffi.from_buffer("uint32_t[]", index[i:i + n]),
                                           written), "checkpoint")
            at += int(written[0])
            if progress is not None:
                progress(header_bytes + (i + n) * ps, total)
    return index, at - header_bytes


def _write_store(region, fd, store_pages, nstored, header_bytes, total, progress):
    from ._binding import check, ffi, lib

    ps = region.page_size
    chunk = max(1, (64 << 20) // ps)
    with region._poisoned_named(0, region.npages, "checkpoint"), region._use() as lm:
        for i in range(0, nstored, chunk):
            n = min(chunk, nstored - i)
            check(lib.lm_ckpt_write(lm, fd, header_bytes + i * ps,
                                    ffi.from_buffer("uint64_t[]", store_pages[i:i + n]), n),
                  "checkpoint")
            if progress is not None:
                progress(header_bytes + (i + n) * ps, total)


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _dedup_keep_order(ws, npages):
    if not ws.size:
        return ws
    seen = np.zeros(npages, bool)
    seen[ws] = True
    if int(np.count_nonzero(seen)) == ws.size:   # the common case, without sorting
        return ws
    _, first = np.unique(ws, return_index=True)
    return ws[np.sort(first)]


def _version():
    from ._version import __version__
    return __version__


SAME_PAGES_AS_KEPT = 16   # earlier content ids a rewritten file keeps answering to


def rewrite_working_set(path, working_set, expect_id=None, durable=True):
    """Replace the working set of the snapshot at `path` (page indices, in prefetch order),
    keeping every page's contents: the store is laid out again with the new working set's
    entries first (docs/snapshot-format.md), atomically, as checkpoint() writes. expect_id:
    the content id (header checksum) the file must still have, else SnapshotError (the file
    was replaced since the working set was recorded against it)."""
    from ._errors import InvalidArgumentError

    path = os.fsdecode(path)
    fd = _open(path)
    try:
        p = _read(fd, path, signatures=True)
        h = p.header
        # The ids this file's pages answer to: its own and its earlier versions' (each
        # rewrite keeps the pages and records the id it replaces).
        same = [int(x) for x in p.manifest.get("same_pages_as", ())]
        if expect_id is not None and expect_id != h["header_xxh3"] and expect_id not in same:
            raise SnapshotError("%s: the file changed since the working set was recorded "
                                "(another snapshot is at that path now)" % path)
        npages, ps = h["npages"], h["page_size"]
        ws = _dedup_keep_order(_in_region(_page_indices(working_set), npages), npages)
        # Store entries in the order the format asks for: the working set's (first mention
        # first), then the others in the address order of the first page that uses them.
        stored = (p.map >= STORED) & (p.map != PARENT)
        used = np.concatenate([p.map[ws][stored[ws]], p.map[stored]]).astype(np.int64) - STORED
        _, first = np.unique(used, return_index=True)
        order = used[np.sort(first)]                    # new position -> old entry
        new_of_old = np.empty(h["nstored"], np.int64)
        new_of_old[order] = np.arange(order.size)
        pmap = p.map.copy()
        pmap[stored] = (new_of_old[p.map[stored].astype(np.int64) - STORED] + STORED
                        ).astype(MAP_DTYPE)
        extra = {k: v for k, v in p.manifest.items() if k not in ("arrays", "pylazymem")}
        # Children of this file name it by its content id, which the new order changes: the
        # id replaced is kept, so that they (and an incremental checkpoint against it) still
        # find their parent (docs/snapshot-format.md, "Parents and chains").
        extra["same_pages_as"] = (same + [h["header_xxh3"]])[-SAME_PAGES_AS_KEPT:]
        manifest = _manifest_bytes(p.manifest["arrays"], extra)
        # The file keeps its parent and its compression: only the order changes (a child's
        # working set is the leaf's, the pages are unchanged).
        index = None if p.index is None else p.index["raw"][order]
        out = _layout(npages, ps, h["nstored"], ws.size, len(manifest), parent_id=h["parent_id"],
                      store_bytes=None if index is None else h["store_bytes"])
        header_bytes = out["store_offset"]
        tfd, tmp = _temporary(path)
        try:
            if p.index is None:
                _copy_entries(fd, h["store_offset"], tfd, header_bytes, order, ps)
            else:
                _copy_packed_entries(fd, h["store_offset"], p.index["raw"], tfd, header_bytes, order,
                                     path)
            _write_tables(tfd, out, header_bytes, ps, pmap, ws, manifest, p.sigs[order],
                          index)
        except BaseException:
            _abandon(tfd, tmp)
            raise
        _commit(tfd, tmp, path, durable)
    finally:
        os.close(fd)
    return inspect(path)


def compact(path, out, durable=True):
    """Fold the chain of incremental snapshots ending at `path` into one file at `out` that
    needs no parent: every page as the chain restores it, the leaf's working set and
    manifest, equal contents stored once. Written atomically like checkpoint(); `path` and
    its parents are left as they are. Returns the new file's SnapshotInfo."""
    from ._chain import open_chain
    from ._errors import InvalidArgumentError

    path, out = os.fsdecode(path), os.fsdecode(out)
    with open_chain(path, signatures=True) as chain:
        for layer in chain.layers:
            if os.path.exists(out) and os.path.samefile(out, layer.path):
                raise InvalidArgumentError("compact(%r, %r): the output is a file of the chain "
                                           "(%s); write it elsewhere, then rename it"
                                           % (path, out, layer.path))
        leaf = chain.leaf
        h = leaf.header
        npages, ps = h["npages"], h["page_size"]
        gmap = chain.map()
        gsigs = chain.signatures()
        ws = leaf.working_set
        stored = gmap >= STORED
        # Entries in the order the format asks for (the working set's first), then equal
        # contents from different files of the chain merged into one entry.
        used = np.concatenate([gmap[ws][stored[ws]], gmap[stored]]).astype(np.int64) - STORED
        _, first = np.unique(used, return_index=True)
        order = used[np.sort(first)]                 # global ids, in new-store order
        new_of_old = np.full(chain.nstored, -1, np.int64)
        extra = {k: v for k, v in leaf.manifest.items()
                 if k not in ("arrays", "pylazymem", "parent")}
        manifest = _manifest_bytes(leaf.manifest["arrays"], extra)
        tfd, tmp = _temporary(out)
        try:
            # One pass: each entry read once, checked against its signature (a file's
            # signatures are not trusted: an uncompressed store's are never recomputed), and
            # merged with an earlier entry of equal contents. Equal signatures are compared
            # by contents: the first entry of a signature by its bytes, and where a signature
            # turns out to stand for several contents (a collision, or a hostile file full
            # of them), by a 128-bit digest of the contents, so that the pass stays linear.
            keep, first_of, digests = [], {}, {}
            header_bytes = at = max(4096, ps)   # as _layout places the store
            for i in range(0, order.size, 1024):
                batch = order[i:i + 1024]
                data = chain.read_entries(batch)
                out_buf = bytearray()
                for j, gid in enumerate(batch.tolist()):
                    page = data[j * ps:(j + 1) * ps]
                    sig = int(gsigs[gid])
                    if _xxh3(page) != sig:
                        _fail(path, "its chain's store entry %d differs from its signature "
                              "(a damaged file): nothing was written to %s" % (gid, out))
                    k = _merge_entry(page, sig, keep, first_of, digests, chain)
                    new_of_old[gid] = k
                    if k == len(keep):
                        keep.append(gid)
                        out_buf += page
                _pwrite_all(tfd, bytes(out_buf), at)
                at += len(out_buf)
            keep = np.array(keep, np.int64)
            hout = _layout(npages, ps, keep.size, ws.size, len(manifest))
            assert hout["store_offset"] == header_bytes, (hout["store_offset"], header_bytes)
            pmap = gmap.copy()
            pmap[stored] = (new_of_old[gmap[stored].astype(np.int64) - STORED] + STORED
                            ).astype(MAP_DTYPE)
            _write_tables(tfd, hout, header_bytes, ps, pmap, ws, manifest, gsigs[keep])
        except BaseException:
            _abandon(tfd, tmp)
            raise
        _commit(tfd, tmp, out, durable)
    return inspect(out)


def _merge_entry(page, sig, keep, first_of, digests, chain):
    """compact(): the new entry for contents `page` (signature `sig`, checked): the kept one
    with equal contents, or len(keep) (a new one). Contents with the signature of a kept
    entry are compared by a 128-bit digest (the first kept entry's bytes read again once)."""
    import hashlib
    k = first_of.get(sig)
    if k is None:
        first_of[sig] = len(keep)
        return len(keep)
    by_digest = digests.get(sig)
    if by_digest is None:
        first = chain.read_entries([keep[k]])
        by_digest = digests[sig] = {hashlib.blake2b(first, digest_size=16).digest(): k}
    return by_digest.setdefault(hashlib.blake2b(page, digest_size=16).digest(), len(keep))


def _page_indices(working_set):
    """Page indices given by a caller: integers (a float is an error, not truncated)."""
    from ._errors import InvalidArgumentError
    try:
        ws = np.asarray(working_set)
    except (TypeError, ValueError):
        raise InvalidArgumentError("working_set must be page indices") from None
    if ws.size == 0:
        return np.zeros(0, np.int64)
    if ws.dtype.kind not in "iu":
        raise InvalidArgumentError("working_set must be integer page indices, not %s"
                                   % ws.dtype)
    return ws.astype(np.int64).ravel()


def _in_region(ws, npages):
    from ._errors import InvalidArgumentError
    if ws.size and (ws.min() < 0 or ws.max() >= npages):
        raise InvalidArgumentError("working_set has page indices outside 0..%d" % (npages - 1))
    return ws.astype(np.uint64)


def _copy_entries(src, src_off, dst, dst_off, order, ps, batch=4096):
    """Write old store entries order[0], order[1], ... as new entries 0, 1, ...: runs of
    consecutive old entries are one read; a batch is one write."""
    for b in range(0, order.size, batch):
        sel = order[b:b + batch]
        buf = bytearray(sel.size * ps)
        view = memoryview(buf)
        i = 0
        while i < sel.size:
            j = i + 1
            while j < sel.size and sel[j] == sel[j - 1] + 1:
                j += 1
            done, want = 0, (j - i) * ps
            while done < want:   # a read may return less than asked (2 GiB at most, signals)
                got = os.preadv(src, [view[i * ps + done:j * ps]],
                                src_off + int(sel[i]) * ps + done)
                if got <= 0:
                    raise SnapshotError("snapshot store is shorter than its header says")
                done += got
            i = j
        _pwrite_all(dst, buf, dst_off + b * ps)


def _copy_packed_entries(src, src_off, index, dst, dst_off, order, path, batch=8 << 20):
    """_copy_entries for a compressed store: entry e is index[e]'s length at its offset (the
    lengths before it summed); runs of consecutive old entries are one read, and the new
    entries are written one after the other in batches of about `batch` bytes."""
    lengths = (index & ENTRY_LEN_MASK).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    buf, at, i = bytearray(), dst_off, 0
    while i < order.size:
        j = i + 1
        while j < order.size and order[j] == order[j - 1] + 1 and \
                offsets[order[j] + 1] - offsets[order[i]] <= batch:
            j += 1
        a, b = int(offsets[order[i]]), int(offsets[order[j - 1] + 1])
        chunk = os.pread(src, b - a, src_off + a)
        if len(chunk) != b - a:
            raise SnapshotError("%s: snapshot store is shorter than its header says" % path)
        buf += chunk
        if len(buf) >= batch:
            _pwrite_all(dst, buf, at)
            at += len(buf)
            buf = bytearray()
        i = j
    _pwrite_all(dst, buf, at)


# ---- restore -----------------------------------------------------------------------------

def _check_server_source(answer, server, fd, path, content_id):
    """The server serves this very snapshot: the same file (device, inode) with the same
    contents (its content id: a file written over in place keeps its inode, and the server
    would serve the old layout over the new bytes)."""
    src = answer.get("source", {})
    st = os.fstat(fd)
    if src.get("kind") != "snapshot" or (src.get("dev"), src.get("ino")) != (st.st_dev,
                                                                           st.st_ino):
        raise SnapshotError("%s: the page server at %s serves %s %s, not this snapshot"
                            % (path, os.fspath(server), src.get("kind", "?"),
                               src.get("path", "?")))
    if src.get("header_xxh3") != content_id:
        raise SnapshotError("%s: the page server at %s opened this file when it held other "
                            "contents (it was written over in place since): restart the "
                            "server" % (path, os.fspath(server)))


def _serve_snapshot_from(region, server, fd, path, connected=None):
    """Hand the restored region to a page server, after checking that it serves this file.
    connected: the (socket, answer) of a handshake made already (a shared restore)."""
    region._serve_from(server, empty_unknown=False, _connected=connected)
    _check_server_source(region.server, server, fd, path, region._snapshot[1])


class _ServerPool:
    """A page server's pool, received O_RDONLY at the handshake (docs/shared-pages.md 5.3):
    the region maps its pages; only the server publishes into it. The interface of
    pylazymem._pool.Pool (fd, info, release, forget)."""

    def __init__(self, fd, desc, server_pid):
        self._fd = fd
        self._desc = dict(desc)
        self._server_pid = server_pid

    @property
    def fd(self):
        if self._fd < 0:
            raise ValueError("pool released")
        return self._fd

    def info(self):
        import fcntl
        st = os.fstat(self.fd)
        seals = fcntl.fcntl(self.fd, getattr(fcntl, "F_GET_SEALS", 1034))
        return {"id": self._desc["id"], "role": "server", "slot": -1,
                "sealed": bool(seals & 0x10),   # F_SEAL_FUTURE_WRITE: nobody may write it
                "bytes": st.st_blocks * 512, "inode": st.st_ino,
                "server_pid": self._server_pid}

    def release(self):
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def forget(self):
        self.release()   # after fork(): the child's copy of the fd is its own to close


def _ask_server_pool(region, server, fd, path, h, share):
    """Hand the region's uffd to the page server asking for its pool (5.3); map the pool
    over the region when it comes. Returns ((socket, answer), why-not-shared or "")."""
    from ._binding import check, lib
    from ._errors import SharingUnavailableError
    from ._protocol import connect
    from .server import pool_id

    with region._use() as lm:
        sock, answer = connect(server, lib.lm_region_uffd(lm), [(region.address,
                                                                 region.nbytes, 0)],
                               watches_server=True, share=True)
    # From here the server serves the region's faults (nothing touches it yet): the region
    # owns the connection, so that close() ends the server's client on any failure below.
    region._server_sock, region.server = sock, answer
    pool_fd = answer.pop("pool_fd", None)
    try:
        _check_server_source(answer, server, fd, path, h["header_xxh3"])
        desc = answer.get("pool")
        if desc is None:
            why = answer.get("pool_reason") or ("the page server at %s does not share its "
                                                "pages (started without --share)"
                                                % os.fspath(server))
            if share is True:
                raise SharingUnavailableError("%s: restore(share=True): %s" % (path, why))
            return (sock, answer), why
        want = pool_id(h["header_xxh3"], h["npages"], h["page_size"])
        if (desc.get("id"), desc.get("npages"), desc.get("page_size")) != (
                want, h["npages"], h["page_size"]):
            raise SnapshotError("%s: the page server at %s offers the pool %r, not this "
                                "snapshot's (%s, %d pages)" % (path, os.fspath(server), desc,
                                                               want, h["npages"]))
        with region._use() as lm:
            check(lib.lm_region_share(lm, pool_fd), "restore(server=, share=True)")
        region._pool, pool_fd = _ServerPool(pool_fd, desc, answer.get("server_pid")), None
        return (sock, answer), ""
    finally:
        if pool_fd is not None:
            os.close(pool_fd)


def _memory_total():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_FROM_SERVER = object()


def _share_pool(h, share, server):
    """The pool a shared restore maps, or (None, why) where sharing cannot be had."""
    from ._errors import InvalidArgumentError, LazyMemError
    from ._features import features
    from ._pool import Pool
    from .region import _env_int

    if share not in (False, True, "auto"):
        raise InvalidArgumentError("share must be False, True or 'auto', not %r" % (share,))
    if not share:
        return None, "not asked for (share=False)"
    f = features()
    if not f.shared_pages:
        return None, f.shared_pages_reason
    if server is not None:
        return _FROM_SERVER, ""   # the server's pool, asked for at the handshake
    limit = _env_int("PYLAZYMEM_POOL_MAX_BYTES", _memory_total() // 2)
    try:
        return Pool(h["header_xxh3"], h["npages"], h["page_size"], max(0, limit)), ""
    except LazyMemError as e:
        return None, str(e)


def restore(path, prefetch="working-set", background=None, verify=False, server=None,
            share=False, **region_kw):
    """A new Region holding the snapshot's state, served lazily from the file.

    prefetch: "working-set" loads the saved working set before returning, "all" everything,
    "none" nothing. background: a low-priority thread fills the remaining pages, yielding to
    demand faults (default: on, unless a server serves the region). verify: check every page
    against its signature as it is served; a mismatch poisons the page (the access raises
    SIGBUS) and is counted in stats()["verify_failures"]. server: the socket of a page server
    (`pylazymem serve --snapshot` of this same file) that serves the region's faults; if it
    dies, the region is served from the file here (docs/page-server.md). share: True maps the
    snapshot's pages from a pool shared by this user's processes restoring the same content
    (reads share one copy; a store gives this process its own) or raises
    SharingUnavailableError saying why it cannot; "auto" shares where it can, else restores
    privately (Region.shared says which, Region.share_reason why not); False (default)
    restores privately. Sharing verifies every page it publishes into the pool; with
    verify=True also every page another process published, before it is mapped (one that
    differs is served privately from the file). Every process of this user can write the pool,
    even after that check: share only among processes that trust one another
    (docs/shared-pages.md 2.6). With share and Region's shared_first_touch=False, a pool
    found complete (its filler's background fill completed and sealed it) is left to the
    kernel: pages are mapped 2 MiB at a time (huge pages) at their first touch, no fault
    reaches this process, nothing is prefetched, and the working set of this run is not
    recorded (stats()["pool_kernel_pages"]; docs/shared-pages.md 2.8).
    Other keyword arguments go to Region().
    """
    where = os.fsdecode(path)
    if not (isinstance(where, str) and where.startswith("s3://")):
        return _restore_once(path, prefetch, background, verify, server, share, region_kw)
    from . import objstore
    try:
        return _restore_once(path, prefetch, background, verify, server, share, region_kw)
    except objstore.ManifestChanged as e:
        # pushed again while this restore set up from the kept manifest: once more, with the
        # bucket's new manifest as it was read (nothing asked again: it cannot be stale twice)
        return _restore_once(path, prefetch, background, verify, server, share, region_kw,
                             e.manifest)


def _stamp(fd):
    st = os.fstat(fd)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _unchanged_since(stamps):
    for fd, stamp, where in stamps:
        if _stamp(fd) != stamp:
            _fail(where, "the file changed while it was being restored (written over in "
                  "place?): restore it again once it is complete")


def _restore_once(path, prefetch, background, verify, server, share, region_kw, manifest=None):
    from ._binding import PAGE_SIZE, ffi, lib
    from ._binding import check
    from ._errors import InvalidArgumentError, SharingUnavailableError
    from .region import Region

    if not isinstance(prefetch, str) or prefetch not in PREFETCH_MODES:
        raise InvalidArgumentError("prefetch must be one of %s, not %r"
                                   % (", ".join(PREFETCH_MODES), prefetch))
    if verify and server is not None:
        # The server sends pages as its file holds them, unchecked: a damaged page would reach
        # this region as wrong bytes while verify=True promised SIGBUS.
        raise InvalidArgumentError("restore(verify=True, server=...): a page server does not "
                                   "check the pages it serves against their signatures; "
                                   "restore with verify=True without a server")
    path = os.fsdecode(path)
    remote = None   # restore("s3://bucket/prefix/NAME"): (manifest, S3Config, bucket)
    confirm = None  # ... and whether its kept manifest is current (objstore.open_source)
    if isinstance(path, str) and path.startswith("s3://"):
        if server is not None:
            raise InvalidArgumentError("restore(%r, server=...): a page server serves local "
                                       "files; restore from the object store directly" % path)
        from . import objstore
        m, fd, s3config, bucket, confirm = objstore.open_source(path, manifest)
        remote = (m, s3config, bucket)
    else:
        fd = _open(path)
    chain = None
    try:
        # The file as its tables were checked must be the file the core serves from: a file
        # written over in place (same inode: `cp new old`) between the two was served with the
        # old tables over the new bytes. The core watches for changes from its attach on; up
        # to then, its size and times are compared after the attach (_unchanged_since).
        stamps = [(fd, _stamp(fd), path)] if remote is None else []
        p = _read(fd, path)
        h = p.header
        if h["flags"] & FLAG_PARENT:
            from ._chain import open_chain
            chain = open_chain(path)   # every link checked; its files open until attached
            # The chain opened the leaf again: the same file as read above?
            if chain.content_id != h["header_xxh3"]:
                _fail(path, "the file changed while it was being opened (another snapshot "
                      "is at that path now): restore it again")
            stamps += [(layer.fd, _stamp(layer.fd), layer.path) for layer in chain.layers]
        if h["page_size"] != PAGE_SIZE:
            _fail(path, "written with %d-byte pages, this machine has %d" % (h["page_size"],
                                                                             PAGE_SIZE))
        if background is None:
            background = server is None
        pool, why = _share_pool(h, share, server)
        from_server = pool is _FROM_SERVER
        if from_server:
            pool = None
        if pool is None and share is True and not from_server:
            raise SharingUnavailableError("%s: restore(share=True): %s" % (path, why))
        # A pool sealed (complete: docs/shared-pages.md 2.5) before the region maps it gets
        # no view, so nothing is published into it: the signatures can wait for whoever
        # needs them. Looked at before the region is made: sealed later, it has a view, and
        # what it publishes is verified.
        sealed = pool is not None and pool.info()["sealed"]
        try:
            region = Region(h["npages"] * h["page_size"], _start=server is None, _pool=pool,
                            _verify_shared=bool(verify) and pool is not None,
                            **region_kw)
        except BaseException:
            if pool is not None:
                pool.release()
            raise
        region.share_reason = "" if pool is not None else why
        connected = None
        try:
            if from_server:
                # The server's pool comes in the answer to the handshake that hands it our
                # uffd: mapped before the records are set up and anything touches the region.
                connected, region.share_reason = _ask_server_pool(region, server, fd, path, h,
                                                                  share)
            with region._use() as lm:
                # A shared restore verifies what it publishes: a pool holds only bytes the
                # snapshot's content id (its header checksum) commits to, whoever filled it.
                # (A page server's pool is published by the server only: nothing to verify
                # here beyond what verify= asks.)
                verify_now = bool(verify) or (pool is not None and not sealed)
                table, nstored = p.map, h["nstored"]
                if chain is not None:   # every file of the chain a layer, leaf first
                    layers = ffi.new("struct lm_src_layer[]", len(chain.layers))
                    indexes = []
                    for k, layer in enumerate(chain.layers):
                        lh, lp = layer.parsed.header, layer.parsed
                        idx = ffi.NULL
                        if lp.index is not None:
                            idx = ffi.from_buffer("uint32_t[]", lp.index["raw"])
                            indexes.append(idx)
                        layers[k] = {"fd": layer.fd, "store_offset": lh["store_offset"],
                                     "store_bytes": lh["store_bytes"], "nstored": lh["nstored"],
                                     "index": idx, "sigs_offset": lh["sigs_offset"],
                                     "sigs_xxh3": lh["sigs_xxh3"]}
                    rc = lib.lm_source_attach_layers(lm, layers, len(chain.layers), verify_now)
                    table, nstored = chain.map(), chain.nstored
                elif remote is not None:   # the store in a bucket, the rest in the memfd
                    from . import objstore
                    layer = ffi.new("struct lm_src_layer *", {
                        "fd": fd, "store_offset": h["store_offset"],
                        "store_bytes": h["store_bytes"], "nstored": h["nstored"],
                        "index": (ffi.NULL if p.index is None else
                                  ffi.from_buffer("uint32_t[]", p.index["raw"])),
                        "sigs_offset": h["sigs_offset"], "sigs_xxh3": h["sigs_xxh3"]})
                    objs = objstore.native_store(*remote)
                    rc = lib.lm_source_attach_remote(lm, layer, objs, verify_now)
                    if rc < 0:
                        lib.lm_objs_free(objs)
                elif p.index is None:
                    rc = lib.lm_source_attach(lm, fd, h["store_offset"], h["nstored"],
                                              h["sigs_offset"], h["sigs_xxh3"], verify_now)
                else:   # a compressed store: one layer with its entry index
                    layer = ffi.new("struct lm_src_layer *", {
                        "fd": fd, "store_offset": h["store_offset"],
                        "store_bytes": h["store_bytes"], "nstored": h["nstored"],
                        "index": ffi.from_buffer("uint32_t[]", p.index["raw"]),
                        "sigs_offset": h["sigs_offset"], "sigs_xxh3": h["sigs_xxh3"]})
                    rc = lib.lm_source_attach_layers(lm, layer, 1, verify_now)
                if rc == -errno.EBADMSG:   # verify: the signatures are read now, and damaged
                    _fail(path, ffi.string(lib.lm_last_op()).decode())
                check(rc, "restore")
                _unchanged_since(stamps)
                check(lib.lm_restore_table(lm, ffi.from_buffer("struct lm_snap_page[]", table),
                                           h["npages"], nstored), "restore")
            region._base_table = table   # read by the C core until every record is filled
            # Pages stay as the snapshot has them until written: an incremental checkpoint
            # against it reads only those written (or deferred) after the epoch restarts,
            # once the prefetch below is done.
            region._epoch_id = h["header_xxh3"]
            for name, a in p.manifest["arrays"].items():
                region._arrays[name] = dict(a)
            region._manifest_extra = {k: v for k, v in p.manifest.items()
                                      if k not in ("arrays", "pylazymem", "parent",
                                                   "same_pages_as")}
            region._snapshot = (path, h["header_xxh3"])
            if remote is not None:
                region._set_remote(path)
            region._alloc_next = max([a["offset"] + int(np.prod(a["shape"], dtype=np.int64))
                                      * a["dtype"].itemsize for a in p.manifest["arrays"].values()]
                                     + [0])
            fresh = confirm() if confirm is not None else None
            if fresh is not None:
                # the kept manifest is not current: nothing has been read from the store yet
                # (the region is closed below), and the caller starts again with this one
                raise objstore.ManifestChanged(fresh)
            # A complete pool the kernel serves (Region(shared_first_touch=False) and a pool
            # sealed complete: docs/shared-pages.md 2.8): its blocks are mapped by the kernel
            # at their first touch; a prefetch would take them back (registered), so none.
            # The blocks left registered are filled on demand and by the background fill.
            kernel = pool is not None and region.stats()["pool_kernel_pages"] > 0
            if kernel:
                pass
            elif prefetch == "working-set":
                region.prefetch(p.working_set)
            elif prefetch == "all" and region.shared:
                # The working set first (scattered pages copied privately: faster, and on the
                # critical path), then the rest in address order, published in clusters.
                region.prefetch(p.working_set)
                region.materialize()
            elif prefetch == "all":
                rest = np.setdiff1d(np.arange(h["npages"], dtype=np.uint64), p.working_set,
                                    assume_unique=True)
                region.prefetch(np.concatenate([p.working_set, rest]))
            # Prefetched pages hold the snapshot's contents: the epoch restarts after them.
            region._restart_epoch()
            # The next window starts now. Prefetched pages are present, so touching them will
            # not be seen: they stay in the working set (REAP's policy) unless re-marked.
            region.mark_working_set(inherit=p.working_set if prefetch != "none" else None)
            if server is not None:
                _serve_snapshot_from(region, server, fd, path, connected)
            if background:
                region.background_start()
        except BaseException:
            region.close()
            raise
    finally:
        os.close(fd)
        if chain is not None:
            chain.close()   # the source holds its own duplicates of the files
    return region
