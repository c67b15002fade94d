"""Dirty tracking (issue 12, docs/design.md "Dirty tracking"): Region.dirty_pages() lists every
page whose contents may differ from what it held when the epoch began (creation, restore(),
reset_dirty()). The rule is no false negatives, ever; where the design promises precision
(present pages of a plain region that were not stored to), these tests hold it to that too.

Swapped-out pages (PAGE_IS_SWAPPED, handled by the same scans) are not tested: this machine
has no swap."""

import ctypes
import threading
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

PS = PAGE_SIZE
S = plm.PageState
BLK = (2 << 20) // PS          # pages per 2 MiB block (canonical chunks)
MADV_DONTNEED = 4

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def drop(r, page, n=1):
    """madvise(MADV_DONTNEED) behind pylazymem's back: the page reads as zero again."""
    assert _libc.madvise(r.address + page * PS, n * PS, MADV_DONTNEED) == 0, ctypes.get_errno()


def dirty(r):
    return set(r.dirty_pages().tolist())


@pytest.fixture
def wp(features):
    """The tests of mode "wp-async" need the kernel's async write-protect (6.7)."""
    if features.dirty_tracking != "wp-async":
        pytest.skip("needs UFFD_FEATURE_WP_ASYNC: %s" % features.dirty_tracking_reason)


def full_region(make_region, n, rng, **kw):
    """A plain region with every page present, holding random program data, epoch reset."""
    r = make_region(n * PS, **kw)
    v = pages(r)
    v[:] = rng.integers(0, 256, (n, PS), dtype=np.uint8)
    r.reset_dirty()
    return r, v


# ---- plain regions -------------------------------------------------------------------------

def test_mode_and_features(make_region, features):
    r = make_region(16 * PS)
    assert features.dirty_tracking in ("wp-async", "none")
    assert r.dirty_tracking == features.dirty_tracking
    assert (features.dirty_tracking_reason == "") == (features.dirty_tracking == "wp-async")
    assert features.has_wp_async, "this machine (6.18) has WP_ASYNC: dirty tracking must use it"
    assert r.dirty_pages().dtype == np.uint64


def test_closed_region_raises(make_region):
    r = make_region(16 * PS)
    r.close()
    for call in (r.dirty_pages, r.reset_dirty, lambda: r.dirty_tracking):
        with pytest.raises(plm.RegionClosedError):
            call()


def test_random_writes_after_reset_are_all_reported_and_only_they(make_region, rng, wp):
    """Many trials: every page stored to after a reset is reported; present pages that were
    only read are not (plain region, all pages private program data)."""
    n = 1024
    r, v = full_region(make_region, n, rng)
    assert r.dirty_pages().size == 0
    for trial in range(60):
        k = int(rng.integers(0, 200))
        written = set(rng.choice(n, k, replace=False).tolist())
        read = rng.choice(n, 100)
        for p in written:
            v[p, int(rng.integers(0, PS))] ^= 0xff
        assert int(v[read].sum()) >= 0
        got = dirty(r)
        assert got == written, (trial, sorted(written - got)[:8], sorted(got - written)[:8])
        r.reset_dirty()
        assert r.dirty_pages().size == 0


def test_dirty_accumulates_until_reset(make_region, rng, wp):
    r, v = full_region(make_region, 256, rng)
    v[3, 0] ^= 1
    assert dirty(r) == {3}
    v[9, 0] ^= 1                # harvested again: 3 must stay
    assert dirty(r) == {3, 9}
    r.mark_working_set()        # the working set's harvest keeps what it finds for dirty
    v[11, 0] ^= 1
    assert r.working_set().tolist() == [11]
    assert dirty(r) == {3, 9, 11}
    r.reset_dirty()
    assert dirty(r) == set()
    assert r.working_set().tolist() == [11]   # a reset does not touch the working set


def test_fresh_region_reads_are_clean_writes_dirty(make_region, wp):
    """Fresh pages read map the kernel's zero page (still zero: clean); first stores are
    dirty (the epoch began at creation, when every page read as zero)."""
    r = make_region(128 * PS, max_cluster_pages=1)
    v = pages(r)
    assert int(v[::2].sum()) == 0
    assert dirty(r) == set()
    v[5, 0] = 1
    v[8, 0] = 1                  # read before (zero page), then stored to
    assert dirty(r) == {5, 8}


