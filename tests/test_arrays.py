"""plm.save / plm.load (issue 14, pylazymem/arrays.py): named arrays, tensors and tables saved
once and loaded lazily; writes stay private; the working set is recorded across loads."""
import json
import os
from collections.abc import Mapping
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]
PS = PAGE_SIZE


def _same(a, b):
    """Equal values, dtype and shape (NaN == NaN; structured arrays compared as bytes)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype.fields is not None or a.dtype.kind == "V":
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    return np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")


rng = np.random.default_rng(14)
NUMPY_CASES = {
    "f32": rng.standard_normal(3000).astype(np.float32),
    "f16": rng.standard_normal((17, 33)).astype(np.float16),
    "f64_nan": np.array([1.0, np.nan, -np.inf, 0.0]),
    "c128": (rng.standard_normal(40) + 1j * rng.standard_normal(40)),
    "bool": rng.integers(0, 2, 5000).astype(bool),
    "u8_multi_page": rng.integers(0, 256, 3 * PS + 5, dtype=np.uint8),
    "i64_3d": np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4),
    "big_endian": np.arange(100, dtype=">i4"),
    "big_endian_f8": np.linspace(0, 1, 9).astype(">f8"),
    "zero_d": np.array(3.25),
    "scalar": np.float32(-2.5),
    "empty": np.zeros((0, 7), np.float32),
    "fortran": np.asfortranarray(rng.standard_normal((31, 45))),
    "sliced": np.arange(1000, dtype=np.int32)[::3],
    "transposed_3d": np.arange(60, dtype=np.int16).reshape(3, 4, 5).transpose(1, 0, 2),
    "structured": np.array([(1, 2.5, b"ab"), (3, -1.0, b"cd")],
                           dtype=[("i", "<i4"), ("f", ">f8"), ("s", "S2")]),
    "datetime": np.array(["2026-12-05", "1970-01-01"], dtype="datetime64[D]"),
    "unicode": np.array(["pylazymem", "é"], dtype="<U9"),
}


def test_numpy_round_trip_every_kind(tmp_path):
    path = tmp_path / "s.plm"
    info = plm.save(path, NUMPY_CASES)
    assert set(info.arrays) == set(NUMPY_CASES)
    with plm.load(path) as st:
        assert set(st) == set(NUMPY_CASES) and st.format == "pylazymem"
        for name, want in NUMPY_CASES.items():
            got = st[name]
            assert _same(got, want), name
        assert st["fortran"].flags.f_contiguous and not st["fortran"].flags.c_contiguous
        assert st["zero_d"].shape == () and st["scalar"].shape == ()
        assert st["big_endian"].dtype.byteorder == ">"


@pytest.mark.package("ml_dtypes")
def test_bfloat16_and_float8_round_trip(tmp_path):
    import ml_dtypes

    st = {"bf16": np.arange(-8, 8, 0.5).astype(ml_dtypes.bfloat16),
          "f8": np.linspace(-2, 2, 11).astype(ml_dtypes.float8_e4m3fn)}
    plm.save(tmp_path / "s.plm", st)
    with plm.load(tmp_path / "s.plm") as got:
        for k, v in st.items():
            assert got[k].dtype == v.dtype
            assert got[k].view(np.uint8).tobytes() == v.view(np.uint8).tobytes()


def test_nested_dicts_and_names(tmp_path):
    st = {"model": {"layer0": {"w": np.ones((4, 4)), "b": np.zeros(4)},
                    "layer1": {"w": np.full((2, 4), 7.0)}},
          "step": np.array(12)}
    info = plm.save(tmp_path / "s.plm", st)
    assert set(info.arrays) == {"model/layer0/w", "model/layer0/b", "model/layer1/w", "step"}
    with plm.load(tmp_path / "s.plm") as got:
        assert isinstance(got["model"]["layer0"], Mapping)   # read-only: see below
        assert _same(got["model"]["layer1"]["w"], st["model"]["layer1"]["w"])
        assert int(got["step"]) == 12


@pytest.mark.parametrize("bad, why", [
    ({"a/b": np.zeros(3)}, "without '/'"),
    ({"": np.zeros(3)}, "non-empty"),
    ({3: np.zeros(3)}, "non-empty strings"),
    ({"o": np.array([object()])}, "Python objects"),
    ({"x": "a string"}, "cannot save a str"),
    ({"x": [1, 2, 3]}, "cannot save a list"),
    (np.zeros(3), "dict of arrays"),
])
def test_bad_state_is_refused_and_writes_nothing(tmp_path, bad, why):
    path = tmp_path / "s.plm"
    with pytest.raises(plm.InvalidArgumentError, match=why):
        plm.save(path, bad)
    assert not os.listdir(tmp_path)


def test_unknown_compress_is_refused_not_ignored(tmp_path):
    with pytest.raises(plm.InvalidArgumentError, match="compress"):
        plm.save(tmp_path / "s.plm", {"a": np.zeros(3)}, compress="zip")
    assert not (tmp_path / "s.plm").exists()   # compressed saves: tests/test_compress.py


def test_loading_reads_nothing_until_touched(tmp_path):
    n = 64 * PS // 8
    st = {k: np.full(n, i + 1, np.float64) for i, k in enumerate("abcd")}
    plm.save(tmp_path / "s.plm", st)
    with plm.load(tmp_path / "s.plm", prefetch="none", background=False) as got:
        s0 = got.region.stats()
        assert s0["pages_present"] == 0 and s0["source_bytes_read"] == 0
        assert float(got["c"].sum()) == 3.0 * n
        s1 = got.region.stats()
        # only c's pages (64), give or take what readahead brought with them
        assert 64 <= s1["pages_present"] < 4 * 64
        assert float(got["a"][0]) == 1.0


def test_writes_stay_private_until_saved(tmp_path):
    path, path2 = tmp_path / "s.plm", tmp_path / "t.plm"
    plm.save(path, {"w": np.arange(5000, dtype=np.float32)})
    before = path.read_bytes()
    with plm.load(path) as got:
        got["w"][10:20] = -1
        with plm.load(path) as other:   # a second load of the file: untouched values
            assert float(other["w"][15]) == 15.0
        plm.save(path2, got)            # saving the loaded state keeps the writes
    assert path.read_bytes() == before
    with plm.load(path2) as again:
        assert (again["w"][10:20] == -1).all() and float(again["w"][25]) == 25.0


def test_readonly_arrays_refuse_writes(tmp_path):
    plm.save(tmp_path / "s.plm", {"w": np.zeros(10), "n": {"v": np.ones(3)}})
    with plm.load(tmp_path / "s.plm", readonly=True) as got:
        with pytest.raises(ValueError):
            got["w"][0] = 1
        with pytest.raises(ValueError):
            got["n"]["v"][0] = 1


def test_working_set_recorded_across_loads(tmp_path):
    path = tmp_path / "s.plm"
    n = 32 * PS // 8
    st = {k: np.full(n, i, np.float64) for i, k in enumerate(["a", "b", "c", "d"])}
    plm.save(path, st)
    info = plm.inspect(path)
    b = info.arrays["b"]
    b_pages = np.arange(b["offset"] // PS, (b["offset"] + n * 8) // PS)
    with plm.load(path, prefetch="none", background=False) as got:
        assert float(got["b"].sum()) == 1.0 * n     # the "first inference" touches b only
        ws = got.working_set()
        # b's pages, first touch first; readahead may have brought (and so recorded) a few
        # pages past them, never pages before b
        assert ws[0] == b_pages[0] and np.isin(b_pages, ws).all() and ws.min() >= b_pages[0]
        assert ws.size < 3 * b_pages.size
        info2 = plm.record_working_set(path, got)
    assert np.array_equal(info2.working_set, ws)
    # contents unchanged, and the next load prefetches exactly that working set
    with plm.load(path, background=False) as again:
        present = again.region.meta["state"] == plm.PageState.PRESENT
        assert np.array_equal(np.flatnonzero(present), np.sort(ws))
        for k, v in st.items():
            assert _same(again[k], v)


def test_record_working_set_checks_its_file(tmp_path):
    p1, p2 = tmp_path / "one.plm", tmp_path / "two.plm"
    plm.save(p1, {"a": np.zeros(10)})
    plm.save(p2, {"a": np.zeros(10)})
    with plm.load(p1) as got:
        with pytest.raises(plm.InvalidArgumentError, match="loaded from"):
            plm.record_working_set(p2, got)
        plm.save(p1, {"a": np.ones(10)})          # another snapshot at the same path now
        with pytest.raises(plm.SnapshotError, match="changed since"):
            plm.record_working_set(p1, got)
    with plm.load(p1) as again:
        assert (again["a"] == 1).all()


def _snapshot_with_tree(path, tree, arrays=None):
    """A well-formed snapshot (checksums right) whose manifest carries `tree`."""
    with plm.Region(4 * PS) as r:
        for name, a in (arrays or {"x": np.arange(4.0)}).items():
            r.alloc(name, a.shape, a.dtype)[...] = a
        r._manifest_extra = {"state": tree}
        plm.checkpoint(r, path)


@pytest.mark.parametrize("tree, why", [
    ({"version": 99, "tree": {"kind": "dict", "items": {}}}, "version"),
    ({"version": 1, "tree": {"kind": "numpy", "array": "x"}}, "state tree"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "numpy", "array": "nope"}}}},
     "does not have"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "pickle", "array": "x"}}}},
     "unknown kind"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "torch", "array": "x",
                                                              "torch_dtype": "evil"}}}},
     "unknown torch dtype"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "numpy", "array": "x",
                                                              "fortran": "yes"}}}}, "fortran"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "dict", "items": 3}}}},
     "without items"),
    ({"version": 1, "tree": {"kind": "dict", "items": {"y": {"kind": "arrow", "array": "x",
                                                              "what": "pandas"}}}},
     "unknown Arrow"),
])
def test_hostile_state_tree_is_a_clear_error(tmp_path, tree, why):
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, tree)
    with pytest.raises(plm.SnapshotError, match=why):
        plm.load(path)


def test_deeply_nested_tree_is_refused(tmp_path):
    node = {"kind": "numpy", "array": "x"}
    for _ in range(200):
        node = {"kind": "dict", "items": {"k": node}}
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, {"version": 1, "tree": node})
    with pytest.raises(plm.SnapshotError, match="deep"):
        plm.load(path)


def test_plain_region_snapshot_loads_flat(tmp_path):
    with plm.Region(4 * PS) as r:
        r.alloc("v", (5,), np.int32)[...] = [1, 2, 3, 4, 5]
        plm.checkpoint(r, tmp_path / "s.plm")
    with plm.load(tmp_path / "s.plm") as got:
        assert list(got) == ["v"] and got["v"].tolist() == [1, 2, 3, 4, 5]


def test_not_a_snapshot_is_a_clear_error(tmp_path):
    p = tmp_path / "junk.bin"
    p.write_bytes(b"hello, not a snapshot" * 100)
    with pytest.raises(plm.SnapshotError, match="not a pylazymem snapshot"):
        plm.load(p)
    with pytest.raises(plm.SnapshotError, match="no such"):
        plm.load(tmp_path / "missing.plm")


def test_closing_with_arrays_alive_keeps_them_valid(tmp_path):
    plm.save(tmp_path / "s.plm", {"w": np.arange(3 * PS, dtype=np.uint8)})
    got = plm.load(tmp_path / "s.plm", prefetch="none", background=False)
    w = got["w"]
    got.close()
    assert np.array_equal(w, np.arange(3 * PS, dtype=np.uint8))


@pytest.mark.package("pyarrow")
def test_arrow_round_trip_zero_copy(tmp_path):
    import pyarrow as pa

    table = pa.table({"i": pa.array([1, None, 3] * 1000, pa.int64()),
                      "s": pa.array(["x", "yy", None] * 1000),
                      "l": pa.array([[1, 2], [], None] * 1000, pa.list_(pa.int32())),
                      "d": pa.array(["a", "b", "a"] * 1000).dictionary_encode()})
    st = {"table": table,
          "array": pa.array(np.arange(10000, dtype=np.float32)),
          "chunked": pa.chunked_array([pa.array([1, 2]), pa.array([3])]),
          "batch": pa.RecordBatch.from_pydict({"q": [1.5, 2.5]}),
          "sliced": pa.array(np.arange(100))[10:20]}
    plm.save(tmp_path / "s.plm", st)
    with plm.load(tmp_path / "s.plm", prefetch="none", background=False) as got:
        assert got["table"].equals(table)
        assert got["array"].equals(st["array"])
        assert got["chunked"].equals(st["chunked"])
        assert got["batch"].equals(st["batch"])
        assert got["sliced"].equals(st["sliced"])
        # zero-copy: the data buffer lies inside the region's memory
        buf = got["array"].buffers()[1]
        base, size = got.region.address, got.region.nbytes
        assert base <= buf.address < base + size


@pytest.mark.package("torch")
def test_torch_round_trip(tmp_path):
    import torch

    st = {"w": torch.randn(33, 17), "h": torch.randn(8).half(), "b": torch.randn(5, 3).bfloat16(),
          "t": torch.randn(4, 6).t(), "i": torch.arange(10), "flag": torch.tensor([True, False])}
    plm.save(tmp_path / "s.plm", st)
    with plm.load(tmp_path / "s.plm") as got:
        for k, v in st.items():
            assert isinstance(got[k], torch.Tensor) and got[k].dtype == v.dtype
            assert torch.equal(got[k], v), k


TRAINED_MODEL = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pylazymem as plm
    from sklearn.linear_model import LogisticRegression

    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(7)
    X = rng.standard_normal((600, 20))
    y = (X[:, :3].sum(axis=1) > 0).astype(int) + (X[:, 3] > 1)
    Xtest = rng.standard_normal((200, 20))
    if mode == "train":
        m = LogisticRegression(max_iter=500).fit(X, y)
        plm.save(path, {"coef": m.coef_, "intercept": m.intercept_, "classes": m.classes_})
        print(json.dumps(m.predict_proba(Xtest).tolist()))
    else:
        st = plm.load(path, prefetch="none", background=False)
        assert st.region.stats()["pages_present"] == 0     # nothing read before use
        m = LogisticRegression()
        m.coef_, m.intercept_, m.classes_ = st["coef"], st["intercept"], st["classes"]
        m.n_features_in_ = st["coef"].shape[1]
        print(json.dumps(m.predict_proba(Xtest).tolist()))
""")


