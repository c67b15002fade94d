"""Checkpoint/restore benchmark 2b: time for the default restore() call to return.

The same 1 GiB snapshots as restore_none (50% zero, 25% duplicate, 25% unique pages, random
layout; "plain" has no working set, "ws10" carries a random 10% working set), built the same way
from the same seed. Per repetition, interleaved:
  default_cold / default_warm   plm.restore(path): restore()'s default arguments (read from its
                                signature and printed), cold page cache / file in the page cache
  none_cold / none_warm         plm.restore(path, prefetch="none", background=False): the call the
                                README's restore time was first measured with, in the same run
  default_ws10_cold / _warm     plm.restore(path) on the snapshot carrying a 10% working set: the
                                default prefetch loads it (about 100 MiB) before returning
Reported: the time until restore() returns; for calls that start the background fill, the time
from the call until the fill has finished (the whole state in memory; stats() polled every
FILL_POLL_S, 64 random pages read and checked against the source first, untimed); close().
No target: the figures are what the README quotes, with the arguments they hold for.
"""
from __future__ import annotations

import inspect
import os
import sys
import time

import numpy as np

from . import _ckpt as K
from . import _common as C
from .restore_none import build_snapshots

NAME = "restore_default"
CHECK_PAGES = 64
FILL_POLL_S = 0.002
FILL_TIMEOUT_S = 120.0
DEFAULT = "default"
NONE = "none"


def restore_defaults(plm) -> dict:
    """restore()'s default prefetch and background arguments, from its signature."""
    sig = inspect.signature(plm.restore)
    return {k: sig.parameters[k].default for k in ("prefetch", "background")}