def test_writes_from_threads_racing_harvests_are_never_lost(make_region, rng, wp):
    """4 threads store to random pages while the main thread harvests (dirty_pages, working_set,
    mark_working_set) in a loop: every page stored to after the reset is reported at the end,
    and every page stored to after a mark is in the working set."""
    n = 4096
    r, v = full_region(make_region, n, rng)
    stop = threading.Event()
    logs = [[] for _ in range(4)]
    marks = []

    def writer(i):
        g = np.random.default_rng(1000 + i)
        while not stop.is_set():
            for p in g.integers(0, n, 64).tolist():
                logs[i].append(p)   # logged before the store: see the working-set check
                v[p, i] ^= 1

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    try:
        for it in range(200):
            if it % 3 == 0:
                r.dirty_pages()
            elif it % 3 == 1:
                r.mark_working_set()
                marks.append([len(x) for x in logs])
            else:
                r.working_set()
    finally:
        stop.set()
        for t in ts:
            t.join()
    written = set(p for x in logs for p in x)
    got = dirty(r)
    assert written <= got, sorted(written - got)[:8]
    assert got <= written, sorted(got - written)[:8]   # all pages present and private
    # the last mark: a store logged after it returned was made after it: in the window
    last = marks[-1]
    after = set(p for i, x in enumerate(logs) for p in x[last[i]:])
    ws = set(r.working_set().tolist())
    assert after <= ws, sorted(after - ws)[:8]


def test_writes_racing_reset_in_a_loop(make_region, wp):
    """Resets while 4 threads store: a store made after a reset returned is reported by the
    next dirty_pages(). Each writer reads the epoch number before its store and logs it with
    the page, so a logged epoch >= e means the store came after reset number e returned."""
    n = 2048
    r = make_region(n * PS)
    v = pages(r)
    v[:] = 1
    r.reset_dirty()
    stop = threading.Event()
    epoch = [0]
    logs = [[] for _ in range(4)]

    def writer(i):
        g = np.random.default_rng(2000 + i)
        while not stop.is_set():
            for p in g.integers(0, n, 32).tolist():
                e = epoch[0]
                v[p, 8 + i] ^= 1
                logs[i].append((e, p))

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    checked = 0
    try:
        for e in range(1, 40):
            r.reset_dirty()
            epoch[0] = e
            time.sleep(0.002)                # let the writers store
            ends = [len(x) for x in logs]   # stores logged so far happened before the call
            got = dirty(r)
            want = {p for i, x in enumerate(logs) for (ep, p) in x[:ends[i]] if ep >= e}
            assert want <= got, (e, sorted(want - got)[:8])
            checked += len(want)
    finally:
        stop.set()
        for t in ts:
            t.join()
    assert checked > 0


def test_defer_fill_after_reset_is_dirty(make_region, rng, wp):
    r, v = full_region(make_region, 256, rng)
    t = random_page(rng)
    c = r.canonical(t.tobytes())
    r.defer_fill(10 * PS, 3 * PS, plm.ZERO)
    r.defer_fill(100 * PS, 70 * PS, c)        # a range record (>= 64 pages)
    want = set(range(10, 13)) | set(range(100, 170))
    assert dirty(r) == want
    assert np.array_equal(v[100], t)
    assert dirty(r) == want                   # filling a deferred page: not a change
    r.reset_dirty()
    assert int(v[101:170].sum()) >= 0         # fills of the deferred pages after the reset
    assert int(v[10:13].sum()) == 0
    # fills install the record's contents without a write-protect bit: reported (the
    # documented over-approximation), but never anything else
    assert dirty(r) <= set(range(100, 170))


def test_dropped_page_is_dirty_before_and_after_its_refault(make_region, rng, wp):
    r, v = full_region(make_region, 64, rng)
    drop(r, 7)
    assert dirty(r) == {7}                    # not present, record PRESENT
    r.reset_dirty()
    assert dirty(r) == {7}                    # reported until touched again (documented)
    assert int(v[7].sum()) == 0               # refault: the zero page
    r.reset_dirty()
    assert dirty(r) == set()
    drop(r, 9)
    assert int(v[9].sum()) == 0               # refault: zero page, with no store
    assert dirty(r) == {9}