def _train_then_load(script, path):
    """The model's outputs printed by `script` in a fresh process that trains and saves it,
    then in another that loads it lazily: [trained, loaded]."""
    out = []
    for mode in ("train", "load"):
        p = subprocess.run([sys.executable, "-c", script, path, mode],
                           capture_output=True, text=True, timeout=90)
        assert p.returncode == 0, p.stderr
        out.append(np.array(json.loads(p.stdout)))
    return out


@pytest.mark.package("sklearn")
def test_trained_model_predicts_the_same_in_a_fresh_process(tmp_path):
    out = _train_then_load(TRAINED_MODEL, str(tmp_path / "model.plm"))
    assert out[0].shape == (200, 3)
    assert np.array_equal(out[0], out[1])   # bit for bit: the same weights, the same math


def test_cli_inspect_lists_named_arrays(tmp_path):
    path = tmp_path / "s.plm"
    plm.save(path, {"model": {"w": np.zeros((64, 32), np.float16), "b": np.zeros(32, np.float32)},
                    "step": np.array(3)})
    cli = [sys.executable, "-m", "pylazymem", "inspect", str(path)]
    p = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith("  ")}
    assert lines["model/w"][1:3] == ["numpy", "float16"] and lines["model/w"][-2] == str(64 * 32 * 2)
    assert lines["model/b"][-2] == str(32 * 4) and lines["step"][-2] == "8"
    p = subprocess.run(cli + ["--json"], capture_output=True, text=True, timeout=60)
    d = json.loads(p.stdout)["arrays"]
    assert d["model/w"]["nbytes"] == 4096 and d["model/w"]["shape"] == [64, 32]
    assert d["step"]["kind"] == "numpy"


