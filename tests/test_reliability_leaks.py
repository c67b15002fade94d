"""Reliability: no leaks (issue 5). In a subprocess, 2,000 regions are created, faulted
(read, write, canonical and zero deferrals, materialize, meta, signatures, background fill)
and closed, every 10th with a numpy view that outlives close(); then 200 restores (prefetch
none / working-set / all, background fill on or off); then 200 regions dropped without close()
(garbage collection closes them). Open file descriptors, Python threads, kernel tasks,
memory mappings and RSS must return to where they started (RSS within 16 MiB).

Under the sanitizers (PYLAZYMEM_UNDER_ASAN=1, scripts/sanitize.sh) only descriptors, threads
and tasks are compared: ASan's allocator grows its own mappings, and its quarantine holds freed
memory, so mappings and RSS measure ASan there, not pylazymem."""

import pytest

from _reliability import UNDER_ASAN, last_json, record

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(300)]

RSS_SLACK_KIB = 16 << 10


def test_regions_and_restores_release_everything(run_py_ok, tmp_path):
    out = run_py_ok("""
        import _reliability
        _reliability.leaks(sys.argv[1], nregions=2000, nrestores=200, ndropped=200)
    """, timeout=240, args=(str(tmp_path),))
    m = last_json(out)
    start, end = m["start"], m["end"]
    record("leaks", dict(start=start, end=end, seconds_regions=m["seconds_regions"],
                         seconds_restores=m["seconds_restores"],
                         rss_growth_kib=end["rss_kib"] - start["rss_kib"]))
    trace = "\n".join("%-14s %s" % (what, c) for what, c in m["trace"])
    keys = ("fds", "threads", "tasks") if UNDER_ASAN else ("fds", "threads", "tasks", "maps")
    for key in keys:
        assert end[key] == start[key], "%s: %d at the start, %d at the end\n%s" % (
            key, start[key], end[key], trace)
    for what, c in m["trace"]:
        for key in keys:
            assert c[key] == start[key], "%s after %s: %d (start %d)\n%s" % (
                key, what, c[key], start[key], trace)
    if not UNDER_ASAN:
        assert end["rss_kib"] - start["rss_kib"] < RSS_SLACK_KIB, trace
