"""Checkpoint and lazy restore with working sets (file format: docs/snapshot-format.md).

checkpoint() writes a region's pages to a content-addressed store (zero and untouched pages take
no bytes, identical pages are stored once) with the working set laid out first; restore() maps a
new region whose pages are deferred updates served from that store, prefetches the working set,
returns, and lets the fault path and a background thread bring in the rest.
"""
import dataclasses
import errno
import glob
import json
import os
import re
import stat
import struct
import tempfile
import threading

import numpy as np
import xxhash

# No compiled code at import: inspect() and page_sources() work without the C core (the
# pure-ctypes backend serves snapshots too). checkpoint() and restore() import it when called.
from ._uffd_errors import LazyMemError

MAGIC = b"PLMSNAP\x00"
VERSION = 2
# magic, version, header_bytes, page_size, flags, then 17 little-endian u64 fields.
_HEADER = struct.Struct("<8sIIII17Q")
_FIELDS = ("npages", "nstored", "nws", "store_offset", "store_bytes", "map_offset", "map_bytes",
           "ws_offset", "ws_bytes", "manifest_offset", "manifest_bytes", "sigs_offset",
           "sigs_bytes", "file_bytes", "tables_xxh3", "sigs_xxh3", "header_xxh3")
# The sections in file order (docs/snapshot-format.md, "Layout").
_SECTIONS = ("store", "map", "ws", "manifest", "sigs")
HEADER_CHECKED = _HEADER.size - 8     # header_xxh3 covers the bytes before it
MAX_MANIFEST = 64 << 20
MAX_PAGES = 1 << 40
MAX_REGION_BYTES = 1 << 46     # 64 TiB: x86-64 user address space is 128 TiB
PREFETCH_MODES = ("working-set", "all", "none")
# Page-map entries (4 bytes, little-endian): untouched, zero, or STORED + store entry.
UNTOUCHED, ZERO, STORED = 0, 1, 2
MAX_STORED = (1 << 32) - STORED
MAP_DTYPE = np.dtype("<u4")
#: The page map decoded, as inspect_tables() returns it: class and store entry per page.
TABLE_DTYPE = np.dtype([("cls", "u1"), ("store", "<u4")])
_xxh3 = xxhash.xxh3_64_intdigest


class SnapshotError(LazyMemError, ValueError):
    """A snapshot file that cannot be used: truncated, corrupt, hostile or from elsewhere."""


@dataclasses.dataclass(frozen=True)
class SnapshotInfo:
    path: str
    version: int
    npages: int
    page_size: int
    pages_by_class: dict      # zero, untouched, unique (distinct stored), duplicate (sharing one)
    stored_bytes: int         # bytes of page contents in the store
    file_bytes: int
    working_set: np.ndarray   # page indices in first-touch order
    arrays: dict              # name -> {"offset", "dtype", "shape"}


@dataclasses.dataclass
class _Parsed:
    header: dict
    map: np.ndarray            # MAP_DTYPE, one entry per page
    working_set: np.ndarray
    manifest: dict
    sigs: np.ndarray = None    # one per store entry, when read


# ---- reading and checking ----------------------------------------------------------------

def _fail(path, what):
    raise SnapshotError("%s: %s" % (path, what))


