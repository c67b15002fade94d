"""Benchmark 3: sequential first touch, per page.

One byte per page, in address order (a numpy strided read over a frombuffer view), over 1 GiB:
  pylazymem_read   region deferred to a canonical page, default readahead, first touch = READ;
  kernel_read      plain anonymous 4 KiB pages (mmap module, MADV_NOHUGEPAGE), first touch = READ
                   (the kernel maps its shared zero page: no allocation, no copy);
  kernel_write     same mapping, first touch = WRITE (the kernel allocates and zeroes a page);
  pylazymem_write  (extra) the deferred region, first touch = WRITE.
Variants are interleaved per repetition. Target: pylazymem_read / kernel_read <= 1.0x (readahead);
pylazymem_read / kernel_write is printed as well (both put a fresh page of memory behind every touch).
"""
from __future__ import annotations

import mmap
import sys

import numpy as np

from . import _common as C

NAME = "sequential"
TARGET = 1.0
TOUCH_OFFSET = 0


def _touch(view, write):
    strided = view[TOUCH_OFFSET::C.PAGE]
    with C.quiet_gc():
        t0 = C.now_ns()
        if write:
            strided[...] = 1
            s = None
        else:
            s = int(strided.sum(dtype=np.uint64))
        t1 = C.now_ns()
    return t1 - t0, s


def _run_plm(plm, nbytes, template, write):
    r = plm.Region(nbytes)
    try:
        c = r.canonical(template)
        r.defer_fill(0, r.nbytes, c)
        view = r.ndarray(np.uint8)
        dt, s = _touch(view, write)
        if write:
            ok = bool((view[TOUCH_OFFSET::C.PAGE] == 1).all()) and int(view[C.PAGE + 1]) == int(template[1])
        else:
            ok = s == int(template[TOUCH_OFFSET]) * (nbytes // C.PAGE)
        del view
        st = r.stats()
    finally:
        r.close()
    return dt, ok, st


def _run_kernel(nbytes, write):
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        view = np.frombuffer(m, dtype=np.uint8)
        dt, s = _touch(view, write)
        ok = bool((view[TOUCH_OFFSET::C.PAGE] == 1).all()) if write else s == 0
        del view
    finally:
        m.close()
    return dt, ok


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)

    rng = np.random.default_rng(20240603)
    template = rng.integers(1, 256, C.PAGE, dtype=np.uint8)

    variants = ["pylazymem_read", "kernel_read", "kernel_write", "pylazymem_write"]
    print(f"# {NAME}: sequential first touch, one byte per page in address order, {nbytes // C.MiB} MiB = "
          f"{npages} pages, {reps} reps interleaved (+{C.WARMUP} warm-up rep discarded); pylazymem: canonical page deferred over the region, "
          f"default readahead and serving threads; kernel: mmap anonymous MAP_PRIVATE + MADV_NOHUGEPAGE; "
          f"main thread unpinned", file=file)
    C.print_environment(env, file)

    samples = {v: [] for v in variants}
    stats = {}
    problems = []
    for rep in range(-C.WARMUP, reps):  # rep < 0: warm-up, not recorded
        for v in C.rotate(variants, rep):
            write = v.endswith("_write")
            if v.startswith("pylazymem"):
                dt, ok, st = _run_plm(plm, nbytes, template, write)
                stats[v] = st
            else:
                dt, ok = _run_kernel(nbytes, write)
            if not ok:
                problems.append(f"{v} rep {rep}: contents check failed")
            if rep >= 0:
                samples[v].append(dt / npages)  # ns per page

    rows = {v: C.summary(samples[v]) for v in variants}
    for v in ("pylazymem_read", "pylazymem_write"):
        st = stats.get(v, {})
        rows[v]["stats"] = {k: st.get(k) for k in ("faults", "readahead_pages", "pages_present",
                                                   "serving_threads", "fault_service_ns", "errors")}

    headers = ["variant", "first_touch", "ns/page_med", "min", "max", "reps", "faults", "pages/fault"]
    table = []
    for v in variants:
        st = rows[v].get("stats", {})
        faults = st.get("faults")
        table.append([v, "write" if v.endswith("_write") else "read", rows[v]["median"], rows[v]["min"],
                      rows[v]["max"], rows[v]["n"], faults if faults is not None else "-",
                      (npages / faults) if faults else "-"])
    C.print_table(headers, table, file)
    for v in ("pylazymem_read", "pylazymem_write"):
        st = rows[v]["stats"]
        print(f"# {v} stats (last rep): faults={st.get('faults')} readahead_pages={st.get('readahead_pages')} "
              f"pages_present={st.get('pages_present')} serving_threads={st.get('serving_threads')} "
              f"fault_service_ns={st.get('fault_service_ns')}", file=file)

    ratios = [
        C.ratio("vs_kernel_read", rows["pylazymem_read"]["median"], rows["kernel_read"]["median"], "<=", TARGET,
                "pylazymem READ first touch / kernel READ first touch (zero page, no allocation)"),
        C.ratio("vs_kernel_write", rows["pylazymem_read"]["median"], rows["kernel_write"]["median"], "<=", TARGET,
                "pylazymem READ first touch / kernel WRITE first touch (both allocate a page per touch)"),
        C.ratio("write_vs_kernel_write", rows["pylazymem_write"]["median"], rows["kernel_write"]["median"], "<=",
                TARGET, "informational: pylazymem WRITE first touch / kernel WRITE first touch"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "env": env,
            "rows": rows, "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
