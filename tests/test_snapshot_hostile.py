"""Bad snapshot files: truncated, corrupt, hostile. Each must raise plm.SnapshotError (a
ValueError) with a message from both plm.inspect and plm.restore, before any page is served;
never a crash, a hang or another exception.

The files are a valid snapshot patched in the test (checksums recomputed where a deeper check
should be reached). They are tried in one subprocess (a crash there cannot take pytest down);
a case the batch did not get to (because an earlier one crashed it) is retried on its own.
"""

import json
import os
import struct

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page
from test_snapshot_format import (FIELD_OFFSET, HEADER_CHECKED, ZERO, SnapFile,
                                  patch_header_field, stored, write_file, xxh3)

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(180)]

PS = PAGE_SIZE
NPAGES = 8
U64 = (1 << 64) - 1


def make_valid(path):
    """8 pages: 0 an array, 1 random, 2 = 1, 3 zero, 4 random, 5..7 untouched; working set
    [4, 1, 3]. Store entries: 0 = page 4, 1 = pages 1 and 2, 2 = page 0."""
    rng = np.random.default_rng(1234)
    with plm.Region(NPAGES * PS, max_cluster_pages=1) as r:
        a = r.alloc("a", 16, np.float32)
        a[:] = np.arange(16)
        v = pages(r)
        v[1] = random_page(rng)
        v[2] = v[1]
        v[3] = 0
        v[4] = random_page(rng)
        plm.checkpoint(r, path, working_set=[4, 1, 3])
    data = open(path, "rb").read()
    sf = SnapFile.parse(data)
    assert sf.header["nstored"] == 3 and sf.ws.tolist() == [4, 1, 3]
    return data


# ---- the cases: name -> function(valid bytes, SnapFile) -> bytes ---------------------------

def _mod(fn, **build_kw):
    def make(data, base):
        sf = base.copy()
        fn(sf)
        return sf.build(**build_kw)
    return make


def _hdr(**fields):
    """Header fields overwritten, header checksum recomputed."""
    def make(data, base):
        for k, v in fields.items():
            data = patch_header_field(data, k, v)
        return data
    return make


def _flip(where, delta=0):
    def make(data, base):
        h = base.header
        off = {"header": FIELD_OFFSET["npages"], "header_xxh3": HEADER_CHECKED + 2,
               "map": h["map_offset"] + 9, "ws": h["ws_offset"] + 1,
               "manifest": h["manifest_offset"] + 3, "sigs": h["sigs_offset"] + 5}[where] + delta
        raw = bytearray(data)
        raw[off] ^= 0x10
        return bytes(raw)
    return make


def _cut(where, delta=0):
    def make(data, base):
        h = base.header
        at = {"start": 0, "header": h["header_bytes"], "store": h["store_offset"],
              "map": h["map_offset"], "ws": h["ws_offset"], "manifest": h["manifest_offset"],
              "sigs": h["sigs_offset"], "end": h["file_bytes"]}[where] + delta
        return data[:at]
    return make


def _map(p, entry):
    def fn(sf):
        sf.map[p] = entry
    return _mod(fn)


def _ws(ws):
    def fn(sf):
        sf.ws = np.array(ws, np.uint64)
    return _mod(fn)


def _manifest(obj):
    def fn(sf):
        sf.manifest = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return _mod(fn)


def _array(**entry):
    e = {"offset": 0, "dtype": "<f4", "shape": [16]}
    e.update(entry)
    return _manifest({"pylazymem": "0.1.0", "arrays": {"a": e}})


def _layout(**fields):
    """Header fields set after the layout (sections keep their bytes), checksums recomputed."""
    def make(data, base):
        return base.copy().build(**fields)
    return make