def _pread_exact(fd, n, offset, path, what):
    """Exactly n bytes at offset, read into one buffer (no intermediate copies)."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        got = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if not got:
            _fail(path, "truncated: %s needs %d bytes at offset %d" % (what, n, offset))
        done += got
    return buf


def _parse_header(raw, path, file_size):
    if len(raw) < _HEADER.size:
        _fail(path, "truncated: %d bytes, a snapshot header needs %d" % (len(raw), _HEADER.size))
    magic, version, header_bytes, page_size, flags, *rest = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        _fail(path, "not a pylazymem snapshot (bad magic %r)" % magic)
    if version == 1:
        _fail(path, "snapshot format version 1 (written by an older pylazymem) is not supported: "
              "this pylazymem reads version %d; re-create the snapshot with this version "
              "(restore it with the pylazymem that wrote it and checkpoint it again)" % VERSION)
    if version != VERSION:
        _fail(path, "snapshot format version %d is not supported (this pylazymem reads %d)"
              % (version, VERSION))
    h = dict(zip(_FIELDS, rest), version=version, header_bytes=header_bytes,
             page_size=page_size, flags=flags)
    if _xxh3(raw[:HEADER_CHECKED]) != h["header_xxh3"]:
        _fail(path, "header checksum mismatch (corrupt header)")
    ps = page_size
    if ps < 4096 or ps > (1 << 21) or ps & (ps - 1):
        _fail(path, "bad page size %d" % ps)
    if flags:
        _fail(path, "unknown header flags 0x%x" % flags)
    if header_bytes < _HEADER.size or header_bytes % ps or header_bytes > (1 << 21):
        _fail(path, "bad header size %d" % header_bytes)
    if any(raw[_HEADER.size:header_bytes]):
        _fail(path, "reserved header bytes are not zero")
    if not 1 <= h["npages"] <= MAX_PAGES:
        _fail(path, "bad page count %d" % h["npages"])
    if h["npages"] * ps > MAX_REGION_BYTES:
        _fail(path, "region of %d bytes is larger than any address space here" % (h["npages"] * ps))
    map_bytes = h["npages"] * MAP_DTYPE.itemsize
    if map_bytes > _memory_bytes() // 4:
        _fail(path, "page map of %d bytes does not fit in this machine's memory" % map_bytes)
    if h["nstored"] > h["npages"] or h["nws"] > h["npages"]:
        _fail(path, "more stored or working-set pages (%d, %d) than pages (%d)"
              % (h["nstored"], h["nws"], h["npages"]))
    if h["nstored"] > MAX_STORED:
        _fail(path, "%d store entries: the page map can name at most %d"
              % (h["nstored"], MAX_STORED))
    sizes = {"store": h["nstored"] * ps, "map": map_bytes, "ws": h["nws"] * 8,
             "sigs": h["nstored"] * 8}
    for name, size in sizes.items():
        if h[name + "_bytes"] != size:
            _fail(path, "%s section is %d bytes, expected %d" % (name, h[name + "_bytes"], size))
    if h["manifest_bytes"] > MAX_MANIFEST:
        _fail(path, "manifest of %d bytes is larger than allowed" % h["manifest_bytes"])
    # The sections follow each other in a fixed order: nothing overlaps, nothing is skipped.
    expect = header_bytes
    for name in _SECTIONS:
        if h[name + "_offset"] != expect:
            _fail(path, "%s section at offset %d, expected %d (overlapping or misplaced)"
                  % (name, h[name + "_offset"], expect))
        expect += h[name + "_bytes"]
    if h["file_bytes"] != expect:
        _fail(path, "header says the file has %d bytes, its sections add up to %d"
              % (h["file_bytes"], expect))
    if file_size != expect:
        _fail(path, "truncated: file has %d bytes, the header says %d" % (file_size, expect)
              if file_size < expect else "file has %d bytes of trailing data"
              % (file_size - expect))
    return h


def _memory_bytes():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def _parse_manifest(raw, h, path):
    try:
        man = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(path, "manifest is not valid JSON: %s" % e)
    if not isinstance(man, dict) or not isinstance(man.get("arrays", {}), dict):
        _fail(path, "manifest must be a JSON object with an 'arrays' object")
    region_bytes = h["npages"] * h["page_size"]
    arrays = {}
    for name, a in man.get("arrays", {}).items():
        try:
            if not isinstance(a, dict):
                raise ValueError("not an object")
            dtype = np.dtype(_descr_from_json(a["dtype"]))
            if not isinstance(a["shape"], list) or len(a["shape"]) > 32:
                raise ValueError("shape must be a list of at most 32 dimensions")
            shape = tuple(_json_int(x, -(1 << 62)) for x in a["shape"])
            offset = _json_int(a["offset"], -(1 << 62))
        except KeyError as e:
            _fail(path, "manifest entry %r is missing the field %s" % (name, e))
        except (TypeError, ValueError, RecursionError, OverflowError, SyntaxError) as e:
            # numpy parses some dtype strings (",f4") with ast.literal_eval: SyntaxError
            _fail(path, "manifest entry %r is malformed: %s" % (name, e))
        if dtype.hasobject:
            _fail(path, "manifest entry %r has an object dtype" % name)
        if dtype.subdtype is not None:
            _fail(path, "manifest entry %r has a sub-array dtype (the writer puts the "
                  "sub-array's shape in 'shape')" % name)
        if dtype.itemsize == 0:
            _fail(path, "manifest entry %r has a zero-size dtype" % name)
        count = 1
        for x in shape:
            if x < 0:
                _fail(path, "manifest entry %r has a negative dimension" % name)
            if x > region_bytes:
                _fail(path, "manifest entry %r has a dimension larger than the region" % name)
            count *= x
        if offset < 0 or offset + count * dtype.itemsize > region_bytes:
            _fail(path, "manifest entry %r lies outside the region" % name)
        arrays[name] = {"offset": offset, "dtype": dtype, "shape": shape}
    man["arrays"] = arrays
    return man


def _descr_from_json(d, depth=0):
    """A dtype descriptor as numpy writes it: a string, or a list of [name, descr] or
    [name, descr, shape] fields (descr itself possibly such a list)."""
    if isinstance(d, str):
        return d
    if not isinstance(d, list) or depth > 8:
        raise ValueError("dtype must be a string or a list of fields (at most 8 deep)")
    fields = []
    for f in d:
        if not isinstance(f, list) or len(f) not in (2, 3):
            raise ValueError("a dtype field must be [name, descr] or [name, descr, shape]")
        name = f[0] if isinstance(f[0], str) else tuple(f[0])
        field = (name, _descr_from_json(f[1], depth + 1))
        if len(f) == 3:
            field += (tuple(_json_int(x) for x in f[2]),)
        fields.append(field)
    return fields


def _json_int(x, lo=0, hi=1 << 62):
    if type(x) is not int or not lo <= x <= hi:
        raise ValueError("expected an integer in [%d, %d], got %r" % (lo, hi, x))
    return x


def _read(fd, path, signatures=False):
    """Read and check everything but the store (and the signatures unless asked for them).
    Raises SnapshotError before anything else."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 4096, 0)
    if len(raw) >= _HEADER.size:   # a header larger than 4 KiB (64 KiB pages)
        hb = _HEADER.unpack_from(raw)[2]
        if 4096 < hb <= (1 << 21):
            raw += os.pread(fd, hb - 4096, 4096)
    h = _parse_header(raw, path, size)
    # map, working set and manifest: one read, one checksum
    tail = _pread_exact(fd, h["sigs_offset"] - h["map_offset"], h["map_offset"], path,
                        "the page map, working set and manifest")
    if _xxh3(tail) != h["tables_xxh3"]:
        _fail(path, "tables checksum mismatch (corrupt page map, working set or manifest)")
    pmap = np.frombuffer(tail, MAP_DTYPE, h["npages"])
    ws = np.frombuffer(tail, "<u8", h["nws"], h["map_bytes"]).astype(np.uint64)
    man = _parse_manifest(bytes(tail[h["map_bytes"] + h["ws_bytes"]:]), h, path)

    core = _core()
    if core is None:
        h["counts"] = _check_map(pmap, h["nstored"], ws, path)
    else:   # the same checks in C, several times faster (restore's time to return)
        ffi, lib = core
        counts = ffi.new("uint64_t[3]")
        if lib.lm_snap_check(ffi.from_buffer("struct lm_snap_page[]", pmap), h["npages"],
                             h["nstored"], ffi.from_buffer("uint64_t[]", ws), ws.size,
                             counts) < 0:
            _fail(path, ffi.string(lib.lm_last_op()).decode())
        h["counts"] = tuple(counts)
    p = _Parsed(h, pmap, ws, man)
    if signatures:
        p.sigs = _read_signatures(fd, h, path)
    return p


