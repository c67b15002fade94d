"""Checkpoint and restore round trips: every byte back in every prefetch mode, concurrent readers
during the background fill, file size, re-checkpoint of a lazy region, atomic writes."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page, wait_background
from test_snapshot_format import STORED, SnapFile, assert_arrays_equal, fill_mixed, tmp_files

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

PS = PAGE_SIZE
S = plm.PageState
C = plm.PageClass


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A snapshot of a region with arrays, random, zero, duplicate and untouched pages, whose
    working set is an explicit subset of the stored pages."""
    rng = np.random.default_rng(20240603)
    path = str(tmp_path_factory.mktemp("mixed") / "mixed.snap")
    with plm.Region(192 * PS, max_cluster_pages=1) as r:
        expected, arrays, kinds = fill_mixed(r, rng)
        meta = r.meta.copy()
        # max_cluster_pages=1: no readahead, untouched pages stayed untouched
        assert (meta["state"][kinds["untouched"]] == S.EMPTY).all()
        ws = rng.permutation(kinds["random"] + kinds["dup"] + kinds["zero_read"])[:20]
        info = plm.checkpoint(r, path, working_set=ws)
    return dict(path=path, expected=expected, arrays=arrays, kinds=kinds, info=info,
                ws=[int(p) for p in ws])


def test_mixed_snapshot_counts(mixed):
    info, kinds = mixed["info"], mixed["kinds"]
    stored = len(kinds["array"]) + len(kinds["random"]) + len(kinds["dup"])
    pbc = info.pages_by_class
    assert pbc["untouched"] == len(kinds["untouched"])
    assert pbc["zero"] == len(kinds["zero_written"]) + len(kinds["zero_read"])
    # the duplicates are copies of 2 pages; every array and random page is distinct
    assert pbc["unique"] == len(kinds["array"]) + len(kinds["random"]) + 2
    assert pbc["unique"] + pbc["duplicate"] == stored
    assert info.stored_bytes == pbc["unique"] * PS
    assert info.working_set.tolist() == mixed["ws"]
    assert sorted(info.arrays) == sorted(mixed["arrays"])


@pytest.mark.parametrize("background", [False, True], ids=["nobg", "bg"])
@pytest.mark.parametrize("prefetch", ["working-set", "all", "none"])
def test_round_trip(mixed, prefetch, background):
    expected, kinds = mixed["expected"], mixed["kinds"]
    sf = SnapFile.parse(open(mixed["path"], "rb").read())
    stored = np.nonzero(sf.cls == STORED)[0]
    ws_stored = [p for p in mixed["ws"] if sf.cls[p] == STORED]
    t0 = time.monotonic()
    r = plm.restore(mixed["path"], prefetch=prefetch, background=background)
    try:
        assert r.npages == len(expected) and r.page_size == PS
        if not background:
            st = r.meta["state"]
            present = set(np.nonzero(st == S.PRESENT)[0].tolist())
            if prefetch == "all":
                assert set(stored.tolist()) <= present
            elif prefetch == "working-set":
                assert set(ws_stored) <= present
                assert not present & (set(stored.tolist()) - set(ws_stored))
            else:
                assert not present, "prefetch='none' made pages present: %s" % sorted(present)
            assert (st[kinds["untouched"]] == S.EMPTY).all()
        v = pages(r)
        got = v.copy()
        bad = np.nonzero((got != expected).any(axis=1))[0]
        assert bad.size == 0, "pages with wrong bytes: %s" % bad[:10].tolist()
        assert_arrays_equal(r.arrays, mixed["arrays"])
        if background:
            wait_background(r)
            assert np.array_equal(v, expected)
        s = r.stats()
        assert s["errors"] == 0 and s["verify_failures"] == 0, s
        if prefetch == "all":
            assert s["faults_by_class"]["snapshot"] == 0, s
        if prefetch == "working-set" and not background:
            assert s["prefetched_pages"] >= len(ws_stored), s
        assert time.monotonic() - t0 < 30
    finally:
        r.close()


