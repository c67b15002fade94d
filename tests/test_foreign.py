"""Other libraries' array files restored lazily (pylazymem/_foreign.py, docs/foreign-formats.md):
.npy (versions 1.0, 2.0, 3.0), .npz written by np.savez, and .safetensors.

Round trips compare every byte with np.load / safetensors' own loader and the whole region
image with the file; laziness is checked with the region's counters; writes stay private; a
file changed under a running restore fails loudly (in a subprocess: SIGBUS); malformed and
tampered headers give a SnapshotError naming the file (targeted cases, then a fuzz loop).
Header parsing needs no compiled core (read_header): those tests run under both backends.
"""
import json
import os
import signal
import struct
import sys

import numpy as np
import pytest
import xxhash

import pylazymem as plm
from pylazymem import _foreign as F
from pylazymem._snapfile import SnapshotError
from _helpers import PAGE_SIZE

PS = PAGE_SIZE
SIGBUS_RC = -signal.SIGBUS


def lazy(f):
    """Needs: the compiled core and a userfaultfd (reads of the region are user-mode faults);
    bounded in time, since it touches lazy memory."""
    return pytest.mark.core(pytest.mark.uffd(pytest.mark.timeout(120)(f)))


def view(region, e):
    return np.ndarray(e["shape"], e["dtype"], buffer=region, offset=e["offset"],
                      order="F" if e["fortran"] else "C")


def load(path, **kw):
    fmt = F.detect(open(path, "rb").read(F.HEAD_BYTES))
    kw.setdefault("background", False)
    return F.open_foreign(path, fmt, **kw)


def image_equals_file(region, path):
    """The region holds the file's bytes from offset 0, and zeros past its end."""
    data = open(path, "rb").read()
    img = bytes(memoryview(region))
    return img[:len(data)] == data and not any(img[len(data):])


def same(a, b):
    """Same dtype, shape, memory order and bytes (NaN-safe)."""
    return (a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
            and (a.ndim < 2 or a.flags.f_contiguous == b.flags.f_contiguous))


def st_bytes(tensors, metadata=None):
    """A .safetensors file, written here (no library needed): tensors maps a name to
    (dtype name, shape, raw bytes), laid out in the given order, header padded to 8 bytes."""
    header, at, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dt, shape, raw) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [at, at + len(raw)]}
        at += len(raw)
        blobs.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write(tmp_path, name, data):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(data)
    return p


# ---- the arrays of the round trips -----------------------------------------------------------