@pytest.mark.shared_pages
def test_shared_loads_share_one_pool_and_keep_writes_private(tmp_path):
    path = tmp_path / "s.plm"
    w = np.random.default_rng(3).standard_normal(16 * PS // 8)
    plm.save(path, {"w": w})
    with plm.load(path, share=True) as a, plm.load(path, share=True) as b:
        assert a.region.shared and b.region.shared
        assert np.array_equal(a["w"], w) and np.array_equal(b["w"], w)
        a["w"][:10] = 0
        assert np.array_equal(b["w"], w)            # b still sees the snapshot's values
        counts = b.region.page_counts()
        assert counts["shared"] >= 16 - 1             # b's pages map the pool


TORCH_MLP = textwrap.dedent("""
    import json, sys
    import torch
    import pylazymem as plm

    path, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(5)
    X = torch.randn(512, 16)
    y = (X[:, :4].sum(dim=1) > 0).long()
    Xtest = torch.randn(64, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    if mode == "train":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(30):     # a few epochs
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        plm.save(path, {"model": dict(model.state_dict())})
    else:
        st = plm.load(path, prefetch="none", background=False)
        model.load_state_dict(st["model"])
    with torch.no_grad():
        print(json.dumps(model(Xtest).tolist()))
""")


@pytest.mark.package("torch")
def test_trained_torch_mlp_predicts_the_same_in_a_fresh_process(tmp_path):
    out = _train_then_load(TORCH_MLP, str(tmp_path / "mlp.plm"))
    assert out[0].shape == (64, 2) and np.array_equal(out[0], out[1])


@pytest.mark.parametrize("order", ["C", "F"])
def test_load_reads_npy_npz_lazily(tmp_path, order):
    a = np.asarray(np.arange(6 * PS, dtype=np.int32).reshape(6, PS), order=order)
    b = np.linspace(0, 1, 77)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "ab.npz", a=a, b=b)
    with plm.load(tmp_path / "a.npy", background=False) as got:
        assert got.format == "npy" and list(got) == ["array"]
        assert got.region.stats()["pages_present"] == 0
        assert np.array_equal(got["array"], a)
        assert got["array"].flags.f_contiguous == (order == "F")
    with plm.load(tmp_path / "ab.npz") as got:
        assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)
        plm.save(tmp_path / "conv.plm", dict(got))      # converted to a pylazymem snapshot
    with plm.load(tmp_path / "conv.plm") as conv:
        assert np.array_equal(conv["a"], a) and np.array_equal(conv["b"], b)