def test_round_trip_arrays_have_the_right_places(mixed):
    info = plm.inspect(mixed["path"])
    with plm.restore(mixed["path"], prefetch="none", background=False) as r:
        for name, a in r.arrays.items():
            assert a.ctypes.data - r.address == info.arrays[name]["offset"]
            assert a.dtype == np.dtype(info.arrays[name]["dtype"])
            assert a.shape == tuple(info.arrays[name]["shape"])
        # arrays of a restored region are writable views of its memory, like alloc()'s
        a = r.arrays["i16"]
        a[:] = 7
        assert (r.arrays["i16"] == 7).all()
        # and alloc() after a restore does not overlap restored arrays
        new = r.alloc("later", 10, np.float64)
        end = max(x["offset"] + np.dtype(x["dtype"]).itemsize * int(np.prod(x["shape"]))
                  for x in info.arrays.values())
        assert new.ctypes.data - r.address >= end


@pytest.mark.parametrize("one_cpu", [False, True], ids=["all_cpus", "one_cpu"])
def test_readers_during_background_fill(run_py_ok, tmp_path, one_cpu):
    """On one CPU (a cpuset, taskset) the background fill is one thread that reads and copies
    each run; on more, a reader and an installer (csrc/prefetch.c)."""
    out = run_py_ok("""
        path = sys.argv[1]
        if sys.argv[2] == "1":   # threads started from here inherit it, the fill's too
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        N = 16384                       # 64 MiB
        rng = np.random.default_rng(11)
        expected = np.zeros((N, PS), np.uint8)
        kind = rng.integers(0, 4, N)    # 0, 1: unique random, 2: zero, 3: copy of one page
        uniq = np.nonzero(kind < 2)[0]
        expected[uniq] = rng.integers(0, 256, (uniq.size, PS), dtype=np.uint8)
        expected[kind == 3] = random_page(rng)
        with plm.Region(N * PS) as r:
            pages(r)[:] = expected
            plm.checkpoint(r, path, working_set="none")

        r = plm.restore(path, prefetch="none", background=True)
        running_at_start = r.stats()["background_running"]
        v = pages(r)
        errors = []
        barrier = threading.Barrier(4)

        def reader(seed):
            try:
                order = np.random.default_rng(seed).permutation(N)[:N // 2]
                barrier.wait()
                for p in order:
                    if not np.array_equal(v[p], expected[p]):
                        errors.append(int(p))
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "readers hung"
        deadline = time.monotonic() + 60
        while r.stats()["background_running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        s = r.stats()
        whole_ok = bool(np.array_equal(v, expected))
        print(json.dumps(dict(errors=errors[:10], nerrors=len(errors), whole_ok=whole_ok,
                              running_at_start=running_at_start,
                              running_after=s["background_running"],
                              background_pages=s["background_pages"], faults=s["faults"],
                              errors_stat=s["errors"])))
        r.close()
    """, timeout=150, args=(str(tmp_path / "big.snap"), "1" if one_cpu else "0"))
    m = json.loads(out.strip().splitlines()[-1])
    assert m["nerrors"] == 0, m
    assert m["whole_ok"], m
    assert m["running_at_start"], m
    assert not m["running_after"], "background fill did not finish: %s" % m
    assert m["errors_stat"] == 0, m
    assert m["background_pages"] > 0, m


