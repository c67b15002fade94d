"""The snapshot file reader: the format's constants, every check of a file, inspect() and
page_sources() (file format: docs/snapshot-format.md).

No compiled code is needed here (the C core's lm_snap_check is used where it is loaded, for
speed): inspect() and page_sources() work under the pure-ctypes backend, and the page server
(pylazymem.server) serves snapshots from this reader. checkpoint() and restore() live in
pylazymem.snapshot, above this module and the region.
"""
import dataclasses
import json
import os
import stat
import struct

import numpy as np
import xxhash

from ._meta import SNAP_PARENT
from ._uffd_errors import LazyMemError, SnapshotError  # noqa: F401  (re-exported)

MAGIC = b"PLMSNAP\x00"
VERSION = 2       # what a plain snapshot is written as
VERSION_3 = 3     # a snapshot with a parent or compressed entries
# magic, version, header_bytes, page_size, flags, then 17 little-endian u64 fields.
_HEADER = struct.Struct("<8sIIII17Q")
_FIELDS = ("npages", "nstored", "nws", "store_offset", "store_bytes", "map_offset", "map_bytes",
           "ws_offset", "ws_bytes", "manifest_offset", "manifest_bytes", "sigs_offset",
           "sigs_bytes", "file_bytes", "tables_xxh3", "sigs_xxh3", "header_xxh3")
# The sections in file order (docs/snapshot-format.md, "Layout").
_SECTIONS = ("store", "map", "ws", "manifest", "sigs")
HEADER_CHECKED = _HEADER.size - 8     # header_xxh3 covers the bytes before it
# Version 3: an entry index after the store, and the parent's content id.
_HEADER_V3 = struct.Struct("<8sIIII20Q")
_FIELDS_V3 = ("npages", "nstored", "nws", "store_offset", "store_bytes", "index_offset",
              "index_bytes", "map_offset", "map_bytes", "ws_offset", "ws_bytes",
              "manifest_offset", "manifest_bytes", "sigs_offset", "sigs_bytes", "file_bytes",
              "parent_id", "tables_xxh3", "sigs_xxh3", "header_xxh3")
