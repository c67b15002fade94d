"""restore(share=True) in one process (docs/shared-pages.md): the region maps the snapshot's pages
from a pool (a memfd), publishing what the pool lacks; stores copy (the pool never changes);
zero pages stay holes; the records, checkpoint and the working set stay true; sharing that cannot
be had is an exception (or, with share="auto", a private restore that says why).
Several processes sharing one pool: tests/test_shared_multiproc.py."""

import ctypes
import os
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.shared_pages,
              pytest.mark.timeout(120)]

PS = PAGE_SIZE
S = plm.PageState
C = plm.PageClass
F = plm.PageFlag
NPAGES = 512
ZERO_PAGES = range(100, 140)          # written as zeros: zero class, never in the pool
UNTOUCHED = range(300, 330)           # never touched: untouched, never in the pool


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    """A snapshot of random pages with runs of zero and untouched pages, and its bytes."""
    rng = np.random.default_rng(11)
    path = str(tmp_path_factory.mktemp("shared") / "s.snap")
    expected = np.zeros(NPAGES * PS, np.uint8)
    with plm.Region(NPAGES * PS, max_cluster_pages=1) as r:
        a = r.ndarray(np.uint8)
        for p in range(NPAGES):
            if p in UNTOUCHED:
                continue
            page = np.zeros(PS, np.uint8) if p in ZERO_PAGES else rng.integers(
                0, 256, PS, dtype=np.uint8)
            a[p * PS:(p + 1) * PS] = page
            expected[p * PS:(p + 1) * PS] = page
        del a
        ws = np.arange(0, NPAGES, 7)
        plm.checkpoint(r, path, working_set=ws)
    return path, expected


def pool_bytes(r, page):
    """Page `page` of the region's pool, read from the memfd (not through the region)."""
    return os.pread(r._pool.fd, PS, page * PS)


