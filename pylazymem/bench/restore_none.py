"""Checkpoint/restore benchmark 2: time for restore(prefetch="none") to return.

A 1 GiB snapshot of 50% zero, 25% duplicate and 25% unique pages (spread at random; every page
was written before the checkpoint), no working set. Per repetition, interleaved:
  cold       plm.restore(path, prefetch="none", background=False) after sync + dropping the page cache
  warm       the same with the file in the page cache
  cold_ws10  (extra) a snapshot of the same state carrying a 10% working set (its list is read and
             checked at open, prefetch="none" still loads nothing)
  cold_bg    (extra) prefetch="none", background=True (the fill thread is started before returning)
  floors (extra, for reading the numbers): region_only = plm.Region(nbytes) alone (create / close);
             tables_cold / tables_warm = open + pread of the header and of the page map, working set
             and manifest (offsets per docs/snapshot-format.md), what any restore must read before it
             can return
The time until restore() returns and the time of close() (untouched region; with background=True
it stops the fill) are reported separately; 64 random pages are checked against the source after
each timed restore. Target: cold restore <= 5 ms (ratio = median / 5 ms, <= 1.0).
"""
from __future__ import annotations

import os
import struct
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "restore_none"
TARGET_MS = 5.0
CHECK_PAGES = 64