def test_size_zero_duplicate_unique(make_region, tmp_path):
    rng = np.random.default_rng(5)
    n = 4096
    r = make_region(n * PS)
    v = pages(r)
    kind = rng.permutation(np.repeat([0, 1, 2, 3], n // 4))   # 0, 1: zero; 2: duplicate; 3: unique
    dup = random_page(rng)
    v[kind == 2] = dup
    uniq = np.nonzero(kind == 3)[0]
    v[uniq] = rng.integers(0, 256, (uniq.size, PS), dtype=np.uint8)
    zw = np.nonzero(kind == 0)[0]
    v[zw] = 0                                    # zeros written
    # kind 1: zero pages never written (read, or mapped by readahead)
    assert not v[kind == 1].any()
    path = str(tmp_path / "size.snap")
    info = plm.checkpoint(r, path, working_set="none")
    pbc = info.pages_by_class
    assert pbc["zero"] + pbc["untouched"] == n // 2, pbc
    assert pbc["unique"] == n // 4 + 1, pbc
    assert pbc["duplicate"] == n // 4 - 1, pbc
    assert info.stored_bytes == (n // 4 + 1) * PS
    raw = n * PS
    # header, page map (4 bytes a page), working set, signatures (8 bytes a store entry),
    # manifest slack
    tables = max(4096, PS) + 4 * n + 8 * len(info.working_set) + 8 * pbc["unique"] + 4096
    assert info.file_bytes == os.path.getsize(path)
    assert info.file_bytes <= 0.27 * raw + tables, (info.file_bytes, raw)
    with plm.restore(path, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), v)


RECHECKPOINT = """
    src, dst = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(3)
    N = 64
    expected = np.zeros((N, PS), np.uint8)
    with plm.Region(N * PS, max_cluster_pages=1) as r:
        v = pages(r)
        for p in range(40):
            v[p] = expected[p] = random_page(rng)
        v[40:48] = 0                          # zero pages
        d = random_page(rng)
        for p in range(48, 56):
            v[p] = expected[p] = d            # duplicates
        # 56..63: untouched
        plm.checkpoint(r, src, working_set="none")
    S, C = plm.PageState, plm.PageClass

    r2 = plm.restore(src, prefetch="none", background=False, max_cluster_pages=1)
    v2 = pages(r2)
    read = [3, 17, 41, 50]
    for p in read:
        assert np.array_equal(v2[p], expected[p]), p
    new = random_page(rng)
    v2[5] = new
    expected[5] = new
    s0 = r2.stats()
    m0 = r2.meta.copy()
    info = plm.checkpoint(r2, dst)
    s1 = r2.stats()
    m1 = r2.meta.copy()
    never = [p for p in range(56) if p not in read and p != 5]
    res = dict(
        faults=[s0["faults"], s1["faults"]],
        present=[s0["pages_present"], s1["pages_present"]],
        states_same=bool(np.array_equal(m0["state"], m1["state"])),
        never_states=sorted(set(int(x) for x in m1["state"][never])),
        stored_never_cls=sorted(set(int(x) for x in
                                    m1["cls"][[p for p in never if p < 40 or p >= 48]])),
        untouched_states=sorted(set(int(x) for x in m1["state"][56:])),
        pbc=info.pages_by_class,
    )
    # the region itself still reads right (also when its source file was replaced)
    res["region_ok"] = bool(np.array_equal(v2, expected))
    r2.close()
    for prefetch in ("none", "all", "working-set"):
        with plm.restore(dst, prefetch=prefetch, background=False) as r3:
            res["restored_ok_" + prefetch] = bool(np.array_equal(pages(r3), expected))
    print(json.dumps(res))
"""


@pytest.mark.parametrize("target", ["other", "same"])
def test_recheckpoint_leaves_lazy_pages_untouched(run_py_ok, tmp_path, target):
    src = str(tmp_path / "a.snap")
    dst = str(tmp_path / "b.snap") if target == "other" else src
    out = run_py_ok(RECHECKPOINT, timeout=60, args=(src, dst))
    m = json.loads(out.strip().splitlines()[-1])
    desc = json.dumps(m)
    assert m["faults"][0] == m["faults"][1], "checkpoint faulted pages in: " + desc
    assert m["present"][0] == m["present"][1], desc
    assert m["states_same"], desc
    assert m["never_states"] == [int(S.DEFERRED)], desc
    assert m["stored_never_cls"] == [int(C.SNAPSHOT)], desc
    assert m["untouched_states"] == [int(S.EMPTY)], desc
    assert m["pbc"] == {"zero": 8, "untouched": 8, "unique": 41, "duplicate": 7}, desc
    assert m["region_ok"], desc
    for prefetch in ("none", "all", "working-set"):
        assert m["restored_ok_" + prefetch], "restore(prefetch=%r) of the re-checkpoint: %s" % (
            prefetch, desc)


class Boom(Exception):
    pass


def test_atomic_write_keeps_old_snapshot_when_interrupted(make_region, tmp_path):
    rng = np.random.default_rng(9)
    path = str(tmp_path / "state.snap")
    old = make_region(16 * PS, max_cluster_pages=1)
    vo = pages(old)
    vo[:12] = rng.integers(0, 256, (12, PS), dtype=np.uint8)
    old_expected = vo.copy()
    plm.checkpoint(old, path)
    old_bytes = open(path, "rb").read()

    n = 17000                                   # more than 64 MiB of distinct pages
    new = make_region(n * PS)
    vn = pages(new)
    vn.view(np.uint64)[:, 0] = np.arange(1, n + 1, dtype=np.uint64)
    calls = []

    def interrupt(done, total):
        calls.append((done, total))
        if done < total:
            raise Boom("stop")

    with pytest.raises(Boom):
        plm.checkpoint(new, path, progress=interrupt)
    assert len(calls) == 1 and calls[0][0] < calls[0][1]
    assert open(path, "rb").read() == old_bytes
    assert plm.inspect(path).npages == 16
    with plm.restore(path, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), old_expected)
    assert tmp_files(tmp_path, "state.snap") == []

    calls.clear()
    info = plm.checkpoint(new, path, progress=lambda d, t: calls.append((d, t)))
    assert tmp_files(tmp_path, "state.snap") == []
    assert len(calls) >= 2, calls
    totals = {t for _, t in calls}
    assert totals == {info.file_bytes}, calls
    dones = [d for d, _ in calls]
    assert all(0 < a < b for a, b in zip(dones, dones[1:])), calls
    assert dones[-1] == info.file_bytes
    assert info.pages_by_class["unique"] == n
    with plm.restore(path, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), vn)


