"""Snapshot files as docs/snapshot-format.md describes them, byte by byte.

Besides its tests this module holds `SnapFile`, an independent reader/writer of the format
written from the document (not from pylazymem/snapshot.py); the other test_snapshot_* files
use it to build valid and hostile files.
"""

import dataclasses
import json
import os
import struct

import numpy as np
import pytest
import xxhash

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page
from _snapformat import (FIELD_OFFSET, FIELD_SIZE, HDR, HEADER_CHECKED, HEADER_FIELDS,  # noqa: F401
                         MAGIC, SECTIONS)

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(120)]

PS = PAGE_SIZE
# Page-map entries: 0 untouched, 1 zero, 2 + i = store entry i.
UNTOUCHED, ZERO, STORED = 0, 1, 2


def xxh3(b):
    return xxhash.xxh3_64_intdigest(bytes(b))


ZERO_SIG = xxh3(bytes(PS))


def stored(i):
    """The page-map entry of a page whose contents are store entry i."""
    return STORED + i


@dataclasses.dataclass
class SnapFile:
    """A snapshot file taken apart into its sections (see docs/snapshot-format.md)."""

    header: dict
    header_pad: bytes      # header bytes 160 .. header_bytes (reserved, zero)
    store: bytes
    map: np.ndarray        # uint32, one entry per page
    ws: np.ndarray         # uint64
    manifest: bytes
    sigs: np.ndarray       # uint64, one per store entry

    @classmethod
    def parse(cls, data):
        """Take a (valid) file apart; trusts the header's offsets."""
        h = dict(zip(HEADER_FIELDS, HDR.unpack_from(data, 0)))
        hb = h["header_bytes"]
        pmap = np.frombuffer(data, "<u4", h["npages"], h["map_offset"]).astype(np.uint32)
        ws = np.frombuffer(data, "<u8", h["nws"], h["ws_offset"]).astype(np.uint64)
        sigs = np.frombuffer(data, "<u8", h["nstored"], h["sigs_offset"]).astype(np.uint64)
        store = bytes(data[h["store_offset"]:h["store_offset"] + h["store_bytes"]])
        manifest = bytes(data[h["manifest_offset"]:h["manifest_offset"] + h["manifest_bytes"]])
        return cls(h, bytes(data[HDR.size:hb]), store, pmap, ws, manifest, sigs)

    @classmethod
    def new(cls, page_size, npages, store=b"", pmap=None, ws=(), manifest=None, sigs=None):
        """A file from its sections; signatures computed from the store unless given."""
        hb = max(4096, page_size)
        pmap = np.zeros(npages, np.uint32) if pmap is None else np.asarray(pmap, np.uint32)
        if manifest is None:
            manifest = json.dumps({"pylazymem": plm.__version__, "arrays": {}}).encode()
        if sigs is None:
            sigs = [xxh3(store[i:i + page_size]) for i in range(0, len(store), page_size)]
        h = dict.fromkeys(HEADER_FIELDS, 0)
        h.update(magic=MAGIC, version=2, header_bytes=hb, page_size=page_size)
        sf = cls(h, bytes(hb - HDR.size), store, pmap, np.asarray(ws, np.uint64), manifest,
                 np.asarray(sigs, np.uint64))
        sf.relayout()
        return sf

    def copy(self):
        return SnapFile(dict(self.header), self.header_pad, self.store, self.map.copy(),
                        self.ws.copy(), self.manifest, self.sigs.copy())

    @property
    def page_size(self):
        return self.header["page_size"]

    @property
    def cls(self):
        """Class of every page: UNTOUCHED, ZERO or STORED."""
        return np.minimum(self.map, STORED)

    @property
    def entry(self):
        """Store entry of every page (meaningful where cls == STORED)."""
        return np.where(self.map >= STORED, self.map.astype(np.int64) - STORED, -1)

    def tail(self):
        """The bytes tables_xxh3 covers: page map, working set, manifest."""
        return self.map.astype("<u4").tobytes() + self.ws.astype("<u8").tobytes() + self.manifest

    def sigs_bytes(self):
        return self.sigs.astype("<u8").tobytes()

    def relayout(self):
        """Counts, sizes and offsets from the sections' contents, as the format requires."""
        h = self.header
        h["header_bytes"] = HDR.size + len(self.header_pad)
        h["npages"] = len(self.map)
        h["nstored"] = len(self.store) // h["page_size"]
        h["nws"] = len(self.ws)
        sizes = {"store": len(self.store), "map": 4 * len(self.map), "ws": 8 * len(self.ws),
                 "manifest": len(self.manifest), "sigs": 8 * len(self.sigs)}
        off = h["header_bytes"]
        for name in SECTIONS:
            h[name + "_offset"], h[name + "_bytes"] = off, sizes[name]
            off += sizes[name]
        h["file_bytes"] = off

    def pack_header(self, fix_checksum=True):
        h = dict(self.header)
        raw = bytearray(HDR.pack(*(h[f] for f in HEADER_FIELDS)))
        if fix_checksum:
            struct.pack_into("<Q", raw, HEADER_CHECKED, xxh3(raw[:HEADER_CHECKED]))
        return bytes(raw) + self.header_pad

    def build(self, relayout=True, fix_tables=True, fix_header=True, **overrides):
        """The file's bytes: sections as they are, header fields from the layout (unless
        relayout=False), then `overrides`, then checksums recomputed (unless told not to or
        overridden)."""
        if relayout:
            self.relayout()
        self.header.update(overrides)
        if fix_tables and "tables_xxh3" not in overrides:
            self.header["tables_xxh3"] = xxh3(self.tail())
        if fix_tables and "sigs_xxh3" not in overrides:
            self.header["sigs_xxh3"] = xxh3(self.sigs_bytes())
        return (self.pack_header(fix_header and "header_xxh3" not in overrides)
                + self.store + self.tail() + self.sigs_bytes())

    def manifest_json(self):
        return json.loads(self.manifest)