def test_poisoned_pages_are_dirty(make_region, rng, wp):
    r, v = full_region(make_region, 64, rng)
    c = r.canonical(random_page(rng).tobytes())
    r.defer_fill(20 * PS, 4 * PS, c)
    r.reset_dirty()
    r._test_fail_fills(1)
    r.prefetch(np.arange(20, 24, dtype=np.uint64))   # cannot raise: poisons what it cannot fill
    bad = set(r.poisoned_pages().tolist())
    assert bad and bad <= set(range(20, 24))
    assert bad <= dirty(r)
    r._test_fail_fills(0)


# ---- mode "none" ---------------------------------------------------------------------------

def test_mode_none_is_conservative(make_region, rng):
    n = 256
    r = make_region(n * PS, _test_no_dirty=True, max_cluster_pages=1)
    assert r.dirty_tracking == "none"
    v = pages(r)
    c = r.canonical(random_page(rng).tobytes())
    r.defer_fill(128 * PS, 128 * PS, c)
    for p in range(0, 64):
        v[p, 0] = 1
    assert int(v[64:96].sum()) == 0
    r.reset_dirty()
    present = set(range(0, 96))
    assert dirty(r) == present                # every page that is not lazy
    for trial in range(10):
        written = set(rng.choice(n, 20, replace=False).tolist())
        for p in written:
            v[p, 1] ^= 1
        assert written <= dirty(r)
    r.reset_dirty()
    present = set(np.flatnonzero(r.meta["state"] == S.PRESENT).tolist())
    assert dirty(r) == present
    r.defer_fill(0, 4 * PS, plm.ZERO)         # lazy now, but changed: still reported
    assert dirty(r) == present | set(range(4))


# ---- restored regions ----------------------------------------------------------------------

@pytest.fixture
def snap(tmp_path):
    rng = np.random.default_rng(5)
    n = 256
    path = str(tmp_path / "d.snap")
    with plm.Region(n * PS) as r:
        v = pages(r)
        v[:200] = rng.integers(0, 256, (200, PS), dtype=np.uint8)   # 200..255 untouched
        r.mark_working_set()
        assert int(v[10:20].sum()) >= 0
        plm.checkpoint(r, path, working_set=np.arange(10, 20, dtype=np.uint64))
    return path


def test_restore_starts_a_clean_epoch(snap, wp):
    with plm.restore(snap, prefetch="working-set", background=False,
                     max_cluster_pages=1) as r:
        v = pages(r)
        assert dirty(r) == set()              # lazy pages and the prefetched working set
        assert int(v[10:20].sum()) >= 0       # present (prefetched) pages read: clean
        assert dirty(r) == set()
        assert int(v[50, 0]) >= 0             # a lazy page read-faulted: filled
        assert int(v[210, 0]) == 0            # write-protected; the untouched page maps the
        assert dirty(r) == set()              # zero page: both clean
        v[15, 1] ^= 1                         # prefetched page stored to
        v[50, 1] ^= 1                         # read-faulted page stored to
        v[60, 1] ^= 1                         # lazy page stored to (a write fault)
        assert dirty(r) == {15, 50, 60}
        r.reset_dirty()
        assert dirty(r) == set()
        v[50, 2] ^= 1
        assert dirty(r) == {50}