def test_killed_checkpoint_leaves_old_snapshot(run_py, make_region, tmp_path):
    rng = np.random.default_rng(10)
    path = str(tmp_path / "state.snap")
    old = make_region(8 * PS, max_cluster_pages=1)
    pages(old)[:5] = rng.integers(0, 256, (5, PS), dtype=np.uint8)
    old_expected = pages(old).copy()
    plm.checkpoint(old, path)
    old_bytes = open(path, "rb").read()

    res = run_py("""
        path = sys.argv[1]
        with plm.Region(4096 * PS) as r:
            pages(r).view(np.uint64)[:, 0] = np.arange(1, 4097, dtype=np.uint64)
            print("checkpointing", os.getpid(), flush=True)
            plm.checkpoint(r, path, progress=lambda d, t: os.kill(os.getpid(), 9))
        print("not killed")
    """, timeout=60, args=(path,))
    assert res.returncode == -signal.SIGKILL, res.describe()
    assert "not killed" not in res.stdout
    dead_pid = int(res.stdout.split()[1])
    assert open(path, "rb").read() == old_bytes
    assert plm.inspect(path).npages == 8
    with plm.restore(path, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), old_expected)
    stale = tmp_files(tmp_path, "state.snap")
    assert all(f.startswith(".state.snap.%d." % dead_pid) for f in stale), stale

    # a stale temporary of another dead process, and one of a live writer (which holds its
    # flock, as every writer does until its rename: pylazymem/_atomic.py)
    live = tmp_path / (".state.snap.%d.abc.tmp" % os.getpid())
    live.write_bytes(b"y" * 100)
    sleeper = subprocess.Popen([sys.executable, "-c",
                                "import fcntl, os, sys, time\n"
                                "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                                "print('locked', flush=True)\n"
                                "time.sleep(60)", str(live)], stdout=subprocess.PIPE)
    try:
        assert sleeper.stdout.readline() == b"locked\n"
        fake_dead = tmp_path / (".state.snap.%d.zz9.tmp" % dead_pid)
        fake_dead.write_bytes(b"x" * 100)
        other = tmp_path / ".other.snap.999999.q.tmp"
        other.write_bytes(b"z")
        info = plm.checkpoint(old, path)
        left = tmp_files(tmp_path, "state.snap")
        assert left == [live.name], "dead processes' temporaries not removed: %s" % left
        assert other.exists()
        assert plm.inspect(path).file_bytes == info.file_bytes
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("err", ["ENOLCK", "EOPNOTSUPP"])
def test_a_filesystem_without_flock_still_takes_checkpoints(make_region, tmp_path, monkeypatch,
                                                            err):
    """Some NFS and FUSE mounts refuse flock: checkpoints there must still be written (they
    failed with the lock's OSError); the temporary, unlockable, is never swept as stale."""
    import errno as _errno
    import fcntl
    from pylazymem import _atomic

    def no_flock(fd, op):
        raise OSError(getattr(_errno, err), os.strerror(getattr(_errno, err)))
    monkeypatch.setattr(_atomic.fcntl, "flock", no_flock)
    r = make_region(4 * PS)
    pages(r)[1] = 7
    path = str(tmp_path / "nolock.snap")
    orphan = tmp_path / ".nolock.snap.1.x.tmp"   # another writer's, maybe alive: kept
    orphan.write_bytes(b"x")
    plm.checkpoint(r, path)
    plm.checkpoint(r, path)
    assert orphan.exists()
    assert tmp_files(tmp_path, "nolock.snap") == [orphan.name]
    with plm.restore(path, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), pages(r))
    monkeypatch.setattr(_atomic.fcntl, "flock",
                        lambda fd, op: (_ for _ in ()).throw(OSError(_errno.EIO, "io")))
    with pytest.raises(OSError) as ei:
        plm.checkpoint(r, path)
    assert ei.value.errno == _errno.EIO   # any other flock error is still an error