def patch_header_field(data, field, value, fix_checksum=True):
    """`data` with one header field overwritten (and the header checksum recomputed)."""
    raw = bytearray(data)
    if field == "magic":
        raw[0:8] = value
    else:
        fmt = "<I" if FIELD_SIZE[field] == 4 else "<Q"
        struct.pack_into(fmt, raw, FIELD_OFFSET[field], value)
    if fix_checksum and field != "header_xxh3":
        struct.pack_into("<Q", raw, HEADER_CHECKED, xxh3(raw[:HEADER_CHECKED]))
    return bytes(raw)


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def tmp_files(directory, name):
    """Temporary files a checkpoint to directory/name leaves (.NAME.*.tmp)."""
    return sorted(f for f in os.listdir(directory)
                  if f.startswith("." + name + ".") and f.endswith(".tmp"))


# ---- a small region with every kind of page ---------------------------------------------

STRUCT_DTYPE = np.dtype([("id", "<i4"), ("pos", "<f8"), ("tag", "S5"), ("ok", "?")])
# numpy writes fields with a shape as [name, descr, shape] (the format allows it).
SUBARRAY_DTYPE = np.dtype([("id", "<i4"), ("pos", "<f8", (3,)),
                           ("inner", [("a", "<u2"), ("b", "|u1", (2, 2))])])