def _arrays():
    rng = np.random.default_rng(14)
    out = {
        "f8_0d": np.float64(np.pi).reshape(()),
        "i1_0d": np.array(-5, np.int8),
        "empty": np.zeros((0,), np.float32),
        "empty_2d": np.zeros((3, 0), "<i8"),
        "bool": rng.integers(0, 2, 1000).astype(bool),
        "u2": rng.integers(0, 1 << 16, (17, 3)).astype(np.uint16),
        "i8_multi_page": rng.integers(-1 << 62, 1 << 62, 3 * PS // 8 + 5),
        "f2": rng.standard_normal(257).astype(np.float16),
        "f4_sub_page": rng.standard_normal(11).astype(np.float32),
        "c16": (rng.standard_normal(40) + 1j * rng.standard_normal(40)),
        "f8_big_endian": rng.standard_normal((33, 7)).astype(">f8"),
        "i4_big_endian_fortran": np.asfortranarray(rng.integers(0, 99, (9, 513)).astype(">i4")),
        "f4_fortran": np.asfortranarray(rng.standard_normal((300, 200)).astype(np.float32)),
        "bytes": np.array([b"abc", b"", b"0123456"], "S7"),
        "unicode": np.array(["pylazymem", "é"], "<U9"),
        "datetime": np.arange(5).astype("M8[ns]"),
        "structured": np.zeros(50, [("a", "<i4"), ("b", ">f8", (2,)), ("c", "S3")]),
        "nan": np.array([np.nan, -0.0, np.inf]),
    }
    out["structured"]["a"] = np.arange(50)
    out["structured"]["b"] = rng.standard_normal((50, 2))
    return out


ARRAYS = _arrays()


# ---- detect ------------------------------------------------------------------------------

def test_detect(tmp_path):
    np.save(str(tmp_path / "a.npy"), np.zeros(3))
    np.savez(str(tmp_path / "b.npz"), x=np.zeros(3))
    np.savez(str(tmp_path / "empty.npz"))
    s = st_bytes({"x": ("F32", (1,), b"\0" * 4)})
    for name, want in (("a.npy", "npy"), ("b.npz", "npz"), ("empty.npz", "npz")):
        assert F.detect(open(str(tmp_path / name), "rb").read(16)) == want
    assert F.detect(s[:16]) == "safetensors"
    assert F.detect(b"PLMSNAP\x00\x02\x00\x00\x00" + bytes(8)) is None   # a snapshot
    assert F.detect(b"") is None and F.detect(b"\x93NUM") is None
    assert F.detect(b"hello, world, this is text") is None


# ---- round trips: .npy -------------------------------------------------------------------

@lazy
@pytest.mark.parametrize("name", sorted(ARRAYS))
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_npy_round_trip(tmp_path, name, version):
    path = str(tmp_path / "a.npy")
    a = ARRAYS[name]
    with open(path, "wb") as f:
        np.lib.format.write_array(f, a, version=version)
    ref = np.load(path)
    region, entries = load(path)
    with region:
        assert list(entries) == ["array"]
        e = entries["array"]
        assert e["meta"]["npy_version"] == "%d.%d" % version
        assert e["fortran"] == (ref.ndim > 1 and ref.flags.f_contiguous
                                and not ref.flags.c_contiguous)
        assert same(view(region, e), ref)
        assert image_equals_file(region, path)
        assert region.foreign_metadata == {} and region.foreign["format"] == "npy"


# ---- round trips: .npz -------------------------------------------------------------------

@lazy
def test_npz_round_trip(tmp_path):
    path = str(tmp_path / "b.npz")
    named = dict(ARRAYS, **{"naïve name": np.arange(3), "arr_0x": np.ones(2)})
    np.savez(path, *[np.arange(5, dtype=np.int16)], **named)   # one positional: arr_0
    with np.load(path) as z:
        ref = {k: z[k] for k in z.files}
    region, entries = load(path)
    with region:
        assert sorted(entries) == sorted(ref)
        for k, e in entries.items():
            assert same(view(region, e), ref[k]), k
            assert e["meta"]["member"] == k + ".npy"
        assert image_equals_file(region, path)


@lazy
def test_empty_npz(tmp_path):
    path = str(tmp_path / "e.npz")
    np.savez(path)
    region, entries = load(path)
    with region:
        assert entries == {} and image_equals_file(region, path)


# ---- round trips: .safetensors -------------------------------------------------------------

ST_ARRAYS = {
    "F64": np.linspace(-1, 1, 1000), "F32": np.arange(2 * PS, dtype=np.float32).reshape(8, -1),
    "F16": np.arange(7, dtype=np.float16), "I64": np.arange(-3, 3, dtype=np.int64),
    "I32": np.zeros((0, 4), np.int32), "I16": np.array(7, np.int16),
    "I8": np.arange(-128, 127, dtype=np.int8), "U64": np.array([1 << 63], np.uint64),
    "U32": np.arange(5, dtype=np.uint32), "U16": np.arange(70000 % 65536, dtype=np.uint16),
    "U8": np.arange(255, dtype=np.uint8), "BOOL": np.array([True, False, True]),
}


@lazy
@pytest.mark.package("safetensors")
def test_safetensors_round_trip(tmp_path):
    import safetensors.numpy as st
    path = str(tmp_path / "m.safetensors")
    arrays = dict(ST_ARRAYS, big_endian_written=np.arange(9, dtype=">f4"))
    st.save_file(arrays, path, metadata={"format": "np", "note": "é"})
    ref = st.load_file(path)
    region, entries = load(path)
    with region:
        assert sorted(entries) == sorted(ref)
        for k, e in entries.items():
            assert same(view(region, e), ref[k]), k
            assert not e["fortran"]
        assert entries["F32"]["meta"] == {"dtype": "F32"}
        assert region.foreign_metadata == {"format": "np", "note": "é"}
        assert image_equals_file(region, path)


@lazy
@pytest.mark.package("ml_dtypes")
def test_safetensors_extension_dtypes(tmp_path):
    """BF16 and the float8 types: ml_dtypes' types where it is installed (what safetensors
    writes them from), their bytes as unsigned integers where it is not; the name is kept."""
    import ml_dtypes
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    arrays = {"bf16": x.astype(ml_dtypes.bfloat16), "e4m3": x.astype(ml_dtypes.float8_e4m3fn),
              "e5m2": x.astype(ml_dtypes.float8_e5m2)}
    names = {"bf16": "BF16", "e4m3": "F8_E4M3", "e5m2": "F8_E5M2"}
    path = write(tmp_path, "x.safetensors", st_bytes(
        {k: (names[k], a.shape, a.tobytes()) for k, a in arrays.items()}))
    region, entries = load(path)
    with region:
        for k, a in arrays.items():
            assert same(view(region, entries[k]), a), k
            assert entries[k]["meta"] == {"dtype": names[k]}


def test_safetensors_extension_dtypes_without_ml_dtypes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # import ml_dtypes fails
    raw = np.arange(6, dtype="<u2").tobytes()
    path = write(tmp_path, "x.safetensors", st_bytes({"b": ("BF16", (2, 3), raw),
                                                      "f8": ("F8_E5M2", (2,), b"\1\2")}))
    fmt, entries, meta, size = F.read_header(path)
    assert fmt == "safetensors" and meta == {} and size == os.path.getsize(path)
    assert entries["b"]["dtype"] == np.dtype("<u2") and entries["b"]["meta"] == {"dtype": "BF16"}
    assert entries["f8"]["dtype"] == np.dtype("u1")


@lazy
def test_safetensors_round_trip_written_here(tmp_path):
    """The same without the safetensors library: every dtype, against the arrays written."""
    tensors = {k: (k, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())
               for k, a in ST_ARRAYS.items()}
    path = write(tmp_path, "m.safetensors", st_bytes(tensors, {"a": "b"}))
    region, entries = load(path)
    with region:
        for k, a in ST_ARRAYS.items():
            got = view(region, entries[k])
            assert got.shape == a.shape and got.tobytes() == a.tobytes(), k
        assert region.foreign_metadata == {"a": "b"}


# ---- the region: tail, laziness, private writes, signatures ---------------------------------

@lazy
@pytest.mark.parametrize("extra", [0, 1, PS - 129, PS - 128, PS - 127])
def test_file_sizes_around_the_page_size(tmp_path, extra):
    """The last page is partial (or not): bytes past the end of the file read as zero."""
    a = np.arange(2 * PS + extra, dtype=np.uint8) * np.uint8(7) + np.uint8(1)
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    size = os.path.getsize(path)
    region, entries = load(path)
    with region:
        assert region.nbytes == -(-size // PS) * PS
        assert same(view(region, entries["array"]), a)
        assert image_equals_file(region, path)
        assert region.stats()["source_bytes_read"] == size   # nothing read past the end


@lazy
def test_pages_are_loaded_lazily(tmp_path):
    a = np.arange(1 << 20, dtype=np.float64)        # 8 MiB, 2049 pages
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    region, entries = load(path, max_cluster_pages=1)
    with region:
        s = region.stats()
        assert s["pages_present"] == 0 and s["faults"] == 0 and s["source_bytes_read"] == 0
        v = view(region, entries["array"])
        touched = set()
        for i in (0, 500_000, len(a) - 1, 500_001):
            assert v[i] == i
            touched.add((entries["array"]["offset"] + 8 * i) // PS)
        s = region.stats()
        assert s["pages_present"] == len(touched) == 3, s
        size = os.path.getsize(path)                # the last page is partial: 128 bytes
        assert s["source_bytes_read"] == sum(min(PS, size - p * PS) for p in touched)
        state = region.meta["state"]
        assert sorted(np.nonzero(state == int(plm.PageState.PRESENT))[0]) == sorted(touched)


@lazy
def test_prefetch_and_background(tmp_path):
    a = np.arange(300_000, dtype=np.int32)
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    region, entries = load(path, prefetch="all")
    with region:
        s = region.stats()
        assert s["pages_present"] == region.npages and s["prefetched_pages"] == region.npages
        assert same(view(region, entries["array"]), a)
    region, entries = load(path, prefetch=[5, 3])
    with region:
        assert region.stats()["pages_present"] == 2
        assert list(region.working_set()[:2]) == [5, 3]
    region, entries = load(path, background=True)
    with region:
        import time
        deadline = time.monotonic() + 30
        while region.stats()["pages_present"] < region.npages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert region.stats()["pages_present"] == region.npages
        assert image_equals_file(region, path)
    with pytest.raises(plm.InvalidArgumentError):
        load(path, prefetch=[region.npages])
    with pytest.raises(plm.InvalidArgumentError):
        load(path, prefetch="some")


@lazy
def test_writes_stay_private(tmp_path):
    a = np.arange(3 * PS, dtype=np.float32)
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    before = open(path, "rb").read()
    region, entries = load(path)
    with region:
        v = view(region, entries["array"])
        v[::1000] = -1
        v[5] += 100
        assert v[1000] == -1 and v[5] == 105 and v[6] == 6
    assert open(path, "rb").read() == before
    region, entries = load(path)     # a second restore sees the file, not the writes
    with region:
        assert same(view(region, entries["array"]), a)


@lazy
def test_signatures_are_the_file_pages_hashes(tmp_path):
    """A raw source has no signature section: signatures (meta, signatures(), verify) are the
    hashes of the file's pages, the last one zero-padded; computed, never made up."""
    a = np.random.default_rng(1).integers(0, 255, 5 * PS + 100, dtype=np.uint8)
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    data = open(path, "rb").read()
    data += bytes(-len(data) % PS)
    want = [xxhash.xxh3_64_intdigest(data[i:i + PS]) for i in range(0, len(data), PS)]
    region, entries = load(path)
    with region:
        assert view(region, entries["array"])[0] == a[0]       # page 0 present, others lazy
        # Lazy pages get theirs from the hashes; a page made present before they were first
        # needed shows 0 (unknown) until it is hashed, as for a snapshot.
        sig = region.meta["signature"]
        assert list(sig[1:]) == want[1:] and sig[0] in (0, want[0])
        assert region.stats()["pages_present"] == 1            # hashing faulted nothing in
        assert list(region.signatures()) == want
        assert list(region.meta["signature"]) == want
    for prefetch in ("none", "all"):
        region, entries = load(path, verify=True, prefetch=prefetch)
        with region:
            assert same(view(region, entries["array"]), a)
            assert region.stats()["verify_failures"] == 0


@lazy
@pytest.mark.uffd_full   # checkpoint writes the region's pages with pwrite (kernel accesses)
def test_checkpoint_of_a_foreign_region(tmp_path):
    a = np.arange(10_000, dtype=np.int64)
    path, snap = str(tmp_path / "a.npy"), str(tmp_path / "a.snap")
    np.save(path, a)
    region, entries = load(path)
    with region:
        view(region, entries["array"])[7] = -7       # a private write goes into the snapshot
        plm.checkpoint(region, snap, working_set="none")
        img = bytes(memoryview(region))
    with plm.restore(snap, prefetch="none", background=False) as r:
        assert bytes(memoryview(r)) == img


def test_content_id_changes_with_the_file(tmp_path):
    path = write(tmp_path, "a.npy", b"x" * 100)
    before = F.content_id(os.stat(path))
    assert F.content_id(os.stat(path)) == before
    with open(path, "r+b") as f:      # same size, new contents
        f.write(b"y")
    assert F.content_id(os.stat(path)) != before


@lazy
def test_arguments(tmp_path):
    path = str(tmp_path / "a.npy")
    np.save(path, np.zeros(3))
    with pytest.raises(plm.InvalidArgumentError, match="page server"):
        F.open_foreign(path, "npy", server="/nonexistent.sock")
    with pytest.raises(plm.InvalidArgumentError, match="format"):
        F.open_foreign(path, "pickle")
    with pytest.raises(SnapshotError, match="no such array file"):
        F.open_foreign(str(tmp_path / "missing.npy"), "npy")
    with pytest.raises(SnapshotError, match="empty file"):
        F.open_foreign(write(tmp_path, "empty.npy", b""), "npy")
    with pytest.raises(SnapshotError, match="not a regular file"):
        F.open_foreign(str(tmp_path), "npy")


# ---- shared pages ------------------------------------------------------------------------

@lazy
@pytest.mark.shared_pages
def test_share_maps_one_pool(tmp_path):
    a = np.random.default_rng(2).standard_normal(64 * PS // 8)
    path = str(tmp_path / "a.npy")
    np.save(path, a)
    r1, e1 = load(path, share=True)
    r2, e2 = load(path, share="auto")
    with r1, r2:
        assert r1.shared and r2.shared and r1.share_reason == ""
        assert r1.pool["inode"] == r2.pool["inode"]               # one pool
        assert same(view(r1, e1["array"]), a)                     # r1 publishes...
        assert same(view(r2, e2["array"]), a)                     # ...r2 maps them
        assert r2.stats()["pages_shared_mapped"] > 0
        assert r2.stats()["source_bytes_read"] < r1.stats()["source_bytes_read"]
        view(r1, e1["array"])[:10] = 0                            # a store copies the page
        assert same(view(r2, e2["array"]), a) and image_equals_file(r2, path)
        assert r1.foreign["content_id"] == "%016x" % F.content_id(os.stat(path))


@lazy
def test_share_false_and_auto_report_why_not(tmp_path):
    path = str(tmp_path / "a.npy")
    np.save(path, np.zeros(3))
    region, _ = load(path)
    with region:
        assert not region.shared and "not asked for" in region.share_reason
    if plm.features().shared_pages:
        return
    region, _ = load(path, share="auto")
    with region:
        assert not region.shared and region.share_reason
    with pytest.raises(plm.SharingUnavailableError):
        load(path, share=True)


# ---- a file changed under a running restore ----------------------------------------------

CHANGED = """
    from pylazymem import _foreign as F
    path, how = sys.argv[1], sys.argv[2]
    a = np.load(path)
    r, e = F.open_foreign(path, "npy", background=False, max_cluster_pages=1)
    v = np.ndarray(e["array"]["shape"], e["array"]["dtype"], buffer=r, offset=e["array"]["offset"])
    assert v[0] == a[0]                              # served while the file is intact
    if how == "truncate":
        os.truncate(path, PS + 17)
    elif how == "overwrite":                         # same size, new contents (and mtime)
        with open(path, "r+b") as f:
            f.seek(20 * PS)
            f.write(b"garbage!" * 16)
    elif how == "replace":
        with open(path + ".new", "wb") as f:
            f.write(b"something else")
        os.replace(path + ".new", path)
    time.sleep(0.05)                                 # > 10 ms: the change is noticed
    print("CHANGED", flush=True)
    x = v[(20 * PS) // 8].copy()                     # SIGBUS expected for truncate/overwrite
    print("READ", x == a[(20 * PS) // 8], flush=True)
    assert np.array_equal(v, a)
    print("ALL_OK", flush=True)
"""


@lazy
@pytest.mark.uffd_full
@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_file_changed_under_restore_fails_loudly(run_py, tmp_path, features, how):
    if not features.has_poison:
        pytest.skip("needs UFFDIO_POISON to fail an access loudly")
    path = str(tmp_path / "a.npy")
    np.save(path, np.arange(40 * PS // 8, dtype=np.int64))
    res = run_py(CHANGED, timeout=60, args=(path, how))
    assert "CHANGED" in res.stdout, res.describe()
    assert "READ" not in res.stdout, "a page of a changed file was served: " + res.describe()
    assert res.returncode == SIGBUS_RC, res.describe()


@lazy
def test_file_replaced_by_rename_is_harmless(run_py_ok, tmp_path):
    """The restore reads the file it opened: a new file renamed over it changes nothing."""
    path = str(tmp_path / "a.npy")
    np.save(path, np.arange(40 * PS // 8, dtype=np.int64))
    out = run_py_ok(CHANGED, timeout=60, args=(path, "replace"))
    assert "READ True" in out and "ALL_OK" in out, out


# ---- malformed and tampered files ---------------------------------------------------------

def _npy(header, version=(1, 0), data=b"", pad=True):
    """A .npy file with this header text (padded as numpy does unless pad=False)."""
    h = header.encode("latin1" if version != (3, 0) else "utf8")
    pre = 10 if version == (1, 0) else 12
    if pad:
        h += b" " * (-(pre + len(h) + 1) % 64) + b"\n"
    size = struct.pack("<H" if version == (1, 0) else "<I", len(h))
    return b"\x93NUMPY" + bytes(version) + size + h + data


GOOD_NPY = "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }"

NPY_CASES = {
    "bad_magic": (b"\x93NUMPZ\x01\x00" + bytes(100), "bad magic"),
    "version_4": (_npy(GOOD_NPY, (4, 0), bytes(16)), "version 4.0 is not supported"),
    "version_1_1": (_npy(GOOD_NPY, (1, 1), bytes(16)), "version 1.1"),
    "short": (b"\x93NUMPY\x01", "truncated"),
    "header_past_end": (_npy(GOOD_NPY, data=bytes(16))[:60], "truncated"),
    "header_too_long": (b"\x93NUMPY\x02\x00" + struct.pack("<I", 10001) + b" " * 10001,
                        "larger than numpy's limit"),
    "not_literal": (_npy("{'descr': __import__('os').system('true'), 'fortran_order': False,"
                         " 'shape': (2,)}", data=bytes(16)), "not a Python literal"),
    "syntax": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,", data=bytes(16)),
               "not a Python literal"),
    "not_dict": (_npy("['<f8', False, (2,)]", data=bytes(16)), "must be a dict"),
    "missing_key": (_npy("{'descr': '<f8', 'shape': (2,)}", data=bytes(16)), "must be a dict"),
    "extra_key": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'x': 1}",
                       data=bytes(16)), "must be a dict"),
    "fortran_int": (_npy("{'descr': '<f8', 'fortran_order': 0, 'shape': (2,)}",
                         data=bytes(16)), "fortran_order must be"),
    "negative_dim": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (-2,)}",
                          data=bytes(16)), "shape must be"),
    "float_dim": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2.0,)}",
                       data=bytes(16)), "shape must be"),
    "bool_dim": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (True,)}",
                      data=bytes(16)), "shape must be"),
    "shape_list": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': [2]}",
                        data=bytes(16)), "shape must be"),
    "too_many_dims": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (%s)}"
                           % ("1," * 65), data=bytes(8)), "shape must be"),
    "object_dtype": (_npy("{'descr': '|O', 'fortran_order': False, 'shape': (2,)}",
                          data=bytes(16)), "object dtype"),
    "object_field": (_npy("{'descr': [('a', '<i4'), ('b', '|O')], 'fortran_order': False, "
                          "'shape': (1,)}", data=bytes(16)), "object dtype"),
    "bad_descr": (_npy("{'descr': '<q9', 'fortran_order': False, 'shape': (2,)}",
                       data=bytes(16)), "is not a dtype"),
    "descr_number": (_npy("{'descr': 5, 'fortran_order': False, 'shape': (2,)}",
                          data=bytes(16)), "is not a dtype"),
    "subarray": (_npy("{'descr': ('<f8', (2,)), 'fortran_order': False, 'shape': (1,)}",
                      data=bytes(16)), "sub-array"),
    "data_short": (_npy(GOOD_NPY, data=bytes(15)), "needs 16 bytes of data, 15"),
    "huge_shape": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (%d, %d)}"
                        % (1 << 40, 1 << 40), data=bytes(16)), "beyond what an array can index"),
    "large_shape": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (%d, %d)}"
                         % (1 << 20, 1 << 20), data=bytes(16)), "truncated"),
    "bad_utf8_v3": (_npy("{'descr': '<f8', 'fortran_order': False, 'shape': (2,)}",
                         (3, 0), bytes(16)).replace(b"descr", b"d\xffscr"), "not utf8 text"),
}


