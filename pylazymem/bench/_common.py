"""Helpers shared by the benchmarks: timing, CPU pinning, medians, tables, environment notes."""
from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import sys
import time

PAGE = os.sysconf("SC_PAGESIZE")
MiB = 1 << 20
GiB = 1 << 30

now_ns = time.perf_counter_ns

# Repetitions run before the recorded ones (all variants, interleaved) and discarded: the first
# touches of memory the host has reclaimed cost several times more (free page reporting).
WARMUP = 1


def import_plm():
    """Import pylazymem, with a clear message if the package (or its C core) is missing."""
    try:
        import pylazymem as plm
    except Exception as e:  # the C core may be unbuilt: say so instead of a bare traceback
        raise RuntimeError(f"cannot import pylazymem ({type(e).__name__}: {e}); "
                           "build it first (bash scripts/test.sh creates .venv)") from e
    return plm


def features_dict(plm) -> dict:
    f = plm.features()
    out = {}
    for k in ("mode", "source", "api_features", "has_wp", "has_wp_async", "has_minor_shmem",
              "has_poison", "has_move", "reason"):
        v = getattr(f, k, None)
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return out


def environment(plm=None) -> dict:
    env = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": sorted(os.sched_getaffinity(0)),
        "page_size": PAGE,
    }
    env.update(thp_settings())
    if plm is not None:
        env["pylazymem"] = getattr(plm, "__version__", "?")
        env["uffd"] = features_dict(plm)
    return env


THP_DIR = "/sys/kernel/mm/transparent_hugepage"


def thp_settings() -> dict:
    """The machine's transparent huge page settings: enabled, defrag, use_zero_page ("?" if unreadable)."""
    out = {}
    for key, name in (("thp", "enabled"), ("thp_defrag", "defrag"), ("thp_zero_page", "use_zero_page")):
        try:
            with open(os.path.join(THP_DIR, name)) as f:
                out[key] = f.read().strip()
        except OSError:
            out[key] = "?"
    return out


def thp_selected(setting: str) -> str:
    """'madvise' from 'always [madvise] never'."""
    if "[" in setting and "]" in setting:
        return setting[setting.index("[") + 1:setting.index("]")]
    return setting


def minflt() -> int:
    """Minor page faults of the calling thread so far (the whole process where RUSAGE_THREAD is missing)."""
    import resource

    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)).ru_minflt


def print_environment(env: dict, file) -> None:
    u = env.get("uffd", {})
    print(f"# kernel {env['kernel']}  python {env['python']}  cpus {env['cpus']}  page {env['page_size']}"
          f"  thp enabled={thp_selected(env['thp'])} defrag={thp_selected(env.get('thp_defrag', '?'))}"
          f" use_zero_page={env.get('thp_zero_page', '?')}", file=file)
    if u:
        print(f"# pylazymem {env.get('pylazymem')}  uffd mode={u.get('mode')} source={u.get('source')}"
              f"  api_features={u.get('api_features')}"
              + (f"  reason={u.get('reason')!r}" if u.get("reason") else ""), file=file)


def cpu_pair():
    """(faulter_cpu, other_cpu or None) from this process's affinity mask."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], (cpus[1] if len(cpus) > 1 else None)


@contextlib.contextmanager
def pinned(cpu):
    """Pin the calling thread to `cpu` (None: leave it alone), restore its mask afterwards."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


@contextlib.contextmanager
def quiet_gc():
    """No garbage collection inside a timed section."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def summary(samples) -> dict:
    s = sorted(samples)
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "n": len(s), "samples": list(samples)}


def ratio(name: str, num: float, den: float, op: str, target: float, what: str) -> dict:
    value = num / den if den else float("inf")
    ok = value <= target if op == "<=" else value >= target
    return {"name": name, "value": value, "target": target, "op": op, "ok": ok, "what": what}


def fmt(v, digits=3) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def print_table(headers, rows, file=None) -> None:
    """Fixed-width, whitespace-separated table; first column left-aligned, others right-aligned."""
    file = file or sys.stdout
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    print(line(headers), file=file)
    for r in cells:
        print(line(r), file=file)


def print_ratios(ratios, file=None) -> None:
    file = file or sys.stdout
    for r in ratios:
        print(f"RATIO {r['name']} = {r['value']:.3f}x  (target {r['op']} {r['target']}x)  "
              f"{'PASS' if r['ok'] else 'MISS'}  # {r['what']}", file=file)


def finish(name, quick, nbytes, reps, env, rows, ratios, problems, file=None) -> dict:
    """The end of a benchmark's run(): its ratios and problems printed, its result returned."""
    print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file or sys.stdout)
    return {"name": name, "quick": quick, "nbytes": nbytes, "reps": reps, "env": env, "rows": rows,
            "ratios": {x["name"]: x for x in ratios}, "problems": problems}


def rotate(seq, k):
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


def setup(quick, reps, file, sizes=(128 * MiB, GiB)):
    """The common start of a benchmark's run(): where to print, the package, its environment
    line, the state size (sizes = (quick, full): 128 MiB / 1 GiB by default), repetitions
    (7, quick: 5) and pages."""
    plm = import_plm()
    nbytes = sizes[0] if quick else sizes[1]
    return file or sys.stdout, plm, environment(plm), nbytes, reps or (5 if quick else 7), \
        nbytes // PAGE