_SECTIONS_V3 = ("store", "index", "map", "ws", "manifest", "sigs")
HEADER_CHECKED_V3 = _HEADER_V3.size - 8
FLAG_COMPRESSED = 1   # the entry index is there: entries have their own lengths and codecs
FLAG_PARENT = 2       # pages may be PARENT: as the parent (parent_id, manifest "parent")
PARENT = SNAP_PARENT  # page-map value: "as the parent's page of the same index"
MAX_STORED_V3 = (1 << 32) - 3   # STORED + i must stay below PARENT
#: Codecs of store entries (index word bits 28..31; csrc/lazymem.h enum lm_codec).
CODECS = {"raw": 0, "zstd": 1, "lz4": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
ENTRY_LEN_MASK = (1 << 28) - 1
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
#: inspect_tables() class of a page left to the parent (page map PARENT): UNTOUCHED, ZERO and
#: STORED are the page map's own values, this one has no store entry of this file.
TABLE_PARENT = 3
_xxh3 = xxhash.xxh3_64_intdigest




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
    # An incremental snapshot's parent: {"path": where it is looked for, "id": its content id
    # (hex), "pages": pages of this file left to it}; None for a file that needs no parent.
    parent: dict = None
    # Compressed stores (flag COMPRESSED): stored_bytes is what the store takes in the file,
    # raw_bytes what its entries hold (nstored pages); codecs counts the entries per codec.
    raw_bytes: int = 0
    compressed: bool = False
    codecs: dict = dataclasses.field(default_factory=dict)
    flags: int = 0


@dataclasses.dataclass
class _Parsed:
    header: dict
    map: np.ndarray            # MAP_DTYPE, one entry per page
    working_set: np.ndarray
    manifest: dict
    sigs: np.ndarray = None    # one per store entry, when read
    index: dict = None         # a compressed store's entry index (_check_index)


# ---- reading and checking ----------------------------------------------------------------

def _fail(path, what):
    raise SnapshotError("%s: %s" % (path, what))


def _read_failed(path, what, offset, e):
    """SnapshotError for a read that failed (EIO of a bad disk, a file that refuses pread):
    names the file and what was being read, the OSError (errno) kept as its __cause__."""
    raise SnapshotError("%s: cannot read: %s (%s at offset %d)"
                        % (path, e.strerror or e, what, offset)) from e


def _pread(fd, n, offset, path, what):
    """os.pread, with a failure a SnapshotError naming the file (_read_failed)."""
    try:
        return os.pread(fd, n, offset)
    except OSError as e:
        _read_failed(path, what, offset, e)


def _pread_exact(fd, n, offset, path, what):
    """Exactly n bytes at offset, read into one buffer (no intermediate copies)."""
    buf = bytearray(n)
    view, done = memoryview(buf), 0
    while done < n:
        try:
            got = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        except OSError as e:
            _read_failed(path, what, offset + done, e)
        if not got:
            _fail(path, "truncated: %s needs %d bytes at offset %d" % (what, n, offset))
        done += got
    return buf


def _header_struct(version):
    """(struct, field names, sections, bytes the header checksum covers) of a version."""
    if version == VERSION_3:
        return _HEADER_V3, _FIELDS_V3, _SECTIONS_V3, HEADER_CHECKED_V3
    return _HEADER, _FIELDS, _SECTIONS, HEADER_CHECKED


def _parse_header(raw, path, file_size):
    if len(raw) < _HEADER.size:
        _fail(path, "truncated: %d bytes, a snapshot header needs %d" % (len(raw), _HEADER.size))
    magic, version = struct.unpack_from("<8sI", raw)
    if magic != MAGIC:
        _fail(path, "not a pylazymem snapshot (bad magic %r)" % magic)
    if version == 1:
        _fail(path, "snapshot format version 1 (written by an older pylazymem) is not supported: "
              "this pylazymem reads version %d; re-create the snapshot with this version "
              "(restore it with the pylazymem that wrote it and checkpoint it again)" % VERSION)
    if version not in (VERSION, VERSION_3):
        _fail(path, "snapshot format version %d is not supported (this pylazymem reads %d and %d)"
              % (version, VERSION, VERSION_3))
    hs, fields, sections, checked = _header_struct(version)
    if len(raw) < hs.size:
        _fail(path, "truncated: %d bytes, a snapshot header needs %d" % (len(raw), hs.size))
    _, _, header_bytes, page_size, flags, *rest = hs.unpack_from(raw)
    h = dict(zip(fields, rest), version=version, header_bytes=header_bytes,
             page_size=page_size, flags=flags)
    h.setdefault("parent_id", 0)
    h.setdefault("index_bytes", 0)
    if _xxh3(raw[:checked]) != h["header_xxh3"]:
        _fail(path, "header checksum mismatch (corrupt header)")
    ps = page_size
    if ps < 4096 or ps > (1 << 21) or ps & (ps - 1):
        _fail(path, "bad page size %d" % ps)
    if flags & ~((FLAG_COMPRESSED | FLAG_PARENT) if version == VERSION_3 else 0):
        _fail(path, "unknown header flags 0x%x" % flags)
    if bool(flags & FLAG_PARENT) != bool(h["parent_id"]):
        _fail(path, "the parent flag and the parent's content id disagree")
    if header_bytes < hs.size or header_bytes % ps or header_bytes > (1 << 21):
        _fail(path, "bad header size %d" % header_bytes)
    if any(raw[hs.size:header_bytes]):
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
    most = MAX_STORED_V3 if version == VERSION_3 else MAX_STORED
    if h["nstored"] > most:
        _fail(path, "%d store entries: the page map can name at most %d" % (h["nstored"], most))
    sizes = {"store": h["nstored"] * ps, "map": map_bytes, "ws": h["nws"] * 8,
             "sigs": h["nstored"] * 8}
    if version == VERSION_3:
        compressed = bool(flags & FLAG_COMPRESSED)
        sizes["index"] = h["nstored"] * 4 if compressed else 0
        if compressed:   # entries have their own lengths: the index's sum is checked at read
            del sizes["store"]
            if not h["nstored"] <= h["store_bytes"] <= h["nstored"] * ps:
                # each entry takes 1 to page_size bytes (the index says which: checked with it)
                _fail(path, "compressed store of %d bytes, outside %d..%d for its %d entries"
                      % (h["store_bytes"], h["nstored"], h["nstored"] * ps, h["nstored"]))
    for name, size in sizes.items():
        if h[name + "_bytes"] != size:
            _fail(path, "%s section is %d bytes, expected %d" % (name, h[name + "_bytes"], size))
    if h["manifest_bytes"] > MAX_MANIFEST:
        _fail(path, "manifest of %d bytes is larger than allowed" % h["manifest_bytes"])
    # The sections follow each other in a fixed order: nothing overlaps, nothing is skipped.
    expect = header_bytes
    for name in sections:
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


MAX_DIMS = 64          # numpy's limit (NPY_MAXDIMS of numpy 2)
MAX_EXTENT = 1 << 62   # bytes an array's shape may span, zero dimensions counted as 1


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
            # descr_to_dtype, as np.load reads a header: padding of an aligned structure
            # ("" fields) becomes offsets again, not fields named f1, f2...
            dtype = np.lib.format.descr_to_dtype(_descr_from_json(a["dtype"]))
            if not isinstance(a["shape"], list) or len(a["shape"]) > MAX_DIMS:
                raise ValueError("shape must be a list of at most %d dimensions" % MAX_DIMS)
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
        count, extent = 1, dtype.itemsize
        for x in shape:
            if x < 0:
                _fail(path, "manifest entry %r has a negative dimension" % name)
            count *= x
            extent *= max(x, 1)
        # A zero dimension makes the data size 0, but numpy still refuses a shape whose other
        # dimensions multiply past its index range: checked as _foreign checks its headers.
        if extent > MAX_EXTENT:
            _fail(path, "manifest entry %r: shape %.100r is beyond what an array can index"
                  % (name, shape))
        if offset < 0 or offset + count * dtype.itemsize > region_bytes:
            _fail(path, "manifest entry %r lies outside the region" % name)
        arrays[name] = {"offset": offset, "dtype": dtype, "shape": shape}
    man["arrays"] = arrays
    if "same_pages_as" in man:
        man["same_pages_as"] = _same_pages_as(man["same_pages_as"], path)
    return man


MAX_SAME_PAGES_AS = 64


def _same_pages_as(ids, path):
    """The manifest's "same_pages_as": content ids of earlier versions of this file whose
    every page held what this one holds (a working set rewritten, docs/snapshot-format.md):
    a child taken from one of them still has its parent in this file (_chain.open_chain)."""
    if not isinstance(ids, list) or len(ids) > MAX_SAME_PAGES_AS or not all(
            type(x) is int and 1 <= x < (1 << 64) for x in ids):
        _fail(path, "manifest 'same_pages_as' must be a list of at most %d content ids "
              "(integers 1 to 2**64 - 1)" % MAX_SAME_PAGES_AS)
    return list(ids)


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


def _read(fd, path, signatures=False, check_header=None):
    """Read and check everything but the store (and the signatures unless asked for them).
    Raises SnapshotError before anything else. check_header: called with the checked header
    before the tables are read (open_chain: its checks of a parent and its memory bound)."""
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        raise SnapshotError("%s: cannot read: %s" % (path, e.strerror or e)) from e
    raw = _pread(fd, 4096, 0, path, "the header")
    if len(raw) >= _HEADER.size:   # a header larger than 4 KiB (64 KiB pages)
        hb = _HEADER.unpack_from(raw)[2]
        if 4096 < hb <= (1 << 21):
            raw += _pread(fd, hb - 4096, 4096, path, "the header")
    h = _parse_header(raw, path, size)
    if check_header is not None:
        check_header(h)
    # (entry index,) map, working set and manifest: one read, one checksum
    first = h["index_offset"] if h["version"] == VERSION_3 else h["map_offset"]
    tail = _pread_exact(fd, h["sigs_offset"] - first, first, path,
                        "the page map, working set and manifest")
    if _xxh3(tail) != h["tables_xxh3"]:
        _fail(path, "tables checksum mismatch (corrupt %spage map, working set or manifest)"
              % ("entry index, " if h["index_bytes"] else ""))
    at = h["index_bytes"]
    pmap = np.frombuffer(tail, MAP_DTYPE, h["npages"], at)
    ws = np.frombuffer(tail, "<u8", h["nws"], at + h["map_bytes"]).astype(np.uint64)
    man = _parse_manifest(bytes(tail[at + h["map_bytes"] + h["ws_bytes"]:]), h, path)
    index = None
    if h["index_bytes"]:
        index = _check_index(np.frombuffer(tail, "<u4", h["nstored"]), h, path)
    checked = pmap
    parent_pages = 0
    if not h["flags"] & FLAG_PARENT and "parent" in man:
        # a writer that keeps unknown manifest keys must not carry a link into a file that
        # does not say it has a parent
        _fail(path, "manifest names a parent, the header has no PARENT flag")
    if h["flags"] & FLAG_PARENT:
        _check_parent_ref(man, path)
        inherit = pmap == PARENT
        parent_pages = int(np.count_nonzero(inherit))
        if parent_pages:   # checked as untouched pages (which take no entry either)
            checked = np.where(inherit, UNTOUCHED, pmap).astype(MAP_DTYPE)

    core = _core()
    if core is None:
        counts = _check_map(checked, h["nstored"], ws, path)
    else:   # the same checks in C, several times faster (restore's time to return)
        ffi, lib = core
        c = ffi.new("uint64_t[3]")
        if lib.lm_snap_check(ffi.from_buffer("struct lm_snap_page[]", checked), h["npages"],
                             h["nstored"], ffi.from_buffer("uint64_t[]", ws), ws.size, c) < 0:
            _fail(path, ffi.string(lib.lm_last_op()).decode())
        counts = tuple(c)
    h["counts"] = (counts[0] - parent_pages, counts[1], counts[2])
    h["parent_pages"] = parent_pages
    p = _Parsed(h, pmap, ws, man)
    p.index = index
    if signatures:
        p.sigs = _read_signatures(fd, h, path)
    return p


def _check_parent_ref(man, path):
    parent = man.get("parent")
    if not isinstance(parent, dict) or not isinstance(parent.get("path"), str) \
            or not parent["path"] or "\0" in parent["path"]:
        _fail(path, "a snapshot with a parent must name it: manifest 'parent' {'path': ...}")


def _check_index(index, h, path):
    """The entry index of a compressed store (docs/snapshot-format.md, "Entry index"): every
    word names a known codec and a length it allows (raw: one page; zstd, LZ4: 1 to
    page_size - 1 bytes), and the lengths add up to the store section. Returns it with each
    entry's length, codec and offset in the store, and the entries per codec name."""
    ps = h["page_size"]
    lengths = (index & ENTRY_LEN_MASK).astype(np.int64)
    codecs = index >> 28
    bad = ~np.isin(codecs, list(CODEC_NAMES))
    if bad.any():
        e = int(np.flatnonzero(bad)[0])
        _fail(path, "entry index: entry %d has unknown codec %d" % (e, int(codecs[e])))
    raw = codecs == CODECS["raw"]
    bad = np.where(raw, lengths != ps, (lengths < 1) | (lengths >= ps))
    if bad.any():
        e = int(np.flatnonzero(bad)[0])
        _fail(path, "entry index: entry %d (%s) has length %d, allowed: %s"
              % (e, CODEC_NAMES[int(codecs[e])], int(lengths[e]),
                 "the page size (%d)" % ps if raw[e] else "1 to %d" % (ps - 1)))
    offsets = np.zeros(index.size + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if int(offsets[-1]) != h["store_bytes"]:
        _fail(path, "entry index: entries add up to %d bytes, the store is %d"
              % (int(offsets[-1]), h["store_bytes"]))
    n = np.bincount(codecs, minlength=len(CODEC_NAMES))
    return {"raw": index, "lengths": lengths, "codecs": codecs, "offsets": offsets[:-1],
            "counts": {CODEC_NAMES[c]: int(n[c]) for c in sorted(CODEC_NAMES) if n[c]}}


def _read_compressed_entries(fd, parsed, ids, path):
    """Contents of store entries `ids` of a compressed file, page_size bytes each, in the
    order given (compact(), Python readers): each entry read and decoded by the core
    (lm_unpack_entry: checked lengths and codec, exactly one page), then checked against its
    signature, as restore checks them. Needs the compiled core (it links the codecs)."""
    h, idx = parsed.header, parsed.index
    ps = h["page_size"]
    core = _core()
    if core is None:
        _fail(path, "reading a compressed store needs the compiled core (its codecs)")
    ffi, lib = core
    sigs = parsed.sigs if parsed.sigs is not None else _read_signatures(fd, h, path)
    out = bytearray(len(ids) * ps)
    view = memoryview(out)
    for k, e in enumerate(np.asarray(ids, np.int64).tolist()):
        n = int(idx["lengths"][e])
        data = _pread_exact(fd, n, h["store_offset"] + int(idx["offsets"][e]), path,
                            "a store entry")
        page = view[k * ps:(k + 1) * ps]
        if lib.lm_unpack_entry(ffi.from_buffer(data), n, int(idx["raw"][e]), ps,
                               ffi.from_buffer(page)) < 0:
            _fail(path, "store entry %d: %s" % (e, ffi.string(lib.lm_last_op()).decode()))
        if _xxh3(page) != int(sigs[e]):
            _fail(path, "store entry %d: decoded page differs from its signature (corrupt "
                  "compressed entry)" % e)
    return out


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
    kinds = _leaf_kinds(p.manifest)
    untouched, zero, stored = h["counts"]
    parent = None
    by_class = {"zero": zero, "untouched": untouched, "unique": h["nstored"],
                "duplicate": stored - h["nstored"]}
    if h.get("parent_id"):
        parent = {"path": parent_path(path, p),
                  "id": "%016x" % h["parent_id"], "pages": h.get("parent_pages", 0)}
        by_class["parent"] = h.get("parent_pages", 0)
    flags = h.get("flags", 0)
    if p.index is not None:
        codecs = dict(p.index["counts"])
    else:
        codecs = {"raw": h["nstored"]} if h["nstored"] else {}
    return SnapshotInfo(
        path=os.fspath(path), version=h["version"], npages=h["npages"],
        page_size=h["page_size"],
        pages_by_class=by_class, parent=parent,
        raw_bytes=h["nstored"] * h["page_size"], compressed=bool(flags & FLAG_COMPRESSED),
        codecs=codecs, flags=flags,
        stored_bytes=h["store_bytes"], file_bytes=h["file_bytes"],
        working_set=p.working_set.copy(),
        arrays={n: {"offset": a["offset"], "dtype": a["dtype"], "shape": a["shape"],
                    "nbytes": _nbytes(a), "kind": kinds.get(n, "numpy")}
                for n, a in p.manifest["arrays"].items()},
    )


def parent_path(child_path, parsed):
    """Where the parent of the file at child_path is: its manifest's relative path, resolved
    against the child's directory."""
    rel = parsed.manifest["parent"]["path"]
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(child_path)), rel))