def _extra_store_entry(data, base):
    sf = base.copy()
    page = bytes(range(256)) * (PS // 256)
    sf.store += page
    sf.sigs = np.append(sf.sigs, np.uint64(xxh3(page)))
    return sf.build()


def _header_pad(data, base):
    sf = base.copy()
    pad = bytearray(sf.header_pad)
    pad[100] = 1
    sf.header_pad = bytes(pad)
    return sf.build()


def _huge_consistent(data, base):
    """npages 2^40 with map bytes and every offset after it consistent: only the file's
    size says it is not there."""
    sf = base.copy()
    sf.relayout()
    h = dict(sf.header)
    n = 1 << 40
    h.update(npages=n, map_bytes=4 * n)
    h["ws_offset"] = h["map_offset"] + h["map_bytes"]
    h["manifest_offset"] = h["ws_offset"] + h["ws_bytes"]
    h["sigs_offset"] = h["manifest_offset"] + h["manifest_bytes"]
    h["file_bytes"] = h["sigs_offset"] + h["sigs_bytes"]
    sf.header = h
    return sf.pack_header() + sf.store + sf.tail() + sf.sigs_bytes()


def _wrap_offsets(data, base):
    """Sizes chosen so that 64-bit sums wrap around to the real offsets."""
    sf = base.copy()
    sf.relayout()
    h = dict(sf.header)
    h["store_bytes"] = (h["store_bytes"] + (1 << 64)) & U64   # unchanged, but:
    h["nstored"] = h["nstored"] + (1 << 64) // PS              # nstored * ps wraps to store_bytes
    h["nstored"] &= U64
    sf.header = h
    return sf.pack_header() + sf.store + sf.tail() + sf.sigs_bytes()


def _all_zero(data, base):
    sf = base.copy()
    sf.map[:] = ZERO
    return sf.build()


def _bigger_header(data, base):
    """header_bytes of 2 pages with the second one not zero."""
    sf = base.copy()
    sf.header_pad = sf.header_pad + b"\x01" + bytes(PS - 1)
    return sf.build()


CASES = {
    # empty and truncated
    "empty": lambda d, b: b"",
    "truncated_7": _cut("start", 7),
    "truncated_in_header_fields": _cut("start", 100),
    "truncated_after_header_fields": _cut("start", 136),
    "truncated_in_header": _cut("header", -1),
    "truncated_after_header": _cut("header"),
    "truncated_in_store": _cut("store", PS + 17),
    "truncated_before_map": _cut("map"),
    "truncated_in_map": _cut("map", 20),
    "truncated_in_ws": _cut("ws", 4),
    "truncated_before_manifest": _cut("manifest"),
    "truncated_in_manifest": _cut("sigs", -1),
    "truncated_before_sigs": _cut("sigs"),
    "truncated_in_sigs": _cut("end", -1),
    # magic, version
    "wrong_magic": _hdr(magic=b"PLMSNAQ\x00"),
    "wrong_magic_unchecked": lambda d, b: b"XLMSNAP\x00" + d[8:],
    "zeros": lambda d, b: bytes(len(d)),
    "text": lambda d, b: (b"hello, not a snapshot\n" * 1000)[:len(d)],
    "version_1": _hdr(version=1),
    "wrong_version_3": _hdr(version=3),
    "wrong_version_0": _hdr(version=0),
    "wrong_version_huge": _hdr(version=0xFFFFFFFF),
    # checksums
    "header_checksum_off": _flip("header"),
    "header_checksum_field_flipped": _flip("header_xxh3"),
    "tables_checksum_off_map": _flip("map"),
    "tables_checksum_off_ws": _flip("ws"),
    "tables_checksum_off_manifest": _flip("manifest"),
    "tables_checksum_field_wrong": _layout(tables_xxh3=12345),
    # counts
    "npages_huge": _hdr(npages=1 << 40),
    "npages_over_limit": _hdr(npages=(1 << 40) + 1),
    "npages_u64_max": _hdr(npages=U64),
    "npages_zero": _hdr(npages=0),
    "npages_huge_consistent": _huge_consistent,
    "nstored_huge": _hdr(nstored=1 << 63),
    "nstored_more_than_npages": _hdr(nstored=NPAGES + 1),
    "nstored_wraps": _wrap_offsets,
    "nws_huge": _hdr(nws=U64),
    "nws_more_than_npages": _hdr(nws=NPAGES + 1),
    "nws_one_more": _hdr(nws=4),
    # offsets and sizes
    "map_offset_past_end": _hdr(map_offset=1 << 62),
    "sigs_offset_past_end": _layout(sigs_offset=1 << 40),
    "ws_offset_past_end": _hdr(ws_offset=1 << 40),
    "manifest_offset_past_end": _layout(manifest_offset=1 << 33),
    "file_bytes_huge": _layout(file_bytes=U64),
    "file_bytes_short": _layout(file_bytes=100),
    "manifest_bytes_huge": _layout(manifest_bytes=1 << 63),
    "manifest_bytes_over_limit": _layout(manifest_bytes=(64 << 20) + 1),
    "map_bytes_short": _layout(map_bytes=4 * (NPAGES - 1)),
    "ws_bytes_wrong": _layout(ws_bytes=16),
    "store_bytes_wrong": _layout(store_bytes=PS),
    "sigs_bytes_wrong": _layout(sigs_bytes=8),
    "sigs_bytes_huge": _layout(sigs_bytes=1 << 63),
    "overlap_store_in_header": _layout(store_offset=0),
    "overlap_ws_in_map": lambda d, b: _layout(ws_offset=b.header["map_offset"])(d, b),
    "overlap_manifest_in_ws": lambda d, b: _layout(
        manifest_offset=b.header["ws_offset"])(d, b),
    "overlap_sigs_in_manifest": lambda d, b: _layout(
        sigs_offset=b.header["manifest_offset"])(d, b),
    "overlap_map_in_store": lambda d, b: _layout(
        map_offset=b.header["map_offset"] - PS)(d, b),
    "gap_before_map": lambda d, b: _layout(map_offset=b.header["map_offset"] + 4)(d, b),
    "gap_before_sigs": lambda d, b: _layout(sigs_offset=b.header["sigs_offset"] + 8)(d, b),
    "store_offset_unaligned": lambda d, b: _layout(
        store_offset=b.header["store_offset"] + 8)(d, b),
    "nstored_over_map_limit": _hdr(nstored=1 << 32),
    # page map
    "store_index_out_of_range": _map(4, stored(3)),
    "store_index_far_out_of_range": _map(4, stored(1 << 20)),
    "map_entry_u32_max": _map(1, 0xFFFFFFFF),
    "store_entry_unused": _extra_store_entry,
    "store_entry_unused_by_map": _map(4, ZERO),
    "store_entries_unused_all_zero": _all_zero,
    # working set
    "ws_index_out_of_range": _ws([4, 1, NPAGES]),
    "ws_index_huge": _ws([4, 1, U64]),
    "ws_duplicated": _ws([4, 1, 4]),
    "ws_index_2_32": _ws([4, 1, 1 << 32]),
    # trailing data
    "trailing_byte": lambda d, b: d + b"\x00",
    "trailing_page": lambda d, b: d + bytes(PS),
    # manifest
    "manifest_not_json": _manifest(b"{nope"),
    "manifest_empty": _manifest(b""),
    "manifest_not_utf8": _manifest(b"\xff\xfe{}"),
    "manifest_nul": _manifest(b"\x00" * 20),
    "manifest_a_list": _manifest([]),
    "manifest_a_string": _manifest("arrays"),
    "manifest_arrays_a_list": _manifest({"pylazymem": "0.1.0", "arrays": []}),
    "manifest_arrays_true": _manifest({"pylazymem": "0.1.0", "arrays": True}),
    "manifest_entry_a_number": _manifest({"pylazymem": "0.1.0", "arrays": {"a": 5}}),
    "manifest_entry_missing_shape": _manifest(
        {"pylazymem": "0.1.0", "arrays": {"a": {"offset": 0, "dtype": "<f4"}}}),
    "manifest_deep_nesting": _manifest(
        b'{"arrays": {}, "x": ' + b"[" * 200000 + b"]" * 200000 + b"}"),
    "manifest_object_dtype": _array(dtype="|O"),
    "manifest_object_dtype_O8": _array(dtype="O"),
    "manifest_object_in_struct": _array(dtype=[["x", "<i4"], ["y", "|O"]]),
    "manifest_bad_dtype": _array(dtype="not-a-dtype"),
    "manifest_dtype_a_number": _array(dtype=5),
    "manifest_dtype_null": _array(dtype=None),
    "manifest_dtype_bad_struct": _array(dtype=[[1, 2, 3, 4]]),
    "manifest_array_outside_region": _array(offset=NPAGES * PS - 32),
    "manifest_array_too_long": _array(shape=[NPAGES * PS]),
    "manifest_offset_past_region": _array(offset=10 ** 30),
    "manifest_negative_offset": _array(offset=-PS),
    "manifest_negative_shape": _array(shape=[-1]),
    "manifest_negative_shape_pair": _array(shape=[-2, -8]),
    "manifest_shape_not_ints": _array(shape=["a"]),
    "manifest_shape_a_number": _array(shape=16),
    "manifest_shape_null": _array(shape=None),
    "manifest_offset_infinite": _manifest(
        b'{"pylazymem": "0.1.0", "arrays": {"a": {"offset": Infinity, "dtype": "<f4", '
        b'"shape": [16]}}}'),
    "manifest_offset_nan": _manifest(
        b'{"pylazymem": "0.1.0", "arrays": {"a": {"offset": NaN, "dtype": "<f4", '
        b'"shape": [16]}}}'),
    "manifest_shape_huge_with_zero": _array(shape=[0, 1 << 64]),
    # header values
    "page_size_not_power_of_two": _hdr(page_size=3 * 4096),
    "page_size_3000": _hdr(page_size=3000),
    "page_size_zero": _hdr(page_size=0),
    "page_size_too_small": _hdr(page_size=2048),
    "page_size_too_large": _hdr(page_size=4 << 20),
    "header_bytes_not_page_multiple": _hdr(header_bytes=4096 + 8),
    "header_bytes_too_large": _hdr(header_bytes=4 << 20),
    "header_bytes_too_small": _hdr(header_bytes=100),
    "header_bytes_zero": _hdr(header_bytes=0),
    "header_flags": _hdr(flags=1),
    "header_reserved_nonzero": _header_pad,
    "header_second_page_nonzero": _bigger_header,
}

SPECIAL = ("directory", "missing")

TRY_ONE = """
def try_one(path):
    res = {}
    for fn in ("inspect", "restore", "page_sources"):
        t0 = time.monotonic()
        try:
            if fn == "inspect":
                plm.inspect(path)
            elif fn == "page_sources":
                plm.snapshot.page_sources(path)
            else:
                plm.restore(path).close()
            res[fn] = {"ok": True}
        except BaseException as e:
            res[fn] = {"type": type(e).__name__, "snap": isinstance(e, plm.SnapshotError),
                       "value": isinstance(e, ValueError), "msg": str(e)[:300]}
        res[fn]["secs"] = round(time.monotonic() - t0, 3)
    return res
"""

BATCH = TRY_ONE + """
cases = json.load(open(sys.argv[1]))
for name, path in cases:
    print("START", name, flush=True)
    print("RESULT", json.dumps([name, try_one(path)]), flush=True)
print("DONE", flush=True)
"""

ONE = TRY_ONE + """
print("RESULT", json.dumps(["one", try_one(sys.argv[1])]), flush=True)
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    valid = make_valid(str(d / "valid.snap"))
    base = SnapFile.parse(valid)
    paths = {}
    for name, make in CASES.items():
        data = make(valid, base)
        assert data != valid, name
        paths[name] = write_file(d / (name + ".snap"), data)
    os.mkdir(d / "directory.snap")
    paths["directory"] = str(d / "directory.snap")
    paths["missing"] = str(d / "missing.snap")
    listing = d / "cases.json"
    listing.write_text(json.dumps([[n, p] for n, p in paths.items()]))
    from conftest import run_py
    res = run_py(BATCH, timeout=120, args=(str(listing),))
    results = {}
    for line in res.stdout.splitlines():
        if line.startswith("RESULT "):
            name, r = json.loads(line[len("RESULT "):])
            results[name] = r
    return dict(paths=paths, results=results, batch=res, valid=str(d / "valid.snap"))


def test_valid_base_file(hostile):
    info = plm.inspect(hostile["valid"])
    assert info.npages == NPAGES
    with plm.restore(hostile["valid"], background=False) as r:
        assert (r.arrays["a"] == np.arange(16)).all()


@pytest.mark.parametrize("name", list(CASES) + list(SPECIAL))
def test_hostile_file(hostile, run_py, name):
    res = hostile["results"].get(name)
    if res is None:
        # the batch died or hung before this case: run it alone for a precise report
        one = run_py(ONE, timeout=60, args=(hostile["paths"][name],))
        assert one.returncode == 0, "case %s crashed the reader:\n%s\n(batch: %s)" % (
            name, one.describe(), hostile["batch"].describe()[-3000:])
        res = json.loads(one.stdout.strip().splitlines()[-1][len("RESULT "):])[1]
    for fn in ("inspect", "restore", "page_sources"):
        r = res[fn]
        assert not r.get("ok"), "%s accepted the hostile file %r: %s" % (fn, name, res)
        assert r["snap"] and r["value"], (
            "%s raised %s, not SnapshotError, for %r: %s" % (fn, r["type"], name, r["msg"]))
        assert len(r["msg"]) > 10, r
        assert r["secs"] < 10, "%s took %.1fs for %r" % (fn, r["secs"], name)


def test_fifo_is_rejected_without_hanging(run_py, tmp_path):
    """A named pipe where a snapshot should be: opening it for reading would wait for a writer
    forever; the reader must refuse it instead."""
    path = str(tmp_path / "pipe.snap")
    os.mkfifo(path)
    res = run_py(ONE, timeout=10, args=(path,))
    assert res.returncode == 0, res.describe()
    r = json.loads(res.stdout.strip().splitlines()[-1][len("RESULT "):])[1]
    for fn in ("inspect", "restore", "page_sources"):
        assert r[fn].get("snap"), (fn, r)


HUGE_SPARSE = """
import resource
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))   # a runaway read fails, not OOMs
path = sys.argv[1]
res = try_one(path)
print("RESULT", json.dumps(["one", res]), flush=True)
"""


@pytest.mark.skipif(os.environ.get("PYLAZYMEM_UNDER_ASAN") == "1",
                    reason="ASan's shadow memory needs more address space than this test's "
                           "RLIMIT_AS allows")
def test_huge_sparse_file_is_rejected_in_bounded_memory(run_py, tmp_path, valid_bytes):
    """A sparse file whose header claims 2^38 pages (a 1 TiB page map, a 1 PiB region: more
    than any address space) with a wrong tables checksum. The reader must not try to hold the
    map in memory: SnapshotError, in bounded time and memory (run under a 2 GiB RLIMIT_AS)."""
    sf = SnapFile.parse(valid_bytes)
    sf.relayout()
    h = sf.header
    n = 1 << 38
    h.update(npages=n, map_bytes=4 * n, nws=0, ws_bytes=0, nstored=0, store_bytes=0,
             sigs_bytes=0)
    h["map_offset"] = h["store_offset"]
    h["ws_offset"] = h["map_offset"] + h["map_bytes"]
    h["manifest_offset"] = h["ws_offset"]
    h["sigs_offset"] = h["file_bytes"] = h["manifest_offset"] + h["manifest_bytes"]
    h["tables_xxh3"] = 12345
    path = str(tmp_path / "sparse.snap")
    try:
        with open(path, "wb") as f:
            f.write(sf.pack_header())
            f.truncate(h["manifest_offset"])
            f.seek(h["manifest_offset"])
            f.write(sf.manifest)
    except OSError as e:
        pytest.skip("cannot make a 1 TiB sparse file here: %s" % e)
    try:
        res = run_py(TRY_ONE + HUGE_SPARSE, timeout=60, args=(path,))
    finally:
        os.unlink(path)
    assert res.returncode == 0, res.describe()
    r = json.loads(res.stdout.strip().splitlines()[-1][len("RESULT "):])[1]
    for fn in ("inspect", "restore", "page_sources"):
        assert r[fn].get("snap"), "%s: %s" % (fn, r[fn])
        assert r[fn]["secs"] < 10, r[fn]


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    return make_valid(str(tmp_path_factory.mktemp("valid") / "v.snap"))


def test_cases_recompute_checksums_where_needed(hostile):
    """Self-check: cases meant to reach the deeper checks have consistent checksums."""
    for name in ("store_index_out_of_range", "store_entry_unused_by_map", "ws_duplicated",
                 "manifest_object_dtype", "page_size_3000", "npages_huge", "wrong_version_3",
                 "version_1"):
        data = open(hostile["paths"][name], "rb").read()
        hx = struct.unpack_from("<Q", data, HEADER_CHECKED)[0]
        assert hx == xxh3(data[:HEADER_CHECKED]), name
        h = SnapFile.parse(data).header if name not in ("npages_huge", "page_size_3000") else None
        if h is not None:
            assert h["tables_xxh3"] == xxh3(data[h["map_offset"]:h["sigs_offset"]]), name
            assert h["sigs_xxh3"] == xxh3(data[h["sigs_offset"]:]), name


# ---- the signature section: checked when it is first read ---------------------------------

SIG_CASES = {
    "sigs_byte_flipped": _flip("sigs"),
    "sigs_checksum_field_wrong": _layout(sigs_xxh3=12345),
}

SIG_CHECK = """
path = sys.argv[1]
res = {}
def attempt(name, fn):
    try:
        fn()
        res[name] = "ok"
    except plm.SnapshotError as e:
        res[name] = "SnapshotError: " + str(e)
    except plm.LazyMemError as e:
        res[name] = "LazyMemError: " + str(e)
