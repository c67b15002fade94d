"""Reliability: stress (issue 5). Eight threads read and write random pages of a lazily served
region while the background fill runs, every byte checked against a numpy model:

  (a) deferred canonical and zero pages, the whole 64 MiB region re-deferred every round with
      readahead off (max_cluster_pages=1), until stats()["faults"] reaches 10^6 (10^7 with
      PYLAZYMEM_LONG=1, scripts/reliability.sh --long);
  (b) lazily restored snapshots (prefetch="none"), each round checkpointed (lazy pages and all)
      and restored again, with the background fill started at restore, started while the
      threads run, or not at all.

A thread writes only pages it owns; reads of pages another thread may be writing must show old
or new bytes only. Workloads live in tests/_reliability.py and run in subprocesses."""

import pytest

from _reliability import LONG, last_json, record

pytestmark = [pytest.mark.core, pytest.mark.timeout(7200 if LONG else 600)]

MIN_FAULTS = 10 ** 7 if LONG else 10 ** 6
RESTORE_ROUNDS = 60 if LONG else 6


@pytest.mark.uffd
def test_stress_deferred_pages_million_faults(run_py_ok):
    out = run_py_ok(f"""
        import _reliability
        _reliability.stress_deferred(seed=2024, nthreads=8, min_faults={MIN_FAULTS},
                                     max_seconds={5400 if LONG else 420})
    """, timeout=6000 if LONG else 480)
    m = last_json(out)
    record("stress_deferred", m)
    assert m["faults"] >= MIN_FAULTS, m
    assert m["by_class"]["canonical"] > 0 and m["by_class"]["zero"] > 0, m
    assert m["write_faults"] > 0, m
    assert m["background_rounds"] > 0 and m["background_pages"] > 0, m


@pytest.mark.uffd_full
def test_stress_restored_snapshots_during_background_fill(run_py_ok, tmp_path):
    out = run_py_ok(f"""
        import _reliability
        _reliability.stress_restore(seed=77, workdir=sys.argv[1], nthreads=8,
                                    rounds={RESTORE_ROUNDS})
    """, timeout=3000 if LONG else 300, args=(str(tmp_path),))
    m = last_json(out)
    record("stress_restore", m)
    assert m["snapshot_faults"] > 0, m
    assert m["background_pages"] > 0, m
    assert m["bg_running_during_threads"] > 0, m