@pytest.mark.parametrize("case", sorted(NPY_CASES))
def test_hostile_npy(tmp_path, case):
    data, why = NPY_CASES[case]
    path = write(tmp_path, "h.npy", data)
    with pytest.raises(SnapshotError, match=why) as e:
        F.read_header(path, "npy")
    assert str(e.value).startswith(path + ": ")


def test_npy_trailing_bytes_are_ignored_as_numpy_does(tmp_path):
    path = write(tmp_path, "t.npy", _npy(GOOD_NPY, data=np.arange(2.0).tobytes() + b"xyz"))
    _, entries, _, _ = F.read_header(path)
    assert entries["array"]["shape"] == (2,) and list(np.load(path)) == [0.0, 1.0]


def _zip_member(tmp_path, name, data, method=0):
    import zipfile
    path = str(tmp_path / "z.npz")
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr(name, data)
    return path


def _local(name, data):
    """A zip local file header (stored) and the member's data."""
    import zlib
    name = name.encode()
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0, zlib.crc32(data),
                       len(data), len(data), len(name), 0) + name + data


def _zip_by_hand(body, members):
    """body: the members' area; members: (name, local header offset, data), one central
    directory entry each."""
    import zlib
    cd = b""
    for name, off, data in members:
        n = name.encode()
        cd += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0,
                          zlib.crc32(data), len(data), len(data), len(n), 0, 0, 0, 0, 0,
                          off) + n
    return body + cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members),
                                   len(members), len(cd), len(body), 0)


