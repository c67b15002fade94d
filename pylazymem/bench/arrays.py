"""Named arrays (issue 14): plm.save / plm.load beside safetensors, np.load(mmap_mode="r") and torch.load.

State: 200 named tensors in 40 model-shaped layers (2 GiB; quick: 64 MiB), per layer
``layers.{i}.attn.qkv`` (d, 3d), ``attn.out`` (d, d), ``mlp.up`` (d, 4d), ``mlp.down`` (4d, d) in
float16 and ``norm`` (2, d) in float32, d chosen so the state is just under the size asked;
values from a fixed seed per tensor. Saved once per format (untimed, save times shown): plm.save
(its working set then recorded by a first plm.load that runs the first inference, and
plm.record_working_set), safetensors.numpy.save_file, one np.save'd .npy per tensor in a
directory, torch.save where torch is importable. Every file is fsync'ed after writing.

The "inference" reads every byte of a tensor once: the wrapping uint64 sum of its words, checked
against the sum computed at generation (one wrong byte changes it). The first inference runs over
the tensors of the first 10% of the layers (4 of 40: 20 tensors, 10% of the bytes).

Every run is one fresh spawned worker process (``sys.executable -c``, not a fork): numpy,
pylazymem and the peer libraries are imported before the clock starts; the worker times its
load and its work with perf_counter_ns and sends the figures back as a JSON line.

  first     time from the load call until the first inference is done, page cache cold:
            plm_ws (plm.load, prefetch="working-set", background=False), plm_ws_bg (the same with
            background=True), plm_none (prefetch="none", background=False), plm_safetensors
            (plm.load of the .safetensors file itself, prefetch="none", where that is built);
            st_load_file
            (safetensors.numpy.load_file: every tensor read into memory, eager), st_safe_open
            (safe_open(framework="numpy"), get_tensor of each tensor the inference needs),
            npy_mmap (np.load(mmap_mode="r") of every .npy), torch_load (eager) and
            torch_load_mmap (torch.load(mmap=True)) where torch is installed.
            Targets: plm_ws <= the fastest peer; eager / plm_ws >= 3x.
  resident  time from the load call until every tensor is resident, page cache cold:
            plm_bg_wait (prefetch="working-set", background=True, then region.stats() polled every
            POLL_S until pages_present covers the region), plm_materialize (prefetch="working-set",
            background=False, then region.materialize()); st_load_file; npy_load (np.load of every
            .npy); npy_mmap_touch (np.load(mmap_mode="r") + one word read per page of every
            tensor); torch_load / torch_load_mmap + touch where installed. After the clock stops,
            every tensor is checked in full. Target: plm_bg_wait <= 1.2x the fastest peer.
  pss       4 workers at once load the state (files in the page cache), each checks every tensor
            in full (reads all of it) and waits; with all 4 alive and done, each reports its Pss
            (/proc/self/smaps_rollup). Reported: the sum of the 4 (Pss at the barrier - Pss before
            loading) / one copy's size. plm_shared (plm.load(path, share=True), other arguments
            default), plm_private (share=False), npy_mmap, st_load_file, torch_load_mmap where
            installed. Target: plm_shared <= 1.3.

"cold" = POSIX_FADV_DONTNEED on every file of every format (after fsync), just before each run:
only this benchmark's files leave the page cache, not the whole machine's (other work runs
here); mincore shows how much of the run's files was still cached (cached_before). Variants
whose library or API is missing are not run and are listed as absent (result["absent"]), never
replaced by something else.
"""
from __future__ import annotations

import gc
import importlib.util
import inspect
import math
import os
import resource
import sys
import time

import numpy as np

from . import _ckpt as K
from . import _common as C
from . import shared as S

NAME = "arrays"
MODULE = "pylazymem.bench.arrays"
PARTS = ("first", "resident", "pss")
NLAYERS = 40
PER_LAYER = ("attn.qkv", "attn.out", "mlp.up", "mlp.down", "norm")   # 40 x 5 = 200 tensors
FIRST_LAYERS = NLAYERS // 10     # the first inference: the first 10% of the layers
SEED = 20250114
NPROCS = 4
POLL_S = 0.001                  # resident/plm_bg_wait: how often the worker polls region.stats()
RESIDENT_TIMEOUT_S = 600.0
TARGET_FIRST = 1.0              # plm_ws / fastest peer
TARGET_EAGER = 3.0              # eager peer / plm_ws
TARGET_RESIDENT = 1.2           # plm_bg_wait / fastest peer
TARGET_PSS = 1.3                # sum of 4 Pss deltas / one copy
SIZES = (64 * C.MiB, 2 * C.GiB)  # (quick, full)
REPS = {"first": (2, 7), "resident": (2, 5), "pss": (1, 3)}   # (quick, full)

