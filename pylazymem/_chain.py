"""Chains of incremental snapshots: a file written with `checkpoint(..., parent=P)` holds only
the pages that changed since P and names P by its content id (docs/snapshot-format.md,
"Parents and chains"). This module follows a chain from a leaf to its root, checking every
link, and resolves it into what one file would say: a page map over the store entries of all
the files, concatenated leaf first (the order lm_source_attach_layers numbers them), and the
signatures and contents of those entries.

Below snapshot.py (checkpoint, restore, compact) and above _snapfile.py (one file's reader);
needs no compiled code but the codecs of compressed files.
"""
import dataclasses
import os

import numpy as np

from . import _snapfile
from ._snapfile import (
    MAX_STORED_V3,
    PARENT,
    STORED,
    UNTOUCHED,
    ZERO,
    SnapshotError,
    _fail,
    _open,
    _pread_exact,
    _read,
    _read_compressed_entries,
    _read_signatures,
    parent_path,
)

#: The deepest chain a reader follows: a longer one is almost surely a mistake (compact it).
MAX_DEPTH = 64
#: What the tables of a chain's files (page maps, entry indexes, signatures) may take
#: together, times the machine's memory: 4 times the bound of one file's page map
#: (_snapfile._parse_header: memory / 4), which one file's tables never exceed. Without it,
#: 64 files of untouched pages (page maps that are holes in sparse files, no disk at all)
#: would ask 64 times one file's memory of every reader.
CHAIN_TABLES_OF_MEMORY = 1


@dataclasses.dataclass
class Layer:
    path: str
    fd: int
    parsed: object      # _snapfile._Parsed; a parent's page map is dropped once resolved
    base: int           # global id of its first store entry
    named_as: int = 0   # the content id its child names it by (0 for the leaf): its own, or
    #                     one of its same_pages_as (its working set rewritten since)


def _content_ids(parsed):
    """The content ids a file answers to: its own (header_xxh3), and those of the earlier
    versions of it whose pages were all the same (manifest "same_pages_as", checked by the
    reader: rewrite_working_set() changes the id, never a page)."""
    return frozenset([parsed.header["header_xxh3"], *parsed.manifest.get("same_pages_as", ())])


