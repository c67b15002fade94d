"""Every bad input gets a clear exception of the package hierarchy that also is the builtin;
use after close(); close() twice."""

import os

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(60)]

PS = PAGE_SIZE


def check(excinfo, cls, builtin=ValueError):
    e = excinfo.value
    assert isinstance(e, cls) and isinstance(e, plm.LazyMemError) and isinstance(e, builtin), (
        type(e).__mro__)
    assert str(e), "the message must say what is wrong"


@pytest.mark.parametrize("nbytes", [0, -1, -PAGE_SIZE])
def test_region_bad_size(nbytes):
    with pytest.raises(plm.InvalidArgumentError) as ei:
        plm.Region(nbytes)
    check(ei, plm.InvalidArgumentError)


@pytest.mark.parametrize("nbytes", ["4096", 4096.0, None, b"x"])
def test_region_non_int_size(nbytes):
    with pytest.raises((TypeError, plm.InvalidArgumentError)) as ei:
        plm.Region(nbytes)
    if isinstance(ei.value, plm.LazyMemError):
        check(ei, plm.InvalidArgumentError)


def test_region_size_beyond_64_bits():
    """A size no mapping can have is a bad size, not a raw OverflowError from the binding."""
    with pytest.raises(plm.LazyMemError) as ei:
        plm.Region(1 << 64)
    assert isinstance(ei.value, (plm.InvalidArgumentError, plm.UffdError)), repr(ei.value)


def test_region_size_unmappable():
    with pytest.raises(plm.LazyMemError) as ei:
        plm.Region(1 << 60)
    assert isinstance(ei.value, (plm.InvalidArgumentError, plm.UffdError)), repr(ei.value)


@pytest.mark.parametrize("cpu", [-1, 1000])
def test_serve_cpus_not_usable(cpu):
    """A serving thread cannot be pinned to a CPU this process may not run on: say so."""
    assert cpu not in os.sched_getaffinity(0)
    with pytest.raises(plm.InvalidArgumentError) as ei:
        plm.Region(1 << 20, serve_cpus=[cpu])
    check(ei, plm.InvalidArgumentError)


BAD_RANGES = [
    (1, PS),              # unaligned offset
    (0, PS + 1),          # unaligned length
    (PS, 100),            # length below a page
    (-PS, PS),            # negative offset
    (0, -PS),             # negative length
    (0, 17 * PS),         # past the end
    (16 * PS, PS),        # starts at the end
    (8 * PS, 9 * PS),     # runs over the end
    (1 << 62, PS),        # huge offset (no overflow)
    (PS, (1 << 64) - PS),  # offset + length wraps around 64 bits
]


