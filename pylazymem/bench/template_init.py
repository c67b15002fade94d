"""Benchmark 2: template initialization.

Fill 1 GiB with a 4 KiB template page and then read 1% of its pages (one byte each, random pages
in random order), end to end:
  pylazymem: Region(1 GiB) + canonical(template) + defer_fill over the whole region + the reads
             (default configuration: readahead and serving threads as shipped; chunk blocks
             kernel-served, shared_first_touch=False);
  pylazymem_seen: the same with Region(shared_first_touch=True): chunk blocks registered MINOR,
             every first touch a uffd round trip (UFFDIO_CONTINUE), seen by the working set;
  numpy:     np.empty(1 GiB) + broadcast-copy of the template into every page + the same reads
             (numpy's large allocations get transparent huge pages).
  pylazymem_copy: the same with Region(share_canonical=False): every first touch copies the
             template (the path before canonical chunks), for comparison.
Variants are interleaved per repetition. Target (issue 11): numpy/pylazymem >= 20x.
"""
from __future__ import annotations

import sys

import numpy as np

from . import _common as C

NAME = "template_init"
TARGET = 20.0
TOUCH_OFFSET = 777
FRACTION = 0.01


def _run_plm(plm, nbytes, template, offsets, cpu=None, share=True, first_touch=None):
    """cpu None: default Region, main thread unpinned; else main thread and one serving thread on `cpu`.
    share False: Region(share_canonical=False), template copied at each first touch.
    first_touch True/False: Region(shared_first_touch=...); None: the default."""
    kw = {} if cpu is None else {"serve_cpus": [cpu]}
    if not share:
        kw["share_canonical"] = False
    if first_touch is not None:
        kw["shared_first_touch"] = first_touch
    with C.quiet_gc(), C.pinned(cpu):
        t0 = C.now_ns()
        r = plm.Region(nbytes, **kw)
        t1 = C.now_ns()
        try:
            c = r.canonical(template)
            r.defer_fill(0, r.nbytes, c)
            t2 = C.now_ns()
            view = r.ndarray(np.uint8)
            got = view[offsets]
            t3 = C.now_ns()
            del view
            st = r.stats()
        finally:
            t4 = C.now_ns()
            r.close()
            t5 = C.now_ns()
    bad = int(np.count_nonzero(got != template[TOUCH_OFFSET]))
    return {"total": t3 - t0, "create": t1 - t0, "fill": t2 - t1, "reads": t3 - t2, "free": t5 - t4}, bad, st