def build_snapshots(plm, d, nbytes, rng, file):
    """The state (50% zero, 25% duplicate, 25% unique pages, every page written) and its two
    snapshots in d: "plain" (no working set) and "ws10" (a random 10% working set). Returns
    (reference copy, {kind: path}, info, info10). Shared with restore_default."""
    npages = nbytes // C.PAGE
    t0 = C.now_ns()
    ref = np.empty(nbytes, np.uint8)
    K.fill_mixed(ref, K.mixed_layout(npages, rng), rng)
    paths = {"plain": os.path.join(d, "state.snap"), "ws10": os.path.join(d, "state_ws10.snap")}
    r0 = plm.Region(nbytes)
    try:
        st = r0.alloc("state", nbytes, np.uint8)
        K.copy_into(st, ref)
        del st
        info = plm.checkpoint(r0, paths["plain"], working_set="none")
        info10 = plm.checkpoint(r0, paths["ws10"],
                                working_set=rng.choice(npages, npages // 10, replace=False))
    finally:
        r0.close()
    os.sync()
    print(f"# setup {(C.now_ns() - t0) / 1e9:.1f} s: snapshot {info.file_bytes / C.MiB:.1f} MiB "
          f"{info.pages_by_class}; with 10% working set {info10.file_bytes / C.MiB:.1f} MiB "
          f"({info10.working_set.size} pages)", file=file)
    return ref, paths, info, info10


def _run(plm, path, background, ref, check_pages):
    with C.quiet_gc():
        t0 = C.now_ns()
        r = plm.restore(path, prefetch="none", background=background)
        t1 = C.now_ns()
        try:
            view = r.ndarray(np.uint8).reshape(-1, C.PAGE)
            bad = int(np.count_nonzero((view[check_pages] != ref.reshape(-1, C.PAGE)[check_pages]).any(axis=1)))
            del view
            st = r.stats()
        finally:
            t2 = C.now_ns()
            r.close()
            t3 = C.now_ns()
    return {"restore": t1 - t0, "close": t3 - t2}, bad, st


def _run_region(plm, nbytes):
    with C.quiet_gc():
        t0 = C.now_ns()
        r = plm.Region(nbytes)
        t1 = C.now_ns()
        r.close()
        t2 = C.now_ns()
    return {"restore": t1 - t0, "close": t2 - t1}


def _run_tables(path):
    with C.quiet_gc():
        t0 = C.now_ns()
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            hdr = os.pread(fd, 4096, 0)
            # docs/snapshot-format.md, header: map_offset, and sigs_offset where the map, working
            # set and manifest end (the signatures after them are not read by restore)
            map_offset = struct.unpack_from("<Q", hdr, 64)[0]
            sigs_offset = struct.unpack_from("<Q", hdr, 112)[0]
            tail = os.pread(fd, sigs_offset - map_offset, map_offset)
        finally:
            os.close(fd)
        t1 = C.now_ns()
    return {"restore": t1 - t0, "close": 0}, len(tail)


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file = file or sys.stdout
    plm = C.import_plm()
    env = C.environment(plm)
    nbytes = (128 * C.MiB) if quick else C.GiB
    reps = reps or (7 if quick else 15)   # cheap: more repetitions than the other benchmarks
    npages = nbytes // C.PAGE

    rng = np.random.default_rng(20240612)
    variants = [("cold", "plain", "cold", False), ("warm", "plain", "warm", False),
                ("cold_ws10", "ws10", "cold", False), ("cold_bg", "plain", "cold", True),
                ("region_only", None, None, False), ("tables_cold", "tables", "cold", False),
                ("tables_warm", "tables", "warm", False)]
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: restore(prefetch='none') of a {nbytes // C.MiB} MiB snapshot ({npages} pages: 50% zero, "
              f"25% duplicate, 25% unique, all written before the checkpoint); {reps} reps interleaved "
              f"(+{C.WARMUP} warm-up rep discarded); default Region config; files in {d} ({K.filesystem(d)})",
              file=file)
        C.print_environment(env, file)
        ref, paths, info, info10 = build_snapshots(plm, d, nbytes, rng, file)

        parts = {v[0]: {"restore": [], "close": []} for v in variants}
        cached, methods, stats = {v[0]: [] for v in variants}, set(), {}
        tail_bytes = 0
        for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
            for v, snap, cache, bg in C.rotate(variants, rep):
                check = rng.choice(npages, CHECK_PAGES, replace=False)
                frac = None
                if cache is not None:
                    method, frac = K.prepare(cache, [paths["plain" if snap == "tables" else snap]])
                    if cache == "cold":
                        methods.add(method)
                if snap is None:
                    t, bad, st = _run_region(plm, nbytes), 0, {}
                elif snap == "tables":
                    t, n = _run_tables(paths["plain"])
                    bad, st = 0, {}
                    tail_bytes = n
                else:
                    t, bad, st = _run(plm, paths[snap], bg, ref, check)
                    stats[v] = K.plm_stats(st)
                if bad:
                    problems.append(f"{v} rep {rep}: {bad} of {CHECK_PAGES} checked pages differ from the source")
                if st.get("errors"):
                    problems.append(f"{v} rep {rep}: stats errors={st.get('errors')} last_error={st.get('last_error')!r}")
                if rep >= 0:
                    if frac is not None:
                        cached[v].append(frac)
                    for k, ns in t.items():
                        parts[v][k].append(ns / 1e6)   # ms
        del ref

    rows = {}
    for v, snap, cache, bg in variants:
        rows[v] = C.summary(parts[v]["restore"])
        rows[v]["cache"] = cache or "-"
        rows[v]["background"] = bg
        rows[v]["close_ms"] = C.summary(parts[v]["close"])
        if cached[v]:
            rows[v]["cached_fraction_max"] = max(cached[v])
        rows[v]["stats"] = stats.get(v, {})
    cold_method = "+".join(sorted(methods)) or "none"

    headers = ["variant", "cache", "bg", "ms_med", "min", "max", "reps", "close_ms_med", "close_max",
               "cached_before"]
    C.print_table(headers, [[v, rows[v]["cache"], str(bg), rows[v]["median"], rows[v]["min"], rows[v]["max"],
                             rows[v]["n"], rows[v]["close_ms"]["median"], rows[v]["close_ms"]["max"],
                             f"{rows[v]['cached_fraction_max']:.0%}" if "cached_fraction_max" in rows[v] else "-"]
                            for v, _, _, bg in variants], file)
    print(f"# ms = plm.restore() call until it returns (region_only: plm.Region(); tables_*: reading the "
          f"{tail_bytes / C.MiB:.1f} MiB of tables); close_ms = Region.close() afterwards ({CHECK_PAGES} "
          f"pages read in between, untimed); cold = page cache dropped via {cold_method}"
          f"{' (NOT cold)' if cold_method == 'none' else ''}; cached_before = fraction of the file cached before "
          f"(mincore)", file=file)

    ratios = [
        C.ratio("cold_vs_5ms", rows["cold"]["median"], TARGET_MS, "<=", 1.0,
                f"restore(prefetch='none') median ms / {TARGET_MS} ms, cold page cache"),
        C.ratio("warm_vs_5ms", rows["warm"]["median"], TARGET_MS, "<=", 1.0,
                f"restore(prefetch='none') median ms / {TARGET_MS} ms, file in the page cache"),
        C.ratio("cold_ws10_vs_5ms", rows["cold_ws10"]["median"], TARGET_MS, "<=", 1.0,
                "informational: same, cold, snapshot carrying a 10% working set"),
        C.ratio("cold_bg_vs_5ms", rows["cold_bg"]["median"], TARGET_MS, "<=", 1.0,
                "informational: same, cold, background=True"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps,
            "cold_method": cold_method, "pages_by_class": dict(info.pages_by_class),
            "file_bytes": info.file_bytes, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
