"""What a private restore leaves in the page cache. The bulk reads, the background fill and
materialize(), copy every page they read into the region, so they drop the pages they bring
into the page cache (LM_SRC_ONCE in csrc/lm_internal.h): a restored snapshot is held once, not
twice. Pages that were cached before stay; faults and the working-set prefetch keep theirs
(the next restore finds its working set warm)."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, wait_background
from pylazymem.bench._ckpt import cached_fraction, warm as read_in
from pylazymem.bench.arrays import drop

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

PS = PAGE_SIZE
NPAGES = 8192   # 32 MiB: many readahead windows


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    rng = np.random.default_rng(614)
    data = rng.integers(0, 256, NPAGES * PS, dtype=np.uint8)   # random: nothing deduplicated
    path = str(tmp_path_factory.mktemp("pagecache") / "s.snap")
    with plm.Region(NPAGES * PS) as r:
        r.ndarray(np.uint8)[:] = data
        plm.checkpoint(r, path)
    return path, data


def cold(path):
    drop([path])   # this file only: fsync + POSIX_FADV_DONTNEED
    assert cached_fraction(path) < 0.01


def warm(path):
    read_in([path])
    assert cached_fraction(path) > 0.99


def check(r, data):
    got = r.ndarray(np.uint8)
    assert np.array_equal(got[:data.size], data)


@pytest.mark.dontcache
def test_background_fill_leaves_a_cold_snapshot_uncached(snap):
    path, data = snap
    cold(path)
    with plm.restore(path, prefetch="none", background=True) as r:
        wait_background(r, timeout=60.0)
        assert r.stats()["pages_present"] == NPAGES
        frac = cached_fraction(path)
        check(r, data)
    assert frac < 0.05, "the background fill left %.0f%% of the snapshot cached" % (frac * 100)


@pytest.mark.dontcache
def test_materialize_leaves_a_cold_snapshot_uncached(snap):
    path, data = snap
    cold(path)
    with plm.restore(path, prefetch="none", background=False) as r:
        r.materialize()
        frac = cached_fraction(path)
        check(r, data)
    assert frac < 0.05, "materialize() left %.0f%% of the snapshot cached" % (frac * 100)


@pytest.mark.parametrize("how", ["background", "materialize"])
def test_bulk_reads_keep_a_warm_snapshot_cached(snap, how):
    path, data = snap
    warm(path)
    with plm.restore(path, prefetch="none", background=how == "background") as r:
        if how == "background":
            wait_background(r, timeout=60.0)
        else:
            r.materialize()
        check(r, data)
    assert cached_fraction(path) > 0.99


def test_faults_keep_what_they_read_cached(snap):
    """The contrast: demand faults (and their readahead) read through the page cache."""
    path, data = snap
    cold(path)
    with plm.restore(path, prefetch="none", background=False) as r:
        check(r, data)   # every page faulted in
        assert r.stats()["faults"] > 0
    assert cached_fraction(path) > 0.9
