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