def _run(plm, path, args, ref, check_pages):
    with C.quiet_gc():
        t0 = C.now_ns()
        if args == DEFAULT:
            r = plm.restore(path)   # deliberately no arguments: the call a user writes first
        else:
            r = plm.restore(path, prefetch="none", background=False)
        t1 = C.now_ns()
        fill = None
        try:
            view = r.ndarray(np.uint8).reshape(-1, C.PAGE)
            bad = int(np.count_nonzero((view[check_pages] != ref.reshape(-1, C.PAGE)[check_pages]).any(axis=1)))
            del view
            st = r.stats()
            if st.get("background_running"):
                deadline = time.monotonic() + FILL_TIMEOUT_S
                while st.get("background_running") and time.monotonic() < deadline:
                    time.sleep(FILL_POLL_S)
                    st = r.stats()
                fill = None if st.get("background_running") else C.now_ns() - t0
            elif st.get("background_pages"):   # the fill finished before the check was done
                fill = C.now_ns() - t0
        finally:
            t2 = C.now_ns()
            r.close()
            t3 = C.now_ns()
    return {"restore": t1 - t0, "close": t3 - t2, "fill": fill}, bad, st


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file = file or sys.stdout
    plm = C.import_plm()
    env = C.environment(plm)
    nbytes = (128 * C.MiB) if quick else C.GiB
    reps = reps or (5 if quick else 9)
    npages = nbytes // C.PAGE
    defaults = restore_defaults(plm)

    rng = np.random.default_rng(20240612)   # restore_none's seed: the same state and snapshots
    variants = [("default_cold", "plain", "cold", DEFAULT), ("none_cold", "plain", "cold", NONE),
                ("default_warm", "plain", "warm", DEFAULT), ("none_warm", "plain", "warm", NONE),
                ("default_ws10_cold", "ws10", "cold", DEFAULT), ("default_ws10_warm", "ws10", "warm", DEFAULT)]
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: plm.restore(path) with its defaults {defaults} (background=None: on unless a page "
              f"server serves the region) vs restore(prefetch='none', background=False), {nbytes // C.MiB} MiB "
              f"snapshot ({npages} pages: 50% zero, 25% duplicate, 25% unique; restore_none's); {reps} reps "
              f"interleaved (+{C.WARMUP} warm-up rep discarded); default Region config; files in {d} "
              f"({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        ref, paths, info, info10 = build_snapshots(plm, d, nbytes, rng, file)

        parts = {v[0]: {"restore": [], "close": [], "fill": []} for v in variants}
        cached, methods, stats, unfinished = {v[0]: [] for v in variants}, set(), {}, {v[0]: 0 for v in variants}
        for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
            for v, snap, cache, args in C.rotate(variants, rep):
                check = rng.choice(npages, CHECK_PAGES, replace=False)
                method, frac = K.prepare(cache, [paths[snap]])
                if cache == "cold":
                    methods.add(method)
                t, bad, st = _run(plm, paths[snap], args, ref, check)
                stats[v] = K.plm_stats(st)
                if bad:
                    problems.append(f"{v} rep {rep}: {bad} of {CHECK_PAGES} checked pages differ from the source")
                if st.get("errors"):
                    problems.append(f"{v} rep {rep}: stats errors={st.get('errors')} last_error={st.get('last_error')!r}")
                if args == DEFAULT and defaults.get("background") is not False and t["fill"] is None:
                    problems.append(f"{v} rep {rep}: the background fill had not finished after {FILL_TIMEOUT_S} s")
                    unfinished[v] += 1
                if rep >= 0:
                    if frac is not None:
                        cached[v].append(frac)
                    for k, ns in t.items():
                        if ns is not None:
                            parts[v][k].append(ns / 1e6)   # ms
        del ref

    rows = {}
    for v, snap, cache, args in variants:
        rows[v] = C.summary(parts[v]["restore"])
        rows[v]["cache"] = cache
        rows[v]["call"] = ("restore(path)  # " + ", ".join(f"{k}={val!r}" for k, val in defaults.items())
                           if args == DEFAULT else "restore(path, prefetch='none', background=False)")
        rows[v]["snapshot"] = snap
        rows[v]["close_ms"] = C.summary(parts[v]["close"])
        if parts[v]["fill"]:
            rows[v]["fill_done_ms"] = C.summary(parts[v]["fill"])
        if cached[v]:
            rows[v]["cached_fraction_max"] = max(cached[v])
        rows[v]["stats"] = stats.get(v, {})
    cold_method = "+".join(sorted(methods)) or "none"

    headers = ["variant", "args", "snapshot", "cache", "ms_med", "min", "max", "reps", "prefetched",
               "fill_done_ms_med", "close_ms_med", "cached_before"]
    C.print_table(headers, [[v, args, snap, cache, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"],
                             rows[v]["stats"].get("prefetched_pages", "-"),
                             rows[v]["fill_done_ms"]["median"] if "fill_done_ms" in rows[v] else "-",
                             rows[v]["close_ms"]["median"],
                             f"{rows[v]['cached_fraction_max']:.0%}" if "cached_fraction_max" in rows[v] else "-"]
                            for v, snap, cache, args in variants], file)
    print(f"# ms = plm.restore() call until it returns; args default = plm.restore(path) "
          f"({', '.join(f'{k}={val!r}' for k, val in defaults.items())}), none = prefetch='none', background=False; "
          f"prefetched = pages loaded before returning (last rep); fill_done = from the call until the background "
          f"fill finished (polled every {FILL_POLL_S * 1e3:.0f} ms); close = Region.close() afterwards; cold = page "
          f"cache dropped via {cold_method}{' (NOT cold)' if cold_method == 'none' else ''}; cached_before = "
          f"fraction of the file cached before (mincore)", file=file)

    # No targets: ratios against prefetch='none' in the same run, so the README's two figures are
    # read side by side (op '>=' 0: always PASS, they are informational).
    ratios = [
        C.ratio("default_vs_none_cold", rows["default_cold"]["median"], rows["none_cold"]["median"], ">=", 0.0,
                "informational: restore(path) / restore(prefetch='none', background=False), cold, no working set"),
        C.ratio("default_vs_none_warm", rows["default_warm"]["median"], rows["none_warm"]["median"], ">=", 0.0,
                "informational: same, file in the page cache"),
        C.ratio("default_ws10_vs_none_cold", rows["default_ws10_cold"]["median"], rows["none_cold"]["median"], ">=",
                0.0, "informational: restore(path) of the snapshot with a 10% working set / prefetch='none', cold"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "defaults": defaults,
            "cold_method": cold_method, "pages_by_class": dict(info.pages_by_class),
            "file_bytes": {"plain": info.file_bytes, "ws10": info10.file_bytes}, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