def _read_signatures(fd, h, path):
    raw = _pread_exact(fd, h["sigs_bytes"], h["sigs_offset"], path, "the signatures")
    if _xxh3(raw) != h["sigs_xxh3"]:
        _fail(path, "signatures checksum mismatch (corrupt signature section)")
    return np.frombuffer(raw, "<u8")


def _core():
    """(ffi, lib) of the compiled core, or None where it is not built."""
    try:
        from ._binding import ffi, lib
    except ImportError:
        return None
    return ffi, lib


def _check_map(pmap, nstored, ws, path):
    """The page map and working set agree with the store: entries name store entries in
    range, every store entry is used, working-set pages are in range and listed once. Returns
    the (untouched, zero, stored) page counts. (lm_snap_check does the same in C.)"""
    npages = pmap.size
    if ws.size:
        if int(ws.max()) >= npages:
            _fail(path, "working set names a page outside the region")
        in_ws = np.zeros(npages, bool)
        in_ws[ws] = True
        if int(np.count_nonzero(in_ws)) != ws.size:
            _fail(path, "working set lists a page twice")
    if int(pmap.max()) >= nstored + STORED:
        _fail(path, "page map points past the end of the store")
    counts = np.bincount(pmap, minlength=nstored + STORED)
    if not counts[STORED:].all():
        _fail(path, "store has entries no page uses")
    return int(counts[UNTOUCHED]), int(counts[ZERO]), npages - int(counts[:STORED].sum())