def test_deferred_pages_are_checkpointed_without_faulting(make_region, tmp_path):
    """Pages with pending updates (defer_fill of a canonical page or zero) are saved from what
    their metadata says, not faulted in; the snapshot restores them."""
    rng = np.random.default_rng(12)
    n = 48
    r = make_region(n * PS, max_cluster_pages=1)
    v = pages(r)
    expected = np.zeros((n, PS), np.uint8)
    for p in range(0, 16):
        v[p] = expected[p] = random_page(rng)
    tpl = random_page(rng)
    c = r.canonical(tpl.tobytes())
    r.defer_fill(16 * PS, 16 * PS, c)          # 16..31: a template, still deferred
    expected[16:32] = tpl
    r.defer_fill(8 * PS, 4 * PS, plm.ZERO)     # 8..11: written pages deferred to zero
    expected[8:12] = 0
    zc = r.canonical(bytes(PS))
    r.defer_fill(32 * PS, 4 * PS, zc)          # 32..35: a canonical page of zeros
    # 36..47 untouched
    f0 = r.stats()["faults"]
    path = str(tmp_path / "d.snap")
    info = plm.checkpoint(r, path, working_set="none")
    assert r.stats()["faults"] == f0
    m = r.meta
    assert (m["state"][16:36] == S.DEFERRED).all()
    assert info.pages_by_class == {"zero": 8, "untouched": 12, "unique": 13, "duplicate": 15}
    with plm.restore(path, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), expected)


CONCURRENT = """
    path, path2 = sys.argv[1], sys.argv[2]
    N = 8192
    rng = np.random.default_rng(13)
    expected = rng.integers(0, 256, (N, PS), dtype=np.uint8)
    expected[::3] = 0
    with plm.Region(N * PS) as r:
        pages(r)[:] = expected
        plm.checkpoint(r, path, working_set="none")
    r = plm.restore(path, prefetch="none", background=True)
    v = pages(r)
    # demand reads and a checkpoint while the background fill runs
    for p in rng.permutation(N)[:500]:
        assert np.array_equal(v[p], expected[p]), p
    running = r.stats()["background_running"]
    info = plm.checkpoint(r, path2)
    r.close()
    with plm.restore(path2, prefetch="none", background=False) as r2:
        ok = bool(np.array_equal(pages(r2), expected))
    print(json.dumps(dict(ok=ok, running=running)))
"""


def test_checkpoint_while_background_fill_runs(run_py_ok, tmp_path):
    out = run_py_ok(CONCURRENT, timeout=90,
                    args=(str(tmp_path / "a.snap"), str(tmp_path / "b.snap")))
    m = json.loads(out.strip().splitlines()[-1])
    assert m["ok"], m