def test_npz_compressed_is_refused_clearly(tmp_path):
    path = str(tmp_path / "c.npz")
    np.savez_compressed(path, x=np.zeros(1000))
    with pytest.raises(SnapshotError, match="np.savez or plm.save") as e:
        F.read_header(path)
    assert "compressed" in str(e.value) and path in str(e.value)


def test_npz_written_by_hand_is_read(tmp_path):
    """The writer the hostile cases below use makes a valid .npz (so they test one flaw)."""
    good = _npy(GOOD_NPY, data=np.arange(2.0).tobytes())
    path = write(tmp_path, "h.npz", _zip_by_hand(_local("x.npy", good), [("x.npy", 0, good)]))
    _, entries, _, _ = F.read_header(path)
    assert list(entries) == ["x"] and list(np.load(path)["x"]) == [0.0, 1.0]


@pytest.mark.parametrize("case", ["not_npy", "directory", "bad_member", "truncated_zip",
                                  "local_name", "local_offset", "overlap", "duplicate",
                                  "data_past_cd", "torch_like"])
def test_hostile_npz(tmp_path, case):
    good = _npy(GOOD_NPY, data=bytes(16))
    if case == "not_npy":
        path, why = _zip_member(tmp_path, "x.txt", b"hello"), "is not a .npy array"
    elif case == "torch_like":
        path, why = _zip_member(tmp_path, "archive/data.pkl", b"\x80\x04."), "torch.save"
    elif case == "directory":
        path, why = _zip_member(tmp_path, "d/", b""), "is a directory"
    elif case == "bad_member":
        path, why = _zip_member(tmp_path, "x.npy", good[:40]), "member 'x.npy': truncated"
    elif case == "overlap":
        # y's local header and data lie inside x's data: both well formed, one byte range
        inner = _local("y.npy", good)
        outer = _npy("{'descr': '|u1', 'fortran_order': False, 'shape': (%d,)}" % len(inner),
                     data=inner)
        body = _local("x.npy", outer)
        path = write(tmp_path, "h.npz", _zip_by_hand(
            body, [("x.npy", 0, outer), ("y.npy", len(body) - len(inner), good)]))
        why = "members 'x.npy' and 'y.npy' overlap"
    elif case == "duplicate":
        one = _local("x.npy", good)
        path = write(tmp_path, "h.npz", _zip_by_hand(one + one, [("x.npy", 0, good),
                                                                 ("x.npy", len(one), good)]))
        why = "appears twice"
    else:
        path = _zip_member(tmp_path, "x.npy", good)
        data = bytearray(open(path, "rb").read())
        cd = data.rindex(b"PK\x01\x02")
        if case == "truncated_zip":
            data, why = data[:-10], "not a readable .npz"
        elif case == "local_name":
            data[30] ^= 1
            why = "disagree"
        elif case == "local_offset":
            struct.pack_into("<I", data, cd + 42, 7)
            why = "no local header"
        elif case == "data_past_cd":
            struct.pack_into("<H", data, 28, 200)      # a local extra field into the CD
            why = "runs past the members' area"
        with open(path, "wb") as f:
            f.write(data)
    with pytest.raises(SnapshotError, match=why) as e:
        F.read_header(path, "npz")
    assert str(e.value).startswith(path + ": ")


