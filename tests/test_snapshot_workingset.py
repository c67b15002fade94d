"""Working sets: pages touched after a restore (or a mark) come back as the next snapshot's
working set in first-touch order, and a prefetching restore has them present on return."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page
from test_snapshot_format import STORED, SnapFile

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

PS = PAGE_SIZE
S = plm.PageState
C = plm.PageClass
F = plm.PageFlag

N = 64
# 0..47 distinct random pages, 48..55 zero pages, 56..63 untouched
ORDER = [37, 5, 60, 12, 13, 14, 2, 50, 21, 47, 0, 33]
WRITTEN = {13: 7, 2: 99}          # first touched by a write (page: value of byte 100)


@pytest.fixture
def base_snapshot(tmp_path):
    rng = np.random.default_rng(77)
    expected = np.zeros((N, PS), np.uint8)
    path = str(tmp_path / "a.snap")
    with plm.Region(N * PS, max_cluster_pages=1) as r:
        v = pages(r)
        for p in range(48):
            v[p] = expected[p] = random_page(rng)
        v[48:56] = 0
        plm.checkpoint(r, path, working_set="none")
    return path, expected


def touch_in_order(r, expected):
    v = pages(r)
    for p in ORDER:
        if p in WRITTEN:
            v[p, 100] = WRITTEN[p]
            expected[p, 100] = WRITTEN[p]
        else:
            assert v[p, 0] == expected[p, 0]


def test_working_set_is_first_touch_order(base_snapshot, tmp_path):
    path, expected = base_snapshot
    expected = expected.copy()
    r = plm.restore(path, prefetch="none", background=False, max_cluster_pages=1)
    try:
        assert r.working_set().tolist() == []
        touch_in_order(r, expected)
        assert r.working_set().tolist() == ORDER
        orders = r.meta["order"][ORDER]
        assert (np.diff(orders.astype(np.int64)) > 0).all(), orders
        info = plm.checkpoint(r, str(tmp_path / "b.snap"), working_set="auto")
        assert info.working_set.tolist() == ORDER
        # checkpoint does not touch pages, so the window is unchanged
        assert r.working_set().tolist() == ORDER
    finally:
        r.close()
    info = plm.inspect(str(tmp_path / "b.snap"))
    assert info.working_set.tolist() == ORDER
    assert info.working_set.dtype == np.uint64
    # the working set's stored pages come first in the store, in working-set order
    sf = SnapFile.parse(open(str(tmp_path / "b.snap"), "rb").read())
    ws_stored = [p for p in ORDER if sf.cls[p] == STORED]
    assert sf.entry[ws_stored].tolist() == list(range(len(ws_stored)))


def test_prefetch_working_set_present_on_return(base_snapshot, tmp_path):
    path, expected = base_snapshot
    expected = expected.copy()
    b = str(tmp_path / "b.snap")
    with plm.restore(path, prefetch="none", background=False, max_cluster_pages=1) as r:
        touch_in_order(r, expected)
        plm.checkpoint(r, b)
    sf = SnapFile.parse(open(b, "rb").read())
    stored = set(np.nonzero(sf.cls == STORED)[0].tolist())

    with plm.restore(b, prefetch="working-set", background=False) as r:
        s = r.stats()
        m = r.meta
        assert s["faults"] == 0, s
        present = set(np.nonzero(m["state"] == S.PRESENT)[0].tolist())
        assert set(ORDER) <= present, sorted(set(ORDER) - present)
        assert not (present - set(ORDER)), "pages outside the working set are present: %s" % (
            sorted(present - set(ORDER)))
        for p in ORDER:
            if p in stored:
                assert m["flags"][p] & F.PREFETCHED, (p, m[p])
        others = sorted(stored - set(ORDER))
        assert (m["state"][others] == S.DEFERRED).all()
        assert (m["cls"][others] == C.SNAPSHOT).all()
        assert s["prefetched_pages"] >= len(stored & set(ORDER)), s
        assert np.array_equal(pages(r), expected)

    with plm.restore(b, prefetch="none", background=False) as r:
        m = r.meta
        assert not (m["state"] == S.PRESENT).any(), np.nonzero(m["state"] == S.PRESENT)[0]
        assert r.stats()["prefetched_pages"] == 0
        assert np.array_equal(pages(r), expected)


def test_mark_working_set_starts_a_new_window(make_region, tmp_path, features):
    rng = np.random.default_rng(8)
    r = make_region(N * PS, max_cluster_pages=1)
    v = pages(r)
    for p in (3, 5, 7, 9):
        v[p] = random_page(rng)
    assert r.working_set().tolist() == [3, 5, 7, 9]
    r.mark_working_set()
    assert r.working_set().tolist() == []
    assert r.tracks_writes == features.has_wp_async
    assert r.tracks_writes, "this machine has async write-protect: writes must be tracked"
    assert v[20, 0] == 0          # first touches: 20 (read), 11 (write), 30 (read)
    v[11, 0] = 1
    assert v[30].sum() == 0
    assert v[5, 10] == v[5, 10]   # read of a page present at the mark: not visible
    v[7, 1] = 1                   # writes to pages present at the mark: after the first
    v[3, 1] = 1                   # touches, in address order
    assert r.working_set().tolist() == [20, 11, 30, 3, 7]
    path = str(tmp_path / "w.snap")
    info = plm.checkpoint(r, path)
    assert info.working_set.tolist() == [20, 11, 30, 3, 7]
    assert plm.inspect(path).working_set.tolist() == [20, 11, 30, 3, 7]

    r.mark_working_set()
    assert r.working_set().tolist() == []
    v[40, 0] = 2                  # first touch
    v[20, 0] = 3                  # present at the new mark, written
    v[9, 0] = 4
    assert r.working_set().tolist() == [40, 9, 20]
    info = plm.checkpoint(r, path, working_set="auto")
    assert info.working_set.tolist() == [40, 9, 20]


def test_explicit_and_empty_working_sets(base_snapshot, tmp_path):
    path, expected = base_snapshot
    with plm.restore(path, prefetch="none", background=False) as r:
        b = str(tmp_path / "b.snap")
        info = plm.checkpoint(r, b, working_set="none")
        assert info.working_set.tolist() == []
        with plm.restore(b, prefetch="working-set", background=False) as r2:
            assert not (r2.meta["state"] == S.PRESENT).any()
            assert np.array_equal(pages(r2), expected)
        info = plm.checkpoint(r, b, working_set=np.array([9, 1, 55, 62], np.int64))
        assert info.working_set.tolist() == [9, 1, 55, 62]
        with plm.restore(b, prefetch="working-set", background=False) as r2:
            m = r2.meta
            assert (m["state"][[9, 1, 55]] == S.PRESENT).all(), m[[9, 1, 55]]
            assert m["state"][62] == S.EMPTY       # untouched: nothing to bring in
            assert np.array_equal(pages(r2), expected)


@pytest.mark.parametrize("ws", [[3, 4, 5, 6], [6, 5, 4, 3], [2, 3, 4, 9, 10, 11]],
                         ids=["zero-then-stored", "reversed", "mixed-runs"])
@pytest.mark.parametrize("prefetch", ["working-set", "all"])
def test_prefetch_runs_across_page_kinds(make_region, tmp_path, ws, prefetch):
    """Runs of address-adjacent pages in the prefetch order mix zero, stored and untouched
    pages: each page gets its own contents (a zero page's neighbour is not zero-filled)."""
    rng = np.random.default_rng(21)
    n = 16
    r = make_region(n * PS, max_cluster_pages=1)
    v = pages(r)
    expected = np.zeros((n, PS), np.uint8)
    for p in (1, 4, 5, 8, 10, 11, 12):
        v[p] = expected[p] = random_page(rng)
    v[3] = 0
    v[9] = 0
    assert v[2].sum() == 0          # read only: zero
    # 0, 6, 7, 13.. untouched
    path = str(tmp_path / "k.snap")
    plm.checkpoint(r, path, working_set=ws)
    with plm.restore(path, prefetch=prefetch, background=False) as r2:
        m = r2.meta
        for p in ws:
            if expected[p].any():
                assert m["state"][p] == S.PRESENT, (p, m[p])
        bad = np.nonzero((pages(r2) != expected).any(axis=1))[0]
        assert bad.size == 0, "pages with wrong contents: %s" % bad.tolist()


def test_prefetched_working_set_is_carried_into_the_next_window(base_snapshot, tmp_path):
    """After a prefetching restore the prefetched pages are present, so touching them raises
    no fault: the window keeps the saved working set in its order and appends new touches;
    mark_working_set() starts an empty window again."""
    path, expected = base_snapshot
    saved = [7, 3, 30]
    with plm.restore(path, prefetch="none", background=False, max_cluster_pages=1) as r:
        v = pages(r)
        for p in saved:
            assert bytes(v[p]) == expected[p].tobytes()
        second = str(tmp_path / "b.snap")
        assert list(plm.checkpoint(r, second).working_set) == saved
    with plm.restore(second, prefetch="working-set", background=False,
                     max_cluster_pages=1) as r:
        v = pages(r)
        assert bytes(v[3]) == expected[3].tobytes()     # prefetched: no fault, not seen...
        assert bytes(v[40]) == expected[40].tobytes()   # ...a new page is
        assert list(r.working_set()) == saved + [40]
        r.mark_working_set()
        assert list(r.working_set()) == []
        assert bytes(v[41]) == expected[41].tobytes()
        assert list(r.working_set()) == [41]
    with plm.restore(second, prefetch="none", background=False, max_cluster_pages=1) as r:
        assert list(r.working_set()) == []   # nothing prefetched, nothing inherited


# ---- issue 10: prefetch with repeated pages, and a prefetch that cannot allocate -----------

@pytest.mark.parametrize("order", [[0, 0], [5, 3, 5, 5, 3, 40, 5], list(range(48)) * 2])
def test_prefetch_lists_a_page_twice(base_snapshot, run_py_ok, order):
    """Issue 10, case 3: r.prefetch([0, 0]) never returned (it waited for the page it had
    claimed itself) and close() then waited forever. Repeats are allowed and cost nothing."""
    path, expected = base_snapshot
    np.save(path + ".npy", expected)
    out = run_py_ok(f"""
        expected = np.load({path!r} + ".npy")
        r = plm.restore({path!r}, prefetch="none", background=False)
        r.prefetch({order!r})
        st = r.meta["state"]
        want = sorted(set({order!r}))
        assert (st[want] == int(plm.PageState.PRESENT)).all(), st[want]
        assert np.array_equal(pages(r), expected)
        r.close()
        print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK")


def test_overlapping_prefetches_from_two_threads(base_snapshot, run_py_ok):
    path, expected = base_snapshot
    np.save(path + ".npy", expected)
    out = run_py_ok(f"""
        expected = np.load({path!r} + ".npy")
        for round in range(20):
            r = plm.restore({path!r}, prefetch="none", background=False)
            rng = np.random.default_rng(round)
            lists = [rng.integers(0, r.npages, 200) for _ in range(2)]
            ts = [threading.Thread(target=r.prefetch, args=(l,)) for l in lists]
            for t in ts: t.start()
            for t in ts: t.join(30)
            assert not any(t.is_alive() for t in ts), "prefetch hung"
            assert np.array_equal(pages(r), expected)
            r.close()
        print("OK")
    """, timeout=120)
    assert out.strip().endswith("OK")


@pytest.mark.skipif(bool(__import__("os").environ.get("PYLAZYMEM_UNDER_ASAN")),
                    reason="RLIMIT_AS: ASan's shadow memory reserves terabytes of address space")
def test_prefetch_out_of_memory_leaves_pages_lazy(run_py_ok, tmp_path):
    """Issue 10, case 4: a failed allocation in the prefetch pipeline left the pages it had
    claimed BUSY forever (a later fault on one spun). The address space is limited to a
    sweep of headrooms, so that each of prefetch's allocations (its lists, scratch, batch
    table, read buffers, threads) fails in some run: prefetch either succeeds or raises, no
    page is left BUSY, and once the limit is lifted every page faults in right."""
    path = str(tmp_path / "big.snap")
    # the snapshot is written by another process: this one's heap then has no free space
    # left over from checkpoint() for prefetch's allocations to come from
    run_py_ok(f"""
        n = 1 << 17
        r = plm.Region(n * PS)
        v = pages(r)
        for p in range(0, n, 3):
            v[p, :8] = np.frombuffer(np.uint64(p + 1).tobytes(), np.uint8)
        plm.checkpoint(r, {path!r}, working_set="none")
    """, timeout=120)
    out = run_py_ok(f"""
        import resource
        n = 1 << 17
        want = np.arange(0, n, 3, dtype=np.uint64)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        results = []
        for kib in (16, 64, 128, 256, 512, 1024, 2048, 3072, 4096, 8192, 16384, 65536):
            r = plm.restore({path!r}, prefetch="none", background=False)
            with open("/proc/self/status") as f:
                vm = [int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:")][0]
            resource.setrlimit(resource.RLIMIT_AS, (vm + kib * 1024, hard))
            try:
                r.prefetch(want)
                results.append("ok")
            except (MemoryError, plm.UffdError) as e:
                results.append(type(e).__name__)
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            st = r.meta["state"]
            busy = np.nonzero(st == int(plm.PageState.BUSY))[0]
            assert busy.size == 0, (kib, "pages left BUSY", busy[:8])
            v = pages(r)
            got = v[want.astype(np.int64), :8].copy().view(np.uint64).ravel()
            assert np.array_equal(got, want + 1), kib
            del v
            r.close()
        print("RESULTS", results)
        print("OK")
    """, timeout=180)
    assert out.strip().endswith("OK"), out
    results = eval(out.split("RESULTS", 1)[1].splitlines()[0])
    assert "ok" in results and any(x != "ok" for x in results), results