attempt("inspect", lambda: plm.inspect(path))
attempt("page_sources", lambda: plm.snapshot.page_sources(path))
attempt("restore_verify", lambda: plm.restore(path, verify=True).close())
with plm.restore(path, prefetch="none", background=False) as r:
    attempt("read", lambda: int(pages(r)[4].sum()))
    attempt("signatures", lambda: r.signatures())
    attempt("checkpoint", lambda: plm.checkpoint(r, path + ".again"))
print("RESULT", json.dumps(res), flush=True)
"""


@pytest.mark.parametrize("name", list(SIG_CASES))
def test_damaged_signature_section(valid_bytes, tmp_path, run_py, name):
    """restore() does not read the signatures (they cost time and are rarely needed), so damage
    to them is found where they are read: inspect(), restore(verify=True), checkpointing the
    restored region again, signatures(). Pages are still served (the store is intact), and
    page_sources() (which restore's checks) accepts the file."""
    data = SIG_CASES[name](valid_bytes, SnapFile.parse(valid_bytes))
    path = write_file(tmp_path / (name + ".snap"), data)
    res = run_py(SIG_CHECK, timeout=60, args=(path,))
    assert res.returncode == 0, res.describe()
    r = json.loads(res.stdout.strip().splitlines()[-1][len("RESULT "):])
    for fn in ("inspect", "restore_verify", "checkpoint"):
        assert r[fn].startswith("SnapshotError") and "signature" in r[fn], (fn, r)
    assert r["signatures"].startswith(("SnapshotError", "LazyMemError")), r
    assert "signature" in r["signatures"], r
    assert r["page_sources"] == "ok" and r["read"] == "ok", r
    assert not os.path.exists(path + ".again")


# ---- issue 10, case 8: the C entry points check the sizes they are given -------------------

def test_c_entry_points_validate_sizes_themselves(run_py_ok, tmp_path):
    """Sizes from a file reach C through the bindings; the C functions must not trust their
    Python caller (lm_snap_check with nstored near 2^64 overflowed its bitmap's size and wrote
    past the heap block; store_offset + nstored * page_size could wrap). Each hostile call
    returns -EINVAL (or -ERANGE), never crashes; under ASan any out-of-bounds access fails."""
    path = str(tmp_path / "blob")
    with open(path, "wb") as f:
        f.write(b"\x01" * (4 * PAGE_SIZE))
    out = run_py_ok(f"""
        import errno
        from pylazymem._binding import ffi, lib
        U64 = (1 << 64) - 1
        res = {{}}
        pmap = np.full(16, 2, np.uint32)                 # every page: store entry 0
        ws = np.zeros(1, np.uint64)
        counts = ffi.new("uint64_t[3]")
        m = ffi.from_buffer("struct lm_snap_page[]", pmap)
        w = ffi.from_buffer("uint64_t[]", ws)
        for name, (npages, nstored) in {{
                "nstored_u64": (16, U64), "nstored_u64_minus_63": (16, U64 - 63),
                "nstored_2^58": (16, 1 << 58), "nstored_past_map_limit": (16, 1 << 33),
                "npages_u64": (U64, 1), "npages_2^60": (1 << 60, 1)}}.items():
            res[name] = lib.lm_snap_check(m, npages, nstored, w, 0, counts)
        res["ws_huge"] = lib.lm_snap_check(m, 16, 1, w, U64, counts)
        r = plm.Region(16 * PS, _start=False)
        lm = r._lm
        fd = os.open({path!r}, os.O_RDONLY)
        for name, args in {{
                "store_offset_wraps": (U64 - PS + 1, 1, 0, 0),
                "store_offset_wraps_2": (U64 - 2 * PS + 1, 2, 0, 0),
                "nstored_times_ps_wraps": (0, (1 << 64) // PS, 0, 0),
                "sigs_offset_wraps": (0, 1, U64 - 7, 0),
                "sigs_past_end": (0, 1, 4 * PS - 4, 0)}}.items():
            res[name] = lib.lm_source_attach(lm, fd, args[0], args[1], args[2], args[3], 0)
        res["restore_nstored_u64"] = lib.lm_restore_table(lm, m, 16, U64)
        res["restore_npages_u64"] = lib.lm_restore_table(lm, m, U64, 1)
        os.close(fd)
        r.close()
        print(json.dumps(res))
    """, timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    import errno
    for name, rc in res.items():
        assert rc in (-errno.EINVAL, -errno.ERANGE, -errno.EFBIG), (name, rc, res)