def _st_header(header, data=b"", raw=None):
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


ST_CASES = {
    "short": (b"\x10\x00\x00", "truncated"),
    "header_too_big": (struct.pack("<Q", 100 << 20 | 1) + b"{}", "larger than allowed"),
    "header_past_end": (struct.pack("<Q", 64) + b"{}", "truncated"),
    "not_json": (_st_header(None, raw=b"{'x': 1}"), "not valid JSON"),
    "not_utf8": (_st_header(None, raw=b'{"\xff": 1}'), "not valid JSON"),
    "not_object": (_st_header(None, raw=b"[1, 2]"), "start with '{'"),
    "leading_space": (_st_header(None, raw=b" {}"), "start with '{'"),
    "duplicate_key": (_st_header(None, raw=b'{"a": {"dtype": "U8", "shape": [1], '
                                 b'"data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1],'
                                 b' "data_offsets": [1, 2]}}', data=b"xy"), "duplicate key"),
    "unknown_dtype": (_st_header({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
                                 b"x"), "dtype 'F4', which is not one read here"),
    "dtype_number": (_st_header({"x": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}},
                                bytes(4)), "which is not one read here"),
    "extra_field": (_st_header({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1],
                                      "z": 0}}, b"x"), "exactly dtype, shape and data_offsets"),
    "tensor_not_object": (_st_header({"x": [1]}), "exactly dtype"),
    "negative_dim": (_st_header({"x": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}),
                     "shape must be"),
    "float_dim": (_st_header({"x": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}},
                             b"x"), "shape must be"),
    "offsets_reversed": (_st_header({"x": {"dtype": "U8", "shape": [0], "data_offsets": [1, 0]}},
                                    b"x"), "data_offsets must be"),
    "offsets_past_end": (_st_header({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}},
                                    b"x"), "data_offsets must be"),
    "offsets_three": (_st_header({"x": {"dtype": "U8", "shape": [1],
                                        "data_offsets": [0, 1, 2]}}, b"x"),
                      "data_offsets must be"),
    "size_mismatch": (_st_header({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                                 bytes(4)), "is 8 bytes, its data_offsets span 4"),
    "overlap": (_st_header({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                            "y": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}},
                           bytes(3)), "overlap"),
    "gap": (_st_header({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                        "y": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]}},
                       bytes(3)), "belong to no tensor"),
    "trailing": (_st_header({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                            bytes(3)), "the tensors cover 1"),
    "metadata_not_strings": (_st_header({"__metadata__": {"a": 1}}), "__metadata__"),
    "metadata_list": (_st_header({"__metadata__": ["a"]}), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(ST_CASES))
def test_hostile_safetensors(tmp_path, case):
    data, why = ST_CASES[case]
    path = write(tmp_path, "h.safetensors", data)
    with pytest.raises(SnapshotError, match=why) as e:
        F.read_header(path, "safetensors")
    assert str(e.value).startswith(path + ": ")


@lazy
def test_tampered_safetensors_header_gives_a_clear_error(tmp_path):
    """The issue's test: a valid file whose header is edited (a dtype changed, the header size
    unchanged) is refused, naming the file and the tensor, before any page is served."""
    a = np.arange(1000, dtype=np.float32)
    data = st_bytes({"weight": ("F32", a.shape, a.tobytes()), "bias": ("F32", (3,), bytes(12))})
    path = write(tmp_path, "m.safetensors", data.replace(b'"F32"', b'"F64"', 1))
    with pytest.raises(SnapshotError, match=r"tensor 'weight': F64 of shape \(1000,\) is 8000 "
                                            r"bytes, its data_offsets span 4000") as e:
        load(path)
    assert path in str(e.value)
    path = write(tmp_path, "m2.safetensors", data.replace(b"[0,4000]", b"[0,4004]", 1))
    with pytest.raises(SnapshotError, match="weight"):
        load(path)


# ---- fuzz: random damage to valid files -----------------------------------------------------

def _valid_files(tmp_path):
    rng = np.random.default_rng(7)
    npy = str(tmp_path / "v.npy")
    np.save(npy, rng.standard_normal((30, 5)).astype(">f4"))
    npz = str(tmp_path / "v.npz")
    np.savez(npz, a=np.arange(10, dtype=np.int16), b=np.asfortranarray(np.ones((3, 4))),
             c=np.array(2.5))
    st = write(tmp_path, "v.safetensors", st_bytes(
        {"w": ("F32", (4, 6), rng.standard_normal(24).astype("<f4").tobytes()),
         "i": ("I64", (3,), np.arange(3, dtype="<i8").tobytes()),
         "e": ("U8", (0,), b"")}, {"k": "v"}))
    return {"npy": npy, "npz": npz, "safetensors": st}


def _damage(rng, data):
    data = bytearray(data)
    kind = rng.integers(0, 4)
    if kind == 0:                          # truncate
        return bytes(data[:rng.integers(0, len(data))])
    if kind == 3:                          # one byte inserted or deleted in the header area
        at = int(rng.integers(0, min(len(data), 256)))
        return bytes(data[:at] + (bytes([rng.integers(0, 256)]) if rng.integers(0, 2) else b"")
                     + data[at + 1:])
    hi = len(data) if kind == 1 else min(len(data), 256)   # anywhere / in the headers
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(0, hi))
        data[at] ^= 1 << int(rng.integers(0, 8))
    return bytes(data)