def fill_mixed(r, rng, untouched_every=5):
    """Give region `r` (created with max_cluster_pages=1) named arrays, random pages, zero pages
    (written and read-only), duplicates and untouched pages. Returns (expected bytes as an
    (npages, ps) array, {name: array copy}, {kind: [pages]})."""
    ps = r.page_size
    arrays = {}
    a = r.alloc("f32", (300, 7), np.float32)
    a[:] = rng.standard_normal(a.shape).astype(np.float32)
    b = r.alloc("i16", 5000, np.int16)
    b[:] = rng.integers(-2 ** 15, 2 ** 15, b.shape, dtype=np.int16)
    c = r.alloc("rec", (50, 4), STRUCT_DTYPE)
    c["id"] = rng.integers(0, 1 << 30, c.shape)
    c["pos"] = rng.standard_normal(c.shape)
    c["tag"] = [[b"t%d" % (i * 4 + j) for j in range(4)] for i in range(50)]
    c["ok"] = rng.integers(0, 2, c.shape).astype(bool)
    d = r.alloc("c128", (2, 3, 50), np.complex128)
    d[:] = rng.standard_normal(d.shape) + 1j * rng.standard_normal(d.shape)
    e = r.alloc("u8_scalar", (), np.uint64)
    e[()] = 0xDEADBEEFCAFEF00D
    used = set()
    for name, view in r.arrays.items():
        arrays[name] = view.copy()
        off = view.ctypes.data - r.address
        used.update(range(off // ps, -(-(off + max(view.nbytes, 1)) // ps)))
    used = sorted(used)
    v = pages(r)
    n = r.npages
    expected = np.zeros((n, ps), np.uint8)
    kinds = {"array": used, "random": [], "zero_written": [], "zero_read": [], "dup": [],
             "untouched": []}
    dup_src = [random_page(rng), random_page(rng)]
    start = used[-1] + 1
    for p in range(start, n):
        k = p - start
        if k % untouched_every == untouched_every - 1:
            kinds["untouched"].append(p)
            continue
        kind = ("random", "zero_written", "dup", "random", "zero_read", "dup")[k % 6]
        kinds[kind].append(p)
        if kind == "random":
            v[p] = random_page(rng)
        elif kind == "zero_written":
            v[p] = random_page(rng)     # written, then zeroed: a present page of zeros
            v[p] = 0
        elif kind == "zero_read":
            assert v[p].sum() == 0       # read fault only: the kernel zero page
        else:
            v[p] = dup_src[(k // 6) % 2]
    touched = [p for p in range(n) if p not in set(kinds["untouched"])]
    expected[touched] = v[touched]
    return expected, arrays, kinds


def assert_arrays_equal(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        g, w = got[name], want[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name


# ---- tests --------------------------------------------------------------------------------

@pytest.mark.core
def test_written_file_follows_the_document(make_region, rng, tmp_path):
    r = make_region(12 * PS, max_cluster_pages=1)
    w = r.alloc("w", 4, np.float32)
    w[:] = [1.5, -2.0, 3.25, 0.0]
    v = pages(r)
    B, C = random_page(rng), random_page(rng)
    v[1] = 0                 # zero (written)
    v[2] = B
    v[3] = v[0]              # duplicate of page 0 (the array's page)
    assert v[5].sum() == 0   # zero (read only)
    v[6] = C
    v[7] = B                 # duplicate of page 2
    # pages 4, 8..11 never touched
    path = str(tmp_path / "s.snap")
    info = plm.checkpoint(r, path, working_set=[6, 2, 1, 4, 6])
    expected_page0 = v[0].copy()
    data = open(path, "rb").read()

    h = dict(zip(HEADER_FIELDS, HDR.unpack_from(data, 0)))
    assert h["magic"] == MAGIC and h["version"] == 2 and h["flags"] == 0
    assert h["page_size"] == PS and h["header_bytes"] == max(4096, PS)
    assert data[HDR.size:h["header_bytes"]] == bytes(h["header_bytes"] - HDR.size)
    assert h["npages"] == 12 and h["nstored"] == 3 and h["nws"] == 4
    assert h["store_offset"] == h["header_bytes"] and h["store_bytes"] == 3 * PS
    assert h["map_offset"] == h["store_offset"] + h["store_bytes"]
    assert h["map_bytes"] == 12 * 4
    assert h["ws_offset"] == h["map_offset"] + h["map_bytes"] and h["ws_bytes"] == 32
    assert h["manifest_offset"] == h["ws_offset"] + h["ws_bytes"]
    assert h["sigs_offset"] == h["manifest_offset"] + h["manifest_bytes"]
    assert h["sigs_bytes"] == 3 * 8
    assert h["file_bytes"] == h["sigs_offset"] + h["sigs_bytes"] == len(data)
    assert h["header_xxh3"] == xxh3(data[:HEADER_CHECKED])
    assert h["tables_xxh3"] == xxh3(data[h["map_offset"]:h["sigs_offset"]])
    assert h["sigs_xxh3"] == xxh3(data[h["sigs_offset"]:])

    sf = SnapFile.parse(data)
    # working set: in the order given, a page listed twice appears once
    assert sf.ws.tolist() == [6, 2, 1, 4]
    # store: working-set pages first in working-set order, then by address of first use
    assert sf.map.tolist() == [stored(2), ZERO, stored(1), stored(2), UNTOUCHED, ZERO,
                               stored(0), stored(1), UNTOUCHED, UNTOUCHED, UNTOUCHED, UNTOUCHED]
    assert sf.cls.tolist() == [STORED, ZERO, STORED, STORED, UNTOUCHED, ZERO, STORED, STORED,
                               UNTOUCHED, UNTOUCHED, UNTOUCHED, UNTOUCHED]
    entries = [sf.store[i * PS:(i + 1) * PS] for i in range(3)]
    assert entries == [C.tobytes(), B.tobytes(), expected_page0.tobytes()]
    assert sf.sigs.tolist() == [xxh3(e) for e in entries]
    man = sf.manifest_json()
    assert man["pylazymem"] == plm.__version__
    assert man["arrays"] == {"w": {"offset": 0, "dtype": "<f4", "shape": [4]}}

    assert info.path == path and info.version == 2
    assert info.npages == 12 and info.page_size == PS
    assert info.pages_by_class == {"zero": 2, "untouched": 5, "unique": 3, "duplicate": 2}
    assert info.stored_bytes == 3 * PS and info.file_bytes == len(data)
    assert info.working_set.tolist() == [6, 2, 1, 4]
    assert info.arrays["w"]["offset"] == 0 and tuple(info.arrays["w"]["shape"]) == (4,)
    assert np.dtype(info.arrays["w"]["dtype"]) == np.float32
    i2 = plm.inspect(path)
    assert i2.pages_by_class == info.pages_by_class
    assert i2.working_set.tolist() == info.working_set.tolist()


@pytest.mark.core
@pytest.mark.parametrize("dtype", [STRUCT_DTYPE, SUBARRAY_DTYPE], ids=["flat", "subarray"])
def test_structured_dtype_in_manifest(make_region, rng, tmp_path, dtype):
    r = make_region(8 * PS, max_cluster_pages=1)
    a = r.alloc("rec", 10, dtype)
    a.view(np.uint8)[:] = rng.integers(0, 256, a.nbytes, dtype=np.uint8)
    want = a.copy()
    path = str(tmp_path / "s.snap")
    plm.checkpoint(r, path)
    man = SnapFile.parse(open(path, "rb").read()).manifest_json()
    entry = man["arrays"]["rec"]
    assert entry["shape"] == [10] and entry["offset"] == 0
    assert isinstance(entry["dtype"], list)
    assert np.dtype(plm.inspect(path).arrays["rec"]["dtype"]) == dtype
    with plm.restore(path, prefetch="none", background=False) as r2:
        got = r2.arrays["rec"]
        assert got.dtype == dtype and got.shape == (10,)
        assert got.tobytes() == want.tobytes()


@pytest.mark.core
def test_hand_written_file_restores(tmp_path, rng):
    """A file written from the document alone (not by checkpoint) restores byte for byte."""
    page_a, page_b = random_page(rng), random_page(rng)
    # page 0: entry 1, page 1: zero, page 2: untouched, page 3: entry 0, page 4: entry 1,
    # page 5: untouched; working set [3, 1]
    pmap = [stored(1), ZERO, UNTOUCHED, stored(0), stored(1), UNTOUCHED]
    manifest = json.dumps({"pylazymem": "0.1.0", "arrays": {
        "a": {"offset": 0, "dtype": "<u2", "shape": [PS // 2]},
        "s": {"offset": 3 * PS, "dtype": [["x", "<u4"], ["y", "<i4"]], "shape": [2]},
    }}).encode()
    sf = SnapFile.new(PS, 6, page_a.tobytes() + page_b.tobytes(), pmap, [3, 1], manifest)
    path = write_file(tmp_path / "hand.snap", sf.build())
    info = plm.inspect(path)
    assert info.pages_by_class == {"zero": 1, "untouched": 2, "unique": 2, "duplicate": 1}
    assert info.working_set.tolist() == [3, 1]
    expected = np.zeros((6, PS), np.uint8)
    expected[0] = expected[4] = page_b
    expected[3] = page_a
    for prefetch, verify in (("working-set", True), ("none", False), ("all", False)):
        with plm.restore(path, prefetch=prefetch, background=False, verify=verify) as r:
            assert np.array_equal(pages(r), expected)
            assert r.signatures().tolist() == [xxh3(p) for p in expected]
            arrs = r.arrays
            assert np.array_equal(arrs["a"], page_b.view("<u2"))
            s = arrs["s"]
            assert s.dtype == np.dtype([("x", "<u4"), ("y", "<i4")]) and s.shape == (2,)
            assert s.tobytes() == page_a[:16].tobytes()


@pytest.mark.core
def test_foreign_page_size_inspects_but_does_not_restore(tmp_path, rng):
    other = 8192 if PS != 8192 else 16384
    page = rng.integers(0, 256, other, dtype=np.uint8).tobytes()
    sf = SnapFile.new(other, 3, page, [UNTOUCHED, stored(0), UNTOUCHED])
    path = write_file(tmp_path / "big.snap", sf.build())
    info = plm.inspect(path)
    assert info.page_size == other and info.npages == 3
    with pytest.raises(plm.SnapshotError, match=str(other)):
        plm.restore(path)


@pytest.mark.core
def test_argument_errors(make_region, tmp_path):
    r = make_region(4 * PS)
    path = str(tmp_path / "s.snap")
    for bad in ("bogus", [-1], [4], [0, 99]):
        with pytest.raises(ValueError):
            plm.checkpoint(r, path, working_set=bad)
    assert not os.path.exists(path) and tmp_files(tmp_path, "s.snap") == []
    plm.checkpoint(r, path)
    with pytest.raises(ValueError):
        plm.restore(path, prefetch="bogus")
    r.close()
    with pytest.raises(plm.RegionClosedError):
        plm.checkpoint(r, path)


def test_snapshot_error_is_a_value_error():
    assert issubclass(plm.SnapshotError, plm.LazyMemError)
    assert issubclass(plm.SnapshotError, ValueError)



@pytest.mark.core
def test_path_like_paths(make_region, tmp_path):
    r = make_region(4 * PS)
    pages(r)[1] = 7
    path = tmp_path / "p.snap"                 # a pathlib.Path, not a str
    info = plm.checkpoint(r, path)
    assert os.fspath(info.path) == str(path)
    assert plm.inspect(path).npages == 4
    with plm.restore(path, background=False) as r2:
        assert (pages(r2)[1] == 7).all()


# ---- reading without the compiled core ----------------------------------------------------

NO_CORE = """
import importlib.util, json, os, sys, types
# pylazymem/snapshot.py alone, in a package whose compiled core cannot be imported: inspect()
# and page_sources() must not need it (the pure-ctypes page server reads snapshots with them).
# Where the package is (source tree or installed) without running its __init__:
where = list(importlib.util.find_spec("pylazymem").submodule_search_locations)
sys.modules["pylazymem._lazymem"] = None
pkg = types.ModuleType("pylazymem")
pkg.__path__ = where
pkg.__version__ = "0.1.0"
sys.modules["pylazymem"] = pkg
import pylazymem.snapshot as S
assert "pylazymem._binding" not in sys.modules
out = {}
for path in sys.argv[1:]:
    try:
        info, offsets = S.page_sources(path)
        i2 = S.inspect(path)
        assert i2.pages_by_class == info.pages_by_class
        out[path] = {"ok": True, "pbc": info.pages_by_class, "offsets": offsets.tolist(),
                     "ws": info.working_set.tolist()}
    except S.SnapshotError as e:
        out[path] = {"ok": False, "msg": str(e)}
assert "pylazymem._binding" not in sys.modules
print(json.dumps(out))
"""


def _no_core(run_py, *paths):
    res = run_py(NO_CORE, prelude=False, timeout=60, args=paths)
    assert res.returncode == 0, res.describe()
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.core
def test_page_sources(make_region, rng, tmp_path, run_py):
    r = make_region(9 * PS, max_cluster_pages=1)
    v = pages(r)
    A, B = random_page(rng), random_page(rng)
    v[0] = A
    v[2] = B
    v[3] = 0          # zero (written)
    v[4].sum()        # zero (read)
    v[5] = A          # duplicate
    v[7] = B
    path = str(tmp_path / "s.snap")
    plm.checkpoint(r, path, working_set=[7, 3])
    info, offsets = plm.snapshot.page_sources(path)
    assert offsets.dtype == np.int64 and offsets.shape == (9,)
    assert info.pages_by_class == plm.inspect(path).pages_by_class
    data = open(path, "rb").read()
    for p in range(9):
        if p in (1, 3, 4, 6, 8):
            assert offsets[p] == -1, p
        else:
            assert offsets[p] % PS == 0
            assert data[offsets[p]:offsets[p] + PS] == v[p].tobytes(), p
    assert offsets[7] == offsets[2] == max(4096, PS)   # the working set's entry comes first
    assert offsets[0] == offsets[5]
    # the same without the compiled core
    got = _no_core(run_py, path)[path]
    assert got["ok"] and got["offsets"] == offsets.tolist() and got["ws"] == [7, 3]
    assert got["pbc"] == info.pages_by_class


@pytest.mark.core
def test_reader_without_core_rejects_what_restore_rejects(tmp_path, run_py):
    """The numpy checks (no compiled core) reject bad tables like the C checks do."""
    from test_snapshot_hostile import CASES, make_valid
    valid = make_valid(str(tmp_path / "valid.snap"))
    base = SnapFile.parse(valid)
    paths = []
    for name, make in CASES.items():
        paths.append(write_file(tmp_path / (name + ".snap"), make(valid, base)))
    out = _no_core(run_py, str(tmp_path / "valid.snap"), *paths)
    assert out[str(tmp_path / "valid.snap")]["ok"]
    accepted = [p for p in paths if out[p]["ok"]]
    assert not accepted, accepted


@pytest.mark.core
def test_version_1_files_are_refused_with_the_fix(tmp_path):
    """Version 1 (16-byte page table entries with signatures) is not read: the message says
    what to do instead of only that the file is bad."""
    raw = bytearray(4096)
    struct.pack_into("<8sIIII", raw, 0, MAGIC, 1, 4096, 4096, 0)
    path = write_file(tmp_path / "v1.snap", bytes(raw))
    for fn in (plm.inspect, plm.restore, plm.snapshot.page_sources):
        with pytest.raises(plm.SnapshotError, match="version 1.*re-create the snapshot"):
            fn(path)


@pytest.mark.core
def test_checkpoint_compares_pages_with_equal_signatures(tmp_path, rng):
    """Pages with the same signature share a store entry only if their bytes are equal too. A
    snapshot whose signature section gives two different entries one signature (restore does
    not check signatures against contents unless verify=True) stands in for a hash collision:
    checkpointing the lazily restored region must keep both contents."""
    A, B = random_page(rng), random_page(rng)
    pmap = [stored(0), stored(1), stored(0), stored(1), ZERO]
    sf = SnapFile.new(PS, 5, A.tobytes() + B.tobytes(), pmap, sigs=[12345, 12345])
    src = write_file(tmp_path / "collide.snap", sf.build())
    expected = np.stack([A, B, A, B, np.zeros(PS, np.uint8)])
    dst = str(tmp_path / "again.snap")
    with plm.restore(src, prefetch="none", background=False) as r:
        info = plm.checkpoint(r, dst, working_set=[3])
        assert r.stats()["faults"] == 0          # lazy pages compared from the source store
    assert info.pages_by_class == {"zero": 1, "untouched": 0, "unique": 2, "duplicate": 2}
    again = SnapFile.parse(open(dst, "rb").read())
    assert again.map.tolist() == [stored(1), stored(0), stored(1), stored(0), ZERO]
    with plm.restore(dst, prefetch="all", background=False) as r:
        assert np.array_equal(pages(r), expected)