PREFETCH_FAILS = """
    path, keep = sys.argv[1], int(sys.argv[2])
    from pylazymem.region import Region
    prefetch = Region.prefetch
    def truncating_prefetch(self, pages):
        os.truncate(path, store_offset + keep * PS)   # the store is cut under the prefetch
        return prefetch(self, pages)
    Region.prefetch = truncating_prefetch
    from test_snapshot_format import SnapFile
    store_offset = SnapFile.parse(open(path, "rb").read()).header["store_offset"]
    t0 = time.monotonic()
    try:
        plm.restore(path, prefetch="working-set", background=False)
        print(json.dumps({"raised": None}))
    except plm.LazyMemError as e:
        print(json.dumps({"raised": type(e).__name__, "msg": str(e),
                          "secs": time.monotonic() - t0}))
"""


@pytest.mark.parametrize("keep", [0, 300, 700], ids=["first-batch", "second-batch", "later"])
def test_prefetch_fails_loudly_when_the_store_cannot_be_read(run_py_ok, tmp_path, rng, keep):
    """A working set of 900 pages is read in several batches by the prefetch's reader thread
    and copied by two threads; a store cut short under it (at the first, second or a later
    batch) makes restore() raise, promptly, never hang or return a region with holes."""
    path = str(tmp_path / "ws.snap")
    with plm.Region(1024 * PS, max_cluster_pages=1) as r:
        v = pages(r)
        order = rng.permutation(1024)[:900]
        r.mark_working_set()
        for p in order:
            v[p] = random_page(rng)
        info = plm.checkpoint(r, path)
    assert info.working_set.size == 900 and info.pages_by_class["unique"] == 900
    out = json.loads(run_py_ok(PREFETCH_FAILS, timeout=60, args=(path, str(keep))).splitlines()[-1])
    assert out["raised"], out
    assert "snapshot" in out["msg"] or "pread" in out["msg"], out
    assert out["secs"] < 10, out


def test_lazy_pages_get_signatures_read_after_restore(tmp_path, rng):
    """restore() does not read the signature section; records of restored pages filled before
    it is read (here: a stored page right after a run of zero pages, looked at by the
    readahead of the faults on those zero pages, then left lazy) get their signatures when
    signatures(), Region.meta or checkpoint() first need them, also with several threads asking
    at once."""
    import threading
    import xxhash
    path = str(tmp_path / "s.snap")
    with plm.Region(64 * PS, max_cluster_pages=64) as r:
        v = pages(r)
        v[:32] = 0
        for p in range(32, 64):
            v[p] = random_page(rng)
        expected = v.copy()
        plm.checkpoint(r, path, working_set="none")
    want = [xxhash.xxh3_64_intdigest(p.tobytes()) for p in expected]
    with plm.restore(path, prefetch="none", background=False) as r:
        v = pages(r)
        for p in range(32):
            assert v[p, 100] == 0          # sequential faults: readahead up to the stored run
        got, errors = [None] * 4, []

        def ask(i):
            try:
                got[i] = r.signatures().tolist()
            except BaseException as e:   # reported below
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(g == want for g in got)
        m = r.meta
        lazy = np.nonzero(m["state"] == S.DEFERRED)[0]
        assert lazy.size and (m["signature"][lazy] == np.array(want, np.uint64)[lazy]).all()
        assert r.stats()["faults"] <= 32, "signatures() must not fault lazy pages in"


def test_a_file_written_over_in_place_before_the_core_attaches_is_refused(make_region, tmp_path,
                                                                         monkeypatch):
    # restore() checked the tables, then the core took the file as it was at its attach as
    # the reference of its watch: bytes written in place in between were served silently.
    import pylazymem.snapshot as snap
    path = str(tmp_path / "s.plm")
    r = make_region(8 * PS)
    v = pages(r)
    v[:] = 7
    v[:, 0] = np.arange(8)
    plm.checkpoint(r, path, working_set="none")
    real = snap._share_pool

    def write_in_place(*args, **kw):   # another process writing the file meanwhile
        with open(path, "r+b") as f:
            f.seek(4096 + 3 * PS)
            f.write(b"\xee" * PS)
        return real(*args, **kw)
    monkeypatch.setattr(snap, "_share_pool", write_in_place)
    with pytest.raises(plm.SnapshotError, match="changed while it was being restored"):
        plm.restore(path, prefetch="none", background=False)
