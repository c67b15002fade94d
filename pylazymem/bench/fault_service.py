"""Benchmark 1: fault service for 4 KiB faults from one Python thread.

pylazymem (a region deferred to one canonical page, readahead off: max_cluster_pages=1) against
the minimal C userfaultfd loop in _baseline.c, with the same region size, the same random page
order (one byte read per page, a numpy fancy-index gather) and the same thread placement:
the faulting thread (the main thread) is pinned to one CPU, the serving thread either on that CPU
or on the other one. Extra rows: pylazymem's default placement (one pinned serving thread per
CPU) and the baseline with one unpinned thread. Variants are interleaved within each repetition
(the machine's "fresh memory" costs drift). Target: pylazymem/baseline <= 1.2x.
"""
from __future__ import annotations

import sys

import numpy as np

from . import _common as C
from ._baseline import BaselineRegion

NAME = "fault_service"
TARGET = 1.2
TOUCH_OFFSET = 123  # byte read inside each page


def _touch(view, offsets, cpu):
    """Time the gather of one byte per page in the given order, pinned to `cpu`."""
    with C.quiet_gc(), C.pinned(cpu):
        t0 = C.now_ns()
        got = view[offsets]
        t1 = C.now_ns()
    return t1 - t0, got


def _run_plm(plm, nbytes, template, offsets, faulter, serve_cpus):
    kw = {"max_cluster_pages": 1}
    if serve_cpus is not None:
        kw["serve_cpus"] = serve_cpus
    r = plm.Region(nbytes, **kw)
    try:
        c = r.canonical(template)
        r.defer_fill(0, r.nbytes, c)
        view = r.ndarray(np.uint8)
        dt, got = _touch(view, offsets, faulter)
        del view
        st = r.stats()
        threads = getattr(r.handler, "threads", None)
        st["handler_cpus"] = tuple(getattr(r.handler, "cpus", ()) or ())
    finally:
        r.close()
    bad = int(np.count_nonzero(got != template[TOUCH_OFFSET]))
    return dt, bad, st, threads


def _run_base(nbytes, template, offsets, faulter, cpu):
    b = BaselineRegion(nbytes, template.tobytes(), cpu)
    try:
        view = b.ndarray()
        dt, got = _touch(view, offsets, faulter)
        del view
        b.stop()
        faults, err = b.faults, b.error
    finally:
        b.close()
    bad = int(np.count_nonzero(got != template[TOUCH_OFFSET]))
    return dt, bad, faults, err


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file, (16 * C.MiB, 64 * C.MiB))
    faulter, other = C.cpu_pair()

    rng = np.random.default_rng(20240601)
    template = rng.integers(0, 256, C.PAGE, dtype=np.uint8)
    order = rng.permutation(npages)
    offsets = order * C.PAGE + TOUCH_OFFSET

    variants = [
        ("pylazymem_same_cpu", "plm", [faulter]),
        ("baseline_same_cpu", "base", faulter),
    ]
    if other is not None:
        variants += [
            ("pylazymem_other_cpu", "plm", [other]),
            ("baseline_other_cpu", "base", other),
        ]
    variants += [
        ("pylazymem_default", "plm", None),       # serve_cpus=None: one pinned thread per CPU
        ("baseline_unpinned", "base", None),      # one thread, scheduler's choice
    ]

    print(f"# {NAME}: 4K faults from one Python thread (pinned to cpu {faulter}), random page order, "
          f"{nbytes // C.MiB} MiB = {npages} pages, {reps} reps interleaved (+{C.WARMUP} warm-up rep discarded), readahead off "
          f"(max_cluster_pages=1), canonical page deferred over the whole region", file=file)
    C.print_environment(env, file)

    samples = {name: [] for name, _, _ in variants}
    service = {name: [] for name, kind, _ in variants if kind == "plm"}
    extra = {name: {} for name, _, _ in variants}
    problems = []
    for rep in range(-C.WARMUP, reps):  # rep < 0: warm-up, not recorded
        for name, kind, where in C.rotate(variants, rep):
            if kind == "plm":
                dt, bad, st, threads = _run_plm(plm, nbytes, template, offsets, faulter, where)
                service[name].append(st.get("fault_service_ns", {}))
                extra[name] = {"faults": st.get("faults"), "serving_threads": st.get("serving_threads", threads),
                               "errors": st.get("errors"), "faults_spurious": st.get("faults_spurious"),
                               "readahead_pages": st.get("readahead_pages"),
                               "handler_cpus": st.get("handler_cpus")}
                if st.get("faults") is not None and st["faults"] < npages:
                    problems.append(f"{name} rep {rep}: stats faults={st['faults']} < {npages} pages touched")
            else:
                dt, bad, faults, err = _run_base(nbytes, template, offsets, faulter, where)
                extra[name] = {"faults": faults, "errors": err}
                if err:
                    problems.append(f"{name} rep {rep}: baseline handler error errno={err}")
            if bad:
                problems.append(f"{name} rep {rep}: {bad} of {npages} bytes read wrong")
            if rep >= 0:
                samples[name].append(dt / npages / 1000.0)  # us per fault

    rows = {name: C.summary(s) for name, s in samples.items()}
    for name, sv in service.items():
        agg = {}
        for k in ("p50", "p99", "max", "mean"):
            vals = [d[k] for d in sv if isinstance(d, dict) and d.get(k) is not None]
            if vals:
                agg[k] = float(np.median(vals))
        rows[name]["fault_service_ns"] = agg
    for name in rows:
        rows[name].update(extra[name])

    headers = ["variant", "us/fault_med", "min", "max", "reps", "faults", "svc_p50_ns", "svc_p99_ns", "svc_mean_ns"]
    table = []
    for name, _, _ in variants:
        r = rows[name]
        svc = r.get("fault_service_ns", {})
        table.append([name, r["median"], r["min"], r["max"], r["n"], r.get("faults", "-"),
                      svc.get("p50", "-"), svc.get("p99", "-"), svc.get("mean", "-")])
    C.print_table(headers, table, file)
    print("# serving threads: " + "  ".join(
        f"{name}={'cpus ' + ','.join(map(str, rows[name].get('handler_cpus') or ())) if kind == 'plm' else where}"
        for name, kind, where in variants) + "  (baseline: cpu it is pinned to, None = unpinned)", file=file)
    print("# svc_* = pylazymem stats()['fault_service_ns'] (its own in-handler service time; median over reps)",
          file=file)

    ratios = [C.ratio("same_cpu", rows["pylazymem_same_cpu"]["median"], rows["baseline_same_cpu"]["median"],
                      "<=", TARGET, "pylazymem/baseline, serving thread on the faulter's CPU")]
    if other is not None:
        ratios.append(C.ratio("other_cpu", rows["pylazymem_other_cpu"]["median"],
                              rows["baseline_other_cpu"]["median"], "<=", TARGET,
                              "pylazymem/baseline, serving thread on the other CPU"))
        ratios.append(C.ratio("default_vs_baseline_unpinned", rows["pylazymem_default"]["median"],
                              rows["baseline_unpinned"]["median"], "<=", TARGET,
                              "informational: pylazymem default placement vs one unpinned C thread"))
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)

    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps,
            "faulter_cpu": faulter, "other_cpu": other, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
