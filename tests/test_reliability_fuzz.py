"""Reliability: mutation-based fuzzing of the snapshot reader (issue 5).

Valid snapshots of four shapes (working set + array, many arrays with structured dtypes,
duplicates with an automatic working set, a single page) are mutated: truncations, appended
bytes, bit flips and byte overwrites (with and without recomputed checksums), hostile header
fields, consistent-looking layouts with hostile counts, rewritten page-map and working-set
entries, hostile manifests, damaged signature sections, sections spliced from another file,
damaged page contents. Each file goes through plm.inspect(), pylazymem.snapshot.page_sources()
and plm.restore(prefetch="none", background=False) (every 16th with prefetch="all"): the outcome
must be success or SnapshotError, page_sources() must agree with restore(), and inspect() may
reject only more (a damaged signature section, which restore() does not read). An accepted file
is read page by page and must hold what the file says (docs/snapshot-format.md); its arrays must
be viewable.

The default run is 20,000 files; PYLAZYMEM_LONG=1 runs 10^6. Workers run in subprocesses (a
crash or hang fails the test and leaves the file under test, current.snap, as the reproducer).
Complements test_snapshot_fuzz.py (hypothesis, small budget) with volume."""

import os
import re
import shutil

import pytest

from _reliability import LONG, UNDER_ASAN, finish_all, last_json, record, start_py

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(7200 if LONG else 400)]

FILES = 10 ** 6 if LONG else 20_000
CHUNK = 50_000 if LONG else 10_000   # files per subprocess (each with its own seed)
WORKERS = max(1, min(4, len(os.sched_getaffinity(0))))   # subprocesses at a time

WORKER = """
import _reliability
_reliability.fuzz_batch(sys.argv[1], seed=int(sys.argv[2]), count=int(sys.argv[3]),
                        worker=int(sys.argv[4]))
"""
PRELUDE = "import sys\n"


def test_mutation_fuzz_snapshot_reader(tmp_path):
    jobs = []
    left, seed = FILES, 1000
    while left > 0:
        n = min(CHUNK, left)
        jobs.append((seed, n))
        left -= n
        seed += 1
    per_file = 0.004 if UNDER_ASAN else 0.002     # 1-2 ms measured per file and worker; x10 below
    totals = dict(files=0, accepted=0, rejected=0, inspect_only=0, prefetch_all=0,
                  read_pages=0, subprocesses=len(jobs))
    reasons, failures, slowest = {}, [], [0, None]
    for i in range(0, len(jobs), WORKERS):
        batch = jobs[i:i + WORKERS]
        procs, dirs = [], []
        for k, (seed, n) in enumerate(batch):
            d = tmp_path / ("w%d" % seed)
            d.mkdir()
            dirs.append(d)
            procs.append(start_py(PRELUDE + WORKER, args=(d, seed, n, seed)))
        budget = 60 + 10 * max(n for _, n in batch) * per_file
        for (seed, n), d, (rc, out, err, timed_out) in zip(batch, dirs,
                                                            finish_all(procs, budget)):
            cur = d / "current.snap"
            if rc != 0 or timed_out:
                keep = tmp_path / ("repro-seed%d.snap" % seed)
                if cur.exists():
                    shutil.copy(cur, keep)
                pytest.fail("fuzz worker seed=%d %s (returncode %s); the file under test is "
                            "kept as %s (reproduce: plm.inspect / plm.restore(path, "
                            "prefetch='none', background=False) on it)\n--- stderr ---\n%s"
                            % (seed, "timed out (hang?)" if timed_out else "died", rc, keep,
                               err[-6000:]), pytrace=False)
            m = last_json(out)
            for key in ("files", "accepted", "rejected", "inspect_only", "prefetch_all",
                        "read_pages"):
                totals[key] += m["counts"][key]
            for key, c in m["reasons"].items():
                reasons[key] = reasons.get(key, 0) + c
            failures += m["failures"]
            if m["counts"]["slowest"][0] > slowest[0]:
                slowest = m["counts"]["slowest"]
    totals["slowest_file_seconds"] = slowest
    top = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:25])
    record("fuzz", dict(totals, distinct_reasons=len(reasons), top_reasons=top,
                        failures=len(failures)))
    assert totals["files"] == FILES, totals
    groups = {}
    for f in failures:
        last = f["detail"].strip().splitlines()[-1] if f["detail"].strip() else ""
        last = re.sub(r"\d+", "N", last)
        g = groups.setdefault((f["what"], last), dict(count=0, example=f))
        g["count"] += 1
    if failures:
        pytest.fail("%d of %d fuzzed files misbehaved, %d kinds:\n%s" % (
            len(failures), totals["files"], len(groups), "\n".join(
            "- %d x %s: %s\n  e.g. mutation %s, file %s\n%s" % (
                g["count"], what, last, g["example"]["mutation"], g["example"]["file"],
                g["example"]["detail"]) for (what, last), g in groups.items())),
            pytrace=False)
    assert totals["accepted"] > 0.02 * FILES and totals["rejected"] > 0.5 * FILES, totals
    assert len(reasons) >= 20, sorted(reasons)     # the mutations reach many distinct checks
