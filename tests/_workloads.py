"""Multi-threaded contents workloads, run in a subprocess by test_contents.py.

A reference model (a numpy copy of what every page must contain) is kept next to the region;
threads touch random pages and compare each page they touch; finally every byte of the region
is compared with the model. Any mismatch raises AssertionError naming the pages.
"""

import json
import threading
import time

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


def touch_plan(rng, n, frac):
    """Pages to touch in order: single random pages mixed with sequential runs of 16-128 pages
    (runs make the adaptive readahead grow across class boundaries), about frac * n in all."""
    k = max(1, int(frac * n / 22))
    starts = rng.integers(0, n, size=k)
    lengths = np.where(rng.random(k) < 0.7, 1, rng.integers(16, 129, size=k))
    return np.concatenate([np.arange(s, min(n, s + ln)) for s, ln in zip(starts, lengths)])


def contents_read(seed, nbytes=64 << 20, nthreads=4, touch_frac=0.5, **region_kw):
    rng = np.random.default_rng(seed)
    with plm.Region(nbytes, **region_kw) as r:
        expected, kinds = build(r, rng)
        n = r.npages
        v = pages(r)
        plans = [touch_plan(np.random.default_rng(seed * 100 + t), n, touch_frac)
                 for t in range(nthreads)]
        bad = []

        def reader(t):
            for p in plans[t]:
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


def nonzero_page(rng, ps):
    return rng.integers(1, 256, size=ps, dtype=np.uint8)   # no zero byte anywhere


def redefer_race(seed, nbytes=8 << 20, nreaders=3, seconds=3.0, pause=0.0002, maxrun=64,
                 **region_kw):
    """Readers fault pages (several on the same pages, so duplicate fault messages happen)
    while the main thread keeps re-deferring random runs between canonical pages A and B and
    materializing some. A racing read may mix A and B bytes, but never show a byte that is in
    neither (a zero byte means a zero page was mapped where A or B belonged). Afterwards every
    page must hold exactly its last fill."""
    rng = np.random.default_rng(seed)
    with plm.Region(nbytes, **region_kw) as r:
        n, ps = r.npages, r.page_size
        pa, pb = nonzero_page(rng, ps), nonzero_page(rng, ps)
        ca, cb = r.canonical(pa.tobytes()), r.canonical(pb.tobytes())
        r.defer_fill(0, r.nbytes, ca)
        last = np.zeros(n, np.int8)                 # 0: A, 1: B
        v = pages(r)
        stop = threading.Event()
        bad = []
        reads_done = [0]

        def reader(t):
            try:
                rr = np.random.default_rng(seed * 10 + t)
                while not stop.is_set():
                    base = int(rr.integers(0, max(1, n - 8)))
                    for p in range(base, min(n, base + 8)):     # readers collide on small windows
                        got = v[p].copy()
                        reads_done[0] += 1
                        if not ((got == pa) | (got == pb)).all():
                            bad.append((t, p, int(np.count_nonzero(got == 0))))
                            return
            except BaseException as e:
                bad.append((t, repr(e)))

        ts = [threading.Thread(target=reader, args=(t,)) for t in range(nreaders)]
        for t in ts:
            t.start()
        i = 0
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                i += 1
                time.sleep(pause)
                first = int(rng.integers(0, n))
                cnt = int(rng.integers(1, min(maxrun, n - first) + 1))
                which = int(rng.integers(0, 2))
                r.defer_fill(first * ps, cnt * ps, (ca, cb)[which])
                last[first:first + cnt] = which
                if i % 16 == 0:
                    mlen = min(32, n)
                    m0 = int(rng.integers(0, n - mlen + 1))
                    r.materialize(m0 * ps, mlen * ps)
        finally:
            stop.set()
            for t in ts:
                t.join()
        expected = np.where(last[:, None] == 0, pa[None, :], pb[None, :])
        final = ""
        if not np.array_equal(v, expected):
            badp, nbad = first_bad_pages(v, expected)
            detail = [(p, int(last[p]), int(r.meta["state"][p]), int(r.meta["cls"][p]),
                       int(r.meta["canon"][p]), int(np.count_nonzero(v[p] == 0))) for p in badp]
            final = (f"; afterwards {nbad} pages differ from their last fill, first (page, "
                     f"fill, state, cls, canon, zero bytes): {detail}")
        assert not bad and not final, (
            f"reads with bytes from neither A nor B (thread, page, zero bytes): {bad}{final}")
        assert reads_done[0] > 0
        st = r.stats()
        assert st["errors"] == 0, st
        print(json.dumps({"faults": st["faults"], "spurious": st["faults_spurious"],
                          "reads": reads_done[0], "fills": i}))


