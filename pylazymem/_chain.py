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

from ._snapfile import (
    MAX_STORED_V3,
    PARENT,
    STORED,
    UNTOUCHED,
    ZERO,
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


@dataclasses.dataclass
class Layer:
    path: str
    fd: int
    parsed: object      # _snapfile._Parsed
    base: int           # global id of its first store entry


class Chain:
    """An open chain, leaf first. Owns the files' descriptors until close()."""

    def __init__(self, layers):
        self.layers = layers
        self._map = None
        self._sigs = None

    @property
    def leaf(self):
        return self.layers[0].parsed

    @property
    def content_id(self):
        return self.leaf.header["header_xxh3"]

    @property
    def nstored(self):
        """Store entries of every file together (the global id space)."""
        last = self.layers[-1]
        return last.base + last.parsed.header["nstored"]

    def map(self):
        """The resolved page map: UNTOUCHED, ZERO or STORED + global entry id per page (u32,
        little-endian, as lm_restore_table reads it)."""
        if self._map is None:
            resolved = None
            for layer in reversed(self.layers):     # root first: each child overrides it
                m = layer.parsed.map
                out = m.astype(np.uint32)
                stored = (m >= STORED) & (m != PARENT)
                out[stored] += np.uint32(layer.base)
                inherit = m == PARENT
                if inherit.any():
                    out[inherit] = resolved[inherit]   # the reader let PARENT in only with a parent
                resolved = out
            self._map = resolved.astype("<u4")
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
        """One dict per file, leaf first: path, content id, pages it stores, bytes."""
        return [{"path": layer.path, "id": "%016x" % layer.parsed.header["header_xxh3"],
                 "stored_pages": int(np.count_nonzero((layer.parsed.map >= STORED)
                                                      & (layer.parsed.map != PARENT))),
                 "parent_pages": int(np.count_nonzero(layer.parsed.map == PARENT)),
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
    exists, its content id is the one the child was taken from, it has the child's shape, the
    chain has no cycle and is at most MAX_DEPTH files. SnapshotError names the file and the
    parent at fault."""
    path = os.fspath(path)
    layers = []
    seen = set()
    try:
        fd = _open(path)
        layers.append(Layer(path, fd, _read(fd, path, signatures), 0))
        seen.add(_identity(fd))
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
            layer = Layer(ppath, fd, None, 0)
            layers.append(layer)
            if _identity(fd) in seen:
                _fail(path, "%s is already in the chain (a cycle)" % what)
            seen.add(_identity(fd))
            try:
                layer.parsed = _read(fd, ppath, signatures)
            except Exception as e:
                _fail(path, "%s is not a usable snapshot (%s)" % (what, _reason(e, ppath)))
            ph = layer.parsed.header
            if ph["header_xxh3"] != ch["parent_id"]:
                _fail(path, "%s has content id %016x, not %016x: it was replaced or changed "
                      "since %s was taken from it" % (what, ph["header_xxh3"], ch["parent_id"],
                                                      child.path))
            if (ph["npages"], ph["page_size"]) != (ch["npages"], ch["page_size"]):
                _fail(path, "%s holds %d pages of %d bytes, the child %d of %d"
                      % (what, ph["npages"], ph["page_size"], ch["npages"], ch["page_size"]))
            layer.base = child.base + ch["nstored"]
        chain = Chain(layers)
        if chain.nstored > MAX_STORED_V3:
            _fail(path, "the chain stores %d entries together, more than a page map can name"
                  % chain.nstored)
        return chain
    except BaseException:
        Chain(layers).close()
        raise


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
