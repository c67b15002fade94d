"""The benchmarks' own logic that decides what is measured (no timing, no page-cache drops: the
benchmarks themselves drop the whole machine's page cache, which a test suite must not do)."""

import mmap

import numpy as np
import pytest

from pylazymem.bench import _common as C
from pylazymem.bench import reap, sequential


def test_zipf_workload_shape_and_size():
    npages = (128 << 20) // C.PAGE
    sample, info = reap.zipf_workload(npages, np.random.default_rng([reap.ZIPF_SEED, 0]))
    cpages = reap.CHUNK_BYTES // C.PAGE
    assert info["chunks"] == npages // cpages and info["chunk_pages"] == cpages
    # the request count is the smallest that makes the expected distinct pages 10%
    assert 0.10 <= info["expected_distinct_fraction"] < 0.11
    a = sample(np.random.default_rng([reap.ZIPF_SEED, 1]))
    b = sample(np.random.default_rng([reap.ZIPF_SEED, 2]))
    for o in (a, b):
        assert o.size == info["requests"] * cpages
        assert ((o % C.PAGE) == reap.TOUCH_OFFSET).all()
        assert o.min() >= 0 and o.max() < npages * C.PAGE
        # whole chunks, each read in address order
        runs = (o // C.PAGE).reshape(-1, cpages)
        assert (runs[:, 0] % cpages == 0).all()
        assert (np.diff(runs, axis=1) == 1).all()
        distinct = np.unique(o // C.PAGE).size / npages
        assert 0.07 < distinct < 0.13, distinct
    # another draw of the same distribution: different requests, the popular chunks shared
    pa, pb = np.unique(a // C.PAGE), np.unique(b // C.PAGE)
    shared = np.intersect1d(pa, pb).size
    assert 0 < shared < min(pa.size, pb.size)
    # skewed: the most requested chunk takes far more than a uniform share of the requests
    counts = np.bincount(a.reshape(-1, cpages)[:, 0] // reap.CHUNK_BYTES, minlength=info["chunks"])
    assert counts.max() > 20 * info["requests"] / info["chunks"]
    # a draw from the same seed repeats exactly
    assert np.array_equal(a, sample(np.random.default_rng([reap.ZIPF_SEED, 1])))


@pytest.mark.parametrize("setting, advice", [("always [madvise] never", mmap.MADV_HUGEPAGE),
                                             ("[always] madvise never", None),
                                             ("always madvise [never]", None)])
def test_thp_baseline_advice(setting, advice):
    got, text = sequential.thp_advice({"thp": setting})
    assert got == advice
    assert C.thp_selected(setting) in text


@pytest.mark.core(reason="reads the signature of the core's restore()")
def test_restore_default_reads_the_signature():
    import inspect

    import pylazymem as plm
    from pylazymem.bench import restore_default

    sig = inspect.signature(plm.restore)
    assert restore_default.restore_defaults(plm) == {
        "prefetch": sig.parameters["prefetch"].default, "background": sig.parameters["background"].default}


def test_shared_page_checksums_find_every_wrong_byte():
    from pylazymem.bench import shared

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 64 * C.PAGE, dtype=np.uint8)
    sums = shared.page_checksums(data)
    assert shared.bad_pages(data, sums) == []
    for page, byte, delta in ((0, 0, 1), (17, 4095, 255), (63, 2048, 128)):
        bad = data.copy()
        bad[page * C.PAGE + byte] ^= np.uint8(delta)
        assert shared.bad_pages(bad, sums) == [page]
    zeroed = data.copy()
    zeroed[5 * C.PAGE:6 * C.PAGE] = 0   # a page served as zeros
    assert shared.bad_pages(zeroed, sums) == [5]


@pytest.mark.core(reason="runs bench/shared.py's parts at 8 MiB")
@pytest.mark.uffd
@pytest.mark.timeout(300)
@pytest.mark.parametrize("part", ["fanout", "second", "template", "reap"])
def test_shared_bench_smoke(part):
    """Each part of bench/shared.py end to end at 8 MiB, one repetition: workers spawn, contents
    are checked, ratios come out, no problem. Parts with shared variants are skipped (with the
    reason) where restore(share=True) is unavailable: the module itself then reports a PROBLEM."""
    import io

    import pylazymem as plm
    from pylazymem.bench import shared

    why = shared.share_unavailable(plm)
    if why and part != "template":
        pytest.skip("restore(share=True) unavailable: %s" % why)
    out = io.StringIO()
    res = shared.run(True, reps=1, file=out, parts=[part], nbytes=8 << 20)
    problems = [p for p in res["problems"] if not (why and "unavailable" in p)]
    assert problems == [], out.getvalue()
    assert part in res["rows"] and res["ratios"], out.getvalue()
    for r in res["ratios"].values():
        assert r["value"] > 0, (r, out.getvalue())
    if part == "fanout":
        assert res["rows"]["fanout"]["shared"]["median"] < res["rows"]["fanout"]["private"]["median"]


def test_arrays_layout_is_model_shaped():
    """bench/arrays.py's state: 200 tensors in 40 layers, just under the size asked, every tensor
    a whole number of uint64 words (the inference sums words), float16 and float32."""
    from pylazymem.bench import arrays

    for nbytes in (64 << 20, 2 << 30):
        spec = arrays.layout(nbytes)
        sizes = [int(np.prod(s)) * dt.itemsize for _, s, dt in spec]
        assert len(spec) == 200 and len({n for n, _, _ in spec}) == 200
        assert 0.9 * nbytes < sum(sizes) <= nbytes
        assert all(b % 8 == 0 for b in sizes)
        assert {dt.name for _, _, dt in spec} == {"float16", "float32"}
        first = arrays.first_names([n for n, _, _ in spec])
        assert len(first) == 20 and all(n.startswith(("layers.0.", "layers.1.", "layers.2.", "layers.3."))
                                        for n in first)
    a = arrays.make_tensor(7, "layers.1.attn.out", (16, 16), np.dtype(np.float16))
    assert np.array_equal(a, arrays.make_tensor(7, "layers.1.attn.out", (16, 16), np.dtype(np.float16)))
    b = a.copy()
    b.reshape(-1).view(np.uint8)[100] ^= 1    # one flipped bit changes the inference's sum
    assert arrays.word_sum(a) != arrays.word_sum(b)


@pytest.fixture(scope="module")
def arrays_quick():
    """`python -m pylazymem.bench arrays --quick` (64 MiB), one repetition per variant, run once
    for the tests below."""
    import io

    from pylazymem.bench import arrays

    out = io.StringIO()
    res = arrays.run(True, reps=1, file=out)
    return res, out.getvalue()


@pytest.mark.core(reason="bench/arrays.py spawns workers that load lazily")
@pytest.mark.uffd
@pytest.mark.timeout(900)
def test_arrays_bench_quick(arrays_quick):
    """Every part runs end to end in spawned workers, every tensor's sum checks, the peers that
    need nothing optional (np.load, np.load(mmap_mode="r")) and the pylazymem variants have rows,
    and whatever is not run is listed as absent with its reason."""
    import importlib.util

    import pylazymem as plm
    from pylazymem.bench import arrays

    res, out = arrays_quick
    assert res["problems"] == [], out
    assert arrays.plm_unavailable(plm) is None, "this build has plm.save/plm.load"
    rows = res["rows"]
    want = {"first": ["plm_ws", "plm_ws_bg", "plm_none", "npy_mmap"],
            "resident": ["plm_bg_wait", "plm_materialize", "npy_load", "npy_mmap_touch"],
            "pss": ["plm_private", "npy_mmap"] + (["plm_shared"] if plm.features().shared_pages else [])}
    for part, variants in want.items():
        for v in variants:
            assert v in rows[part] and rows[part][v]["median"] > 0, (part, v, out)
    assert rows["first"]["plm_ws"]["stats"]["prefetched_pages"] > 0, out   # the recorded working set was used
    assert rows["first"]["plm_none"]["stats"]["prefetched_pages"] == 0, out
    # four private copies cost about four times one; np.load(mmap_mode="r") shares the page cache
    assert rows["pss"]["plm_private"]["median"] > 3.0, out
    assert rows["pss"]["npy_mmap"]["median"] < 1.5, out
    if "plm_shared" in rows["pss"]:
        assert rows["pss"]["plm_shared"]["median"] < rows["pss"]["plm_private"]["median"] / 2, out
    for r in res["ratios"].values():
        assert r["value"] > 0, (r, out)
    # what is not run says why; torch and safetensors only where they are not installed
    for lib, variants in (("torch", ["first.torch_load_mmap", "pss.torch_load_mmap"]),
                          ("safetensors", ["first.st_load_file", "resident.st_load_file"])):
        missing = importlib.util.find_spec(lib) is None
        for v in variants:
            assert missing == any(a.startswith(v + ":") for a in res["absent"]), (v, res["absent"])


@pytest.mark.core(reason="bench/arrays.py spawns workers that load lazily")
@pytest.mark.uffd
@pytest.mark.package("safetensors")
@pytest.mark.timeout(900)
def test_arrays_bench_quick_safetensors(arrays_quick):
    """The safetensors peers ran in every part (where safetensors is installed)."""
    res, out = arrays_quick
    for part, v in (("first", "st_load_file"), ("first", "st_safe_open"), ("resident", "st_load_file"),
                    ("pss", "st_load_file")):
        assert v in res["rows"][part] and res["rows"][part][v]["median"] > 0, (part, v, out)
    # load_file copies: four processes hold about four copies
    assert res["rows"]["pss"]["st_load_file"]["median"] > 3.0, out


@pytest.mark.core(reason="bench/compress.py saves and loads compressed snapshots")
@pytest.mark.uffd
@pytest.mark.package("sklearn")
@pytest.mark.timeout(600)
def test_compress_bench_quick():
    """Every variant saves and loads each state (contents compared by the bench itself), and
    the states are what the docstring says: trained weights, text, 2% set floats."""
    import io

    from pylazymem.bench import compress as B

    sparse = B.state_sparse(1 << 20)
    assert abs(np.count_nonzero(sparse) / sparse.size - 0.02) < 0.001
    text = B.state_text(1 << 20)
    assert text.size == 1 << 20 and b"def " in text.tobytes()
    res = B.run(quick=True, reps=1, file=io.StringIO())
    assert res["problems"] == []
    for state in ("mlp", "text", "sparse"):
        rows = res["rows"][state]
        assert set(rows) == set(B.VARIANTS)
        # compressible state shrinks with every codec; plain plm.save is the raw size
        assert rows["plm_none"]["size_ratio"] >= 1.0
        if state != "mlp":
            assert rows["plm_zstd"]["size_ratio"] < 0.5 and rows["plm_lz4"]["size_ratio"] < 0.6


@pytest.mark.core(reason="bench/objstore.py checkpoints and restores")
@pytest.mark.uffd_full
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_objstore_bench_quick(tmp_path, monkeypatch):
    """The issue-13 benchmark runs against the gateway with one repetition: every workload sum
    right (the bench checks them), the four ratios computed, the bucket removed after."""
    import io

    from pylazymem._s3 import S3Client
    from pylazymem.bench import objstore as B

    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(B, "MACHINES", 2)
    before = {k for k, _ in S3Client().list_buckets()}
    out = io.StringIO()
    res = B.run(quick=True, reps=1, file=out)
    assert res["problems"] == [], out.getvalue()
    assert set(res["ratios"]) == {"download_vs_s3", "s3_warm_vs_local", "machines_fetched",
                                  "second_push"}
    assert res["ratios"]["second_push"]["value"] < 0.2   # 10% of the pages new: ~0.1x sent
    assert {k for k, _ in S3Client().list_buckets()} <= before