class Chain:
    """An open chain, leaf first. Owns the files' descriptors until close()."""

    def __init__(self, layers, resolved=None):
        self.layers = layers
        self._map = resolved
        self._sigs = None

    @property
    def leaf(self):
        return self.layers[0].parsed

    @property
    def content_id(self):
        return self.leaf.header["header_xxh3"]

    @property
    def content_ids(self):
        """The leaf's content id and those of its earlier versions with the same pages
        (same_pages_as): a child taken from any of them is a child of this chain."""
        return _content_ids(self.leaf)

    @property
    def nstored(self):
        """Store entries of every file together (the global id space)."""
        last = self.layers[-1]
        return last.base + last.parsed.header["nstored"]

    def map(self):
        """The resolved page map: UNTOUCHED, ZERO or STORED + global entry id per page (u32,
        little-endian, as lm_restore_table reads it). Resolved by open_chain as it reads the
        files (_resolve), so that no parent's page map is kept."""
        return self._map

    def signatures(self):
        """Signatures of every store entry, in global order (each file's section checked)."""
        if self._sigs is None:
            self._sigs = np.concatenate([
                layer.parsed.sigs if layer.parsed.sigs is not None
                else _read_signatures(layer.fd, layer.parsed.header, layer.path)
                for layer in self.layers]).astype(np.uint64)
        return self._sigs

    def page_classes(self):
        """(cls, sig) per page: cls UNTOUCHED, ZERO or STORED (u8), sig the stored page's
        signature (0 for the others): what a child checkpoint compares its pages with."""
        m = self.map()
        cls = np.minimum(m, STORED).astype(np.uint8)
        sig = np.zeros(m.size, np.uint64)
        stored = m >= STORED
        sig[stored] = self.signatures()[m[stored].astype(np.int64) - STORED]
        return cls, sig

    def read_entries(self, ids):
        """The contents of global store entries `ids` (page_size bytes each, decompressed),
        as one bytes object in the order given."""
        ids = np.asarray(ids, np.int64)
        ps = self.leaf.header["page_size"]
        out = np.empty((ids.size, ps), np.uint8)
        bases = np.array([layer.base for layer in self.layers], np.int64)
        which = np.searchsorted(bases, ids, side="right") - 1
        for k, layer in enumerate(self.layers):
            sel = np.flatnonzero(which == k)
            if sel.size:
                data = _read_store_entries(layer.fd, layer.parsed, ids[sel] - layer.base,
                                           layer.path)
                out[sel] = np.frombuffer(data, np.uint8).reshape(sel.size, ps)
        return out.tobytes()

    def read_pages(self, pages):
        """The contents of region pages `pages` as the chain restores them (zero for zero and
        untouched pages), one bytes object."""
        pages = np.asarray(pages, np.int64)
        ps = self.leaf.header["page_size"]
        m = self.map()[pages]
        out = np.zeros((pages.size, ps), np.uint8)
        stored = np.flatnonzero(m >= STORED)
        if stored.size:
            data = self.read_entries(m[stored].astype(np.int64) - STORED)
            out[stored] = np.frombuffer(data, np.uint8).reshape(stored.size, ps)
        return out.tobytes()

    def locations(self):
        """Where each region page's bytes are, for a reader in another process (the page
        server): (offsets, codes, layers, sigs) per page. offsets[p] is the file offset of its
        store entry in file layers[p] (an index into self.layers), or -1 for a page that reads
        as zero; codes[p] its entry word (length | codec << 28, as the version 3 index; a raw
        page: page_size); sigs[p] its signature."""
        m = self.map()
        ps = self.leaf.header["page_size"]
        offsets = np.full(m.size, -1, np.int64)
        codes = np.zeros(m.size, np.uint32)
        layers = np.zeros(m.size, np.uint8)
        sigs = np.zeros(m.size, np.uint64)
        stored = np.flatnonzero(m >= STORED)
        gid = m[stored].astype(np.int64) - STORED
        sigs[stored] = self.signatures()[gid]
        bases = np.array([layer.base for layer in self.layers], np.int64)
        which = np.searchsorted(bases, gid, side="right") - 1
        for k, layer in enumerate(self.layers):
            sel = which == k
            e = gid[sel] - layer.base
            h, idx = layer.parsed.header, layer.parsed.index
            if idx is None:
                offsets[stored[sel]] = h["store_offset"] + e * ps
                codes[stored[sel]] = ps
            else:
                offsets[stored[sel]] = h["store_offset"] + idx["offsets"][e].astype(np.int64)
                codes[stored[sel]] = idx["raw"][e]
            layers[stored[sel]] = k
        return offsets, codes, layers, sigs

    def describe(self):
        """One dict per file, leaf first: path, content id, pages it stores, bytes, and the
        content id its child names it by ("named_as"; None for the leaf): another than "id"
        where its working set was rewritten since the child was taken (same_pages_as)."""
        # the counts are the reader's (_read), taken before a parent's page map was dropped
        return [{"path": layer.path, "id": "%016x" % layer.parsed.header["header_xxh3"],
                 "named_as": "%016x" % layer.named_as if layer.named_as else None,
                 "stored_pages": int(layer.parsed.header["counts"][2]),
                 "parent_pages": int(layer.parsed.header["parent_pages"]),
                 "file_bytes": layer.parsed.header["file_bytes"]}
                for layer in self.layers]

    def close(self):
        for layer in self.layers:
            if layer.fd >= 0:
                os.close(layer.fd)
                layer.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_chain(path, signatures=False):
    """Open the snapshot at `path` and every parent it names, checking each link: the parent
    exists, its content id is the one the child was taken from (or an earlier version's with
    the same pages: same_pages_as), it has the child's shape, the chain has no cycle, is at
    most MAX_DEPTH files and its tables fit the machine's memory (CHAIN_TABLES_OF_MEMORY).
    SnapshotError names the file and the parent at fault. The page map is resolved as the
    files are read; a parent's own page map is not kept."""
    path = os.fsdecode(path)
    layers = []
    try:
        return _open_chain(path, signatures, layers)
    except MemoryError:
        # what the bound lets in may still not fit (other memory in use, RLIMIT_AS)
        Chain(layers).close()
        raise SnapshotError("%s: not enough memory to read the tables of its chain (%d files "
                            "read)" % (path, len(layers))) from None
    except BaseException:
        Chain(layers).close()
        raise


