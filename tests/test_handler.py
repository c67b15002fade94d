"""The serving threads' lifecycle (r.handler) and their placement; env tunables."""

import json
import os

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(150)]


def test_stop_then_restart_serves_faults(run_py_ok):
    out = run_py_ok("""
        rng = np.random.default_rng(1)
        page = random_page(rng)
        with plm.Region(16 * PS, max_cluster_pages=1) as r:
            c = r.canonical(page.tobytes())
            r.defer_fill(0, r.nbytes, c)
            h = r.handler
            assert h.is_alive(), "handler must serve from creation"
            assert h.threads >= 1
            h.stop()
            assert not h.is_alive(), "is_alive() after stop()"
            h.stop()                                   # idempotent
            assert not h.is_alive()
            h.start()
            assert h.is_alive(), "is_alive() after restart"
            v = pages(r)
            for p in (3, 0, 15, 7):                    # first touches: only after the restart
                assert np.array_equal(v[p], page), f"page {p} after restart"
            st = r.stats()
            assert st["faults"] >= 4, st
            assert st["serving_threads"] == h.threads, (st, h.threads)
        print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK")


def test_default_threads_one_per_allowed_cpu(make_region):
    r = make_region(1 << 20)
    cpus = sorted(os.sched_getaffinity(0))
    assert r.handler.threads == len(cpus)
    assert tuple(sorted(r.handler.cpus)) == tuple(cpus)
    assert r.stats()["serving_threads"] == len(cpus)


def test_unpinned_threads(make_region):
    r = make_region(1 << 20, serve_cpus=[], serve_threads=2)
    assert r.handler.threads == 2
    assert r.handler.cpus == ()
    assert r.stats()["serving_threads"] == 2


def test_pinned_thread_runs_on_its_cpu(run_py_ok):
    """serve_cpus=[c]: exactly one new thread of this process is allowed only on CPU c."""
    cpu = max(os.sched_getaffinity(0))
    out = run_py_ok(f"""
        def pinned_threads(cpu):
            n = 0
            for tid in os.listdir("/proc/self/task"):
                try:
                    if os.sched_getaffinity(int(tid)) == {{cpu}}:
                        n += 1
                except OSError:
                    pass
            return n
        before = pinned_threads({cpu})
        with plm.Region(1 << 20, serve_cpus=[{cpu}]) as r:
            assert r.handler.cpus == ({cpu},), r.handler.cpus
            assert r.handler.threads == 1
            deadline = time.monotonic() + 2     # a thread may pin itself once it runs
            during = pinned_threads({cpu})
            while during != before + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
                during = pinned_threads({cpu})
            r.defer_fill(0, PS, plm.ZERO)
            assert pages(r)[0].sum() == 0
        print(json.dumps([before, during]))
    """, timeout=60)
    before, during = json.loads(out.strip().splitlines()[-1])
    assert during == before + 1, (before, during)


def test_env_serve_cpus_and_max_cluster(run_py_ok):
    cpu = min(os.sched_getaffinity(0))
    out = run_py_ok("""
        page = random_page(np.random.default_rng(2))
        with plm.Region(64 * PS) as r:
            c = r.canonical(page.tobytes())
            r.defer_fill(0, r.nbytes, c)
            v = pages(r)
            for p in range(r.npages):                 # sequential: would grow readahead
                assert v[p, 0] == page[0]
            st = r.stats()
            print(json.dumps([list(r.handler.cpus), st["faults"], st["readahead_pages"]]))
    """, env={"PYLAZYMEM_SERVE_CPUS": str(cpu), "PYLAZYMEM_MAX_CLUSTER": "1"}, timeout=60)
    cpus, faults, readahead = json.loads(out.strip().splitlines()[-1])
    assert cpus == [cpu]
    assert (faults, readahead) == (64, 0)


def test_fault_while_stopped_waits_for_start(run_py_ok):
    """Documented: with the handler stopped, an access to a lazy page waits until start()."""
    out = run_py_ok("""
        page = random_page(np.random.default_rng(3))
        with plm.Region(16 * PS, max_cluster_pages=1) as r:
            r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
            v = pages(r)
            r.handler.stop()
            got = []
            t = threading.Thread(target=lambda: got.append(v[6].copy()))
            t.start()
            t.join(0.3)
            blocked = t.is_alive()
            r.handler.start()
            t.join(20)
            assert not t.is_alive(), "the faulting thread was not released by start()"
            assert np.array_equal(got[0], page)
            print("OK", blocked)
    """, timeout=60)
    assert out.strip().splitlines()[-1] == "OK True", out
