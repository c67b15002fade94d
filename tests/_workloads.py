"""Multi-threaded contents workloads, run in a subprocess by test_contents.py.

A reference model (a numpy copy of what every page must contain) is kept next to the region;
threads touch random pages and compare each page they touch; finally every byte of the region
is compared with the model. Any mismatch raises AssertionError naming the pages.
"""

import json
import sys
import threading

import numpy as np

import pylazymem as plm
from _helpers import first_bad_pages, pages


def build(r, rng, ncanon=5):
    """Fill region `r` with a mix of written data, ZERO and canonical deferrals and untouched
    EMPTY pages. Returns (expected (npages, ps) uint8, kinds (npages,) int8) where kinds is
    -2 written data, -1 EMPTY, 0 ZERO, k>0 canonical k."""
    ps, n = r.page_size, r.npages
    canon = rng.integers(0, 256, size=(ncanon, ps), dtype=np.uint8)
    canon[0] = 0
    canon[0, ps - 1] = 1          # almost zero: catches zero/canonical confusion
    canon[1, : ps // 2] = 0       # half zero
    cans = [r.canonical(canon[i].tobytes()) for i in range(ncanon)]
    assert len({c.id for c in cans}) == ncanon, [c.id for c in cans]

    v = pages(r)
    expected = np.zeros((n, ps), np.uint8)
    kinds = np.full(n, -1, np.int8)

    # Some pages get program data first; deferrals below discard part of it again.
    written = rng.choice(n, size=n // 16, replace=False)
    data = rng.integers(0, 256, size=(written.size, ps), dtype=np.uint8)
    v[written] = data
    expected[written] = data
    kinds[written] = -2

    p = 0
    while p < n:
        run = min(int(rng.integers(1, 65)), n - p)
        k = int(rng.integers(-1, ncanon + 1))
        if k == 0:
            r.defer_fill(p * ps, run * ps, plm.ZERO)
            expected[p:p + run] = 0
            kinds[p:p + run] = 0
        elif k > 0:
            r.defer_fill(p * ps, run * ps, cans[k - 1])
            expected[p:p + run] = canon[k - 1]
            kinds[p:p + run] = k
        p += run

    meta = r.meta
    deferred = kinds >= 0
    assert (meta["state"][deferred] == int(plm.PageState.DEFERRED)).all()
    assert (meta["state"][kinds == -2] == int(plm.PageState.PRESENT)).all()
    # untouched pages stay EMPTY, unless readahead around a write fault mapped them (zero)
    assert np.isin(meta["state"][kinds == -1],
                   [int(plm.PageState.EMPTY), int(plm.PageState.PRESENT)]).all()
    canon_ids = np.array([0] + [c.id for c in cans], np.uint32)
    is_canon = kinds > 0
    assert (meta["canon"][is_canon] == canon_ids[kinds[is_canon]]).all()
    return expected, kinds


def _run_threads(nthreads, target):
    errors = []
    barrier = threading.Barrier(nthreads)

    def wrap(t):
        try:
            barrier.wait()
            target(t)
        except BaseException as e:  # reported by the main thread
            errors.append((t, repr(e)))

    ts = [threading.Thread(target=wrap, args=(t,)) for t in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def verify_all(r, expected, kinds):
    v = pages(r)
    if not np.array_equal(v, expected):
        bad, nbad = first_bad_pages(v, expected)
        detail = [(p, int(kinds[p]), int(r.meta["state"][p]), int(r.meta["cls"][p])) for p in bad]
        raise AssertionError(f"{nbad} pages differ from the model; first (page, kind, state, cls):"
                             f" {detail}")
    st = r.stats()
    assert st["errors"] == 0, st
    assert (r.meta["state"] == int(plm.PageState.PRESENT)).all()
    assert st["pages_present"] == r.npages, st
    return st


def contents_read(seed, nbytes=64 << 20, nthreads=4, touch_frac=0.6, **region_kw):
    rng = np.random.default_rng(seed)
    with plm.Region(nbytes, **region_kw) as r:
        expected, kinds = build(r, rng)
        n = r.npages
        v = pages(r)
        orders = [np.random.default_rng(seed * 100 + t).permutation(n)[: int(n * touch_frac)]
                  for t in range(nthreads)]
        bad = []

        def reader(t):
            for p in orders[t]:
                if not np.array_equal(v[p], expected[p]):
                    bad.append((t, int(p), int(kinds[p])))

        _run_threads(nthreads, reader)
        assert not bad, f"{len(bad)} bad reads (thread, page, kind), first: {bad[:8]}"
        st = verify_all(r, expected, kinds)
        print(json.dumps({"faults": st["faults"], "readahead": st["readahead_pages"],
                          "spurious": st["faults_spurious"]}))


def contents_write(seed, nbytes=64 << 20, nthreads=4, write_frac=0.5, **region_kw):
    rng = np.random.default_rng(seed)
    with plm.Region(nbytes, **region_kw) as r:
        expected, kinds = build(r, rng)
        n, ps = r.npages, r.page_size
        v = pages(r)
        w = r.ndarray(np.uint64).reshape(n, ps // 8)
        chosen = rng.permutation(n)[: int(n * write_frac)]
        mine = [chosen[t::nthreads] for t in range(nthreads)]  # disjoint write sets
        ramp = np.arange(ps, dtype=np.uint32)

        def writer(t):
            for p in mine[t]:
                p = int(p)
                how = p % 3
                if how == 0:      # whole page: a pattern unique to (thread, page)
                    pat = ((ramp * 131 + p * 7 + t) & 0xFF).astype(np.uint8)
                    v[p] = pat
                    expected[p] = pat
                elif how == 1:    # one 8-byte store into the page: the rest keeps its contents
                    i = (p * 37) % (ps // 8)
                    val = np.uint64((p << 8) | (t + 1) | (1 << 63))
                    w[p, i] = val
                    expected[p].view(np.uint64)[i] = val
                else:             # read first, then a small slice store
                    if not np.array_equal(v[p], expected[p]):
                        raise AssertionError(f"read before write: page {p} kind {kinds[p]}")
                    v[p, 100:116] = t + 1
                    expected[p, 100:116] = t + 1
                if not np.array_equal(v[p], expected[p]):
                    raise AssertionError(f"read after write: page {p} kind {kinds[p]} how {how}")

        _run_threads(nthreads, writer)
        st = verify_all(r, expected, kinds)
        print(json.dumps({"faults": st["faults"], "writes": st["faults_write"]}))


if __name__ == "__main__":
    kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    {"read": contents_read, "write": contents_write}[sys.argv[1]](**kw)