def _reference(fmt, path):
    """What numpy / safetensors read, or None where they refuse the file."""
    try:
        if fmt == "npy":
            return {"array": np.load(path, allow_pickle=False)}
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        st = pytest.importorskip("safetensors.numpy")
        return st.load_file(path)
    except Exception:
        return None


FUZZ_ROUNDS = 150


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors"])
def test_fuzz_headers(tmp_path, fmt):
    """Random bit flips, truncations, insertions and deletions (fixed seed): each file is
    refused with a SnapshotError naming it, or read with its arrays inside the file and, where
    the format's own library reads it too, the same names, dtypes and shapes."""
    rng = np.random.default_rng(1414)
    good = open(_valid_files(tmp_path)[fmt], "rb").read()
    path = str(tmp_path / ("f." + fmt))
    outcomes = {"refused": 0, "read": 0, "agreed": 0}
    for i in range(FUZZ_ROUNDS):
        data = _damage(rng, good)
        with open(path, "wb") as f:
            f.write(data)
        try:
            _, entries, _, size = F.read_header(path, fmt)
        except SnapshotError as e:
            assert str(e).startswith(path + ": "), e
            outcomes["refused"] += 1
            continue
        outcomes["read"] += 1
        for e in entries.values():
            n = int(np.prod(e["shape"], dtype=object)) * e["dtype"].itemsize
            assert 0 <= e["offset"] and e["offset"] + n <= size == len(data)
        ref = _reference(fmt, path) if fmt != "safetensors" or _has("safetensors") else None
        if ref is not None:
            assert sorted(ref) == sorted(entries), i
            for k, e in entries.items():
                got = np.ndarray(e["shape"], e["dtype"], buffer=data, offset=e["offset"],
                                 order="F" if e["fortran"] else "C")
                assert same(got, ref[k]), (i, k)
            outcomes["agreed"] += 1
    assert outcomes["refused"] > FUZZ_ROUNDS // 4 and outcomes["read"] > 0, outcomes
    if fmt != "safetensors" or _has("safetensors"):
        assert outcomes["agreed"] > 0, outcomes


