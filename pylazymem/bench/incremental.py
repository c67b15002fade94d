"""Issue 12, benchmark 1: incremental checkpoints.

A 1 GiB region of random bytes (no zero or duplicate pages: the full checkpoint stores every
page). Per repetition: a full checkpoint (plm.checkpoint(region, a)), then 2% of the pages
written (one byte each, random pages), then the incremental one (plm.checkpoint(region, b,
parent=a)). Both durable (fsync), in the same scratch directory; files deleted between
repetitions. Variants:
  full            the first checkpoint
  incremental     the second, with dirty tracking (Region.dirty_tracking; pages not written since
                  `a` are not read)
  incremental_compare  (informational) the same with the tracking epoch dropped first
                  (Region._epoch_id = None): every page hashed and compared with the parent's
Targets: incremental time <= 0.1x full, incremental file <= 0.05x full. After the last repetition
the chain is read back (pylazymem._chain) and compared with the region byte for byte.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "incremental"
TARGET_TIME = 0.1
TARGET_SIZE = 0.05
WRITTEN = 0.02


def _timed(fn):
    with C.quiet_gc():
        t0 = C.now_ns()
        out = fn()
        t1 = C.now_ns()
    return (t1 - t0) / 1e6, out


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    from .._chain import open_chain

    rng = np.random.default_rng(20241205)
    variants = ["full", "incremental", "incremental_compare"]
    samples = {v: [] for v in variants}
    sizes = {v: [] for v in variants}
    problems = []
    nwrite = max(1, int(npages * WRITTEN))
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB region of random bytes; full checkpoint, then {nwrite} pages "
              f"({WRITTEN:.0%}) written, then checkpoint(parent=full); {reps} reps (+{C.WARMUP} warm-up "
              f"discarded); files in {d} ({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        r = plm.Region(nbytes)
        try:
            a = r.ndarray(np.uint8)
            for i in range(0, nbytes, 64 * C.MiB):
                a[i:i + 64 * C.MiB] = rng.integers(0, 256, min(64 * C.MiB, nbytes - i), dtype=np.uint8)
            print(f"# dirty tracking: {getattr(r, 'dirty_tracking', 'none')}", file=file)
            for rep in range(-C.WARMUP, reps):
                paths = {v: os.path.join(d, "%s.plm" % v) for v in variants}
                for v in ("incremental", "incremental_compare"):
                    # each incremental variant against its own fresh full checkpoint
                    t, info = _timed(lambda: plm.checkpoint(r, paths["full"]))
                    if v == "incremental" and rep >= 0:
                        samples["full"].append(t)
                        sizes["full"].append(os.path.getsize(paths["full"]))
                    pages = rng.choice(npages, nwrite, replace=False)
                    a[pages * C.PAGE + rng.integers(0, C.PAGE, nwrite)] += 1
                    if v == "incremental_compare":
                        r._epoch_id = None
                    t, info = _timed(lambda: plm.checkpoint(r, paths[v], parent=paths["full"]))
                    if rep >= 0:
                        samples[v].append(t)
                        sizes[v].append(os.path.getsize(paths[v]))
                    if info.pages_by_class["unique"] + info.pages_by_class["duplicate"] < nwrite:
                        problems.append(f"{v} rep {rep}: stores {info.pages_by_class['unique']} pages, "
                                        f"{nwrite} were written")
                    if rep == reps - 1 and v == "incremental":
                        with open_chain(paths[v]) as chain:
                            for i in range(0, npages, 16384):
                                got = chain.read_pages(np.arange(i, min(npages, i + 16384)))
                                if got != bytes(a[i * C.PAGE:(i + 16384) * C.PAGE]):
                                    problems.append(f"chain contents differ from the region near page {i}")
                                    break
                    os.unlink(paths[v])
                os.unlink(paths["full"])
        finally:
            r.close()

    rows = {v: C.summary(samples[v]) for v in variants}
    for v in variants:
        rows[v]["file_bytes_median"] = float(np.median(sizes[v]))
    headers = ["variant", "ms_median", "min", "max", "reps", "file_MiB"]
    C.print_table(headers, [[v, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"],
                             rows[v]["file_bytes_median"] / C.MiB] for v in variants], file)
    ratios = [C.ratio("time", rows["incremental"]["median"], rows["full"]["median"], "<=", TARGET_TIME,
                      "incremental checkpoint time / full checkpoint time (lower is better)"),
              C.ratio("size", rows["incremental"]["file_bytes_median"], rows["full"]["file_bytes_median"], "<=",
                      TARGET_SIZE, "incremental file / full file"),
              C.ratio("time_compare", rows["incremental_compare"]["median"], rows["full"]["median"], "<=",
                      TARGET_TIME, "informational: incremental without dirty tracking (every page hashed) / full")]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "env": env,
            "rows": rows, "ratios": {x["name"]: x for x in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
