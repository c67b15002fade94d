"""Page contents under concurrency: 4 threads, 64 MiB, ZERO + 5 canonical deferrals + EMPTY pages
+ program data, checked byte for byte against a numpy reference model (tests/_workloads.py).

Each workload runs in a subprocess (a hang fails the test instead of blocking the run)."""

import json

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(300)]

CONFIGS = {
    "default": {},
    "no-readahead": {"max_cluster_pages": 1},
    "cluster16-one-unpinned-server": {"max_cluster_pages": 16, "serve_cpus": [],
                                      "serve_threads": 1},
}


def run_workload(run_py_ok, func, seed, env=None, **kw):
    """Run _workloads.<func>(seed=..., **kw) in a fresh interpreter; return its JSON summary."""
    args = json.dumps(dict(seed=seed, **kw))
    out = run_py_ok(f"""
        import _workloads
        _workloads.{func}(**json.loads({args!r}))
    """, timeout=240, env=env)
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_threads_read_random_pages(run_py_ok, config):
    st = run_workload(run_py_ok, "contents_read", seed=11 + len(config), **CONFIGS[config])
    assert st["faults"] > 0
    if config == "no-readahead":
        assert st["readahead"] == 0, st


@pytest.mark.parametrize("config", ["default", "no-readahead"])
def test_threads_write_then_verify(run_py_ok, config):
    st = run_workload(run_py_ok, "contents_write", seed=23 + len(config), **CONFIGS[config])
    assert st["faults"] > 0


def test_threads_read_user_mode_only(run_py_ok, probe_mode):
    """The same workload with a user-mode-only uffd (user faults are served the same way)."""
    mode, _, reason = probe_mode("user-mode-only")
    if mode != "user-mode-only":
        pytest.skip(f"user-mode-only uffd not available: {reason}")
    run_workload(run_py_ok, "contents_read", seed=5, env={"PYLAZYMEM_UFFD": "user-mode-only"},
                 nbytes=16 << 20)


REDEFER = {
    "default": {"seconds": 3.0},
    "no-readahead": {"seconds": 3.0, "max_cluster_pages": 1},
    # 4 readers on 16 pages: many duplicate fault messages (the "already present" path)
    "hot-16-pages": {"seconds": 4.0, "max_cluster_pages": 1, "nbytes": 16 << 12,
                     "nreaders": 4},
    # runs of up to 2048 pages: defer_fill's range-record path (>= 64 pages) racing with the
    # faults that fill records lazily (once mapped zeros over a page just filled: 1 run in 4)
    "range-records": {"seconds": 6.0, "max_cluster_pages": 16, "nbytes": 4096 << 12,
                      "nreaders": 4, "maxrun": 2048},
}


@pytest.mark.parametrize("config", list(REDEFER))
def test_redefer_while_threads_fault(run_py_ok, config):
    """defer_fill / materialize racing with faults from several threads on the same pages:
    a read may mix the old and new fill, never show bytes of neither; the end state is exact."""
    run_workload(run_py_ok, "redefer_race", seed=31 + len(config), **REDEFER[config])