def _run_numpy(nbytes, template, offsets):
    with C.quiet_gc():
        t0 = C.now_ns()
        a = np.empty(nbytes, dtype=np.uint8)
        t1 = C.now_ns()
        a.reshape(-1, C.PAGE)[:] = template
        t2 = C.now_ns()
        got = a[offsets]
        t3 = C.now_ns()
        del a
        t4 = C.now_ns()
    bad = int(np.count_nonzero(got != template[TOUCH_OFFSET]))
    return {"total": t3 - t0, "create": t1 - t0, "fill": t2 - t1, "reads": t3 - t2, "free": t4 - t3}, bad


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    nreads = max(1, int(npages * FRACTION))

    rng = np.random.default_rng(20240602)
    template = rng.integers(0, 256, C.PAGE, dtype=np.uint8)
    pages = rng.choice(npages, size=nreads, replace=False)  # random pages, random order
    offsets = pages * C.PAGE + TOUCH_OFFSET

    print(f"# {NAME}: fill {nbytes // C.MiB} MiB with a 4 KiB template, then read {nreads} random pages "
          f"({FRACTION:.0%}, one byte each); end-to-end ms, {reps} reps interleaved (+{C.WARMUP} warm-up rep discarded); pylazymem default "
          f"Region config, main thread unpinned", file=file)
    C.print_environment(env, file)

    faulter, _ = C.cpu_pair()
    # pylazymem_pinned (informational): main thread pinned to one CPU, serve_cpus=[that CPU]
    variants = ["pylazymem", "numpy", "pylazymem_seen", "pylazymem_pinned", "pylazymem_copy"]
    parts = {v: {k: [] for k in ("total", "create", "fill", "reads", "free")} for v in variants}
    stats = {}
    problems = []
    for rep in range(-C.WARMUP, reps):  # rep < 0: warm-up, not recorded
        for v in C.rotate(variants, rep):
            if v.startswith("pylazymem"):
                t, bad, st = _run_plm(plm, nbytes, template, offsets, faulter if v.endswith("_pinned") else None,
                                      share=not v.endswith("_copy"),
                                      first_touch=True if v.endswith("_seen") else None)
                stats[v] = st
            else:
                t, bad = _run_numpy(nbytes, template, offsets)
            if bad:
                problems.append(f"{v} rep {rep}: {bad} of {nreads} bytes read wrong")
            for k, ns in t.items():
                if rep >= 0:
                    parts[v][k].append(ns / 1e6)  # ms

    rows = {}
    for v in variants:
        rows[v] = C.summary(parts[v]["total"])
        for k in ("create", "fill", "reads", "free"):
            rows[v][k + "_ms_median"] = float(np.median(parts[v][k]))
    for v in variants:
        if v.startswith("pylazymem"):
            rows[v]["stats"] = {k: stats[v].get(k) for k in ("faults", "readahead_pages", "pages_present",
                                                             "bytes_materialized", "serving_threads",
                                                             "fault_service_ns", "errors",
                                                             "canonical_shared_pages", "canonical_copied_pages",
                                                             "canonical_kernel_pages")}

    headers = ["variant", "total_ms_med", "min", "max", "reps", "create_ms", "fill_ms", "reads_ms",
               "us/read", "free_ms"]
    table = [[v, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"], rows[v]["create_ms_median"],
              rows[v]["fill_ms_median"], rows[v]["reads_ms_median"],
              rows[v]["reads_ms_median"] * 1000.0 / nreads, rows[v]["free_ms_median"]] for v in variants]
    C.print_table(headers, table, file)
    print("# create = Region() / np.empty; fill = canonical()+defer_fill / broadcast copy; free (close / del) "
          "is not part of total", file=file)
    print(f"# pylazymem_pinned: main thread pinned to cpu {faulter} for the whole timed section, "
          f"Region(serve_cpus=[{faulter}])", file=file)
    for v in variants:
        if v.startswith("pylazymem"):
            s = rows[v]["stats"]
            print(f"# {v} stats (last rep): faults={s.get('faults')} readahead_pages={s.get('readahead_pages')} "
                  f"pages_present={s.get('pages_present')} serving_threads={s.get('serving_threads')} "
                  f"fault_service_ns={s.get('fault_service_ns')}", file=file)

    ratios = [C.ratio("speedup", rows["numpy"]["median"], rows["pylazymem"]["median"], ">=", TARGET,
                      "numpy total / pylazymem total, default Region (higher is better)"),
              C.ratio("speedup_seen", rows["numpy"]["median"], rows["pylazymem_seen"]["median"], ">=", TARGET,
                      "informational: numpy total / pylazymem total with shared_first_touch=True (first touches "
                      "served by us, seen by the working set)"),
              C.ratio("speedup_pinned", rows["numpy"]["median"], rows["pylazymem_pinned"]["median"], ">=", TARGET,
                      "informational: numpy total / pylazymem total, faulter and serving thread on one CPU"),
              C.ratio("speedup_copy", rows["numpy"]["median"], rows["pylazymem_copy"]["median"], ">=", TARGET,
                      "informational: numpy total / pylazymem total with share_canonical=False (copy at first touch)")]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reads": nreads, "reps": reps,
            "faulter_cpu": faulter, "env": env, "rows": rows, "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
