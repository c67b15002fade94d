"""Benchmark 3: sequential first touch, per page.

One byte per page, in address order (a numpy strided read over a frombuffer view), over 1 GiB:
  pylazymem_read    region deferred to a canonical page, default readahead, first touch = READ;
  kernel_read_4k    plain anonymous 4 KiB pages (mmap module, MADV_NOHUGEPAGE), first touch = READ
                    (the kernel maps its shared zero page: no allocation, no copy);
  kernel_write_4k   same mapping, first touch = WRITE (the kernel allocates and zeroes a page);
  kernel_read_thp   the kernel's huge-page path: the same mapping with transparent huge pages
                    allowed (MADV_HUGEPAGE when the machine's THP setting is "madvise", no advice
                    when it is "always"), first touch = READ (one fault maps the huge zero page
                    over 2 MiB when use_zero_page is on);
  kernel_write_thp  same, first touch = WRITE (one fault allocates and zeroes a 2 MiB page);
  pylazymem_write   (extra) the deferred region, first touch = WRITE.
Variants are interleaved per repetition; the kernel variants also count the minor faults of the
timed touch (getrusage), which shows whether huge pages were used. pylazymem regions use 4 KiB
pages. Ratios are printed against both kernel paths, side by side. Target: pylazymem_read /
kernel_read_4k <= 1.0x (readahead); the THP ratios are informational (a 4 KiB-page runtime cannot
reach them: the kernel does 512 times fewer faults).
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


def thp_advice(env: dict):
    """(madvise constant or None, description) for the THP baseline on this machine."""
    sel = C.thp_selected(env.get("thp", "?"))
    if sel == "madvise":
        return mmap.MADV_HUGEPAGE, "MADV_HUGEPAGE (THP enabled=madvise)"
    if sel == "always":
        return None, "no madvise (THP enabled=always: the default path)"
    return None, f"no madvise (THP enabled={sel}: no huge pages on this machine, the THP rows are 4 KiB pages)"


def _run_kernel(nbytes, write, thp=False, advice=None):
    """First touch of fresh anonymous memory: 4 KiB pages (MADV_NOHUGEPAGE), or with thp=True the
    huge-page path (`advice`, e.g. MADV_HUGEPAGE, or none). Returns (ns, contents ok, minor faults)."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        if not thp:
            m.madvise(mmap.MADV_NOHUGEPAGE)
        elif advice is not None:
            m.madvise(advice)
        view = np.frombuffer(m, dtype=np.uint8)
        f0 = C.minflt()
        dt, s = _touch(view, write)
        faults = C.minflt() - f0
        ok = bool((view[TOUCH_OFFSET::C.PAGE] == 1).all()) if write else s == 0
        del view
    finally:
        m.close()
    return dt, ok, faults


