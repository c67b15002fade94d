"""Checkpoint/restore benchmark 1: the REAP scenario.

State: 1 GiB of random (incompressible) bytes in a named array (Region.alloc). Workload: read one
byte from each of a fixed random 10% of its pages, in a fixed random order (a numpy gather, then
the sum of the bytes read, checked against the in-memory answer in every variant).

Setting up (once, untimed): the state is built in a Region, checkpointed with no working set and
np.save'd (the eager baseline's file). The working set is recorded the way REAP records it: restore
that snapshot lazily (prefetch="none"; restore() opens a new window), run the workload once, and
checkpoint the restored region with working_set="auto" (its untouched pages come from the first
snapshot's store). That second snapshot is the one every lazy variant restores.

Variants, interleaved per repetition (end to end = load/restore + workload):
  eager       np.load of the .npy (reads the whole file into fresh memory), then the workload   (a)
  eager_into  (extra) the .npy read into an array already allocated and populated, then the
              workload: (a) without the cost of fresh memory (large and erratic on this machine)
  none        plm.restore(prefetch="none", background=False), then the workload                 (b)
  ws          plm.restore(prefetch="working-set", background=False), then the workload          (c)
  ws_bg       plm.restore(prefetch="working-set", background=True), then the workload           (c)
  resident    the workload on a plain numpy array already in memory (numpy gets THP)            (d)
              (one untimed read of another cache line of every page first: the mapping is warm)
  resident_4k (extra) the same bytes in anonymous memory with 4 KiB pages (MADV_NOHUGEPAGE)
Each variant also runs the workload a second time right after ("again", not in the totals: the
steady state). File-backed variants run cold (sync + drop the page cache just before) and warm (file read in
just before, untimed). Targets (cold): eager / ws end to end >= 4x; ws workload after restore
returns / resident workload <= 1.10x.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "reap"
FRACTION = 0.10
TOUCH_OFFSET = 321
TARGET_E2E = 4.0
TARGET_WORKLOAD = 1.10
REAP_BAR = 3.7   # REAP (ASPLOS'21): working-set prefetch vs plain lazy restore


def _workload(view, offsets):
    return int(view[offsets].sum(dtype=np.uint64))


def _run_eager(npy, offsets):
    with C.quiet_gc():
        t0 = C.now_ns()
        a = np.load(npy)
        t1 = C.now_ns()
        s = _workload(a, offsets)
        t2 = C.now_ns()
        _workload(a, offsets)
        t3 = C.now_ns()
        del a
        t4 = C.now_ns()
    return {"total": t2 - t0, "restore": t1 - t0, "workload": t2 - t1, "again": t3 - t2, "close": t4 - t3}, s, {}


def _run_eager_into(npy, buf, offsets):
    """(extra) the .npy read into memory that is already allocated and populated (no fresh memory)."""
    int(buf[0::C.PAGE].sum(dtype=np.uint64))   # untimed: the buffer's mapping is warm (see _run_resident)
    with C.quiet_gc():
        t0 = C.now_ns()
        with open(npy, "rb", buffering=0) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if dtype != buf.dtype or int(np.prod(shape)) != buf.size:
                raise RuntimeError(f"{npy}: unexpected array {dtype} {shape}")
            mv, n = memoryview(buf), 0
            while n < buf.size:
                k = f.readinto(mv[n:])
                if not k:
                    raise RuntimeError(f"{npy}: short read")
                n += k
        t1 = C.now_ns()
        s = _workload(buf, offsets)
        t2 = C.now_ns()
        _workload(buf, offsets)
        t3 = C.now_ns()
    return {"total": t2 - t0, "restore": t1 - t0, "workload": t2 - t1, "again": t3 - t2, "close": 0}, s, {}


def _run_lazy(plm, snap, offsets, prefetch, background):
    with C.quiet_gc():
        t0 = C.now_ns()
        r = plm.restore(snap, prefetch=prefetch, background=background)
        t1 = C.now_ns()
        try:
            view = r.arrays["state"]
            t2 = C.now_ns()
            s = _workload(view, offsets)
            t3 = C.now_ns()
            s2 = _workload(view, offsets)   # again: the region in steady state (not in total)
            t4 = C.now_ns()
            del view
            st = r.stats()
        finally:
            t5 = C.now_ns()
            r.close()
            t6 = C.now_ns()
    st = dict(st, _again_ok=(s2 == s))
    return {"total": t3 - t0, "restore": t1 - t0, "workload": t3 - t2, "again": t4 - t3, "close": t6 - t5}, s, st


def _run_resident(arr, offsets):
    # Untimed: read the first cache line of every page, so that the mapping is warm (this machine's
    # host makes the first access to in-use memory left idle for seconds cost up to ~2 us/page, with
    # no guest page fault), while the cache lines the workload reads (byte 321) stay cold.
    int(arr[0::C.PAGE].sum(dtype=np.uint64))
    with C.quiet_gc():
        t0 = C.now_ns()
        s = _workload(arr, offsets)
        t1 = C.now_ns()
        _workload(arr, offsets)
        t2 = C.now_ns()
    return {"total": t1 - t0, "restore": 0, "workload": t1 - t0, "again": t2 - t1, "close": 0}, s, {}


def _setup(plm, d, nbytes, offsets, rng, problems, file):
    """Build the state, the eager .npy and the snapshot with the recorded working set."""
    npages = nbytes // C.PAGE
    ref = np.empty(nbytes, np.uint8)            # the resident copy, variant (d)
    K.fill_random(ref, rng)
    expected = _workload(ref, offsets)
    npy = os.path.join(d, "state.npy")
    base = os.path.join(d, "base.snap")
    snap = os.path.join(d, "state.snap")
    np.save(npy, ref)

    r0 = plm.Region(nbytes)
    try:
        st = r0.alloc("state", nbytes, np.uint8)
        K.copy_into(st, ref)
        # The window on a region whose pages are all present sees writes only (documented):
        # running the read workload there records nothing. Shown, then recorded after a restore.
        r0.mark_working_set()
        if _workload(st, offsets) != expected:
            problems.append("setup: workload on the freshly built region gave a wrong sum")
        ws_present = int(r0.working_set().size)
        del st
        plm.checkpoint(r0, base, working_set="none")
    finally:
        r0.close()

    r1 = plm.restore(base, prefetch="none", background=False)
    try:
        view = r1.arrays["state"]
        if _workload(view, offsets) != expected:
            problems.append("setup: workload on the lazily restored base snapshot gave a wrong sum")
        del view
        ws = r1.working_set()
        rec_stats = r1.stats()
        info = plm.checkpoint(r1, snap, working_set="auto")
        after = r1.stats()
    finally:
        r1.close()
    os.unlink(base)

    touched = offsets // C.PAGE
    wsi = np.asarray(info.working_set, dtype=np.int64)
    if not np.isin(touched, wsi).all():
        problems.append(f"setup: recorded working set ({wsi.size} pages) misses "
                        f"{int((~np.isin(touched, wsi)).sum())} of the {touched.size} pages the workload read")
    if after.get("pages_present") != rec_stats.get("pages_present"):
        problems.append(f"setup: re-checkpoint of the lazily restored region changed pages_present "
                        f"{rec_stats.get('pages_present')} -> {after.get('pages_present')}")
    # the workload's pages appear in the working set in the order the workload first touched them,
    # except pages that a readahead brought in before the workload reached them
    pos = np.full(npages, -1, np.int64)
    pos[wsi] = np.arange(wsi.size)
    tp = pos[touched]
    out_of_order = int(np.count_nonzero(tp[1:] < np.maximum.accumulate(tp)[:-1])) if tp.size > 1 else 0
    os.sync()   # the .npy's writeback happens here, not inside a timed variant
    setup = {"ws_when_all_present": ws_present, "ws_recorded": int(ws.size), "ws_in_snapshot": int(wsi.size),
             "ws_out_of_order": out_of_order, "pages_by_class": dict(info.pages_by_class),
             "snapshot_bytes": info.file_bytes, "npy_bytes": os.path.getsize(npy),
             "recording_faults": rec_stats.get("faults"), "recording_readahead": rec_stats.get("readahead_pages"),
             "npages": npages}
    return ref, expected, npy, snap, setup


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    nreads = max(1, int(npages * FRACTION))

    rng = np.random.default_rng(20240611)
    pages = rng.choice(npages, size=nreads, replace=False)   # fixed random pages, random order
    offsets = pages.astype(np.int64) * C.PAGE + TOUCH_OFFSET

    variants = [  # name, kind, cache
        ("eager_cold", "eager", "cold"), ("eager_into_cold", "eager_into", "cold"), ("none_cold", "none", "cold"), ("ws_cold", "ws", "cold"),
        ("ws_bg_cold", "ws_bg", "cold"), ("resident", "resident", None), ("resident_4k", "resident_4k", None),
        ("eager_warm", "eager", "warm"), ("none_warm", "none", "warm"), ("ws_warm", "ws", "warm"),
        ("ws_bg_warm", "ws_bg", "warm"),
    ]
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB of random bytes in Region.alloc('state'); workload = one byte "
              f"from each of {nreads} fixed random pages ({FRACTION:.0%}, random order, numpy gather + sum); "
              f"{reps} reps interleaved (+{C.WARMUP} warm-up rep discarded); default Region config, main thread "
              f"unpinned; files in {d} ({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        t0 = C.now_ns()
        ref, expected, npy, snap, setup = _setup(plm, d, nbytes, offsets, rng, problems, file)
        anon = K.AnonPages(nbytes)
        K.copy_into(anon.array, ref)
        into = np.empty(nbytes, np.uint8)   # eager_into's destination, populated
        into[:] = 0
        print(f"# setup {(C.now_ns() - t0) / 1e9:.1f} s: snapshot {setup['snapshot_bytes'] / C.MiB:.1f} MiB "
              f"{setup['pages_by_class']}, working set {setup['ws_in_snapshot']} pages recorded after a lazy "
              f"restore (workload pages out of first-touch order: {setup['ws_out_of_order']}; recording run: "
              f"{setup['recording_faults']} faults, {setup['recording_readahead']} readahead pages); "
              f".npy {setup['npy_bytes'] / C.MiB:.1f} MiB", file=file)
        print(f"# note: mark_working_set() + the workload on the freshly built region (all pages present) "
              f"recorded {setup['ws_when_all_present']} pages: a window sees first touches and writes, "
              f"not reads of pages already present (documented), hence the recording after a restore", file=file)

        parts = {v: {k: [] for k in ("total", "restore", "workload", "again", "close")} for v, _, _ in variants}
        stats, cached, methods = {}, {v: [] for v, _, _ in variants}, set()
        try:
            for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
                for v, kind, cache in C.rotate(variants, rep):
                    if cache is not None:
                        method, frac = K.prepare(cache, [npy if kind.startswith("eager") else snap])
                        if cache == "cold":
                            methods.add(method)
                        if rep >= 0 and frac is not None:
                            cached[v].append(frac)
                    if kind == "eager":
                        t, s, st = _run_eager(npy, offsets)
                    elif kind == "eager_into":
                        into[offsets] = 0   # the previous rep's contents must not make a wrong read pass
                        t, s, st = _run_eager_into(npy, into, offsets)
                    elif kind == "none":
                        t, s, st = _run_lazy(plm, snap, offsets, "none", False)
                    elif kind == "ws":
                        t, s, st = _run_lazy(plm, snap, offsets, "working-set", False)
                    elif kind == "ws_bg":
                        t, s, st = _run_lazy(plm, snap, offsets, "working-set", True)
                    elif kind == "resident":
                        t, s, st = _run_resident(ref, offsets)
                    else:
                        t, s, st = _run_resident(anon.array, offsets)
                    if s != expected:
                        problems.append(f"{v} rep {rep}: workload sum {s} != in-memory answer {expected}")
                    if st:
                        if not st.get("_again_ok", True):
                            problems.append(f"{v} rep {rep}: second run of the workload gave a different sum")
                        stats[v] = K.plm_stats(st)
                        if st.get("errors"):
                            problems.append(f"{v} rep {rep}: stats errors={st.get('errors')} "
                                            f"last_error={st.get('last_error')!r}")
                    if rep >= 0:
                        for k, ns in t.items():
                            parts[v][k].append(ns / 1e6)   # ms
        finally:
            anon.close()
            del ref, into

    rows = {}
    for v, kind, cache in variants:
        rows[v] = C.summary(parts[v]["total"])
        rows[v]["cache"] = cache or "-"
        for k in ("restore", "workload", "again", "close"):
            rows[v][k + "_ms_median"] = float(np.median(parts[v][k]))
        if cached[v]:
            rows[v]["cached_fraction_max"] = max(cached[v])
        if v in stats:
            rows[v]["stats"] = stats[v]
    cold_method = "+".join(sorted(methods)) or "none"
    cold_real = cold_method != "none"

    headers = ["variant", "cache", "total_ms_med", "min", "max", "reps", "restore_ms", "workload_ms",
               "again_ms", "close_ms", "faults", "prefetched", "src_MiB_read", "cached_before"]
    table = []
    for v, kind, cache in variants:
        r = rows[v]
        s = r.get("stats", {})
        sb = s.get("source_bytes_read")
        table.append([v, r["cache"], r["median"], r["min"], r["max"], r["n"], r["restore_ms_median"],
                      r["workload_ms_median"], r["again_ms_median"], r["close_ms_median"], s.get("faults", "-"),
                      s.get("prefetched_pages", "-"), (sb / C.MiB) if sb is not None else "-",
                      f"{r['cached_fraction_max']:.0%}" if "cached_fraction_max" in r else "-"])
    C.print_table(headers, table, file)
    print(f"# total = restore (np.load / plm.restore until it returns) + workload; again = the workload run a "
          f"second time right after (steady state, not in total); close (region close / del "
          f"array) is not in total; cold = page cache dropped before each variant via {cold_method}"
          f"{'' if cold_real else ' (NOT cold: could not drop the page cache)'}; cached_before = largest "
          f"fraction of the file in the page cache just before the variant (mincore); stats of the last rep",
          file=file)

    def rr(name, num, den, op, target, what, key_num="median", key_den="median"):
        return C.ratio(name, rows[num][key_num], rows[den][key_den], op, target, what)

    ratios = [
        rr("eager_vs_ws_cold", "eager_cold", "ws_cold", ">=", TARGET_E2E,
           "(a)/(c) end to end, cold: np.load + workload / restore(working-set, background=False) + workload"),
        rr("eager_vs_ws_bg_cold", "eager_cold", "ws_bg_cold", ">=", TARGET_E2E,
           "(a)/(c) end to end, cold, background fill on"),
        rr("ws_workload_vs_resident", "ws_cold", "resident", "<=", TARGET_WORKLOAD,
           "(c)/(d) workload alone: after restore(working-set, background=False) returns (cold) / numpy array "
           "in memory", "workload_ms_median", "workload_ms_median"),
        rr("ws_bg_workload_vs_resident", "ws_bg_cold", "resident", "<=", TARGET_WORKLOAD,
           "(c)/(d) workload alone, background fill running (cold)", "workload_ms_median", "workload_ms_median"),
        rr("ws_workload_vs_resident_4k", "ws_cold", "resident_4k", "<=", TARGET_WORKLOAD,
           "informational: (c) workload / the same workload on resident 4 KiB pages (no THP on either side)",
           "workload_ms_median", "workload_ms_median"),
        rr("ws_again_vs_resident_again", "ws_cold", "resident", "<=", TARGET_WORKLOAD,
           "informational: the workload's second run, restored region (4 KiB pages) / resident numpy array",
           "again_ms_median", "again_ms_median"),
        rr("eager_into_vs_ws_cold", "eager_into_cold", "ws_cold", ">=", TARGET_E2E,
           "informational: (a) reading into already-populated memory (no fresh-memory cost) / (c), cold"),
        rr("eager_vs_ws_warm", "eager_warm", "ws_warm", ">=", TARGET_E2E,
           "informational: (a)/(c) end to end, files in the page cache"),
        rr("none_vs_ws_cold", "none_cold", "ws_cold", ">=", REAP_BAR,
           "informational: (b)/(c) end to end, cold: working-set prefetch vs plain lazy restore (REAP: 3.7x)"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reads": nreads, "reps": reps,
            "cold_method": cold_method, "setup": setup, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