def _info(path, p):
    h = p.header
    untouched, zero, stored = h["counts"]
    return SnapshotInfo(
        path=os.fspath(path), version=h["version"], npages=h["npages"],
        page_size=h["page_size"],
        pages_by_class={"zero": zero, "untouched": untouched,
                        "unique": h["nstored"], "duplicate": stored - h["nstored"]},
        stored_bytes=h["store_bytes"], file_bytes=h["file_bytes"],
        working_set=p.working_set.copy(),
        arrays={n: {"offset": a["offset"], "dtype": a["dtype"], "shape": a["shape"]}
                for n, a in p.manifest["arrays"].items()},
    )


def _open(path):
    # O_NONBLOCK: opening a FIFO must not wait for a writer. Regular files ignore it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SnapshotError("%s: no such snapshot file" % path) from None
    except IsADirectoryError:
        raise SnapshotError("%s: is a directory, not a snapshot file" % path) from None
    except OSError as e:
        raise SnapshotError("%s: cannot open: %s" % (path, e.strerror)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError("%s: not a regular file" % path)
    return fd


def inspect(path):
    """Check a snapshot file (every checksum, the signatures' too) and describe it, without
    restoring it."""
    return inspect_tables(path)[0]


def _load(path, signatures=False):
    fd = _open(path)
    try:
        return _read(fd, os.fspath(path), signatures)
    finally:
        os.close(fd)


def inspect_tables(path):
    """(SnapshotInfo, page table) of a checked snapshot file, for tools that draw page maps:
    the table has the class (UNTOUCHED, ZERO, STORED) and store entry of every page."""
    p = _load(path, signatures=True)
    table = np.empty(p.map.size, TABLE_DTYPE)
    table["cls"] = np.minimum(p.map, STORED)
    table["store"] = np.where(p.map >= STORED, p.map - STORED, 0)
    return _info(path, p), table


def page_sources(path):
    """(SnapshotInfo, offsets) of a checked snapshot file, for serving its pages from another
    process: offsets[p] is the file offset of page p's contents (page_size bytes), or -1 for
    a page that reads as zero (zero and untouched pages). Checked as restore() checks a file;
    needs no compiled code."""
    p = _load(path)
    h = p.header
    entry = p.map.astype(np.int64) - STORED
    offsets = np.where(entry >= 0, h["store_offset"] + entry * h["page_size"], -1)
    return _info(path, p), offsets


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
    try:
        ws = np.asarray(working_set, dtype=np.int64).ravel()
    except (TypeError, ValueError):
        raise InvalidArgumentError("working_set must be a sequence of page indices") from None
    if ws.size and (ws.min() < 0 or ws.max() >= region.npages):
        raise InvalidArgumentError("working_set has page indices outside 0..%d"
                                   % (region.npages - 1))
    return ws.astype(np.uint64)


def _sweep_stale_temporaries(path):
    """Temporaries of checkpoints whose process died (kill -9) are removed by the next one."""
    d, base = os.path.split(os.path.abspath(path))
    for tmp in glob.glob(os.path.join(glob.escape(d), ".%s.*.tmp" % glob.escape(base))):
        m = re.match(r"\.%s\.(\d+)\..*\.tmp$" % re.escape(base), os.path.basename(tmp))
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        except PermissionError:
            pass   # another user's live process


def _json_dtype(dtype):
    return np.lib.format.dtype_to_descr(dtype)


def checkpoint(region, path, working_set="auto", progress=None, durable=True):
    """Write the region's state to `path` atomically; returns its SnapshotInfo.

    working_set: "auto" (the current window, Region.working_set()), "none", or page indices
    in the order they should be prefetched. progress: called as progress(done_bytes, total).
    durable: fsync the file and its directory before returning (a crash after return keeps
    the new snapshot). With durable=False the replacement is still atomic (rename), but a
    machine crash soon after may leave the old snapshot or none instead of the new one.
    Checkpoint a quiescent region: stores racing with the checkpoint may or may not be in it.
    """
    from ._binding import ffi, lib
    from ._errors import check

    region._check_open()
    path = os.fspath(path)
    region._prepare_checkpoint()   # records up to date with what a page server filled
    ws = _working_set_arg(region, working_set)
    npages, ps = region.npages, region.page_size
    pmap = np.empty(npages, MAP_DTYPE)
    sigs = np.empty(npages, "<u8")
    store_pages = np.empty(npages, np.uint64)
    nstored_p = ffi.new("uint64_t *")
    c_map = ffi.from_buffer("struct lm_snap_page[]", pmap)
    c_pages = ffi.from_buffer("uint64_t[]", store_pages)

    def plan(compare):
        with region._use() as lm:
            rc = lib.lm_ckpt_plan(lm, ffi.from_buffer("uint64_t[]", ws), ws.size, c_map,
                                  ffi.from_buffer("uint64_t[]", sigs), c_pages, nstored_p,
                                  compare)
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
    ws = _dedup_keep_order(ws, npages)   # as lm_ckpt_plan placed them: first mention wins
    manifest = json.dumps({
        "pylazymem": _version(),
        "arrays": {n: {"offset": a["offset"], "dtype": _json_dtype(a["dtype"]),
                       "shape": list(a["shape"])} for n, a in region._arrays.items()},
    }, sort_keys=True).encode()
    header_bytes = max(4096, ps)

    d, base = os.path.split(os.path.abspath(path))
    _sweep_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".%s.%d." % (base, os.getpid()), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; a snapshot is an ordinary file
        for attempt in (0, 1):
            h = _layout(npages, ps, nstored, ws.size, len(manifest))
            result = []
            checker = None
            if attempt == 0 and nstored:
                checker = threading.Thread(target=compare, args=(result,), daemon=True)
                checker.start()
            try:
                _write_store(region, fd, store_pages, nstored, header_bytes, h["file_bytes"],
                             progress)
            finally:
                if checker is not None:
                    checker.join()
            if not result or result[0] == 0:
                break
            if result[0] < 0:
                check(result[0], "checkpoint: %s" % result[1])
            nstored = plan(True)   # a collision: lay the store out again, comparing
        tail = pmap.tobytes() + ws.astype("<u8").tobytes() + manifest
        sigs_raw = sigs[:nstored].tobytes()
        h["tables_xxh3"] = _xxh3(tail)
        h["sigs_xxh3"] = _xxh3(sigs_raw)
        h["header_xxh3"] = 0
        raw = bytearray(header_bytes)
        _HEADER.pack_into(raw, 0, MAGIC, VERSION, header_bytes, ps, 0, *(h[f] for f in _FIELDS))
        h["header_xxh3"] = _xxh3(bytes(raw[:HEADER_CHECKED]))
        _HEADER.pack_into(raw, 0, MAGIC, VERSION, header_bytes, ps, 0, *(h[f] for f in _FIELDS))
        _pwrite_all(fd, tail + sigs_raw, h["map_offset"])
        _pwrite_all(fd, raw, 0)
        if durable:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        if durable:
            _fsync_dir(d)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if progress is not None:
        progress(h["file_bytes"], h["file_bytes"])
    # What inspect() would say of the file, from what was just written.
    counts = np.bincount(pmap[pmap < STORED], minlength=STORED)
    h.update(version=VERSION, page_size=ps,
             counts=(int(counts[UNTOUCHED]), int(counts[ZERO]),
                     npages - int(counts[UNTOUCHED]) - int(counts[ZERO])))
    return _info(path, _Parsed(h, pmap, ws.astype(np.uint64),
                               _parse_manifest(manifest, h, path)))


def _layout(npages, ps, nstored, nws, manifest_bytes):
    """Header fields of a file with these sections: sizes and offsets, in section order."""
    sizes = {"store": nstored * ps, "map": npages * MAP_DTYPE.itemsize, "ws": nws * 8,
             "manifest": manifest_bytes, "sigs": nstored * 8}
    h = {"npages": npages, "nstored": nstored, "nws": nws}
    offset = max(4096, ps)
    for name in _SECTIONS:
        h[name + "_offset"], h[name + "_bytes"] = offset, sizes[name]
        offset += sizes[name]
    h["file_bytes"] = offset
    return h


def _write_store(region, fd, store_pages, nstored, header_bytes, total, progress):
    from ._binding import ffi, lib
    from ._errors import check

    ps = region.page_size
    chunk = max(1, (64 << 20) // ps)
    with region._use() as lm:
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


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _dedup_keep_order(ws, npages):
    if not ws.size:
        return ws
    seen = np.zeros(npages, bool)
    seen[ws] = True
    if int(np.count_nonzero(seen)) == ws.size:   # the common case, without sorting
        return ws
    _, first = np.unique(ws, return_index=True)
    return ws[np.sort(first)]


def _fsync_dir(d):
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as e:   # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(dfd)


def _version():
    from . import __version__
    return __version__


# ---- restore -----------------------------------------------------------------------------

def _serve_snapshot_from(region, server, fd, path):
    """Hand the restored region to a page server, after checking that it serves this file."""
    region._serve_from(server, empty_unknown=False)
    src = region.server.get("source", {})
    st = os.fstat(fd)
    if src.get("kind") != "snapshot" or (src.get("dev"), src.get("ino")) != (st.st_dev,
                                                                           st.st_ino):
        raise SnapshotError("%s: the page server at %s serves %s %s, not this snapshot"
                            % (path, os.fspath(server), src.get("kind", "?"),
                               src.get("path", "?")))


def restore(path, prefetch="working-set", background=None, verify=False, server=None,
            **region_kw):
    """A new Region holding the snapshot's state, served lazily from the file.

    prefetch: "working-set" loads the saved working set before returning, "all" everything,
    "none" nothing. background: a low-priority thread fills the remaining pages, yielding to
    demand faults (default: on, unless a server serves the region). verify: check every page
    against its signature as it is served; a mismatch poisons the page (the access raises
    SIGBUS) and is counted in stats()["verify_failures"]. server: the socket of a page server
    (`pylazymem serve --snapshot` of this same file) that serves the region's faults; if it
    dies, the region is served from the file here (docs/page-server.md). Other keyword
    arguments go to Region().
    """
    from ._binding import PAGE_SIZE, ffi, lib
    from ._errors import InvalidArgumentError, check
    from .region import Region

    if prefetch not in PREFETCH_MODES:
        raise InvalidArgumentError("prefetch must be one of %s, not %r"
                                   % (", ".join(PREFETCH_MODES), prefetch))
    path = os.fspath(path)
    fd = _open(path)
    try:
        p = _read(fd, path)
        h = p.header
        if h["page_size"] != PAGE_SIZE:
            _fail(path, "written with %d-byte pages, this machine has %d" % (h["page_size"],
                                                                             PAGE_SIZE))
        if background is None:
            background = server is None
        region = Region(h["npages"] * h["page_size"], _start=server is None, **region_kw)
        try:
            with region._use() as lm:
                rc = lib.lm_source_attach(lm, fd, h["store_offset"], h["nstored"],
                                          h["sigs_offset"], h["sigs_xxh3"], bool(verify))
                if rc == -errno.EBADMSG:   # verify: the signatures are read now, and damaged
                    _fail(path, ffi.string(lib.lm_last_op()).decode())
                check(rc, "restore")
                check(lib.lm_restore_table(lm, ffi.from_buffer("struct lm_snap_page[]", p.map),
                                           h["npages"], h["nstored"]), "restore")
            region._base_table = p.map   # read by the C core until every record is filled
            for name, a in p.manifest["arrays"].items():
                region._arrays[name] = dict(a)
            region._alloc_next = max([a["offset"] + int(np.prod(a["shape"], dtype=np.int64))
                                      * a["dtype"].itemsize for a in p.manifest["arrays"].values()]
                                     + [0])
            if prefetch == "working-set":
                region.prefetch(p.working_set)
            elif prefetch == "all":
                rest = np.setdiff1d(np.arange(h["npages"], dtype=np.uint64), p.working_set,
                                    assume_unique=True)
                region.prefetch(np.concatenate([p.working_set, rest]))
            # The next window starts now. Prefetched pages are present, so touching them will
            # not be seen: they stay in the working set (REAP's policy) unless re-marked.
            region.mark_working_set(inherit=p.working_set if prefetch != "none" else None)
            if server is not None:
                _serve_snapshot_from(region, server, fd, path)
            if background:
                region.background_start()
        except BaseException:
            region.close()
            raise
    finally:
        os.close(fd)
    return region