def test_restore_background_fill_is_clean(snap, wp):
    """The background fill installs the snapshot's own contents write-protected: after it has
    filled everything, nothing is dirty but what was stored to."""
    with plm.restore(snap, prefetch="none", background=True) as r:
        deadline = time.monotonic() + 60
        while r.stats()["background_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not r.stats()["background_running"]
        assert (r.meta["state"] == S.PRESENT).sum() >= 200
        v = pages(r)
        v[7, 0] ^= 1
        assert dirty(r) == {7}


def test_restore_prefetch_all_then_stores(snap, wp, rng):
    with plm.restore(snap, prefetch="all", background=False) as r:
        v = pages(r)
        assert dirty(r) == set()
        assert int(v.sum()) >= 0
        assert dirty(r) == set()
        written = set(rng.choice(256, 30, replace=False).tolist())
        for p in written:
            v[p, 3] ^= 1
        assert dirty(r) == written


@pytest.mark.shared_pages
def test_shared_restore_reads_clean_stores_dirty(snap):
    with plm.restore(snap, share=True, prefetch="none", background=False) as r:
        assert r.shared
        assert r.dirty_tracking == "page-tables"
        v = pages(r)
        assert dirty(r) == set()
        assert int(v[:200].sum()) >= 0        # pool pages mapped: clean
        assert dirty(r) == set()
        v[30, 0] ^= 1                         # a private copy
        v[220, 0] = 1                         # an untouched page stored to
        assert dirty(r) == {30, 220}
        r.reset_dirty()
        # a copy's later stores are invisible, so it stays reported (documented)
        assert dirty(r) == {30, 220}
        v[31, 0] ^= 1
        assert dirty(r) == {30, 31, 220}
        drop(r, 30)                           # back to the pool's page: changed, no store
        assert v[30, 0] == v[30, 0]
        r.reset_dirty()
        assert dirty(r) == {31, 220}


# ---- canonical chunk blocks ----------------------------------------------------------------

@pytest.mark.shared_pages
@pytest.mark.parametrize("first_touch", [False, True], ids=["kernel", "seen"])
def test_canonical_chunk_blocks(make_region, rng, first_touch, wp):
    r = make_region(8 << 20, shared_first_touch=first_touch)
    v = pages(r)
    v[:] = 7                                  # program data everywhere first
    r.reset_dirty()
    t = random_page(rng)
    c = r.canonical(t.tobytes())
    first, n = 3, 2 * BLK                     # partial blocks at both ends, 1 whole block
    r.defer_fill(first * PS, n * PS, c)
    assert r.stats()["map_budget_fallbacks"] == 0
    want = set(range(first, first + n))
    assert dirty(r) == want                   # the deferral changed them
    r.reset_dirty()
    assert int(v[BLK:2 * BLK].sum()) >= 0     # reads of the chunk block
    got = dirty(r)
    assert not (got & set(range(BLK, 2 * BLK))), sorted(got)[:8]
    v[BLK + 5, 0] ^= 1                        # a store in the chunk block: a private copy
    v[2 * BLK + 600, 0] ^= 1                  # a store elsewhere
    got = dirty(r)
    assert {BLK + 5, 2 * BLK + 600} <= got
    assert not (got & (set(range(BLK, 2 * BLK)) - {BLK + 5}))
    r.reset_dirty()
    assert BLK + 5 in dirty(r)                # sticky: later stores to it are invisible
    drop(r, BLK + 5)                          # the template again, without a store
    assert int(v[BLK + 5, 0]) == int(t[0])
    assert BLK + 5 in dirty(r)                # changed since the reset
    r.reset_dirty()
    assert BLK + 5 not in dirty(r)


def test_working_set_of_present_pages_still_sees_writes(make_region, rng, wp):
    """lm_ws_mark goes through the harvest now: writes before a mark are not lost for dirty
    tracking, and the window after the mark sees only its own."""
    r, v = full_region(make_region, 128, rng)
    v[4, 0] ^= 1
    r.mark_working_set()
    assert r.working_set().tolist() == []
    v[6, 0] ^= 1
    v[2, 0] ^= 1
    assert r.working_set().tolist() == [2, 6]
    assert dirty(r) == {2, 4, 6}


def test_taking_the_epoch_loses_no_store(make_region, wp):
    """_take_dirty (lm_dirty_reset with a bitmap: what checkpoint(parent=) uses) while 4 threads
    store: a store made after take number e returned is in the bitmap of a later take. Each
    writer reads the take count before its store and logs it with the page."""
    n = 2048
    r = make_region(n * PS)
    v = pages(r)
    v[:] = 1
    r._take_dirty()
    stop = threading.Event()
    count = [0]
    logs = [[] for _ in range(4)]

    def writer(i):
        g = np.random.default_rng(3000 + i)
        while not stop.is_set():
            for p in g.integers(0, n, 32).tolist():
                e = count[0]
                v[p, 16 + i] ^= 1
                logs[i].append((e, p))

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    taken = [None]                             # taken[e]: bitmap of take number e
    try:
        for e in range(1, 60):
            time.sleep(0.001)
            _, words = r._take_dirty()
            taken.append(words)
            count[0] = e
    finally:
        stop.set()
        for t in ts:
            t.join()
    _, words = r._take_dirty()                 # after the last store
    taken.append(words)
    sets = [None] + [set(np.flatnonzero(np.unpackbits(w.view(np.uint8), bitorder="little")
                                        [:n]).tolist()) for w in taken[1:]]
    later = [set() for _ in sets]              # later[e]: union of takes after take e
    for e in range(len(sets) - 2, -1, -1):
        later[e] = later[e + 1] | sets[e + 1]
    lost = [(ep, p) for x in logs for (ep, p) in x if p not in later[ep]]
    assert not lost, lost[:8]
    assert sum(len(x) for x in logs) > 0


# ---- foreground checkpoints that fail, or whose pages change under them (session 15) -------

def test_a_failed_checkpoint_puts_its_epoch_back(make_region, tmp_path, wp):
    # The checkpoint ends the epoch before it reads a page; when it then failed (a missing
    # directory, a progress callback that raised), the stores of the ended epoch were lost:
    # dirty_pages() no longer had them. They are put back.
    r = make_region(16 * PS)
    v = pages(r)
    v[5, 0] = 7
    with pytest.raises(FileNotFoundError, match=r"cannot write .*no-such-dir/x\.plm"):
        plm.checkpoint(r, str(tmp_path / "no-such-dir" / "x.plm"))   # (named: not its temporary)
    assert 5 in r.dirty_pages().tolist()
    v[9, 0] = 1

    def stop(done, total):
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        plm.checkpoint(r, str(tmp_path / "x.plm"), progress=stop)
    assert {5, 9} <= set(r.dirty_pages().tolist())
    # and an incremental checkpoint after a failed one still has every change
    base = str(tmp_path / "base.plm")
    plm.checkpoint(r, base)
    v[3, 1] = 33
    with pytest.raises(RuntimeError):
        plm.checkpoint(r, str(tmp_path / "c.plm"), parent=base, progress=stop)
    child = str(tmp_path / "c2.plm")
    plm.checkpoint(r, child, parent=base)
    with plm.restore(child, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), v)