@pytest.mark.parametrize("offset,length", BAD_RANGES)
def test_defer_fill_bad_range(make_region, offset, length):
    r = make_region(16 * PS)
    c = r.canonical(bytes(range(256)) * (PS // 256))
    for fill in (plm.ZERO, c):
        with pytest.raises(plm.InvalidRangeError) as ei:
            r.defer_fill(offset, length, fill)
        check(ei, plm.InvalidRangeError)
    assert (r.meta["state"] == int(plm.PageState.EMPTY)).all(), "nothing changed"


def test_defer_fill_zero_length(make_region):
    r = make_region(16 * PS)
    with pytest.raises((plm.InvalidRangeError, plm.InvalidArgumentError)) as ei:
        r.defer_fill(0, 0, plm.ZERO)
    check(ei, type(ei.value))


@pytest.mark.parametrize("fill", [None, "zero", 1.5, b"\0", plm.PageClass.DATA,
                                  plm.PageClass.NONE, plm.PageClass.SNAPSHOT,
                                  plm.PageClass.CANONICAL])
def test_defer_fill_bad_fill(make_region, fill):
    r = make_region(16 * PS)
    with pytest.raises(plm.InvalidArgumentError) as ei:
        r.defer_fill(0, PS, fill)
    check(ei, plm.InvalidArgumentError)
    assert r.meta["state"][0] == int(plm.PageState.EMPTY)


def test_canonical_from_another_region(make_region, rng):
    """A Canonical of region A used in region B: rejected, or served with A's page's bytes."""
    a, b = make_region(4 * PS), make_region(4 * PS, max_cluster_pages=1)
    pa, pb = random_page(rng), random_page(rng)
    b.canonical(pb.tobytes())                # B's id 1 (or whatever) is a different page
    ca = a.canonical(pa.tobytes())
    try:
        b.defer_fill(0, PS, ca)
    except plm.InvalidArgumentError:
        return
    assert bytes(memoryview(b)[:PS]) == pa.tobytes(), "served another page's contents"


@pytest.mark.parametrize("size", [0, 1, PS - 1, PS + 1, 2 * PS])
def test_canonical_wrong_size(make_region, size):
    r = make_region(4 * PS)
    with pytest.raises(plm.InvalidArgumentError) as ei:
        r.canonical(bytes(size))
    check(ei, plm.InvalidArgumentError)


def test_canonical_not_bytes(make_region):
    r = make_region(4 * PS)
    with pytest.raises((TypeError, plm.InvalidArgumentError)):
        r.canonical(12345)
    with pytest.raises((TypeError, plm.InvalidArgumentError)):
        r.canonical(None)


@pytest.mark.parametrize("offset,length", [(1, PS), (0, PS + 1), (-PS, PS), (0, 17 * PS),
                                           (16 * PS, PS), (8 * PS, 9 * PS), (1 << 62, PS)])
@pytest.mark.parametrize("method", ["materialize", "signatures"])
def test_materialize_signatures_bad_range(make_region, method, offset, length):
    r = make_region(16 * PS)
    with pytest.raises(plm.InvalidRangeError) as ei:
        getattr(r, method)(offset, length)
    check(ei, plm.InvalidRangeError)
    assert (r.meta["state"] == int(plm.PageState.EMPTY)).all()


@pytest.mark.parametrize("kwargs", [dict(offset=16 * PS + 1), dict(offset=-1),
                                    dict(shape=(16 * PS + 1,)), dict(shape=(2, 8 * PS), offset=1)])
def test_ndarray_out_of_range(make_region, kwargs):
    r = make_region(16 * PS)
    with pytest.raises(ValueError):
        r.ndarray(np.uint8, **kwargs)


def closed_calls(r, c):
    return {
        "defer_fill(ZERO)": lambda: r.defer_fill(0, PS, plm.ZERO),
        "defer_fill(canonical)": lambda: r.defer_fill(0, PS, c),
        "materialize()": lambda: r.materialize(),
        "signatures()": lambda: r.signatures(),
        "stats()": lambda: r.stats(),
        "canonical()": lambda: r.canonical(bytes(PS)),
        "ndarray()": lambda: r.ndarray(np.uint8),
    }


def test_use_after_close():
    r = plm.Region(16 * PS)
    c = r.canonical(bytes(range(256)) * (PS // 256))
    r.close()
    assert r.closed is True
    for name, call in closed_calls(r, c).items():
        with pytest.raises(plm.RegionClosedError) as ei:
            call()
        check(ei, plm.RegionClosedError)
    with pytest.raises(Exception):
        memoryview(r)
    r.close()                                     # twice is fine
    r.close()
    assert r.closed is True


def test_close_after_context_exit():
    with plm.Region(4 * PS) as r:
        pass
    assert r.closed
    r.close()
    with pytest.raises(plm.RegionClosedError):
        r.stats()


def test_views_released_after_close(run_py_ok):
    """Views taken before close() may be released afterwards; r.meta arrays stay readable."""
    out = run_py_ok("""
        r = plm.Region(16 * PS, max_cluster_pages=1)
        v = pages(r)
        mv = memoryview(r)
        m = r.meta
        v[3, :] = 0x42
        r.close()
        assert r.closed
        assert m["state"][3] == int(plm.PageState.PRESENT)
        del v, mv
        import gc; gc.collect()
        print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK")
