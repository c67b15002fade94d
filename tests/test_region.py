"""Region basics: sizes, views (memoryview / ndarray), fresh contents, context manager."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(60)]


@pytest.mark.parametrize("nbytes,npages", [
    (1, 1), (PAGE_SIZE, 1), (PAGE_SIZE + 1, 2), (3 * PAGE_SIZE - 1, 3),
    (1 << 20, (1 << 20) // PAGE_SIZE)])
def test_size_rounded_up_to_pages(make_region, nbytes, npages):
    r = make_region(nbytes)
    assert r.page_size == PAGE_SIZE
    assert r.npages == npages
    assert r.nbytes == npages * PAGE_SIZE
    assert isinstance(r.address, int) and r.address != 0
    assert r.address % PAGE_SIZE == 0
    assert r.closed is False


def test_context_manager_closes():
    with plm.Region(4 * PAGE_SIZE) as r:
        assert r.closed is False
        assert len(memoryview(r)) == r.nbytes
    assert r.closed is True


def test_fresh_region_reads_zero(make_region):
    r = make_region(256 * PAGE_SIZE)
    a = r.ndarray(np.uint8)
    assert a.shape == (r.nbytes,)
    assert not a.any()
    assert bytes(memoryview(r)[:64]) == bytes(64)


def test_memoryview_writable_zero_copy(make_region):
    r = make_region(8 * PAGE_SIZE)
    mv = memoryview(r)
    assert mv.readonly is False
    assert mv.nbytes == r.nbytes
    assert mv.format == "B" and mv.ndim == 1 and mv.contiguous
    mv[3 * PAGE_SIZE + 5] = 0xAB
    a = r.ndarray(np.uint8)
    assert a[3 * PAGE_SIZE + 5] == 0xAB
    a[7 * PAGE_SIZE - 1] = 0x5A
    assert mv[7 * PAGE_SIZE - 1] == 0x5A
    assert a.ctypes.data == r.address


def test_ndarray_dtype_shape_offset(make_region):
    r = make_region(8 * PAGE_SIZE)
    f = r.ndarray(np.float64)
    assert f.shape == (r.nbytes // 8,) and f.dtype == np.float64
    assert f.flags.writeable
    f[PAGE_SIZE // 8] = 1.5                           # first float of page 1
    u = r.ndarray(np.uint32, shape=(4,), offset=PAGE_SIZE)
    assert u.ctypes.data == r.address + PAGE_SIZE
    assert u.tolist() == [0, 0x3FF80000, 0, 0]        # 1.5 little-endian
    tail = r.ndarray(np.uint16, offset=r.nbytes - 8)  # shape None: as many as fit after offset
    assert tail.shape == (4,)
    m = r.ndarray(np.uint8, shape=(2, PAGE_SIZE), offset=2 * PAGE_SIZE)
    m[1, 0] = 9
    assert memoryview(r)[3 * PAGE_SIZE] == 9


def test_defer_and_read_smoke(make_region, rng):
    r = make_region(16 * PAGE_SIZE)
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(4 * PAGE_SIZE, 8 * PAGE_SIZE, c)
    r.defer_fill(12 * PAGE_SIZE, 2 * PAGE_SIZE, plm.ZERO)
    v = pages(r)
    for p in range(16):
        want = page if 4 <= p < 12 else np.zeros(PAGE_SIZE, np.uint8)
        assert np.array_equal(v[p], want), f"page {p}"


# ---- found by a review (session 14) ------------------------------------------------------------

def test_a_failed_alloc_changes_nothing():
    # np.prod wrapped in int64: a huge shape looked small or negative, and the entry was
    # recorded before the view failed: every later alloc(), arrays and checkpoint() failed.
    with plm.Region(1 << 20) as r:
        for shape in ((2**63,), (2**62, 4), (2**40, 2**40)):
            with pytest.raises((plm.InvalidArgumentError, plm.InvalidRangeError)):
                r.alloc("x", shape, np.float64)
        assert r.arrays == {}
        a = r.alloc("ok", (16,), np.float64)
        assert a.shape == (16,) and list(r.arrays) == ["ok"]


def test_page_lists_are_checked_before_anything_changes():
    with plm.Region(16 * PAGE_SIZE) as r:
        for bad in ([1.7], [True], [[1, 2], [3, 4]], ["3"]):
            with pytest.raises(plm.InvalidArgumentError):
                r.prefetch(bad)
        for bad in ([-1], [16], [2**64], [2**70]):
            with pytest.raises(plm.InvalidRangeError):
                r.prefetch(bad)
        r.prefetch(np.array([3, 1], np.int32))
        r.prefetch([])
        np.asarray(r.ndarray(np.uint8)[:PAGE_SIZE]).sum()
        r.mark_working_set(inherit=[0])
        with pytest.raises(plm.InvalidRangeError):
            r.mark_working_set(inherit=[1_000_000_000])
        assert r.working_set().tolist()[:1] == [0]   # the earlier window goes on
        plm.checkpoint  # a default checkpoint works: its working set is inside the region


@pytest.mark.parametrize("kw", [{"serve_threads": -3}, {"serve_threads": 65},
                                {"max_cluster_pages": 2**33}, {"max_cluster_pages": -1}])
def test_bad_region_arguments_are_refused(kw):
    with pytest.raises(plm.InvalidArgumentError):
        plm.Region(1 << 20, **kw)


def test_a_bool_is_not_a_region_size():
    with pytest.raises(plm.InvalidArgumentError):
        plm.Region(True)


def test_alloc_from_several_threads_never_hands_out_the_same_memory():
    # alloc() read and advanced its next offset with ndarray() (which lets other threads
    # run) in between: up to half of 800 arrays shared memory with another.
    import sys
    import threading
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for rep in range(10):
            with plm.Region(4096 * PAGE_SIZE) as r:
                out = {}
                barrier = threading.Barrier(4)

                def worker(k):
                    barrier.wait()
                    for j in range(200):
                        out["t%d_%d" % (k, j)] = r.alloc("t%d_%d" % (k, j), 3, np.uint8)
                ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                addrs = [a.__array_interface__["data"][0] for a in out.values()]
                assert len(set(addrs)) == len(addrs) == 800
                assert len(r.arrays) == 800
    finally:
        sys.setswitchinterval(old)


def test_the_default_serving_cpus_fit_the_core_on_a_large_machine(monkeypatch):
    # every usable CPU was the default: Region() failed on a machine of more than 64
    from pylazymem import region
    from pylazymem._binding import lib
    monkeypatch.delenv("PYLAZYMEM_SERVE_CPUS", raising=False)
    for n in (2, 64, 96, 200):
        monkeypatch.setattr(region.os, "sched_getaffinity", lambda pid, n=n: set(range(n)))
        cpus = region._default_cpus()
        assert len(cpus) == min(n, lib.LM_MAX_SERVE_THREADS) == len(set(cpus))
        assert set(cpus) <= set(range(n)) and cpus[0] == 0


@pytest.mark.parametrize("call", [
    lambda: plm.Region(PAGE_SIZE, serve_threads=2.0),
    lambda: plm.Region(PAGE_SIZE, max_cluster_pages=1.5),
    lambda: plm.Region(PAGE_SIZE, serve_threads=0),
])
def test_region_arguments_that_are_not_what_they_say_are_clear_errors(call):
    # (a bare TypeError, or serve_threads=0 taken as 1 although 1 to 64 is asked for)
    with pytest.raises(plm.InvalidArgumentError, match="serve_threads|max_cluster_pages"):
        call()


def test_shapes_and_sub_array_dtypes_as_alloc_takes_them():
    with plm.Region(16 * PAGE_SIZE) as r:
        assert r.ndarray("4f4", 2).shape == (2, 4)   # (numpy's ValueError from reshape)
        assert r.ndarray("4f4").shape == (16 * PAGE_SIZE // 16, 4)   # as many as fit
        for shape in ([[1, 2], 3], True):   # (a ragged shape: numpy's ValueError; True: taken)
            with pytest.raises(plm.InvalidArgumentError, match="shape"):
                r.alloc("x", shape, "f4")