def _open_chain(path, signatures, layers):
    seen = set()
    budget = _snapfile._memory_bytes() * CHAIN_TABLES_OF_MEMORY
    held = [0]

    def bound(what):
        def check(h):
            # tables the reader holds (signatures: also those read later), before any is read
            held[0] += h["map_bytes"] + h["index_bytes"] + h["sigs_bytes"]
            if held[0] > budget:
                _link_fail(path, "the tables of its chain (page maps, entry indexes, "
                           "signatures) come to more than this machine's memory allows (%d "
                           "bytes) with %s (file %d of the chain): too many files of too large "
                           "a region to read here" % (budget, what, len(layers)))
        return check

    fd = _open(path)
    layers.append(Layer(path, fd, None, 0))
    seen.add(_identity(fd))
    layers[0].parsed = _read(fd, path, signatures, bound(path))
    resolved = layers[0].parsed.map.astype("<u4")   # the leaf's entries are 0.. (base 0)
    while layers[-1].parsed.header.get("parent_id"):
        child = layers[-1]
        ch = child.parsed.header
        if len(layers) >= MAX_DEPTH:
            _fail(path, "chain of parents deeper than %d files (compact it: pylazymem "
                  "compact)" % MAX_DEPTH)
        ppath = parent_path(child.path, child.parsed)
        what = "%s names its parent %s, which" % (child.path, ppath)
        try:
            fd = _open(ppath, "parent snapshot")
        except Exception as e:
            _fail(path, "%s cannot be opened (%s)" % (what, _reason(e, ppath)))
        layer = Layer(ppath, fd, None, child.base + ch["nstored"], ch["parent_id"])
        layers.append(layer)
        if _identity(fd) in seen:
            _fail(path, "%s is already in the chain (a cycle)" % what)
        seen.add(_identity(fd))
        check_size = bound(ppath)

        def check(ph):
            # the shape before the tables are read (a parent's map may be large); a file of
            # another shape is no version of the parent: if its id differs, it was replaced
            if (ph["npages"], ph["page_size"]) != (ch["npages"], ch["page_size"]):
                if ph["header_xxh3"] != ch["parent_id"]:
                    _link_fail(path, _replaced(what, ph, ch, child))
                _link_fail(path, "%s holds %d pages of %d bytes, the child %d of %d"
                           % (what, ph["npages"], ph["page_size"], ch["npages"],
                              ch["page_size"]))
            check_size(ph)
        try:
            layer.parsed = _read(fd, ppath, signatures, check)
        except SnapshotError as e:
            if getattr(e, "chain_link", False):   # ours (check), not about the parent's file
                raise
            _fail(path, "%s is not a usable snapshot (%s)" % (what, _reason(e, ppath)))
        ph = layer.parsed.header
        if ch["parent_id"] not in _content_ids(layer.parsed):
            _fail(path, _replaced(what, ph, ch, child))
        if layer.base + ph["nstored"] > MAX_STORED_V3:
            _fail(path, "the chain stores %d entries together, more than a page map can name"
                  % (layer.base + ph["nstored"]))
        _resolve(resolved, layer)
    return Chain(layers, resolved)   # the root has no PARENT page left (_read refuses it)


def _resolve(resolved, layer):
    """Give the pages of `resolved` still left to a parent (PARENT) what `layer`, that
    parent, says of them (its entries numbered from layer.base), then drop the layer's page
    map: a chain holds the resolved map and the leaf's, not one per file."""
    p = layer.parsed
    inherit = resolved == PARENT
    if inherit.any():
        m = p.map[inherit]
        stored = (m >= STORED) & (m != PARENT)
        m[stored] += np.uint32(layer.base)   # below PARENT: the sum was checked
        resolved[inherit] = m
    p.map = None
    if p.index is not None:   # a view of the tables' buffer, which would keep it (and the map)
        p.index["raw"] = p.index["raw"].copy()


def _replaced(what, ph, ch, child):
    return ("%s has content id %016x, not %016x: it was replaced or changed since %s was "
            "taken from it" % (what, ph["header_xxh3"], ch["parent_id"], child.path))


def _link_fail(path, what):
    """SnapshotError about the chain of `path` raised from inside the reader of a parent
    (_read's check_header), marked so that it is not taken for a fault of the parent's file."""
    e = SnapshotError("%s: %s" % (path, what))
    e.chain_link = True
    raise e


def _identity(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _reason(e, ppath):
    """An error about the parent, without repeating its path."""
    s = str(e)
    return s[len(ppath) + 2:] if s.startswith(ppath + ": ") else s


def _read_store_entries(fd, parsed, ids, path):
    """Contents of store entries `ids` of one file, page_size bytes each, in the order given.
    Runs of consecutive entries are read with one pread."""
    h = parsed.header
    ps = h["page_size"]
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= h["nstored"]):
        _fail(path, "store entry out of range")
    if getattr(parsed, "index", None) is not None:
        return _read_compressed_entries(fd, parsed, ids, path)
    out = bytearray(ids.size * ps)
    view = memoryview(out)
    i = 0
    while i < ids.size:
        j = i + 1
        while j < ids.size and ids[j] == ids[j - 1] + 1 and j - i < 1024:
            j += 1
        view[i * ps:j * ps] = _pread_exact(fd, (j - i) * ps, h["store_offset"] + int(ids[i]) * ps,
                                           path, "store entries")
        i = j
    return out


__all__ = ["Chain", "Layer", "MAX_DEPTH", "open_chain", "parent_path", "UNTOUCHED", "ZERO"]