def pool_data_pages(r):
    """The pool pages that hold data (SEEK_DATA/SEEK_HOLE walk of the memfd)."""
    fd, out, off = r._pool.fd, set(), 0
    end = r.npages * PS
    while off < end:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        out.update(range(start // PS, stop // PS))
        off = stop
    return out


@pytest.mark.parametrize("prefetch", ["none", "working-set", "all"])
@pytest.mark.parametrize("background", [False, True])
def test_every_byte(snap, prefetch, background):
    path, expected = snap
    with plm.restore(path, share=True, prefetch=prefetch, background=background) as r:
        assert r.shared and r.share_reason == ""
        got = r.ndarray(np.uint8)
        assert np.array_equal(got, expected)
        del got
        st = r.stats()
        assert st["shared"] and st["errors"] == 0 and st["pages_poisoned"] == 0
        stored = NPAGES - len(ZERO_PAGES) - len(UNTOUCHED)
        # every stored page is mapped from the pool, or (scattered working-set pages of a
        # prefetch) copied privately: none is lost, none counted twice
        assert st["pages_shared_mapped"] + st["pool_fallback_pages"] == stored
        # zero and untouched pages enter the pool only as pages of zeros when a complete
        # pool's block that is mostly data is made a huge page (docs/shared-pages.md 2.8);
        # every published page is a stored one
        data = pool_data_pages(r)
        zeros = data & (set(ZERO_PAGES) | set(UNTOUCHED))
        if zeros:
            assert background
            deadline = time.monotonic() + 60
            while not r.pool["sealed"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert r.pool["sealed"]
            assert all(pool_bytes(r, p) == bytes(PS) for p in zeros)
        assert len(data - zeros) == st["pages_published"]


def test_stores_copy_and_leave_the_pool_alone(snap):
    path, expected = snap
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        a[5 * PS + 1] ^= 0xFF            # read-then-write: a mapped pool page is copied
        a[7 * PS:8 * PS] = 0x5A          # first touch is a store
        a[ZERO_PAGES[0] * PS] = 1        # a zero-class page
        want = expected.copy()
        want[5 * PS + 1] ^= 0xFF
        want[7 * PS:8 * PS] = 0x5A
        want[ZERO_PAGES[0] * PS] = 1
        assert np.array_equal(a, want)
        for p in (5, 7):
            assert pool_bytes(r, p) == expected[p * PS:(p + 1) * PS].tobytes()
        del a
    # a new restore maps the pool's (original) pages
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        assert np.array_equal(r.ndarray(np.uint8), expected)


def test_records_say_what_each_page_holds(snap):
    """Mapped pool pages are PRESENT | SHARED; a written one is program data once the records
    are synced (the kernel's copy is found in the page tables)."""
    path, expected = snap
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        int(a[::PS].sum())                        # read every page
        written = [3, 50, 51, 400]
        for p in written:
            a[p * PS + 9] = a[p * PS + 9] ^ 1
        a[60 * PS + 9] = a[60 * PS + 9]           # a store of the same byte: still a store
        written.append(60)
        del a
        m = r.meta
        stored = [p for p in range(NPAGES) if p not in ZERO_PAGES and p not in UNTOUCHED]
        for p in stored:
            assert m["state"][p] == S.PRESENT
            if p in written:
                assert m["cls"][p] == C.DATA and not m["flags"][p] & F.SHARED, p
            else:
                assert m["cls"][p] == C.SNAPSHOT and m["flags"][p] & F.SHARED, p
        for p in ZERO_PAGES:
            assert not m["flags"][p] & F.SHARED


def test_checkpoint_of_a_shared_restore(snap, tmp_path):
    """The checkpoint holds exactly the written pages as changed."""
    path, expected = snap
    rng = np.random.default_rng(3)
    written = sorted(int(p) for p in rng.choice([p for p in range(NPAGES)
                                                if p not in UNTOUCHED], 25, replace=False))
    with plm.restore(path, share=True, prefetch="working-set", background=True) as r:
        a = r.ndarray(np.uint8)
        for p in written:
            a[p * PS:(p + 1) * PS] = rng.integers(0, 256, PS, dtype=np.uint8)
        want = np.array(a)
        del a
        out = str(tmp_path / "again.snap")
        plm.checkpoint(r, out)
        before = None
        with plm.restore(path, prefetch="none", background=False) as src:
            before = src.signatures()
        after_r = plm.restore(out, prefetch="none", background=False)
        with after_r:
            after = after_r.signatures()
            assert np.array_equal(after_r.ndarray(np.uint8), want)
    changed = sorted(int(p) for p in np.nonzero(before != after)[0])
    assert changed == written


def test_working_set_keeps_first_touch_order(snap):
    """Every first touch of a shared region faults to us (MINOR registration has no kernel
    fault-around), pool filled or not, so the window has the touch order."""
    path, _ = snap
    order = [int(p) for p in np.random.default_rng(5).permutation(
        [p for p in range(NPAGES) if p not in UNTOUCHED])[:60]]
    for _ in range(2):   # the pool empty, then (second restore) holding these pages
        with plm.restore(path, share=True, prefetch="none", background=False,
                         max_cluster_pages=1) as r:
            a = r.ndarray(np.uint8)
            for p in order:
                int(a[p * PS])
            del a
            assert r.working_set().tolist() == order


def test_dropped_page_reads_the_pool_again(snap):
    """madvise(MADV_DONTNEED) of a mapped page: the next read maps the pool's page again (what
    a private file mapping does), a written page reverts to it."""
    path, expected = snap
    libc = ctypes.CDLL(None, use_errno=True)
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        a[9 * PS] ^= 0xFF
        int(a[10 * PS])
        assert libc.madvise(ctypes.c_void_p(r.address + 9 * PS), ctypes.c_size_t(2 * PS),
                            4) == 0   # MADV_DONTNEED
        assert np.array_equal(a[9 * PS:11 * PS], expected[9 * PS:11 * PS])
        del a


def test_defer_fill_over_a_shared_range(snap):
    path, expected = snap
    with plm.restore(path, share=True, prefetch="all", background=False) as r:
        r.defer_fill(20 * PS, 10 * PS, plm.ZERO)
        c = r.canonical(bytes([7]) * PS)
        r.defer_fill(40 * PS, 4 * PS, c)
        a = r.ndarray(np.uint8)
        assert not a[20 * PS:30 * PS].any()
        assert (a[40 * PS:44 * PS] == 7).all()
        assert np.array_equal(a[:20 * PS], expected[:20 * PS])
        del a
        assert pool_bytes(r, 25) == expected[25 * PS:26 * PS].tobytes()


def test_corrupt_store_page_is_poisoned_never_published(snap, tmp_path, run_py):
    """Sharing verifies what it publishes: a store entry whose bytes do not match its signature
    is never put into the pool; the access fails loudly (SIGBUS), the others are served."""
    path, expected = snap
    bad = str(tmp_path / "bad.snap")
    data = bytearray(open(path, "rb").read())
    info = plm.inspect(path)
    store_offset = max(4096, PS)                 # the store follows the header (snapshot-format.md)
    data[store_offset + 3] ^= 0xFF               # store entry 0: the first working-set page
    open(bad, "wb").write(bytes(data))
    first_ws = int(info.working_set[0])
    res = run_py('''
        import os, sys, numpy as np, pylazymem as plm
        r = plm.restore(sys.argv[1], share=True, prefetch="none", background=False)
        a = r.ndarray(np.uint8)
        p = int(sys.argv[2])
        ok = [int(a[q * 4096]) for q in range(r.npages) if q != p]   # the others are served
        print("OTHERS", len(ok), r.stats()["pages_poisoned"], flush=True)
        holes = os.lseek(r._pool.fd, p * 4096, os.SEEK_HOLE) == p * 4096
        print("HOLE", holes, flush=True)
        int(a[p * 4096])
        print("READ A BAD PAGE")
    ''', args=(bad, str(first_ws)))
    assert "OTHERS %d" % (NPAGES - 1) in res.stdout, res.describe()
    assert "HOLE True" in res.stdout, res.describe()
    assert "READ A BAD PAGE" not in res.stdout
    assert res.returncode in (-7, -11), res.describe()   # SIGBUS (SIGSEGV before Linux 6.6)


def test_share_true_where_it_cannot_be_had(snap, monkeypatch):
    import dataclasses

    from pylazymem import _features
    path, expected = snap
    f = dataclasses.replace(plm.features(), shared_pages=False,
                            shared_pages_reason="test: no MINOR userfaultfd here")
    monkeypatch.setattr(_features, "features", lambda: f)
    with pytest.raises(plm.SharingUnavailableError, match="no MINOR userfaultfd"):
        plm.restore(path, share=True)
    with plm.restore(path, share="auto", prefetch="none", background=False) as r:
        assert not r.shared and "no MINOR userfaultfd" in r.share_reason
        assert r.pool is None and not r.stats()["shared"]
        assert np.array_equal(r.ndarray(np.uint8), expected)
    with pytest.raises(plm.InvalidArgumentError):
        plm.restore(path, share="yes")


def test_pool_size_bound(snap, monkeypatch):
    path, _ = snap
    monkeypatch.setenv("PYLAZYMEM_POOL_MAX_BYTES", str(PS))
    with pytest.raises(plm.SharingUnavailableError):
        plm.restore(path, share=True)
    with plm.restore(path, share="auto", prefetch="none", background=False) as r:
        assert not r.shared and r.share_reason


def test_close_with_live_views(snap):
    path, expected = snap
    r = plm.restore(path, share=True, prefetch="none", background=True)
    a = r.ndarray(np.uint8)
    r.close()
    assert np.array_equal(a, expected)    # still mapped and served until the view goes
    del a


def test_broken_source_fails_loudly(snap, run_py):
    path, _ = snap
    res = run_py('''
        import sys, numpy as np, pylazymem as plm
        r = plm.restore(sys.argv[1], share=True, prefetch="none", background=False,
                        _test_broken_source=True)
        a = r.ndarray(np.uint8)
        print("START", flush=True)
        int(a[0])
        print("READ ZEROS OR DATA")
    ''', args=(path,))
    assert "START" in res.stdout and "READ" not in res.stdout, res.describe()
    assert res.returncode in (-7, -11), res.describe()


def test_page_counts(snap):
    """Region.page_counts() says where pages are: mapped from the pool, private, zero page."""
    path, _ = snap
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        assert r.page_counts() == {"shared": 0, "private": 0, "zero": 0,
                                   "not_present": NPAGES}
        a = r.ndarray(np.uint8)
        int(a[::PS].sum())                 # every page read
        for p in (1, 2, 3):
            a[p * PS] ^= 1                 # three copied by a store
        del a
        stored = NPAGES - len(ZERO_PAGES) - len(UNTOUCHED)
        counts = r.page_counts()
        assert counts["shared"] == stored - 3
        assert counts["private"] == 3
        assert counts["zero"] == len(ZERO_PAGES) + len(UNTOUCHED)
        assert counts["not_present"] == 0


def test_cli_inspect_pid(snap):
    """`pylazymem inspect --pid PID` sums a process's pool mappings (smaps)."""
    import json
    import subprocess
    import sys
    path, _ = snap
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        int(a[::PS].sum())
        a[:16 * PS] = 1                    # 16 pages copied by stores
        del a
        out = subprocess.run([sys.executable, "-m", "pylazymem", "inspect", "--pid",
                              str(os.getpid()), "--json"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        t = json.loads(out.stdout)
        assert t["mappings"] >= 1
        stored = NPAGES - len(ZERO_PAGES) - len(UNTOUCHED)
        assert t["Rss"] >= (stored - 16) * PS
        assert t["Anonymous"] >= 16 * PS
    bad = subprocess.run([sys.executable, "-m", "pylazymem", "inspect"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "SNAPSHOT or --pid" in bad.stderr


@pytest.mark.parametrize("prefetch", ["working-set", "none"])
def test_pool_refusing_memory_costs_sharing_not_data(tmp_path, prefetch):
    # Publishing fails with ENOMEM (a memory cgroup's limit, a full tmpfs): prefetch and demand
    # faults copy those pages privately (docs/shared-pages.md 2.7). The prefetch used to poison
    # its run instead: SIGBUS at the first read of the working set.
    path = str(tmp_path / "ws.snap")
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 128 * PS, dtype=np.uint8)
    with plm.Region(128 * PS) as r:
        a = r.ndarray(np.uint8)
        a[:] = data
        del a
        plm.checkpoint(r, path, working_set=np.arange(0, 48))   # one run: published, not copied
    with plm.restore(path, share=True, prefetch=prefetch, background=False,
                     _test_fail_publish=True) as r:
        st = r.stats()
        assert st["pages_poisoned"] == 0 and st["errors"] == 0, st
        assert np.array_equal(r.ndarray(np.uint8), data)   # every page, demand faults too
        st = r.stats()
        assert st["pages_poisoned"] == 0 and st["pages_published"] == 0
        assert st["pool_fallback_pages"] == 128


def _punch(fd, offset, length):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, 3, offset, length) != 0:   # FALLOC_FL_PUNCH_HOLE | KEEP_SIZE
        raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")


def test_a_page_lost_from_the_pool_reads_as_the_snapshots_never_zeros(snap):
    # Another process of this user punches a hole into the pool (F_SEAL_SHRINK allows it):
    # the kernel unmaps the page everywhere, the next read raises a MISSING fault on a page
    # whose record says present. It is served from the store and published again; it used
    # to be mapped as the zero page, for good.
    path, expected = snap
    page = 5
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        want = expected[page * PS:(page + 1) * PS]
        assert np.array_equal(a[page * PS:(page + 1) * PS], want)
        assert r.meta["state"][page] == int(S.PRESENT)
        _punch(r._pool.fd, page * PS, PS)
        assert page not in pool_data_pages(r)
        assert np.array_equal(a[page * PS:(page + 1) * PS], want)
        assert page in pool_data_pages(r) and pool_bytes(r, page) == want.tobytes()
        assert r.stats()["pages_poisoned"] == 0
        del a


@pytest.mark.parametrize("prefetch", ["none", "working-set"])
def test_verify_checks_pages_another_process_published(snap, prefetch):
    # Any process of this uid can write the pool (docs/shared-pages.md 2.6). verify=True
    # checks a page the pool already holds before mapping it: one planted with other bytes is
    # served privately from the file (and counted); without verify it is mapped as it is.
    path, expected = snap
    page = 7                                          # in the working set (every 7th page)
    want = expected[page * PS:(page + 1) * PS]
    with plm.restore(path, share=True, prefetch="none", background=False) as filler:
        a = filler.ndarray(np.uint8)
        assert np.array_equal(a, expected)            # every page published
        del a
        os.pwrite(filler._pool.fd, b"\xEE" * PS, page * PS)   # another process's write
        with plm.restore(path, share=True, prefetch=prefetch, background=False,
                         verify=True) as r:
            got = r.ndarray(np.uint8)
            assert np.array_equal(got, expected)
            del got
            st = r.stats()
            assert st["verify_failures"] == 1 and st["pages_poisoned"] == 0
        with plm.restore(path, share=True, prefetch=prefetch, background=False) as r:
            got = r.ndarray(np.uint8)
            assert got[page * PS] == 0xEE and not np.array_equal(got[page * PS:][:PS], want)
            del got