def _nbytes(a):
    n = a["dtype"].itemsize
    for x in a["shape"]:
        n *= x
    return n


def _leaf_kinds(manifest):
    """array name -> what plm.load() makes of it ("numpy", "numpy bfloat16", "torch float32",
    "arrow table", ...), from the state tree plm.save() writes; nothing for a malformed tree
    (load() says what is wrong with it; describing a file must not fail on it)."""
    out = {}
    state = manifest.get("state")
    todo = [state.get("tree")] if isinstance(state, dict) else []
    while todo and len(out) < 1 << 20:
        node = todo.pop()
        if not isinstance(node, dict):
            continue
        if node.get("kind") == "dict" and isinstance(node.get("items"), dict):
            todo.extend(node["items"].values())
        elif isinstance(node.get("array"), str):
            extra = node.get("ml_dtype") or node.get("torch_dtype") or node.get("what")
            out[node["array"]] = " ".join(str(x) for x in (node.get("kind"), extra) if x)
    return out


def _open(path, kind="snapshot file"):
    """A read-only fd of the regular file at `path`, or SnapshotError saying why not (`kind`
    names what the file should be, for the message)."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer. Regular files ignore it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SnapshotError("%s: no such %s" % (path, kind)) from None
    except IsADirectoryError:
        raise SnapshotError("%s: is a directory, not a %s" % (path, kind)) from None
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
    the table has the class (UNTOUCHED, ZERO, STORED, or TABLE_PARENT: left to the parent)
    and store entry of every page (an entry of this file; 0 for the other classes)."""
    p = _load(path, signatures=True)
    table = np.empty(p.map.size, TABLE_DTYPE)
    inherit = p.map == PARENT
    stored = (p.map >= STORED) & ~inherit
    table["cls"] = np.minimum(p.map, STORED)
    table["cls"][inherit] = TABLE_PARENT
    table["store"] = np.where(stored, p.map - np.uint32(STORED), 0)
    return _info(path, p), table


def page_sources(path):
    """(SnapshotInfo, offsets) of a checked snapshot file, for serving its pages from another
    process: offsets[p] is the file offset of page p's contents (page_size bytes), or -1 for
    a page that reads as zero (zero and untouched pages). Checked as restore() checks a file;
    needs no compiled code."""
    p = _load(path)
    h = p.header
    if h["flags"] & (FLAG_COMPRESSED | FLAG_PARENT):
        # One file offset per page of page_size bytes: a compressed entry also has a length
        # and a codec, a parent's page another file (pylazymem._chain: Chain.locations, which
        # the page server uses for such files).
        _fail(path, "%s: page_sources() lists pages stored whole in the one file (format "
              "version 2); for this one open the chain (pylazymem._chain.open_chain(path)"
              ".locations())" % (
                  "compressed store (format version 3, %s entries)"
                  % "/".join(c for c in p.index["counts"] if c != "raw")
                  if h["flags"] & FLAG_COMPRESSED else "has a parent snapshot"))
    entry = p.map.astype(np.int64) - STORED
    offsets = np.where(entry >= 0, h["store_offset"] + entry * h["page_size"], -1)
    return _info(path, p), offsets
