"""Checkpoint/restore benchmark 1: the REAP scenario.

State: 1 GiB of random (incompressible) bytes in a named array (Region.alloc). Two workloads, each
a numpy gather of one byte per page read, then the sum of the bytes read, checked against the
in-memory answer in every variant:
  uniform  one byte from each of a fixed random 10% of the pages, in a fixed random order. The
           working set is recorded on this workload and the SAME offsets are replayed: the best
           case for a recorded working set (a second uniform draw would share only ~10% of it).
  zipf     requests for 128 KiB chunks (32 pages, read in address order; 1 GiB = 8192 chunks, the
           size of the demo's IVF clusters) drawn from a Zipf law (s = 1.3, the demo's; popularity
           a fixed random permutation of the chunks); as many requests as make the expected
           distinct pages 10% of the state. The working set is recorded on sample A and the timed
           workload is sample B, another draw from the same distribution (seed family
           [SEED, 1] / [SEED, 2]): a working set predicting requests it has not seen.

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
  mmap        np.load(mmap_mode="r"), then the workload: the lazy load the kernel gives for free
              (page cache + read-around), beside eager
The zipf section (variant names x_*): eager, mmap, none, ws, ws_bg and resident as above, all
running sample B on the snapshot whose working set was recorded on sample A, and ws_same (extra:
sample A replayed on it, the uniform section's best case for this workload).
Each variant also runs the workload a second time right after ("again", not in the totals: the
steady state). File-backed variants run cold (sync + drop the page cache just before) and warm (file read in
just before, untimed). Targets (cold): eager / ws end to end >= 4x; ws workload after restore
returns / resident workload <= 1.10x; the same for the zipf section (cross-sample); mmap ratios are
informational.
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
ZIPF = 1.3         # the demo's (pylazymem/demo.py)
CHUNK_BYTES = 128 * 1024
ZIPF_SEED = 20241204


def _workload(view, offsets):
    return int(view[offsets].sum(dtype=np.uint64))


def zipf_workload(npages, rng_popularity, fraction=FRACTION):
    """(sample(draw) -> offsets, description): requests for CHUNK_BYTES chunks with Zipf(ZIPF)
    popularity over a fixed random permutation of the chunks, one byte per page of each requested
    chunk in address order, requests in draw order (repeats kept). The number of requests per
    sample makes the expected distinct pages `fraction` of the state."""
    cpages = CHUNK_BYTES // C.PAGE
    nchunks = npages // cpages
    popularity = rng_popularity.permutation(nchunks)
    p = np.arange(1, nchunks + 1, dtype=np.float64) ** -ZIPF
    p /= p.sum()

    def expected_distinct(n):
        return float(np.mean(1.0 - np.exp(n * np.log1p(-p))))

    lo, hi = 1, 1
    while expected_distinct(hi) < fraction:
        hi *= 2
    while lo < hi:   # smallest n with expected distinct >= fraction
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if expected_distinct(mid) < fraction else (lo, mid)
    nreq = lo
    within = np.arange(cpages, dtype=np.int64)

    def sample(draw):
        ranks = draw.choice(nchunks, nreq, p=p)
        chunks = popularity[ranks].astype(np.int64)
        pages = (chunks[:, None] * cpages + within).ravel()
        return pages * C.PAGE + TOUCH_OFFSET

    return sample, {"requests": nreq, "chunks": nchunks, "chunk_pages": cpages, "zipf": ZIPF,
                    "expected_distinct_fraction": expected_distinct(nreq)}


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


def _run_mmap(npy, offsets):
    """np.load(mmap_mode="r"): the file mapped, pages read from the page cache on first touch."""
    with C.quiet_gc():
        t0 = C.now_ns()
        a = np.load(npy, mmap_mode="r")
        t1 = C.now_ns()
        s = _workload(a, offsets)
        t2 = C.now_ns()
        _workload(a, offsets)
        t3 = C.now_ns()
        del a   # the last reference: the file is unmapped
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


def _setup(plm, d, nbytes, recordings, rng, problems, file):
    """Build the state, the eager .npy and, per recording {name: offsets}, a snapshot whose
    working set was recorded on those offsets. Returns (ref, npy, {name: snapshot}, {name: setup})."""
    npages = nbytes // C.PAGE
    ref = np.empty(nbytes, np.uint8)            # the resident copy, variant (d)
    K.fill_random(ref, rng)
    npy = os.path.join(d, "state.npy")
    base = os.path.join(d, "base.snap")
    np.save(npy, ref)

    first = next(iter(recordings.values()))
    r0 = plm.Region(nbytes)
    try:
        st = r0.alloc("state", nbytes, np.uint8)
        K.copy_into(st, ref)
        # The window on a region whose pages are all present sees writes only (documented):
        # running the read workload there records nothing. Shown, then recorded after a restore.
        r0.mark_working_set()
        if _workload(st, first) != _workload(ref, first):
            problems.append("setup: workload on the freshly built region gave a wrong sum")
        ws_present = int(r0.working_set().size)
        del st
        plm.checkpoint(r0, base, working_set="none")
    finally:
        r0.close()

    snaps, setups = {}, {}
    for name, offsets in recordings.items():
        expected = _workload(ref, offsets)
        snap = os.path.join(d, f"state_{name}.snap")
        r1 = plm.restore(base, prefetch="none", background=False)
        try:
            view = r1.arrays["state"]
            if _workload(view, offsets) != expected:
                problems.append(f"setup {name}: workload on the lazily restored base snapshot gave a wrong sum")
            del view
            ws = r1.working_set()
            rec_stats = r1.stats()
            info = plm.checkpoint(r1, snap, working_set="auto")
            after = r1.stats()
        finally:
            r1.close()

        touched = offsets // C.PAGE
        wsi = np.asarray(info.working_set, dtype=np.int64)
        if not np.isin(touched, wsi).all():
            problems.append(f"setup {name}: recorded working set ({wsi.size} pages) misses "
                            f"{int((~np.isin(touched, wsi)).sum())} of the {touched.size} pages the workload read")
        if after.get("pages_present") != rec_stats.get("pages_present"):
            problems.append(f"setup {name}: re-checkpoint of the lazily restored region changed pages_present "
                            f"{rec_stats.get('pages_present')} -> {after.get('pages_present')}")
        # the workload's pages appear in the working set in the order the workload first touched
        # them, except pages that a readahead brought in before the workload reached them
        first_touch = touched[np.sort(np.unique(touched, return_index=True)[1])]
        pos = np.full(npages, -1, np.int64)
        pos[wsi] = np.arange(wsi.size)
        tp = pos[first_touch]
        out_of_order = int(np.count_nonzero(tp[1:] < np.maximum.accumulate(tp)[:-1])) if tp.size > 1 else 0
        snaps[name] = snap
        setups[name] = {"ws_when_all_present": ws_present, "ws_recorded": int(ws.size),
                        "ws_in_snapshot": int(wsi.size), "ws_pages": wsi, "ws_out_of_order": out_of_order,
                        "pages_by_class": dict(info.pages_by_class), "snapshot_bytes": info.file_bytes,
                        "npy_bytes": os.path.getsize(npy), "recording_faults": rec_stats.get("faults"),
                        "recording_readahead": rec_stats.get("readahead_pages"), "npages": npages}
    os.unlink(base)
    os.sync()   # the .npy's writeback happens here, not inside a timed variant
    return ref, npy, snaps, setups


UNIFORM, ZIPF_A, ZIPF_B = "uniform", "zipf_a", "zipf_b"   # workloads
SNAP_OF = {UNIFORM: UNIFORM, ZIPF_A: "zipf", ZIPF_B: "zipf"}   # the snapshot recorded for a workload
VARIANTS = [  # name, kind, cache, workload (timed); the snapshot is the one recorded on SNAP_OF[workload]'s recording
    ("eager_cold", "eager", "cold", UNIFORM), ("eager_into_cold", "eager_into", "cold", UNIFORM),
    ("mmap_cold", "mmap", "cold", UNIFORM), ("none_cold", "none", "cold", UNIFORM),
    ("ws_cold", "ws", "cold", UNIFORM), ("ws_bg_cold", "ws_bg", "cold", UNIFORM),
    ("resident", "resident", None, UNIFORM), ("resident_4k", "resident_4k", None, UNIFORM),
    ("eager_warm", "eager", "warm", UNIFORM), ("mmap_warm", "mmap", "warm", UNIFORM),
    ("none_warm", "none", "warm", UNIFORM), ("ws_warm", "ws", "warm", UNIFORM),
    ("ws_bg_warm", "ws_bg", "warm", UNIFORM),
    # zipf: working set recorded on sample A, timed on sample B (ws_same: A replayed)
    ("x_eager_cold", "eager", "cold", ZIPF_B), ("x_mmap_cold", "mmap", "cold", ZIPF_B),
    ("x_none_cold", "none", "cold", ZIPF_B), ("x_ws_cold", "ws", "cold", ZIPF_B),
    ("x_ws_bg_cold", "ws_bg", "cold", ZIPF_B), ("x_ws_same_cold", "ws", "cold", ZIPF_A),
    ("x_resident", "resident", None, ZIPF_B),
    ("x_eager_warm", "eager", "warm", ZIPF_B), ("x_mmap_warm", "mmap", "warm", ZIPF_B),
    ("x_ws_warm", "ws", "warm", ZIPF_B),
]


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    nreads = max(1, int(npages * FRACTION))

    rng = np.random.default_rng(20240611)
    pages = rng.choice(npages, size=nreads, replace=False)   # fixed random pages, random order
    offsets = {UNIFORM: pages.astype(np.int64) * C.PAGE + TOUCH_OFFSET}
    zipf_sample, zipf_info = zipf_workload(npages, np.random.default_rng([ZIPF_SEED, 0]))
    offsets[ZIPF_A] = zipf_sample(np.random.default_rng([ZIPF_SEED, 1]))   # recorded
    offsets[ZIPF_B] = zipf_sample(np.random.default_rng([ZIPF_SEED, 2]))   # timed: another draw

    variants = VARIANTS
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB of random bytes in Region.alloc('state'); workloads (numpy gather "
              f"+ sum, one byte per page read): uniform = {nreads} fixed random pages ({FRACTION:.0%}, random "
              f"order), recorded and replayed; zipf = {zipf_info['requests']} requests for "
              f"{CHUNK_BYTES // 1024} KiB chunks ({zipf_info['chunks']} chunks, Zipf s={ZIPF}, expected distinct "
              f"pages {zipf_info['expected_distinct_fraction']:.1%}), recorded on sample A, timed on sample B; "
              f"{reps} reps interleaved (+{C.WARMUP} warm-up rep discarded); default Region config, main thread "
              f"unpinned; files in {d} ({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        t0 = C.now_ns()
        ref, npy, snaps, setups = _setup(plm, d, nbytes, {UNIFORM: offsets[UNIFORM], "zipf": offsets[ZIPF_A]},
                                         rng, problems, file)
        expected = {w: _workload(ref, o) for w, o in offsets.items()}
        anon = K.AnonPages(nbytes)
        K.copy_into(anon.array, ref)
        into = np.empty(nbytes, np.uint8)   # eager_into's destination, populated
        into[:] = 0
        print(f"# setup {(C.now_ns() - t0) / 1e9:.1f} s; .npy {setups[UNIFORM]['npy_bytes'] / C.MiB:.1f} MiB",
              file=file)
        for name, setup in setups.items():
            print(f"# snapshot {name}: {setup['snapshot_bytes'] / C.MiB:.1f} MiB {setup['pages_by_class']}, working "
                  f"set {setup['ws_in_snapshot']} pages recorded after a lazy restore (workload pages out of "
                  f"first-touch order: {setup['ws_out_of_order']}; recording run: {setup['recording_faults']} "
                  f"faults, {setup['recording_readahead']} readahead pages)", file=file)
        wsa = setups["zipf"]["ws_pages"]
        pa, pb = np.unique(offsets[ZIPF_A] // C.PAGE), np.unique(offsets[ZIPF_B] // C.PAGE)
        reads_b = offsets[ZIPF_B] // C.PAGE
        cross = {"sample_a_pages": int(pa.size), "sample_b_pages": int(pb.size),
                 "a_b_shared_pages": int(np.intersect1d(pa, pb).size),
                 "b_pages_in_ws": float(np.isin(pb, wsa).mean()),
                 "b_reads_in_ws": float(np.isin(reads_b, wsa).mean()),
                 "b_reads": int(reads_b.size), **zipf_info}
        print(f"# zipf: sample A touches {cross['sample_a_pages']} distinct pages, sample B "
              f"{cross['sample_b_pages']} ({cross['b_reads']} page reads with repeats); shared "
              f"{cross['a_b_shared_pages']}; B's distinct pages in A's recorded working set: "
              f"{cross['b_pages_in_ws']:.1%}, B's page reads in it: {cross['b_reads_in_ws']:.1%}", file=file)
        for name in setups:
            setups[name].pop("ws_pages")
        print(f"# note: mark_working_set() + the workload on the freshly built region (all pages present) "
              f"recorded {setups[UNIFORM]['ws_when_all_present']} pages: a window sees first touches and writes, "
              f"not reads of pages already present (documented), hence the recording after a restore", file=file)

        parts = {v[0]: {k: [] for k in ("total", "restore", "workload", "again", "close")} for v in variants}
        stats, cached, methods = {}, {v[0]: [] for v in variants}, set()
        try:
            for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
                for v, kind, cache, w in C.rotate(variants, rep):
                    o, snap = offsets[w], snaps[SNAP_OF[w]]
                    if cache is not None:
                        method, frac = K.prepare(cache, [npy if kind in ("eager", "eager_into", "mmap") else snap])
                        if cache == "cold":
                            methods.add(method)
                        if rep >= 0 and frac is not None:
                            cached[v].append(frac)
                    if kind == "eager":
                        t, s, st = _run_eager(npy, o)
                    elif kind == "eager_into":
                        into[o] = 0   # the previous rep's contents must not make a wrong read pass
                        t, s, st = _run_eager_into(npy, into, o)
                    elif kind == "mmap":
                        t, s, st = _run_mmap(npy, o)
                    elif kind == "none":
                        t, s, st = _run_lazy(plm, snap, o, "none", False)
                    elif kind == "ws":
                        t, s, st = _run_lazy(plm, snap, o, "working-set", False)
                    elif kind == "ws_bg":
                        t, s, st = _run_lazy(plm, snap, o, "working-set", True)
                    elif kind == "resident":
                        t, s, st = _run_resident(ref, o)
                    else:
                        t, s, st = _run_resident(anon.array, o)
                    if s != expected[w]:
                        problems.append(f"{v} rep {rep}: workload sum {s} != in-memory answer {expected[w]}")
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
    for v, kind, cache, w in variants:
        rows[v] = C.summary(parts[v]["total"])
        rows[v]["cache"] = cache or "-"
        rows[v]["workload_kind"] = w
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
    for title, section in (("uniform 10% pages, working set recorded and replayed on the same offsets",
                            [v for v in variants if v[3] == UNIFORM]),
                           ("zipf chunks, working set recorded on sample A, timed on sample B (ws_same: A)",
                            [v for v in variants if v[3] != UNIFORM])):
        print(f"## {title}", file=file)
        table = []
        for v, kind, cache, w in section:
            r = rows[v]
            s = r.get("stats", {})
            sb = s.get("source_bytes_read")
            table.append([v, r["cache"], r["median"], r["min"], r["max"], r["n"], r["restore_ms_median"],
                          r["workload_ms_median"], r["again_ms_median"], r["close_ms_median"], s.get("faults", "-"),
                          s.get("prefetched_pages", "-"), (sb / C.MiB) if sb is not None else "-",
                          f"{r['cached_fraction_max']:.0%}" if "cached_fraction_max" in r else "-"])
        C.print_table(headers, table, file)
    print(f"# total = restore (np.load / np.load(mmap_mode='r') / plm.restore until it returns) + workload; again = "
          f"the workload run a second time right after (steady state, not in total); close (region close / del "
          f"array) is not in total; cold = page cache dropped before each variant via {cold_method}"
          f"{'' if cold_real else ' (NOT cold: could not drop the page cache)'}; cached_before = largest "
          f"fraction of the file in the page cache just before the variant (mincore); stats of the last rep",
          file=file)

    def rr(name, num, den, op, target, what, key_num="median", key_den="median"):
        return C.ratio(name, rows[num][key_num], rows[den][key_den], op, target, what)

    W = ("workload_ms_median", "workload_ms_median")
    ratios = [
        rr("eager_vs_ws_cold", "eager_cold", "ws_cold", ">=", TARGET_E2E,
           "(a)/(c) end to end, cold: np.load + workload / restore(working-set, background=False) + workload"),
        rr("eager_vs_ws_bg_cold", "eager_cold", "ws_bg_cold", ">=", TARGET_E2E,
           "(a)/(c) end to end, cold, background fill on"),
        rr("mmap_vs_ws_cold", "mmap_cold", "ws_cold", ">=", 1.0,
           "informational: np.load(mmap_mode='r') + workload / restore(working-set) + workload, cold"),
        rr("mmap_vs_ws_bg_cold", "mmap_cold", "ws_bg_cold", ">=", 1.0,
           "informational: np.load(mmap_mode='r') + workload / restore(working-set, background=True) + workload, cold"),
        rr("ws_workload_vs_resident", "ws_cold", "resident", "<=", TARGET_WORKLOAD,
           "(c)/(d) workload alone: after restore(working-set, background=False) returns (cold) / numpy array "
           "in memory", *W),
        rr("ws_bg_workload_vs_resident", "ws_bg_cold", "resident", "<=", TARGET_WORKLOAD,
           "(c)/(d) workload alone, background fill running (cold)", *W),
        rr("ws_workload_vs_resident_4k", "ws_cold", "resident_4k", "<=", TARGET_WORKLOAD,
           "informational: (c) workload / the same workload on resident 4 KiB pages (no THP on either side)", *W),
        rr("ws_again_vs_resident_again", "ws_cold", "resident", "<=", TARGET_WORKLOAD,
           "informational: the workload's second run, restored region (4 KiB pages) / resident numpy array",
           "again_ms_median", "again_ms_median"),
        rr("eager_into_vs_ws_cold", "eager_into_cold", "ws_cold", ">=", TARGET_E2E,
           "informational: (a) reading into already-populated memory (no fresh-memory cost) / (c), cold"),
        rr("eager_vs_ws_warm", "eager_warm", "ws_warm", ">=", TARGET_E2E,
           "informational: (a)/(c) end to end, files in the page cache"),
        rr("mmap_vs_ws_warm", "mmap_warm", "ws_warm", ">=", 1.0,
           "informational: np.load(mmap_mode='r') / restore(working-set), end to end, files in the page cache"),
        rr("none_vs_ws_cold", "none_cold", "ws_cold", ">=", REAP_BAR,
           "informational: (b)/(c) end to end, cold: working-set prefetch vs plain lazy restore (REAP: 3.7x)"),
        # zipf, cross-sample: recorded on A, timed on B
        rr("x_eager_vs_ws_cold", "x_eager_cold", "x_ws_cold", ">=", TARGET_E2E,
           "zipf, recorded on A / timed on B: np.load + workload / restore(working-set, background=False) + "
           "workload, cold"),
        rr("x_eager_vs_ws_bg_cold", "x_eager_cold", "x_ws_bg_cold", ">=", TARGET_E2E,
           "zipf A/B: same, background fill on (restore()'s defaults)"),
        rr("x_mmap_vs_ws_cold", "x_mmap_cold", "x_ws_cold", ">=", 1.0,
           "informational: zipf A/B: np.load(mmap_mode='r') + workload / restore(working-set) + workload, cold"),
        rr("x_mmap_vs_ws_bg_cold", "x_mmap_cold", "x_ws_bg_cold", ">=", 1.0,
           "informational: zipf A/B: np.load(mmap_mode='r') + workload / restore(working-set, background=True) + "
           "workload, cold"),
        rr("x_ws_workload_vs_resident", "x_ws_cold", "x_resident", "<=", TARGET_WORKLOAD,
           "zipf A/B: workload alone after restore(working-set, background=False) returns (cold) / in memory", *W),
        rr("x_ws_bg_workload_vs_resident", "x_ws_bg_cold", "x_resident", "<=", TARGET_WORKLOAD,
           "zipf A/B: workload alone, background fill running (cold) / in memory", *W),
        rr("x_none_vs_ws_cold", "x_none_cold", "x_ws_cold", ">=", REAP_BAR,
           "informational: zipf A/B, end to end, cold: working-set prefetch vs plain lazy restore (REAP: 3.7x)"),
        rr("x_ws_vs_ws_same_cold", "x_ws_cold", "x_ws_same_cold", "<=", 1.0,
           "informational: zipf, cold, end to end: timed on B / on A itself (the cost of an unseen sample)"),
        rr("x_eager_vs_ws_warm", "x_eager_warm", "x_ws_warm", ">=", TARGET_E2E,
           "informational: zipf A/B, end to end, files in the page cache"),
        rr("x_mmap_vs_ws_warm", "x_mmap_warm", "x_ws_warm", ">=", 1.0,
           "informational: zipf A/B, np.load(mmap_mode='r') / restore(working-set), files in the page cache"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reads": nreads, "reps": reps,
            "cold_method": cold_method, "setup": setups, "zipf": cross, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