def test_pages_stored_to_while_written_are_written_again(make_region, tmp_path, wp):
    # A page changed between its hash (the plan) and its write left a file whose bytes were
    # not their signature: restore(verify=True) poisoned it, deduplication could hand the
    # bytes to other pages. Where stores are tracked exactly, such a file is written again.
    rng = np.random.default_rng(5)   # (wp: needs exact store tracking, async write-protect)
    n = 20000   # more than one 64 MiB store chunk: progress() runs between two writes
    r = make_region(n * PS)
    v = pages(r)
    v[:] = rng.integers(0, 256, (n, PS), dtype=np.uint8)
    calls = []

    def change_a_page_not_yet_written(done, total):
        calls.append(done)
        if len(calls) == 1:
            v[n - 2] = 0x5A   # the last chunk's: planned with other bytes, written with these
    path = str(tmp_path / "x.plm")
    # (no working set: the store in address order, page n - 2 in the last chunk; a recorded
    # window starts wherever the first touch was, the end under ASan's memcpy checks)
    plm.checkpoint(r, path, working_set="none", progress=change_a_page_not_yet_written)
    assert len(calls) > 3, calls   # written twice
    with plm.restore(path, prefetch="none", background=False, verify=True) as r2:
        r2.materialize()
        assert r2.stats()["verify_failures"] == 0
        assert np.array_equal(pages(r2), v)

    # stored to all the time: the region is taken as it was at a pause (background's way)
    def always(done, total):
        v[n - 1, :8] = rng.integers(0, 256, 8, dtype=np.uint8)
    plm.checkpoint(r, path, progress=always)
    with plm.restore(path, prefetch="none", background=False, verify=True) as r2:
        r2.materialize()
        assert r2.stats()["verify_failures"] == 0
        got = pages(r2)
        assert np.array_equal(got[:n - 1], v[:n - 1])
        assert np.array_equal(got[n - 1, 8:], v[n - 1, 8:])


@pytest.mark.shared_pages
def test_without_write_protect_a_store_to_a_kernel_served_block_is_seen(tmp_path):
    # Mode "none" (kernels before 6.7; the test hook emulates one) counts a page as changed
    # when its record is not lazy. A store to a canonical chunk's block, which the kernel
    # serves, leaves the record lazy: dirty_pages() missed it and checkpoint(parent=) kept
    # the parent's page (until something read r.meta).
    ps = PAGE_SIZE
    with plm.Region(1024 * ps, _test_no_dirty=True) as r:
        assert r.dirty_tracking == "none"
        c = r.canonical(bytes([0xAB]) * ps)
        r.defer_fill(0, 512 * ps, c)
        p1, p2 = tmp_path / "a.plm", tmp_path / "b.plm"
        plm.checkpoint(r, p1)
        v = pages(r)
        v[10, 0] = 1
        assert 10 in r.dirty_pages().tolist()
        plm.checkpoint(r, p2, parent=p1)
        want = v.copy()
        del v
    with plm.restore(p2) as q:
        assert np.array_equal(pages(q), want)