# variant: (format it reads, eager or lazy); the order is the tables'
FIRST = {"plm_ws": ("plm", "lazy"), "plm_ws_bg": ("plm", "lazy"), "plm_none": ("plm", "lazy"),
         "plm_safetensors": ("plm_foreign", "lazy"),
         "st_load_file": ("safetensors", "eager"), "st_safe_open": ("safetensors", "lazy"),
         "npy_mmap": ("npy", "lazy"), "torch_load": ("torch", "eager"), "torch_load_mmap": ("torch", "lazy")}
RESIDENT = {"plm_bg_wait": ("plm", "lazy"), "plm_materialize": ("plm", "lazy"),
            "st_load_file": ("safetensors", "eager"), "npy_load": ("npy", "eager"),
            "npy_mmap_touch": ("npy", "lazy"), "torch_load": ("torch", "eager"),
            "torch_load_mmap": ("torch", "lazy")}
PSS = {"plm_shared": ("plm_share", "lazy"), "plm_private": ("plm", "lazy"), "npy_mmap": ("npy", "lazy"),
       "st_load_file": ("safetensors", "eager"), "torch_load_mmap": ("torch", "lazy")}
# plm.load's arguments per variant
PLM_ARGS = {"plm_ws": {"prefetch": "working-set", "background": False},
            "plm_ws_bg": {"prefetch": "working-set", "background": True},
            "plm_none": {"prefetch": "none", "background": False},
            "plm_safetensors": {"prefetch": "none", "background": False},
            "plm_bg_wait": {"prefetch": "working-set", "background": True},
            "plm_materialize": {"prefetch": "working-set", "background": False},
            "plm_shared": {"share": True}, "plm_private": {"share": False}}


# ---- availability ------------------------------------------------------------------------------

def plm_unavailable(plm) -> str | None:
    """None when this build has issue 14's plm.save / plm.load / plm.record_working_set with the
    arguments the benchmark passes, else why not."""
    missing = [f for f in ("save", "load", "record_working_set") if not callable(getattr(plm, f, None))]
    if missing:
        return "pylazymem." + ", pylazymem.".join(missing) + " absent in this build (issue 14 not built)"
    params = inspect.signature(plm.load).parameters
    missing = [k for k in ("prefetch", "background", "share") if k not in params]
    if missing:
        return f"plm.load() has no {', '.join(missing)} argument in this build"
    return None


def share_unavailable(plm) -> str | None:
    f = plm.features()
    if not getattr(f, "shared_pages", False):
        return f"features().shared_pages is false: {getattr(f, 'shared_pages_reason', '') or '?'}"
    return None


def availability(plm) -> dict:
    """{format: None (available) or why not}: plm, plm_share, safetensors, npy, torch."""
    why = plm_unavailable(plm)
    out = {"plm": why, "plm_share": why or share_unavailable(plm), "npy": None}
    for fmt, mod in (("safetensors", "safetensors"), ("torch", "torch")):
        out[fmt] = None if importlib.util.find_spec(mod) else f"{mod} is not importable here"
    # plm.load of the .safetensors file (pylazymem/_foreign.py): needs that file too
    out["plm_foreign"] = why or out["safetensors"] or (
        None if importlib.util.find_spec("pylazymem._foreign") else
        "pylazymem._foreign absent: plm.load of a .safetensors file not built")
    return out


# ---- the state ---------------------------------------------------------------------------------

