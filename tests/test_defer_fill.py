"""defer_fill over present pages: their memory is returned at once, nothing is written until
first access, and the next access sees the new contents."""

import json

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

MiB = 1 << 20
S = plm.PageState
C = plm.PageClass
F = plm.PageFlag


def test_defer_fill_returns_memory(run_py_ok):
    out = run_py_ok("""
        rng = np.random.default_rng(4)
        r = plm.Region(32 << 20)
        v = pages(r)
        data = rng.integers(0, 256, size=v.shape, dtype=np.uint8)
        v[:] = data                                    # 32 MiB of program data, present
        assert np.array_equal(v, data)
        rss_written = rss_anon()
        page = random_page(rng)
        c = r.canonical(page.tobytes())
        half = r.nbytes // 2
        r.defer_fill(0, half, plm.ZERO)
        r.defer_fill(half, half, c)
        rss_deferred = rss_anon()
        faults_before = r.stats()["faults"]
        n = r.npages // 2
        assert not v[:n].any()
        assert (v[n:] == page).all()
        print(json.dumps(dict(written=rss_written, deferred=rss_deferred,
                              faults=r.stats()["faults"] - faults_before)))
        r.close()
    """, timeout=90)
    m = json.loads(out.strip().splitlines()[-1])
    freed = m["written"] - m["deferred"]
    assert freed > 28 * MiB, f"defer_fill over 32 MiB of present pages freed {freed / MiB:.1f} MiB"
    assert m["faults"] > 0, "after defer_fill the pages must be faulted in again"


@pytest.mark.parametrize("max_cluster", [1, None])
def test_defer_fill_over_present_meta_and_contents(make_region, rng, max_cluster):
    r = make_region(32 * PAGE_SIZE, max_cluster_pages=max_cluster)
    v = pages(r)
    data = rng.integers(0, 256, size=v.shape, dtype=np.uint8)
    v[:] = data
    assert (r.meta["state"] == int(S.PRESENT)).all()
    assert r.stats()["pages_present"] == 32
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, 8 * PAGE_SIZE, plm.ZERO)          # pages 0-7
    r.defer_fill(16 * PAGE_SIZE, 8 * PAGE_SIZE, c)    # pages 16-23
    m = r.meta
    z, k, rest = slice(0, 8), slice(16, 24), np.r_[8:16, 24:32]
    assert (m["state"][z] == int(S.DEFERRED)).all()
    assert (m["cls"][z] == int(C.ZERO)).all()
    assert not (m["flags"][z] & int(F.NEEDS_UPDATE)).any(), "ZERO needs no update"
    assert (m["state"][k] == int(S.DEFERRED)).all()
    assert (m["cls"][k] == int(C.CANONICAL)).all()
    assert (m["canon"][k] == c.id).all()
    assert (m["flags"][k] & int(F.NEEDS_UPDATE)).all()
    assert (m["signature"][k] == c.signature).all()
    assert (m["state"][rest] == int(S.PRESENT)).all()
    faults = r.stats()["faults"]
    assert r.stats()["pages_present"] == 16, "deferred pages are no longer present"
    # next access sees the new contents; the other pages kept theirs
    assert not v[z].any()
    assert (v[k] == page).all()
    assert np.array_equal(v[rest], data[rest])
    assert r.stats()["faults"] > faults
    m = r.meta
    assert (m["state"] == int(S.PRESENT)).all()
    assert not (m["flags"] & int(F.NEEDS_UPDATE)).any(), "update carried out on access"
    assert (m["cls"][k] == int(C.CANONICAL)).all() and (m["canon"][k] == c.id).all()
    assert (m["cls"][z] == int(C.ZERO)).all()


def test_redefer_last_fill_wins(make_region, rng):
    r = make_region(16 * PAGE_SIZE, max_cluster_pages=1)
    v = pages(r)
    p1, p2 = random_page(rng), random_page(rng)
    c1, c2 = r.canonical(p1.tobytes()), r.canonical(p2.tobytes())
    r.defer_fill(0, 16 * PAGE_SIZE, c1)
    r.defer_fill(4 * PAGE_SIZE, 4 * PAGE_SIZE, c2)       # over deferred, untouched pages
    r.defer_fill(6 * PAGE_SIZE, PAGE_SIZE, plm.ZERO)
    assert np.array_equal(v[2], p1)
    r.defer_fill(2 * PAGE_SIZE, PAGE_SIZE, c2)           # over a page present as canonical
    v[9, 0] = 0                                          # page 9: present, canonical, written
    r.defer_fill(9 * PAGE_SIZE, PAGE_SIZE, plm.ZERO)
    want = {p: p1 for p in range(16)}
    want.update({4: p2, 5: p2, 7: p2, 2: p2, 6: np.zeros_like(p1), 9: np.zeros_like(p1)})
    for p in range(16):
        assert np.array_equal(v[p], want[p]), f"page {p}"
    assert r.meta["canon"][2] == c2.id and r.meta["canon"][4] == c2.id
    assert r.meta["cls"][6] == int(C.ZERO) and r.meta["cls"][9] == int(C.ZERO)