KERNEL = {  # variant: (write, thp)
    "kernel_read_4k": (False, False), "kernel_write_4k": (True, False),
    "kernel_read_thp": (False, True), "kernel_write_thp": (True, True),
}


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    advice, advice_txt = thp_advice(env)

    rng = np.random.default_rng(20240603)
    template = rng.integers(1, 256, C.PAGE, dtype=np.uint8)

    variants = ["pylazymem_read", "kernel_read_4k", "kernel_read_thp", "kernel_write_4k", "kernel_write_thp",
                "pylazymem_write"]
    print(f"# {NAME}: sequential first touch, one byte per page in address order, {nbytes // C.MiB} MiB = "
          f"{npages} pages, {reps} reps interleaved (+{C.WARMUP} warm-up rep discarded); pylazymem: canonical page "
          f"deferred over the region, default readahead and serving threads; kernel 4k: mmap anonymous MAP_PRIVATE "
          f"+ MADV_NOHUGEPAGE; kernel thp: same + {advice_txt}; main thread unpinned", file=file)
    C.print_environment(env, file)

    samples = {v: [] for v in variants}
    faults = {v: [] for v in variants}
    stats = {}
    problems = []
    for rep in range(-C.WARMUP, reps):  # rep < 0: warm-up, not recorded
        for v in C.rotate(variants, rep):
            if v.startswith("pylazymem"):
                dt, ok, st = _run_plm(plm, nbytes, template, v.endswith("_write"))
                stats[v] = st
                nf = st.get("faults")
            else:
                write, thp = KERNEL[v]
                dt, ok, nf = _run_kernel(nbytes, write, thp, advice)
            if not ok:
                problems.append(f"{v} rep {rep}: contents check failed")
            if rep >= 0:
                samples[v].append(dt / npages)  # ns per page
                faults[v].append(nf)

    rows = {v: C.summary(samples[v]) for v in variants}
    for v in variants:
        rows[v]["faults_median"] = float(np.median(faults[v])) if faults[v] and None not in faults[v] else None
    for v in ("pylazymem_read", "pylazymem_write"):
        st = stats.get(v, {})
        rows[v]["stats"] = {k: st.get(k) for k in ("faults", "readahead_pages", "pages_present",
                                                   "serving_threads", "fault_service_ns", "errors")}
    huge = {v: rows[v]["faults_median"] is not None and rows[v]["faults_median"] * 64 < npages
            for v in ("kernel_read_thp", "kernel_write_thp")}

    headers = ["variant", "first_touch", "pages", "ns/page_med", "min", "max", "reps", "faults", "pages/fault"]
    table = []
    for v in variants:
        nf = rows[v]["faults_median"]
        write = KERNEL[v][0] if v in KERNEL else v.endswith("_write")
        table.append([v, "write" if write else "read",
                      "2M" if huge.get(v) else "4K", rows[v]["median"], rows[v]["min"],
                      rows[v]["max"], rows[v]["n"], nf if nf is not None else "-", (npages / nf) if nf else "-"])
    C.print_table(headers, table, file)
    print(f"# faults = median per touch of 1 GiB: pylazymem = its stats() faults (userfaultfd), kernel = minor "
          f"faults of the touching thread (getrusage); pages = the page size the kernel used (2M if fewer than "
          f"1/64 as many faults as pages)", file=file)
    for v in ("pylazymem_read", "pylazymem_write"):
        st = rows[v]["stats"]
        print(f"# {v} stats (last rep): faults={st.get('faults')} readahead_pages={st.get('readahead_pages')} "
              f"pages_present={st.get('pages_present')} serving_threads={st.get('serving_threads')} "
              f"fault_service_ns={st.get('fault_service_ns')}", file=file)
    if not all(huge.values()):
        print(f"# note: the THP rows did not get huge pages ({', '.join(v for v, h in huge.items() if not h)}): "
              f"their ratios compare against 4 KiB pages", file=file)

    # side by side: pylazymem against the kernel's 4 KiB path and its huge-page path
    print_side_by_side(rows, [("pylazymem_read", "kernel_read"), ("pylazymem_read", "kernel_write"),
                              ("pylazymem_write", "kernel_write")], file)
    ratios = [
        C.ratio("vs_kernel_read_4k", rows["pylazymem_read"]["median"], rows["kernel_read_4k"]["median"], "<=",
                TARGET, "pylazymem READ first touch / kernel READ first touch, 4 KiB pages (zero page, no allocation)"),
        C.ratio("vs_kernel_read_thp", rows["pylazymem_read"]["median"], rows["kernel_read_thp"]["median"], "<=",
                TARGET, "informational: pylazymem READ first touch / kernel READ first touch, THP (huge zero page)"),
        C.ratio("vs_kernel_write_4k", rows["pylazymem_read"]["median"], rows["kernel_write_4k"]["median"], "<=",
                TARGET, "pylazymem READ first touch / kernel WRITE first touch, 4 KiB pages (both allocate a page "
                "per touch)"),
        C.ratio("vs_kernel_write_thp", rows["pylazymem_read"]["median"], rows["kernel_write_thp"]["median"], "<=",
                TARGET, "informational: pylazymem READ first touch / kernel WRITE first touch, THP (2 MiB pages)"),
        C.ratio("write_vs_kernel_write_4k", rows["pylazymem_write"]["median"], rows["kernel_write_4k"]["median"],
                "<=", TARGET, "informational: pylazymem WRITE first touch / kernel WRITE first touch, 4 KiB pages"),
        C.ratio("write_vs_kernel_write_thp", rows["pylazymem_write"]["median"], rows["kernel_write_thp"]["median"],
                "<=", TARGET, "informational: pylazymem WRITE first touch / kernel WRITE first touch, THP"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "env": env,
            "thp_baseline": advice_txt, "thp_used": huge, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


def print_side_by_side(rows, pairs, file, label=None) -> None:
    """One line per (numerator row, kernel row stem): the ratio to the stem's _4k and _thp rows."""
    C.print_table(["ratio", "vs 4K pages", "vs THP"],
                  [[f"{label or num} / {stem}", rows[num]["median"] / rows[stem + "_4k"]["median"],
                    rows[num]["median"] / rows[stem + "_thp"]["median"]] for num, stem in pairs], file)


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