@pytest.mark.package("safetensors")
def test_load_reads_safetensors_lazily(tmp_path):
    import safetensors.numpy as stn

    arrays = {"w": np.random.default_rng(1).standard_normal((300, 40)).astype(np.float32),
              "b": np.arange(40, dtype=np.float16)}
    path = str(tmp_path / "m.safetensors")
    stn.save_file(arrays, path, metadata={"epoch": "3"})
    with plm.load(path, background=False, readonly=True) as got:
        assert got.format == "safetensors" and got.metadata == {"epoch": "3"}
        assert got.region.stats()["pages_present"] == 0
        for k, v in arrays.items():
            assert np.array_equal(got[k], v)
        with pytest.raises(ValueError):
            got["w"][0, 0] = 1


def test_cli_inspect_lists_a_foreign_files_arrays(tmp_path):
    np.savez(tmp_path / "ab.npz", a=np.zeros((4, 5), np.float32), b=np.arange(3))
    cli = [sys.executable, "-m", "pylazymem", "inspect", str(tmp_path / "ab.npz")]
    p = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "npz" in p.stdout.splitlines()[0]
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.startswith("  ")}
    assert lines["a"][1] == "float32" and lines["a"][-2] == "80"
    d = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True,
                                  timeout=60).stdout)
    assert d["format"] == "npz" and d["arrays"]["b"]["shape"] == [3]
    p = subprocess.run(cli + ["--plot", str(tmp_path / "x.png")], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0 and "needs a pylazymem snapshot" in p.stderr


def _via_region(path, arrays, extra, ws="none"):
    """The same arrays written the long way: a region holding them, checkpoint()."""
    end = 0
    for a in arrays.values():      # page-aligned, one after the other, as save() lays them out
        end = -(-end // PS) * PS + a.nbytes
    with plm.Region(max(PS, -(-end // PS) * PS)) as r:
        for name, a in arrays.items():
            v = r.alloc(name, a.shape, a.dtype)
            if a.size:
                v[...] = a
        r._manifest_extra = extra
        plm.checkpoint(r, path, working_set=ws)


def test_save_writes_the_file_checkpoint_would(tmp_path):
    """save() writes straight to the file (no region): byte for byte what checkpoint() of a
    region holding the same arrays writes: zero pages, duplicates, partial last pages."""
    from pylazymem.snapshot import write_arrays

    r = np.random.default_rng(9)
    page = r.integers(0, 256, PS, dtype=np.uint8)
    arrays = {"dups": np.tile(page, 5), "zeros": np.zeros(3 * PS + 10, np.uint8),
              "mixed": np.concatenate([page, np.zeros(PS, np.uint8), r.integers(0, 256, 2 * PS + 7,
                                                                              dtype=np.uint8)]),
              "empty": np.zeros(0, np.float32), "tail": np.arange(100, dtype=np.float64)}
    extra = {"state": {"version": 1, "tree": {"kind": "dict", "items": {}}}}
    write_arrays(tmp_path / "direct.plm", arrays, extra)
    _via_region(tmp_path / "region.plm", arrays, extra)
    assert (tmp_path / "direct.plm").read_bytes() == (tmp_path / "region.plm").read_bytes()
    ws = [7, 3, 0, 11]
    write_arrays(tmp_path / "direct_ws.plm", arrays, extra, working_set=ws)
    _via_region(tmp_path / "region_ws.plm", arrays, extra, ws=ws)
    assert (tmp_path / "direct_ws.plm").read_bytes() == (tmp_path / "region_ws.plm").read_bytes()


def test_save_compares_pages_whose_signatures_collide(tmp_path, monkeypatch):
    """Equal signatures are not taken for equal pages: every hash collides here, and every
    distinct page still gets its own store entry."""
    import pylazymem.snapshot as snap

    monkeypatch.setattr(snap, "_page_signature", lambda b: 42)
    a = np.arange(6 * PS // 8, dtype=np.uint64)     # 6 distinct pages
    b = a[:PS // 8].copy()                           # equal to a's first page
    info = snap.write_arrays(tmp_path / "s.plm", {"a": a, "b": b})
    assert info.pages_by_class["unique"] == 6 and info.pages_by_class["duplicate"] == 1
    monkeypatch.undo()
    with plm.load(tmp_path / "s.plm") as got:
        assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b)


def test_save_with_a_working_set(tmp_path):
    st = {"a": np.ones(4 * PS // 8), "b": np.full(4 * PS // 8, 2.0)}
    info = plm.save(tmp_path / "s.plm", st, working_set=[5, 4])
    assert info.working_set.tolist() == [5, 4]
    with plm.load(tmp_path / "s.plm", background=False) as got:
        present = np.flatnonzero(got.region.meta["state"] == plm.PageState.PRESENT)
        assert present.tolist() == [4, 5]
        assert float(got["b"].sum()) == 2.0 * 4 * PS // 8
    with pytest.raises(plm.InvalidArgumentError, match="outside"):
        plm.save(tmp_path / "t.plm", st, working_set=[8])
    assert not (tmp_path / "t.plm").exists()


def test_failed_replacement_leaves_no_temporary_and_says_why(tmp_path):
    """save()/checkpoint() onto a path that cannot be replaced (a directory): the error is the
    rename's, and no temporary stays behind."""
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError):
        plm.save(tmp_path / "out", {"a": np.zeros(3)})
    with plm.Region(PS) as r, pytest.raises(IsADirectoryError):
        plm.checkpoint(r, tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]


def test_saving_a_foreign_state_saves_its_arrays(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.arange(1000.0), y=np.ones(3))
    with plm.load(tmp_path / "a.npz") as st:
        info = plm.save(tmp_path / "s.plm", st)
    assert set(info.arrays) == {"x", "y"}
    with plm.load(tmp_path / "s.plm") as got:
        assert np.array_equal(got["x"], np.arange(1000.0)) and got["y"].tolist() == [1, 1, 1]


def test_state_keeps_its_key_order(tmp_path):
    plm.save(tmp_path / "s.plm", {"b": np.zeros(2), "a": np.ones(2),
                                  "c": {"z": np.ones(1), "y": np.ones(1)}})
    with plm.load(tmp_path / "s.plm") as got:
        assert list(got) == ["b", "a", "c"] and list(got["c"]) == ["z", "y"]


def test_working_set_must_be_integers(tmp_path):
    with pytest.raises(plm.InvalidArgumentError, match="integer"):
        plm.save(tmp_path / "s.plm", {"a": np.zeros(4 * PS)}, working_set=[1.7])
    assert not os.listdir(tmp_path)


@pytest.mark.package("pyarrow")
def test_damaged_arrow_offsets_are_an_error_not_a_crash(tmp_path):
    """A string column whose offsets point past its data (a hostile or damaged file: store
    pages are not verified unless asked) is refused at load, before pyarrow reads it."""
    import pyarrow as pa

    col = pa.array(["x" * (i % 7) for i in range(1000)])
    path = tmp_path / "t.plm"
    plm.save(path, {"t": pa.table({"s": col})})
    offsets = np.frombuffer(col.buffers()[1], np.int32)
    with plm.load(path) as st:   # where the offsets sit in the region, then patch the file
        raw = bytes(st.region.ndarray(np.uint8))
        buf = st["t"].column(0).chunk(0).buffers()[1]
        at = buf.address - st.region.address
        assert raw[at:at + offsets.nbytes] == offsets.tobytes()
    from pylazymem._snapfile import _open, _read
    fd = _open(str(path))
    try:
        p = _read(fd, str(path))
    finally:
        os.close(fd)
    page, within = divmod(at + 500 * 4, PS)          # offset 500 of the string column
    pos = p.header["store_offset"] + (int(p.map[page]) - 2) * PS + within
    blob = bytearray(path.read_bytes())
    blob[pos:pos + 4] = np.int32(1 << 30).tobytes()
    path.write_bytes(bytes(blob))
    with pytest.raises(plm.SnapshotError, match="Arrow data"):
        plm.load(path)


# ---- found by a review (session 14) ------------------------------------------------------------

def test_shapes_numpy_allows_round_trip_and_unsavable_dtypes_keep_the_old_file(tmp_path):
    # save() checked what a reader accepts only after replacing the file: a 33-dimension array
    # or a zero dimension beside a wide one gave a file that load() refused, the good one gone.
    p = tmp_path / "s.plm"
    deep = np.arange(2, dtype=np.int8).reshape((2,) + (1,) * 32)
    wide = np.zeros((0, 100000), np.float64)
    plm.save(p, {"deep": deep, "wide": wide})
    with plm.load(p) as st:
        assert _same(st["deep"], deep) and _same(st["wide"], wide)
    good = {"good": np.arange(5)}
    plm.save(p, good)
    overlapping = np.zeros(2, np.dtype({"names": ["a", "b"], "formats": ["<i4", "<i2"],
                                        "offsets": [0, 0]}))
    for bad in (np.zeros(3, np.dtype([])), overlapping,
                np.ma.masked_array([1.0, 2.0], mask=[False, True])):
        with pytest.raises(plm.InvalidArgumentError):
            plm.save(p, {"x": bad})
        with plm.load(p) as st:
            assert list(st) == ["good"] and _same(st["good"], good["good"])


def test_an_aligned_structure_comes_back_with_its_own_dtype(tmp_path):
    a = np.array([(1, 2.5), (3, -1.0)], np.dtype([("x", "u1"), ("y", "<f8")], align=True))
    plm.save(tmp_path / "s.plm", {"a": a})
    with plm.load(tmp_path / "s.plm") as st:
        assert st["a"].dtype == a.dtype and st["a"].dtype.names == ("x", "y")
        assert (st["a"] == a).all()


def test_nested_state_is_read_only_so_nothing_is_lost_silently(tmp_path):
    # save() of a LoadedState writes the region's state tree: an entry replaced or added in a
    # nested dict of it was dropped without a word. Such a change now raises.
    p = tmp_path / "s.plm"
    plm.save(p, {"layer": {"w": np.ones(4), "b": np.zeros(4)}})
    with plm.load(p) as st:
        with pytest.raises(TypeError):
            st["layer"]["w"] = np.full(4, 9.0)
        with pytest.raises(TypeError):
            st["layer"]["new"] = np.ones(2)
        st["layer"]["w"][:] = 7.0          # writes into the arrays themselves are kept
        plm.save(tmp_path / "t.plm", st)
    with plm.load(tmp_path / "t.plm") as st2:
        assert sorted(st2["layer"]) == ["b", "w"] and np.all(st2["layer"]["w"] == 7.0)


def test_a_working_set_taken_while_the_background_fill_ran_says_so(tmp_path):
    # Pages the fill brings in are never faulted by the program: its touches of them are not
    # seen, and the working set depends on timing. Said, not hidden.
    import time
    import warnings
    p = tmp_path / "s.plm"
    plm.save(p, {"a": np.arange(64 * PS // 8, dtype=np.int64)})
    with plm.load(p, background=True) as st:
        deadline = time.monotonic() + 30
        while st.region.stats()["background_pages"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.warns(RuntimeWarning, match="background fill"):
            plm.record_working_set(p, st)
    with plm.load(p, background=False) as st:
        int(st["a"][0])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plm.record_working_set(p, st)
    assert len(plm.inspect(p).working_set) >= 1


def test_prefetch_of_page_indices_is_a_clear_error_for_a_snapshot(tmp_path):
    p = tmp_path / "s.plm"
    plm.save(p, {"a": np.arange(10)})
    with pytest.raises(plm.InvalidArgumentError, match="prefetch"):
        plm.load(p, prefetch=np.array([0, 1]))


def test_a_hostile_state_tree_fails_as_a_snapshot_error(tmp_path):
    # A manifest naming "__name__" as its ml_dtype (an attribute of the module, not a type)
    # raised TypeError; it is a SnapshotError like every other damage.
    pytest.importorskip("ml_dtypes")
    from pylazymem import arrays as A

    def bad(what):
        raise plm.SnapshotError(what)

    for name in ("__name__", "finfo", 3):
        with pytest.raises(plm.SnapshotError, match="unknown ml_dtypes type"):
            A._ml_view(np.zeros(2, np.uint16), name, "x", bad)


@pytest.mark.package("pyarrow")
def test_a_damaged_arrow_message_is_a_snapshot_error(tmp_path):
    # pyarrow reports a damaged IPC flatbuffer as ArrowIOError, which is an OSError, not an
    # ArrowException: it escaped load() as a bare OSError.
    import pyarrow as pa

    t = pa.table({"x": list(range(1000)), "s": [str(i) for i in range(1000)]})
    path = tmp_path / "t.plm"
    plm.save(path, {"t": t})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    head = sink.getvalue().to_pybytes()[:64]
    raw = path.read_bytes()
    at = raw.find(head)
    assert at > 0
    kinds = set()
    for off in range(8, 48):
        b = bytearray(raw)
        b[at + off] ^= 0xFF
        (tmp_path / "x.plm").write_bytes(bytes(b))
        try:
            plm.load(tmp_path / "x.plm").close()
            kinds.add("loaded")
        except plm.SnapshotError:
            kinds.add("SnapshotError")
    assert kinds <= {"loaded", "SnapshotError"} and "SnapshotError" in kinds


def test_inspect_escapes_names_that_would_forge_lines(tmp_path):
    import subprocess
    import sys
    path = tmp_path / "s.plm"
    plm.save(path, {"a\nFAKE LINE": np.zeros(3), "ok": np.ones(2)})
    out = subprocess.run([sys.executable, "-m", "pylazymem", "inspect", str(path)],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert not any(line.startswith("FAKE") for line in out.stdout.splitlines())
    assert "a\\nFAKE LINE" in out.stdout


def test_readonly_arrays_cannot_be_made_writable_through_their_base(tmp_path):
    # readonly=True set numpy's writeable flag only: setflags(write=True), or a write through
    # .base (the region), changed the array.
    p = tmp_path / "s.plm"
    plm.save(p, {"E": np.arange(12.0).reshape(3, 4), "F": np.asfortranarray(np.ones((3, 5)))})
    with plm.load(p, readonly=True) as st:
        for name in ("E", "F"):
            a = st[name]
            with pytest.raises(ValueError):
                a[0, 0] = 42.0
            with pytest.raises(ValueError):
                a.setflags(write=True)
            base = a
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            with pytest.raises((TypeError, ValueError)):
                np.asarray(memoryview(base)).view(np.uint8)[0] = 1
        assert st["F"].flags.f_contiguous and np.all(st["F"] == 1)
        assert np.array_equal(st["E"], np.arange(12.0).reshape(3, 4))


@pytest.mark.package("ml_dtypes")
def test_a_big_endian_ml_dtypes_array_comes_back_with_its_values(tmp_path):
    # The manifest keeps an ml_dtypes type's name, not its byte order: a '>' bfloat16 (or
    # complex32) was stored as it was and read back in native order, byte-swapped, no error.
    import ml_dtypes

    native = {"bf16": np.arange(-4, 4, 0.5).astype(ml_dtypes.bfloat16),
              "c32": (np.arange(6) + 1j * np.arange(6, 12)).astype(ml_dtypes.complex32),
              "f8": np.linspace(-2, 2, 9).astype(ml_dtypes.float8_e4m3fn),
              "bf16_fortran": np.asfortranarray(np.arange(12.0).reshape(3, 4))
              .astype(ml_dtypes.bfloat16)}
    state = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in native.items()}
    state["plain_be"] = np.arange(5, dtype=">f8")      # plain numpy: keeps its byte order
    assert not state["bf16"].dtype.isnative
    plm.save(tmp_path / "s.plm", state)
    with plm.load(tmp_path / "s.plm") as got:
        for k, v in native.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert got[k].tobytes() == v.tobytes(), k     # the native bits: the same values
        assert got["bf16_fortran"].flags.f_contiguous
        assert got["plain_be"].dtype == np.dtype(">f8")
        assert got["plain_be"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


@pytest.mark.package("ml_dtypes")
@pytest.mark.parametrize("ml, stored, why", [
    # np.dtype(ml_dtypes.finfo) is the object dtype, of 8 bytes: viewing uint64 bits as it
    # raised a bare TypeError
    ("finfo", np.arange(4, dtype=np.uint64), "unknown ml_dtypes type"),
    ("iinfo", np.arange(4, dtype=np.uint64), "unknown ml_dtypes type"),
    # save() stores the bits as unsigned integers: a structure of the same size was viewed
    ("bfloat16", np.zeros(4, dtype=[("a", "u1"), ("b", "u1")]), "not as unsigned integers"),
    ("bfloat16", np.zeros(4, dtype=">u2"), "not as unsigned integers"),
])
def test_a_hostile_ml_dtype_is_a_snapshot_error(tmp_path, ml, stored, why):
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, {"version": 1, "tree": {"kind": "dict", "items": {
        "y": {"kind": "numpy", "array": "x", "ml_dtype": ml}}}}, {"x": stored})
    with pytest.raises(plm.SnapshotError, match="'x'.*" + why):
        plm.load(path)


@pytest.mark.package("torch")
@pytest.mark.parametrize("stored", [np.zeros(4, dtype=[("a", "<f4")]), np.zeros(4, "<U1"),
                                    np.zeros(4, ">f4")], ids=["structured", "unicode", "be"])
def test_a_torch_leaf_torch_cannot_read_is_a_snapshot_error(tmp_path, stored):
    # torch.from_numpy's TypeError / ValueError escaped load()
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, {"version": 1, "tree": {"kind": "dict", "items": {
        "y": {"kind": "torch", "array": "x", "torch_dtype": "float32"}}}}, {"x": stored})
    with pytest.raises(plm.SnapshotError, match="'x'.*torch cannot read"):
        plm.load(path)


def test_an_arrow_leaf_without_pyarrow_is_a_snapshot_error(tmp_path, monkeypatch):
    # It raised a bare ModuleNotFoundError; a torch leaf without torch says what is missing.
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, {"version": 1, "tree": {"kind": "dict", "items": {
        "t": {"kind": "arrow", "array": "x", "what": "table"}}}},
        {"x": np.zeros(64, np.uint8)})
    monkeypatch.setitem(sys.modules, "pyarrow", None)     # as if it were not installed
    with pytest.raises(plm.SnapshotError, match="'x' is an Arrow table, and pyarrow is not "
                                               "installed"):
        plm.load(path)


@pytest.mark.package("torch")
def test_torch_conjugate_views_are_saved_and_sparse_tensors_refused(tmp_path):
    # numpy() refuses a tensor with its conjugate or negative bit set, and .contiguous() a
    # sparse one: both escaped save() as torch's RuntimeError.
    import torch

    x = torch.tensor([[1 + 2j, 3 - 4j], [5j, -1]], dtype=torch.complex64)
    st = {"conj": x.conj(), "adjoint": x.mH, "neg": x.conj().imag, "bf16_neg":
          torch._neg_view(torch.arange(4.0).bfloat16())}
    assert st["conj"].is_conj() and st["adjoint"].is_conj() and st["neg"].is_neg()
    plm.save(tmp_path / "s.plm", st)
    with plm.load(tmp_path / "s.plm") as got:
        for k, v in st.items():
            want = v.resolve_conj().resolve_neg()
            assert got[k].dtype == want.dtype and torch.equal(got[k], want), k
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(plm.InvalidArgumentError, match="'s'.*sparse"):
        plm.save(tmp_path / "x.plm", {"s": sparse})
    # with a live region, save() first looks where each leaf's memory is: a sparse tensor
    # has no data pointer (torch's RuntimeError there too)
    with plm.load(tmp_path / "s.plm"):
        with pytest.raises(plm.InvalidArgumentError, match="'s'.*sparse"):
            plm.save(tmp_path / "x.plm", {"s": sparse})
    assert not (tmp_path / "x.plm").exists()


def test_cli_inspect_shows_the_shape_load_returns(tmp_path):
    # A Fortran-ordered array is stored as its transpose: inspect showed the stored shape.
    path = tmp_path / "s.plm"
    plm.save(path, {"f": np.asfortranarray(np.zeros((3, 4))), "c": np.zeros((2, 5)),
                    "f3": np.asfortranarray(np.zeros((2, 3, 4), np.float32))})
    with plm.load(path) as st:
        want = {k: st[k].shape for k in st}
    cli = [sys.executable, "-m", "pylazymem", "inspect", str(path)]
    d = json.loads(subprocess.run(cli + ["--json"], capture_output=True, text=True,
                                  timeout=60, check=True).stdout)["arrays"]
    assert {k: tuple(v["shape"]) for k, v in d.items()} == want
    assert d["f"]["fortran"] and d["f3"]["fortran"] and not d["c"]["fortran"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=True).stdout
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "(3, 4) F" in lines["f"] and "(2, 3, 4) F" in lines["f3"]
    assert "(2, 5)" in lines["c"] and " F " not in lines["c"]


@pytest.mark.package("safetensors")
def test_saving_a_safetensors_state_keeps_its_metadata(tmp_path):
    # plm.save of what plm.load read from a .safetensors file dropped its __metadata__.
    from safetensors.numpy import save_file

    src, out, again = (str(tmp_path / n) for n in ("m.safetensors", "m.plm", "m2.plm"))
    save_file({"w": np.ones(4, np.float32)}, src, metadata={"format": "pt", "step": "1200"})
    with plm.load(src) as st:
        plm.save(out, st)
    with plm.load(out) as got:
        assert got.metadata == {"format": "pt", "step": "1200"} and list(got) == ["w"]
        plm.save(again, got)          # a snapshot's own state: its manifest is kept
    with plm.load(again) as got:
        assert got.metadata == {"format": "pt", "step": "1200"}
    plm.save(out, {"w": np.ones(2)})
    with plm.load(out) as got:
        assert got.metadata == {}
    with plm.load(src) as st:
        st.metadata["step"] = 1201    # not a string: the file could not be read back
        with pytest.raises(plm.InvalidArgumentError, match="strings to strings"):
            plm.save(out, st)


def test_hostile_state_metadata_is_a_snapshot_error(tmp_path):
    path = tmp_path / "s.plm"
    _snapshot_with_tree(path, {"version": 1, "metadata": {"a": 1}, "tree": {
        "kind": "dict", "items": {"x": {"kind": "numpy", "array": "x"}}}})
    with pytest.raises(plm.SnapshotError, match="metadata"):
        plm.load(path)
