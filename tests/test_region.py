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
