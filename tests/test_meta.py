"""Page metadata: layout, read-only, state/class/flag/order transitions."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(60)]

S = plm.PageState
C = plm.PageClass
F = plm.PageFlag

LAYOUT = [("signature", "<u8", 0), ("order", "<u8", 8), ("canon", "<u4", 16), ("aux", "<u4", 20),
          ("state", "u1", 24), ("cls", "u1", 25), ("flags", "<u2", 26), ("reserved", "<u4", 28)]


def test_meta_layout(make_region):
    r = make_region(8 * PAGE_SIZE)
    m = r.meta
    assert isinstance(m, np.ndarray)
    assert m.shape == (8,)
    assert m.dtype.itemsize == 32
    for name, typ, off in LAYOUT:
        dt, got_off = m.dtype.fields[name][:2]
        assert dt == np.dtype(typ), name
        assert got_off == off, name


def test_meta_read_only(make_region):
    r = make_region(8 * PAGE_SIZE)
    m = r.meta
    assert not m.flags.writeable
    with pytest.raises(ValueError):
        m["state"][0] = int(S.PRESENT)
    with pytest.raises(ValueError):
        m[1] = m[0]
    with pytest.raises(ValueError):
        m["flags"] |= 1
    assert (r.meta["state"] == int(S.EMPTY)).all()


def test_meta_cannot_be_made_writable(make_region):
    """Only the C core changes the metadata: Python cannot flip the array back to writable."""
    r = make_region(8 * PAGE_SIZE)
    with pytest.raises(ValueError):
        r.meta.setflags(write=True)


def test_fresh_region_meta(make_region):
    """A fresh page is EMPTY with class NONE: its record is all zero."""
    r = make_region(16 * PAGE_SIZE, max_cluster_pages=1)
    m = r.meta
    assert (m["state"] == int(S.EMPTY)).all()
    assert (m["cls"] == int(C.NONE)).all()
    assert not m.view(np.uint8).any(), "every field of a fresh record is zero"
    pages(r)[3, 0]                                   # a read fault: PRESENT, class ZERO
    assert m["state"][3] == int(S.PRESENT) and m["cls"][3] == int(C.ZERO)
    pages(r)[9, 0] = 1                               # a write fault: class DATA
    assert m["state"][9] == int(S.PRESENT) and m["cls"][9] == int(C.DATA)
    assert (m["cls"][[0, 1, 2, 4, 15]] == int(C.NONE)).all()


def test_meta_is_live(make_region):
    r = make_region(4 * PAGE_SIZE, max_cluster_pages=1)
    m = r.meta
    r.defer_fill(0, PAGE_SIZE, plm.ZERO)
    assert m["state"][0] == int(S.DEFERRED)
    memoryview(r)[0]
    assert m["state"][0] == int(S.PRESENT)


def test_touch_order_exact(make_region, rng):
    r = make_region(32 * PAGE_SIZE, max_cluster_pages=1)
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(8 * PAGE_SIZE, 8 * PAGE_SIZE, c)       # 8-15 canonical
    r.defer_fill(16 * PAGE_SIZE, 8 * PAGE_SIZE, plm.ZERO)  # 16-23 zero, rest EMPTY
    v = pages(r)
    touch = [12, 3, 20, 9, 0, 31, 17, 8]
    for p in touch:
        if p == 3:
            v[p, 7] = 1                                  # a store
        else:
            int(v[p, 100])                               # a load
    m = r.meta
    orders = [int(m["order"][p]) for p in touch]
    assert orders[0] > 0
    assert all(b == a + 1 for a, b in zip(orders, orders[1:])), orders
    untouched = np.setdiff1d(np.arange(32), touch)
    assert not m["order"][untouched].any()
    assert (m["state"][touch] == int(S.PRESENT)).all()
    assert (m["state"][[p for p in untouched if 8 <= p < 24]] == int(S.DEFERRED)).all()
    assert (m["state"][[p for p in untouched if p < 8 or p >= 24]] == int(S.EMPTY)).all()
    assert not (m["flags"] & int(F.READAHEAD)).any()
    # canonical pages: class, id and signature kept; update carried out
    for p in (12, 9, 8):
        assert m["cls"][p] == int(C.CANONICAL) and m["canon"][p] == c.id
        assert not m["flags"][p] & int(F.NEEDS_UPDATE)
        assert m["signature"][p] == c.signature
        assert not m["flags"][p] & int(F.WRITE_FAULT)
    # the store: DATA, unknown signature, WRITE_FAULT
    assert m["cls"][3] == int(C.DATA) and m["signature"][3] == 0
    assert m["flags"][3] & int(F.WRITE_FAULT)
    for p in (20, 0, 31, 17):
        assert m["cls"][p] == int(C.ZERO), p
        assert not m["flags"][p] & int(F.WRITE_FAULT), p
    assert int(v[3].sum()) == 1 and v[3, 7] == 1


def test_readahead_flags_and_order(make_region, rng):
    r = make_region(64 * PAGE_SIZE, max_cluster_pages=8)
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, r.nbytes, c)
    v = pages(r)
    for p in range(r.npages):                            # sequential first touches
        assert v[p, 5] == page[5]
    m = r.meta
    st = r.stats()
    ra = (m["flags"] & int(F.READAHEAD)) != 0
    assert (m["state"] == int(S.PRESENT)).all()
    assert ra.any(), "sequential faults must grow the cluster beyond one page"
    assert int(ra.sum()) == st["readahead_pages"], (int(ra.sum()), st)
    assert st["faults"] + st["readahead_pages"] == r.npages, st
    assert st["faults"] >= r.npages // 8, "max_cluster_pages=8 bounds pages per fault"
    assert not ra[0], "the first page was faulted on, not read ahead"
    order = m["order"].astype(np.int64)
    assert (order > 0).all(), "read-ahead pages get an order too"
    assert (np.diff(order) >= 0).all(), "sequential touches: order follows the address"
    assert (np.diff(order[~ra]) > 0).all()
    assert (m["cls"] == int(C.CANONICAL)).all() and not (m["flags"] & int(F.NEEDS_UPDATE)).any()
    assert (v == page).all()


def test_materialize(make_region, rng):
    r = make_region(16 * PAGE_SIZE, max_cluster_pages=1)
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, 8 * PAGE_SIZE, c)
    r.defer_fill(8 * PAGE_SIZE, 4 * PAGE_SIZE, plm.ZERO)  # 12-15 EMPTY
    r.materialize(2 * PAGE_SIZE, 4 * PAGE_SIZE)           # pages 2-5
    m = r.meta
    mat = list(range(2, 6))
    assert (m["state"][mat] == int(S.PRESENT)).all()
    assert (m["flags"][mat] & int(F.MATERIALIZED)).all()
    assert not (m["flags"][mat] & int(F.NEEDS_UPDATE)).any()
    assert not m["order"][mat].any(), "materialized pages were not touched"
    assert (m["state"][[0, 1, 6, 7]] == int(S.DEFERRED)).all()
    st = r.stats()
    assert st["faults"] == 0 and st["materialized_pages"] == 4, st
    v = pages(r)
    assert (v[2:6] == page).all()
    assert r.stats()["faults"] == 0, "reading materialized pages must not fault"
    r.materialize()                                       # everything, EMPTY pages included
    m = r.meta
    assert (m["state"] == int(S.PRESENT)).all()
    others = [p for p in range(16) if p not in mat]
    assert (m["flags"][others] & int(F.MATERIALIZED)).all()
    assert not m["order"].any()
    assert (v[:8] == page).all() and not v[8:].any()
    st = r.stats()
    assert st["faults"] == 0, st
    assert st["materialized_pages"] == 16 and st["pages_present"] == 16, st
