"""Checkpoint/restore benchmark 3: sequential read of a lazily restored region, per page.

A 1 GiB snapshot of unique random pages (no working set). Per repetition, interleaved:
  plm_cold      restore(prefetch="none", background=False) with the page cache dropped, then one byte
                per page in address order (numpy strided read + sum, checked), ns per page
  plm_warm      the same with the snapshot file in the page cache
  kernel_read_4k   plain anonymous 4 KiB pages (mmap, MADV_NOHUGEPAGE), first touch = READ (zero page)
  kernel_write_4k  same mapping, first touch = WRITE (allocates and zeroes a page)
  kernel_read_thp / kernel_write_thp  the kernel's huge-page path: the same mapping with transparent
                huge pages allowed (MADV_HUGEPAGE when THP is "madvise"; see sequential.py)
  file_cold / file_warm  (extra, the floor) read() of the whole snapshot file into a reused,
                populated 64 MiB buffer, ns per region page: what the disk / page cache delivers
Target: plm / kernel_read_4k <= 1.0x per page (the issue's wording; printed for cold and warm, and
against kernel_write_4k, which like a restore puts a fresh page behind every touch). The same ratios
against the THP rows are printed beside them (informational).
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C
from .sequential import KERNEL, _run_kernel, print_side_by_side, thp_advice

NAME = "restore_sequential"
TARGET = 1.0
TOUCH_OFFSET = 0


def _run_plm(plm, path, expected):
    with C.quiet_gc():
        t0 = C.now_ns()
        r = plm.restore(path, prefetch="none", background=False)
        t1 = C.now_ns()
        try:
            strided = r.ndarray(np.uint8)[TOUCH_OFFSET::C.PAGE]
            t2 = C.now_ns()
            s = int(strided.sum(dtype=np.uint64))
            t3 = C.now_ns()
            del strided
            st = r.stats()
        finally:
            t4 = C.now_ns()
            r.close()
            t5 = C.now_ns()
    return {"read": t3 - t2, "restore": t1 - t0, "close": t5 - t4}, s == expected, st


def _run_file(path):
    with C.quiet_gc():
        t0 = C.now_ns()
        n = K.read_file(path)
        t1 = C.now_ns()
    return {"read": t1 - t0}, n == os.path.getsize(path)


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)

    advice, advice_txt = thp_advice(env)
    rng = np.random.default_rng(20240613)
    variants = [("plm_cold", "plm", "cold"), ("kernel_read_4k", "kernel", None), ("plm_warm", "plm", "warm"),
                ("kernel_write_4k", "kernel", None), ("kernel_read_thp", "kernel", None),
                ("file_cold", "file", "cold"), ("kernel_write_thp", "kernel", None), ("file_warm", "file", "warm")]
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: one byte per page in address order over a lazily restored {nbytes // C.MiB} MiB region "
              f"({npages} unique random pages; restore(prefetch='none', background=False), default Region config "
              f"and readahead) vs kernel anonymous 4 KiB pages (MADV_NOHUGEPAGE) and huge pages ({advice_txt}); "
              f"{reps} reps interleaved "
              f"(+{C.WARMUP} warm-up rep discarded); main thread unpinned; files in {d} ({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        t0 = C.now_ns()
        path = os.path.join(d, "state.snap")
        r0 = plm.Region(nbytes)
        try:
            st = r0.alloc("state", nbytes, np.uint8)
            K.fill_random(st, rng)
            expected = int(st[TOUCH_OFFSET::C.PAGE].sum(dtype=np.uint64))
            del st
            info = plm.checkpoint(r0, path, working_set="none")
        finally:
            r0.close()
        os.sync()
        print(f"# setup {(C.now_ns() - t0) / 1e9:.1f} s: snapshot {info.file_bytes / C.MiB:.1f} MiB "
              f"{info.pages_by_class}", file=file)

        parts = {v: {"read": [], "restore": [], "close": []} for v, _, _ in variants}
        cached, methods, stats = {v: [] for v, _, _ in variants}, set(), {}
        kfaults = {v: [] for v in KERNEL}
        for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
            for v, kind, cache in C.rotate(variants, rep):
                frac = None
                if cache is not None:
                    method, frac = K.prepare(cache, [path])
                    if cache == "cold":
                        methods.add(method)
                if kind == "plm":
                    t, ok, s = _run_plm(plm, path, expected)
                    stats[v] = K.plm_stats(s)
                    if s.get("errors"):
                        problems.append(f"{v} rep {rep}: stats errors={s.get('errors')} "
                                        f"last_error={s.get('last_error')!r}")
                elif kind == "file":
                    t, ok = _run_file(path)
                else:
                    write, thp = KERNEL[v]
                    dt, ok, nf = _run_kernel(nbytes, write, thp, advice)
                    t = {"read": dt}
                    if rep >= 0:
                        kfaults[v].append(nf)
                if not ok:
                    problems.append(f"{v} rep {rep}: contents check failed")
                if rep >= 0:
                    if frac is not None:
                        cached[v].append(frac)
                    for k, ns in t.items():
                        parts[v][k].append(ns / npages if k == "read" else ns / 1e6)

    rows = {}
    for v, kind, cache in variants:
        rows[v] = C.summary(parts[v]["read"])   # ns per page
        rows[v]["cache"] = cache or "-"
        for k in ("restore", "close"):
            if parts[v][k]:
                rows[v][k + "_ms_median"] = float(np.median(parts[v][k]))
        if cached[v]:
            rows[v]["cached_fraction_max"] = max(cached[v])
        if v in stats:
            rows[v]["stats"] = stats[v]
        if kfaults.get(v):
            rows[v]["stats"] = {"faults": float(np.median(kfaults[v]))}   # minor faults of the touch
    cold_method = "+".join(sorted(methods)) or "none"

    headers = ["variant", "cache", "ns/page_med", "min", "max", "reps", "GB/s", "restore_ms", "close_ms", "faults",
               "pages/fault", "readahead", "cached_before"]
    table = []
    for v, kind, cache in variants:
        r = rows[v]
        s = r.get("stats", {})
        f = s.get("faults")
        table.append([v, r["cache"], r["median"], r["min"], r["max"], r["n"], C.PAGE / r["median"],
                      r.get("restore_ms_median", "-"), r.get("close_ms_median", "-"), f if f is not None else "-",
                      (npages / f) if f else "-", s.get("readahead_pages", "-"),
                      f"{r['cached_fraction_max']:.0%}" if "cached_fraction_max" in r else "-"])
    C.print_table(headers, table, file)
    print(f"# ns/page = the strided read (plm: after restore() returned; restore and close not included); GB/s = "
          f"4 KiB / ns per page; cold = page cache dropped via {cold_method}"
          f"{' (NOT cold)' if cold_method == 'none' else ''}; file_* = read() of the snapshot file (floor); "
          f"faults: plm = stats() of the last rep, kernel = median minor faults of the touch (getrusage; "
          f"{npages // 512} = 2 MiB pages)", file=file)

    print_side_by_side(rows, [("plm_cold", "kernel_read"), ("plm_warm", "kernel_read"), ("plm_cold", "kernel_write"),
                              ("plm_warm", "kernel_write")], file)
    ratios = [
        C.ratio("cold_vs_kernel_read_4k", rows["plm_cold"]["median"], rows["kernel_read_4k"]["median"], "<=", TARGET,
                "restored region (cold file) / kernel READ first touch, 4 KiB pages (zero page, no allocation)"),
        C.ratio("cold_vs_kernel_read_thp", rows["plm_cold"]["median"], rows["kernel_read_thp"]["median"], "<=",
                TARGET, "informational: restored region (cold file) / kernel READ first touch, THP (huge zero page)"),
        C.ratio("warm_vs_kernel_read_4k", rows["plm_warm"]["median"], rows["kernel_read_4k"]["median"], "<=", TARGET,
                "restored region (file in page cache) / kernel READ first touch, 4 KiB pages"),
        C.ratio("warm_vs_kernel_read_thp", rows["plm_warm"]["median"], rows["kernel_read_thp"]["median"], "<=",
                TARGET, "informational: restored region (file in page cache) / kernel READ first touch, THP"),
        C.ratio("cold_vs_kernel_write_4k", rows["plm_cold"]["median"], rows["kernel_write_4k"]["median"], "<=",
                TARGET, "informational: cold / kernel WRITE first touch, 4 KiB pages (both put a fresh page behind "
                "every touch)"),
        C.ratio("cold_vs_kernel_write_thp", rows["plm_cold"]["median"], rows["kernel_write_thp"]["median"], "<=",
                TARGET, "informational: cold / kernel WRITE first touch, THP (2 MiB pages)"),
        C.ratio("warm_vs_kernel_write_4k", rows["plm_warm"]["median"], rows["kernel_write_4k"]["median"], "<=",
                TARGET, "informational: warm / kernel WRITE first touch, 4 KiB pages"),
        C.ratio("warm_vs_kernel_write_thp", rows["plm_warm"]["median"], rows["kernel_write_thp"]["median"], "<=",
                TARGET, "informational: warm / kernel WRITE first touch, THP"),
        C.ratio("cold_vs_file_read", rows["plm_cold"]["median"], rows["file_cold"]["median"], "<=", TARGET,
                "informational: cold / read() of the cold file (the disk's floor)"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps,
            "cold_method": cold_method, "file_bytes": info.file_bytes, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
