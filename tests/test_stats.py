"""r.stats(): counters after a known access pattern, service-time percentiles."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(60)]

KEYS = {"faults", "faults_by_class", "faults_spurious", "faults_write", "readahead_pages",
        "pages_present", "bytes_materialized", "materialized_pages", "errors", "serving_threads",
        "fault_service_ns"}


def test_fresh_stats(make_region):
    r = make_region(8 * PAGE_SIZE)
    st = r.stats()
    assert KEYS <= set(st), KEYS - set(st)
    assert set(st["faults_by_class"]) == {"zero", "canonical", "empty", "snapshot"}
    assert set(st["fault_service_ns"]) >= {"p50", "p99", "max", "mean"}
    for k in ("faults", "faults_spurious", "faults_write", "readahead_pages", "pages_present",
              "bytes_materialized", "materialized_pages", "errors"):
        assert st[k] == 0, k
    assert st["serving_threads"] == r.handler.threads >= 1
    assert r.stats() is not st, "stats() returns a fresh snapshot"


def test_counts_after_known_pattern(make_region, rng):
    r = make_region(32 * PAGE_SIZE, max_cluster_pages=1)
    page = random_page(rng)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, 8 * PAGE_SIZE, plm.ZERO)         # 0-7 zero
    r.defer_fill(8 * PAGE_SIZE, 8 * PAGE_SIZE, c)    # 8-15 canonical, 16-31 EMPTY
    v = pages(r)
    for p in range(0, 4):                            # 4 zero faults
        assert not v[p].any()
    for p in range(8, 13):                           # 5 canonical faults
        assert np.array_equal(v[p], page)
    for p in (16, 17):                               # 2 empty read faults
        assert not v[p].any()
    v[20, 1] = 7                                     # 1 empty write fault
    v[14, 0] = 1                                     # 1 canonical write fault
    for p in list(range(0, 4)) + [8, 16, 20]:        # present already: no new faults
        int(v[p, 0])
    st = r.stats()
    assert st["faults"] == 13, st
    assert st["faults_by_class"] == {"zero": 4, "canonical": 6, "empty": 3, "snapshot": 0}, st
    assert st["faults_write"] == 2, st
    assert st["faults_spurious"] == 0, st
    assert st["readahead_pages"] == 0, st
    assert st["pages_present"] == 13, st
    assert st["bytes_materialized"] == 13 * PAGE_SIZE, st
    assert st["materialized_pages"] == 0 and st["errors"] == 0, st
    ns = st["fault_service_ns"]
    assert 0 < ns["p50"] <= ns["p99"] <= ns["max"], ns
    assert 0 < ns["mean"] <= ns["max"], ns

    r.materialize(24 * PAGE_SIZE, 4 * PAGE_SIZE)
    st = r.stats()
    assert st["faults"] == 13
    assert st["materialized_pages"] == 4, st
    assert st["pages_present"] == 17, st
    assert st["bytes_materialized"] == 17 * PAGE_SIZE, st


def test_readahead_counts(make_region, rng):
    r = make_region(256 * PAGE_SIZE, max_cluster_pages=16)
    page = random_page(rng)
    r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
    v = pages(r)
    for p in range(r.npages):
        assert v[p, 0] == page[0]
    st = r.stats()
    assert st["readahead_pages"] > 0, st
    assert st["faults"] + st["readahead_pages"] == r.npages, st
    assert st["faults"] >= r.npages // 16, st
    assert st["faults_by_class"]["canonical"] == st["faults"], st
    assert st["pages_present"] == r.npages, st
    assert st["bytes_materialized"] == r.nbytes, st