def layout(nbytes: int) -> list:
    """[(name, shape, dtype)] of the 200 tensors; d (a multiple of 8, so that every tensor is a
    whole number of uint64 words) makes the total just under nbytes: 40 x (24 d^2 + 8 d) bytes."""
    d = max(8, int(math.sqrt(nbytes / (NLAYERS * 24))) // 8 * 8)
    while NLAYERS * (24 * d * d + 8 * d) > nbytes and d > 8:
        d -= 8
    shapes = {"attn.qkv": ((d, 3 * d), np.float16), "attn.out": ((d, d), np.float16),
              "mlp.up": ((d, 4 * d), np.float16), "mlp.down": ((4 * d, d), np.float16),
              "norm": ((2, d), np.float32)}
    return [(f"layers.{i}.{k}", shapes[k][0], np.dtype(shapes[k][1])) for i in range(NLAYERS) for k in PER_LAYER]


def first_names(names) -> list:
    """The tensors of the first FIRST_LAYERS layers, in layer order."""
    prefixes = tuple(f"layers.{i}." for i in range(FIRST_LAYERS))
    return [n for n in names if n.startswith(prefixes)]


def make_tensor(index: int, name: str, shape, dtype) -> np.ndarray:
    """The tensor's values: weights ~ N(0, 0.02) in float16, norms ~ 1 + N(0, 0.1) in float32;
    seed [SEED, index], so a tensor is the same in every run."""
    rng = np.random.default_rng([SEED, index])
    n = int(np.prod(shape))
    x = rng.standard_normal(n, dtype=np.float32)
    x *= 0.1 if name.endswith("norm") else 0.02
    if name.endswith("norm"):
        x += 1.0
    return x.astype(dtype).reshape(shape)


def word_sum(a) -> int:
    """The "inference": the wrapping uint64 sum of the tensor's words; reads every byte once."""
    return int(np.asarray(a).reshape(-1).view(np.uint64).sum(dtype=np.uint64))


def page_touch(a) -> None:
    """Read one word per page of a tensor (its pages mapped and resident, no full pass)."""
    w = np.asarray(a).reshape(-1).view(np.uint64)
    int(w[::C.PAGE // 8].sum(dtype=np.uint64))


def _fsync(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(plm, d, nbytes, avail, problems) -> dict:
    """Generate the state and save it once per available format. Returns paths, names, the
    expected sums and what saving took."""
    spec = layout(nbytes)
    names = [n for n, _, _ in spec]
    first = first_names(names)
    t0 = C.now_ns()
    state = {n: make_tensor(i, n, s, dt) for i, (n, s, dt) in enumerate(spec)}
    expected = {n: word_sum(a) for n, a in state.items()}
    total = sum(a.nbytes for a in state.values())
    info = {"names": names, "first": first, "expected": expected, "nbytes": total, "d": spec[1][1][0],
            "first_bytes": sum(state[n].nbytes for n in first), "gen_s": (C.now_ns() - t0) / 1e9,
            "save_ms": {}, "file_bytes": {}, "paths": {}, "files": {}}
    paths = info["paths"]

    def timed(fmt, fn, files):
        t = C.now_ns()
        fn()
        for f in files:
            _fsync(f)
        info["save_ms"][fmt] = (C.now_ns() - t) / 1e6
        info["files"][fmt] = list(files)
        info["file_bytes"][fmt] = sum(os.path.getsize(f) for f in files)

    npy_dir = os.path.join(d, "npy")
    os.mkdir(npy_dir)
    paths["npy"] = npy_dir
    npy_files = [os.path.join(npy_dir, n + ".npy") for n in names]

    def save_npy():
        for n, f in zip(names, npy_files):
            np.save(f, state[n])

    timed("npy", save_npy, npy_files)
    if avail["safetensors"] is None:
        import safetensors.numpy as stn

        paths["safetensors"] = os.path.join(d, "state.safetensors")
        timed("safetensors", lambda: stn.save_file(state, paths["safetensors"]), [paths["safetensors"]])
    if avail["torch"] is None:
        import torch

        paths["torch"] = os.path.join(d, "state.pt")
        timed("torch", lambda: torch.save({n: torch.from_numpy(a) for n, a in state.items()}, paths["torch"]),
              [paths["torch"]])
    if avail["plm"] is None:
        paths["plm"] = os.path.join(d, "state.plm")
        timed("plm", lambda: plm.save(paths["plm"], state), [paths["plm"]])
        del state
        info["record"] = _record(plm, paths["plm"], first, expected, problems)
        _fsync(paths["plm"])
        info["file_bytes"]["plm"] = os.path.getsize(paths["plm"])
    else:
        del state
    os.sync()
    return info


def _record(plm, path, first, expected, problems) -> dict:
    """The working set the way a user records it: load lazily, run the first inference, store
    what it touched (plm.record_working_set rewrites the file)."""
    t0 = C.now_ns()
    st = plm.load(path, prefetch="none", background=False)
    try:
        for n in first:
            if word_sum(st[n]) != expected[n]:
                problems.append(f"setup: {n} read back wrong from the first plm.load")
        touched = st.working_set()
        stats = st.region.stats()
        res = plm.record_working_set(path, st)
    finally:
        st.close()
    out = {"pages": int(np.asarray(touched).size), "faults": stats.get("faults"),
           "readahead_pages": stats.get("readahead_pages"), "ms": (C.now_ns() - t0) / 1e6}
    ws = getattr(res, "working_set", None)
    if ws is not None:
        out["stored_pages"] = int(np.asarray(ws).size)
    return out


# ---- page cache ---------------------------------------------------------------------------------

def drop(paths) -> str:
    """fsync + POSIX_FADV_DONTNEED on each file: its clean cached pages leave the page cache
    (only this benchmark's files: the machine's other work keeps its cache)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def cached(paths) -> float | None:
    """Fraction of the files' bytes in the page cache (mincore), weighted by size."""
    tot = got = 0
    for p in paths:
        f = K.cached_fraction(p)
        if f is None:
            return None
        n = os.path.getsize(p)
        tot += n
        got += f * n
    return got / tot if tot else 0.0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return ", ".join(f.read().split()[:3])


def page_cache_note() -> str:
    m = S.meminfo(("Cached", "MemFree", "MemAvailable", "Dirty"))
    return ", ".join(f"{k} {v / C.GiB:.2f} GiB" for k, v in m.items())


# ---- the worker process ------------------------------------------------------------------------------

class _Loaded:
    """A loaded state in a worker: get(name) -> numpy array; close()."""

    def __init__(self, get, close=None, region=None):
        self.get, self._close, self.region = get, close, region

    def close(self):
        if self._close is not None:
            self._close()
            self._close = None


def _load(plm, variant, paths, names) -> _Loaded:
    """The variant's load call (timed by the caller)."""
    if variant.startswith("plm_"):
        st = plm.load(paths["safetensors" if variant == "plm_safetensors" else "plm"], **PLM_ARGS[variant])
        return _Loaded(st.__getitem__, st.close, st.region)
    if variant == "st_load_file":
        import safetensors.numpy as stn

        return _Loaded(stn.load_file(paths["safetensors"]).__getitem__)
    if variant == "st_safe_open":
        from safetensors import safe_open

        f = safe_open(paths["safetensors"], framework="numpy")
        return _Loaded(f.get_tensor)
    if variant.startswith("npy_"):
        mode = None if variant == "npy_load" else "r"
        arrays = {n: np.load(os.path.join(paths["npy"], n + ".npy"), mmap_mode=mode) for n in names}
        return _Loaded(arrays.__getitem__)
    if variant.startswith("torch_"):
        import torch

        sd = torch.load(paths["torch"], weights_only=True, **({"mmap": True} if variant.endswith("mmap") else {}))
        return _Loaded(lambda n: sd[n].numpy())
    raise ValueError(f"unknown variant {variant!r}")


def _usage():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_majflt, u.ru_minflt


def _region_stats(ld) -> dict:
    if ld.region is None:
        return {}
    st = ld.region.stats()
    return dict(K.plm_stats(st), **{k: st[k] for k in S.SHARE_STATS if k in st})


def _wrong(ld, names, expected) -> list:
    return [n for n in names if word_sum(ld.get(n)) != expected[n]]


def _op_first(plm, held, cmd):
    names, first, expected = cmd["names"], cmd["first"], cmd["expected"]
    m0 = _usage()
    with C.quiet_gc():
        t0 = C.now_ns()
        ld = _load(plm, cmd["variant"], cmd["paths"], names)
        t1 = C.now_ns()
        sums = {n: word_sum(ld.get(n)) for n in first}
        t2 = C.now_ns()
    m1 = _usage()
    st = _region_stats(ld)
    ld.close()
    return {"total_ns": t2 - t0, "load_ns": t1 - t0, "infer_ns": t2 - t1, "majflt": m1[0] - m0[0], "minflt": m1[1] - m0[1],
            "wrong": [n for n in first if sums[n] != expected[n]], "stats": st}


def _op_resident(plm, held, cmd):
    names, expected, v = cmd["names"], cmd["expected"], cmd["variant"]
    m0 = _usage()
    how = "load"
    with C.quiet_gc():
        t0 = C.now_ns()
        ld = _load(plm, v, cmd["paths"], names)
        t1 = C.now_ns()
        if v == "plm_bg_wait":
            npages = ld.region.nbytes // C.PAGE
            deadline = time.monotonic() + RESIDENT_TIMEOUT_S
            while True:
                s = ld.region.stats()
                if s["pages_present"] >= npages:
                    how = "pages_present"
                    break
                if not s["background_running"]:
                    how = f"background done, {s['pages_present']} of {npages} pages present"
                    break
                if time.monotonic() > deadline:
                    how = f"timed out, {s['pages_present']} of {npages} pages present"
                    break
                time.sleep(POLL_S)
        elif v == "plm_materialize":
            ld.region.materialize()
            how = "materialize"
        elif v.endswith(("mmap", "mmap_touch")):
            for n in names:
                page_touch(ld.get(n))
            how = "one word per page"
        t2 = C.now_ns()
    m1 = _usage()
    st = _region_stats(ld)
    wrong = _wrong(ld, names, expected)   # untimed: every byte of every tensor
    ld.close()
    return {"total_ns": t2 - t0, "load_ns": t1 - t0, "how": how, "majflt": m1[0] - m0[0],
            "minflt": m1[1] - m0[1], "wrong": wrong, "stats": st}


def _op_touch_all(plm, held, cmd):
    gc.collect()
    pss0 = S.smaps_rollup()["Pss"]
    t0 = C.now_ns()
    ld = _load(plm, cmd["variant"], cmd["paths"], cmd["names"])
    t1 = C.now_ns()
    wrong = _wrong(ld, cmd["names"], cmd["expected"])   # reads every byte
    t2 = C.now_ns()
    held.append(ld)
    info = {}
    if ld.region is not None and cmd["variant"] == "plm_shared":
        info = {"shared": bool(getattr(ld.region, "shared", False)), "pool": dict(ld.region.pool or {})}
    return {"pss_before": pss0, "load_ns": t1 - t0, "check_ns": t2 - t1, "wrong": wrong,
            "stats": _region_stats(ld), **info}


_OPS = {"first": _op_first, "resident": _op_resident, "touch_all": _op_touch_all}


def _worker() -> None:
    """A worker: JSON commands on stdin, one JSON reply line each on stdout (bench/shared.py's
    protocol). The peer libraries are imported here, before any command is timed."""
    import json

    plm = C.import_plm()
    for mod in ("safetensors.numpy", "torch"):
        if importlib.util.find_spec(mod.split(".")[0]):
            __import__(mod)
    held = []
    out = sys.stdout

    def reply(d):
        out.write(json.dumps(d, default=int) + "\n")
        out.flush()

    reply({"ready": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "exit":
                for ld in held:
                    ld.close()
                reply({"bye": True})
                return
            if cmd["op"] == "pss":
                reply(S.smaps_rollup())
            else:
                reply(_OPS[cmd["op"]](plm, held, cmd))
        except Exception as e:   # the parent records it as a problem and goes on
            import traceback

            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


# ---- the parts ----------------------------------------------------------------------------------------

def _files(info, fmt):
    return info["files"][{"plm_share": "plm", "plm_foreign": "safetensors"}.get(fmt, fmt)]


def _present(table, avail, absent, part):
    """The variants of `table` whose format is available; the others go to `absent`."""
    out = []
    for v, (fmt, _) in table.items():
        if avail[fmt] is None:
            out.append(v)
        else:
            absent.append(f"{part}.{v}: {avail[fmt]}")
    return out


def _timed_runs(part, table, info, variants, reps, problems):
    """Every variant `reps` times (+ the warm-up), interleaved, each run in a fresh worker with
    this benchmark's files dropped from the page cache just before. Returns per-variant samples."""
    all_files = [f for fs in info["files"].values() for f in fs]
    cmd = {"names": info["names"], "first": info["first"], "expected": info["expected"], "paths": info["paths"]}
    samples = {v: {"total": [], "load": [], "cached": [], "majflt": []} for v in variants}
    last = {}
    for rep in range(-C.WARMUP, reps):
        for v in C.rotate(variants, rep):
            try:
                ws = S.spawn(1, MODULE)
            except RuntimeError as e:
                problems.append(f"{part} {v} rep {rep}: {e}")
                continue
            try:
                drop(all_files)
                frac = cached(_files(info, table[v][0]))
                r = ws[0].call(op=part, variant=v, **cmd)
            except RuntimeError as e:
                problems.append(f"{part} {v} rep {rep}: {e}")
                continue
            finally:
                S.close_all(ws)
            if r["wrong"]:
                problems.append(f"{part} {v} rep {rep}: {len(r['wrong'])} tensors with a wrong sum, first {r['wrong'][:3]}")
            if r["stats"].get("errors"):
                problems.append(f"{part} {v} rep {rep}: stats errors {r['stats']['errors']}")
            if r.get("how", "").startswith(("background done", "timed out")):
                problems.append(f"{part} {v} rep {rep}: not every page present: {r['how']}")
            last[v] = r
            if rep >= 0:
                s = samples[v]
                s["total"].append(r["total_ns"] / 1e6)
                s["load"].append(r["load_ns"] / 1e6)
                s["majflt"].append(r["majflt"])
                if frac is not None:
                    s["cached"].append(frac)
    return samples, last


def _rows(table, samples, last):
    rows = {}
    for v, s in samples.items():
        if not s["total"]:
            continue
        rows[v] = C.summary(s["total"])
        rows[v].update(kind=table[v][1], load_ms_median=float(np.median(s["load"])),
                       majflt_median=float(np.median(s["majflt"])), stats=last.get(v, {}).get("stats", {}),
                       cached_before_max=max(s["cached"]) if s["cached"] else None,
                       how=last.get(v, {}).get("how"))
    return rows


def _print_rows(rows, total_name, file):
    headers = ["variant", "kind", total_name, "min", "max", "reps", "load_ms", "majflt", "faults", "prefetched",
               "src_MiB_read", "cached_before"]
    table = []
    for v, r in rows.items():
        st = r["stats"]
        sb = st.get("source_bytes_read")
        cb = r["cached_before_max"]
        table.append([v, r["kind"], r["median"], r["min"], r["max"], r["n"], r["load_ms_median"],
                      r["majflt_median"], st.get("faults", "-"), st.get("prefetched_pages", "-"),
                      sb / C.MiB if sb is not None else "-", f"{cb:.1%}" if cb is not None else "?"])
    C.print_table(headers, table, file)


def _fastest(rows, names):
    present = [v for v in names if v in rows]
    return min(present, key=lambda v: rows[v]["median"]) if present else None


def _part_first(plm, info, avail, reps, problems, absent, file):
    variants = _present(FIRST, avail, absent, "first")
    print(f"## first: time from the load call until the first inference is done (uint64 sum of every word "
          f"of the {len(info['first'])} tensors of layers 0-{FIRST_LAYERS - 1}: "
          f"{info['first_bytes'] / C.MiB:.1f} MiB, checked); page cache cold (fadvise); each run a fresh "
          f"worker; {reps} reps interleaved (+{C.WARMUP} warm-up)", file=file)
    samples, last = _timed_runs("first", FIRST, info, variants, reps, problems)
    rows = _rows(FIRST, samples, last)
    _print_rows(rows, "total_ms_med", file)
    print("# total = load call + first inference, ms; load_ms = the load call alone; majflt = the worker's "
          "major faults in the timed section; faults / prefetched / src_MiB_read = region stats (pylazymem); "
          "cached_before = largest fraction of the variant's files in the page cache just before the run",
          file=file)
    peers = [v for v in rows if not v.startswith("plm_")]
    eager = [v for v in peers if FIRST[v][1] == "eager"]
    fastest = _fastest(rows, peers)
    ratios = []
    for p in ("plm_ws", "plm_ws_bg"):
        if p not in rows:
            continue
        if fastest:
            ratios.append(C.ratio(f"first_{p[4:]}_vs_fastest_peer", rows[p]["median"], rows[fastest]["median"], "<=",
                                  TARGET_FIRST, f"{p} / the fastest peer ({fastest}), load + first inference, cold"))
        for e in eager:
            ratios.append(C.ratio(f"first_{e}_vs_{p[4:]}", rows[e]["median"], rows[p]["median"], ">=", TARGET_EAGER,
                                  f"eager {e} / {p}, load + first inference, cold"))
    if "plm_none" in rows and fastest:
        ratios.append(C.ratio("first_none_vs_fastest_peer", rows["plm_none"]["median"], rows[fastest]["median"],
                              "<=", TARGET_FIRST, f"informational: prefetch='none' / {fastest}"))
    if "plm_none" in rows and "plm_ws" in rows:
        ratios.append(C.ratio("first_none_vs_ws", rows["plm_none"]["median"], rows["plm_ws"]["median"], ">=", 1.0,
                              "informational: prefetch='none' / prefetch='working-set'"))
    return rows, ratios



def _part_resident(plm, info, avail, reps, problems, absent, file):
    variants = _present(RESIDENT, avail, absent, "resident")
    print(f"## resident: time from the load call until all {info['nbytes'] / C.MiB:.0f} MiB are resident; "
          f"plm_bg_wait polls region.stats() every {POLL_S * 1e3:g} ms until pages_present covers the region, "
          f"plm_materialize times region.materialize(); npy_mmap_touch reads one word per page of every tensor; "
          f"page cache cold (fadvise); every tensor checked in full afterwards (untimed); each run a fresh "
          f"worker; {reps} reps interleaved (+{C.WARMUP} warm-up)", file=file)
    samples, last = _timed_runs("resident", RESIDENT, info, variants, reps, problems)
    rows = _rows(RESIDENT, samples, last)
    _print_rows(rows, "resident_ms_med", file)
    print("# resident = from the load call until every page is resident, ms; load_ms = the load call alone",
          file=file)
    peers = [v for v in rows if not v.startswith("plm_")]
    fastest = _fastest(rows, peers)
    ratios = []
    if fastest:
        for p, what in (("plm_bg_wait", ""), ("plm_materialize", "informational: ")):
            if p in rows:
                ratios.append(C.ratio(f"resident_{p[4:]}_vs_fastest_peer", rows[p]["median"], rows[fastest]["median"],
                                      "<=", TARGET_RESIDENT, f"{what}{p} / the fastest peer ({fastest}), until all "
                                      f"state is resident, cold"))
    return rows, ratios


def _part_pss(plm, info, avail, reps, problems, absent, file):
    variants = _present(PSS, avail, absent, "pss")
    print(f"## pss: {NPROCS} workers at once load the state ({info['nbytes'] / C.MiB:.0f} MiB), check every "
          f"tensor in full, wait; with all {NPROCS} alive: sum of (Pss at the barrier - Pss before loading) / one "
          f"copy; files in the page cache (read just before); fresh workers per variant and rep; {reps} reps "
          f"interleaved", file=file)
    cmd = {"names": info["names"], "expected": info["expected"], "paths": info["paths"]}
    samples = {v: {"pss": [], "anon": [], "file": [], "shmem": [], "dshmem": [], "danon": [], "load": [],
                   "check": []} for v in variants}
    extra = {}
    for rep in range(reps):
        for v in C.rotate(variants, rep):
            K.warm(_files(info, PSS[v][0]))
            try:
                ws = S.spawn(NPROCS, MODULE)
            except RuntimeError as e:
                problems.append(f"pss {v} rep {rep}: {e}")
                continue
            try:
                m0 = S.meminfo()
                for w in ws:
                    w.send(op="touch_all", variant=v, **cmd)
                done = [w.recv() for w in ws]         # the barrier: every worker done
                pss = [w.call(op="pss") for w in ws]   # all alive
                m1 = S.meminfo()
            except RuntimeError as e:
                problems.append(f"pss {v} rep {rep}: {e}")
                continue
            finally:
                S.close_all(ws)
            for k, r in enumerate(done):
                if r["wrong"]:
                    problems.append(f"pss {v} rep {rep} worker {k}: {len(r['wrong'])} tensors wrong, "
                                    f"first {r['wrong'][:3]}")
                if r["stats"].get("errors"):
                    problems.append(f"pss {v} rep {rep} worker {k}: stats errors {r['stats']['errors']}")
            if v == "plm_shared":
                S._check_pools(done, problems, f"pss rep {rep}")
                extra[v] = {"pool": done[0].get("pool"), "stats": [r["stats"] for r in done]}
            nb = info["nbytes"]
            s = samples[v]
            s["pss"].append(sum(p["Pss"] - r["pss_before"] for r, p in zip(done, pss)) / nb)
            for key, field in (("anon", "Pss_Anon"), ("file", "Pss_File"), ("shmem", "Pss_Shmem")):
                s[key].append(sum(p.get(field, 0) for p in pss) / nb)
            s["dshmem"].append((m1["Shmem"] - m0["Shmem"]) / nb)
            s["danon"].append((m1["AnonPages"] - m0["AnonPages"]) / nb)
            s["load"].append(float(np.median([r["load_ns"] for r in done])) / 1e6)
            s["check"].append(float(np.median([r["check_ns"] for r in done])) / 1e6)
    rows = {}
    for v in variants:
        if not samples[v]["pss"]:
            continue
        rows[v] = C.summary(samples[v]["pss"])
        rows[v]["kind"] = PSS[v][1]
        for k, vals in samples[v].items():
            rows[v][k + "_median"] = float(np.median(vals))
        rows[v].update(extra.get(v, {}))
    C.print_table(["variant", "sumPss/size", "min", "max", "reps", "Pss_Anon", "Pss_File", "Pss_Shmem", "dShmem",
                   "dAnon", "load_ms", "check_ms"],
                  [[v, r["median"], r["min"], r["max"], r["n"]] + [r[k + "_median"] for k in
                   ("anon", "file", "shmem", "dshmem", "danon", "load", "check")] for v, r in rows.items()], file)
    print(f"# sumPss/size = sum over the {NPROCS} workers of (Pss at the barrier - Pss before loading) / the "
          f"state's bytes ({NPROCS} private copies = {NPROCS}.0); Pss_* = the workers' whole Pss by kind at the "
          f"barrier / state bytes; dShmem / dAnon = /proc/meminfo deltas (machine-wide: other work moves them); "
          f"load_ms / check_ms = median over the workers (check = reading every byte)", file=file)
    ratios = []
    if "plm_shared" in rows:
        ratios.append(C.ratio("pss_plm_shared", rows["plm_shared"]["median"], 1.0, "<=", TARGET_PSS,
                              f"sum of the {NPROCS} workers' Pss deltas / one copy, plm.load(share=True), each "
                              f"read all state"))
    for v in rows:
        if v != "plm_shared":
            ratios.append(C.ratio(f"pss_{v}", rows[v]["median"], 1.0, ">=", 0.0,
                                  f"informational: sum of the {NPROCS} Pss deltas / one copy, {v}"))
    return rows, ratios


# ---- run ------------------------------------------------------------------------------------------------

def run(quick: bool = False, *, reps: int | None = None, file=None, parts=None, nbytes: int | None = None) -> dict:
    """parts: a subset of PARTS (default all); nbytes: the state size instead of 2 GiB / quick 64 MiB."""
    file, plm, env, default_bytes, _, _ = C.setup(quick, reps, file, sizes=SIZES)
    nbytes = nbytes or default_bytes
    parts = list(parts or PARTS)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    avail = availability(plm)
    problems, absent, rows, ratios, loads = [], [], {}, [], {"start": loadavg()}
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: parts {', '.join(parts)}; state of {NLAYERS * len(PER_LAYER)} tensors in {NLAYERS} "
              f"layers, at most {nbytes / C.MiB:.0f} MiB; files in {d} ({K.filesystem(d)}); load average "
              f"{loads['start']}; page cache: {page_cache_note()}", file=file)
        C.print_environment(env, file)
        for fmt, why in avail.items():
            if why:
                print(f"# absent in this build/environment: {fmt} variants ({why})", file=file)
        t0 = C.now_ns()
        info = build(plm, d, nbytes, avail, problems)
        print(f"# state: {len(info['names'])} tensors, {info['nbytes'] / C.MiB:.1f} MiB (d = {info['d']}), first "
              f"inference {len(info['first'])} tensors / {info['first_bytes'] / C.MiB:.1f} MiB; generated in "
              f"{info['gen_s']:.1f} s; set-up {(C.now_ns() - t0) / 1e9:.1f} s", file=file)
        print("# save (warm, once, fsync included), ms / file MiB: " + ", ".join(
            f"{fmt} {info['save_ms'][fmt]:.0f} / {info['file_bytes'][fmt] / C.MiB:.1f}" for fmt in info["save_ms"]),
            file=file)
        if "record" in info:
            rec = info["record"]
            print(f"# working set recorded by a first plm.load(prefetch='none') + the first inference: "
                  f"{rec['pages']} pages touched ({rec['pages'] * C.PAGE / C.MiB:.1f} MiB; the inference's "
                  f"tensors span {info['first_bytes'] / C.MiB:.1f} MiB), {rec.get('stored_pages', '?')} stored, "
                  f"{rec['faults']} faults, {rec['readahead_pages']} readahead pages, {rec['ms']:.0f} ms", file=file)
        fns = {"first": _part_first, "resident": _part_resident, "pss": _part_pss}
        for p in parts:
            n = reps or REPS[p][0 if quick else 1]
            t1 = C.now_ns()
            try:
                rows[p], q = fns[p](plm, info, avail, n, problems, absent, file)
            except Exception as e:   # a failed part is a problem; the others still run
                problems.append(f"{p}: {type(e).__name__}: {e}")
                print(f"PROBLEM {p} failed: {type(e).__name__}: {e}", file=file)
                continue
            ratios += q
            loads[p] = loadavg()
            print(f"# part {p} took {(C.now_ns() - t1) / 1e9:.1f} s; load average {loads[p]}; page cache: "
                  f"{page_cache_note()}", file=file)
    if absent:   # grouped by reason: "part.variant: why"
        by_why = {}
        for a in absent:
            v, why = a.split(": ", 1)
            by_why.setdefault(why, []).append(v)
        for why, vs in by_why.items():
            print(f"# absent (not run): {', '.join(vs)}: {why}", file=file)
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    info.pop("files", None)
    info.pop("paths", None)
    return {"name": NAME, "quick": quick, "nbytes": info["nbytes"], "parts": parts, "env": env, "rows": rows,
            "ratios": {r["name"]: r for r in ratios}, "absent": absent, "problems": problems, "loadavg": loads,
            "cold_method": "fadvise", "info": {k: v for k, v in info.items() if k not in ("expected", "names")}}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