def _has(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


@lazy
@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors"])
def test_fuzz_restores(tmp_path, fmt):
    """Damaged files that parse are restored: the region's image is the file and every array
    reads the file's bytes at its offset (never a crash, never a hang)."""
    rng = np.random.default_rng(2828)
    good = open(_valid_files(tmp_path)[fmt], "rb").read()
    path = str(tmp_path / ("f." + fmt))
    restored = 0
    for _ in range(60):
        data = _damage(rng, good)
        with open(path, "wb") as f:
            f.write(data)
        try:
            region, entries = F.open_foreign(path, fmt, background=False)
        except SnapshotError:
            continue
        with region:
            assert image_equals_file(region, path)
            for e in entries.values():
                got = view(region, e)
                want = np.ndarray(e["shape"], e["dtype"], buffer=data, offset=e["offset"],
                                  order="F" if e["fortran"] else "C")
                assert same(got, want)
        restored += 1
    assert restored > 0


@lazy
@pytest.mark.parametrize("shape", [(0, 2**62, 2**62), (0, 2**70), (2**70, 0)])
def test_zero_sized_array_with_huge_dimensions_is_refused(tmp_path, shape):
    """A zero dimension makes the data size 0, which passes every size check; numpy could
    still not make the view (OverflowError, "array is too big"): a clear SnapshotError."""
    import struct as _struct
    h = repr({"descr": "<f8", "fortran_order": shape[0] > 0, "shape": shape}).encode()
    h += b" " * ((64 - (10 + len(h) + 1) % 64) % 64) + b"\n"
    p = tmp_path / "z.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + _struct.pack("<H", len(h)) + h)
    with pytest.raises(plm.SnapshotError, match="beyond what an array can index"):
        plm.load(p)


@lazy
def test_npz_crc_checked_with_verify(tmp_path):
    a = np.arange(512.0)
    np.savez(tmp_path / "a.npz", x=a)
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[raw.find(a.tobytes()) + 8] ^= 0xFF
    (tmp_path / "a.npz").write_bytes(bytes(raw))
    with pytest.raises(plm.SnapshotError, match="CRC-32 mismatch"):
        plm.load(tmp_path / "a.npz", verify=True)
    with plm.load(tmp_path / "a.npz") as st:   # without verify: the bytes as they are
        assert st["x"][1] != 1.0
