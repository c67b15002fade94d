"""Shared pages (issue 11): restore(share=True) across processes; docs/shared-pages.md section 6.

Four parts (``parts=`` selects some; all by default), each measured in SPAWNED worker processes
(``sys.executable -c "...shared import _worker"``; timing inside them with perf_counter_ns, results
back as JSON lines on their stdout), every page's contents checked (a per-page uint64 sum and xor
against values precomputed from the state: any wrong byte changes the sum):

  fanout    one snapshot of random bytes (1 GiB; quick: 256 MiB; no duplicate, no zero page). 8
            workers at once each open it, read every page (checked), write 1% of the pages (page i
            with i % 100 == rank), then wait at a barrier; with all 8 alive and done, each reports
            its Pss (/proc/self/smaps_rollup) and the parent reads /proc/meminfo (Shmem, AnonPages).
            Variants, interleaved: shared = restore(share=True, prefetch="none", background=False);
            mmap_r = np.load(mmap_mode="r") of a .npy of the same bytes (reads only, no writes);
            mmap_c = np.load(mmap_mode="c") (the same writes); private = restore(share=False) of a
            snapshot of at most 256 MiB (quick: 64 MiB; the private copies of 8 x 1 GiB would crowd the other
            work on this machine), scaled per snapshot byte. Memory is reported as the sum over
            the 8 of (Pss at the barrier - Pss before opening), per byte of the snapshot opened.
            Target: shared <= 1.5 (1 GiB shared + 8 x 1% private copies ~ 1.08).
  second    worker 1 restores (share=True, prefetch="none", background=False) and reads the whole
            region; then worker 2 does the same while worker 1 stays alive (the pool is filled);
            then np.load(mmap_mode="r") of the .npy with the file in the page cache. Two reading
            modes, each with its own pool: "word" = one uint64 per page, "bytes" = a uint64 sum of
            every byte. Also restore(share=False) as a private reference. Targets: first/second
            >= 3x; second/mmap_r <= 1.5x (the design predicts a miss for "word": 4 KiB PTEs of the
            pool against the page cache's PMD-mapped large folios).
  template  Region + canonical(template) + defer_fill of the whole region + 1% random page reads
            vs np.empty + template fill + the same reads (template_init.py's two runs, reused),
            plus Region(share_canonical=True) and Region(shared_first_touch=False / True) variants when
            those keyword arguments exist (reported as absent otherwise). Target >= 20x.
  reap      reap.py's uniform 10% workload, recorded and replayed: eager np.load + workload vs
            restore(prefetch="working-set", background=False) + workload with share=True, the
            restoring worker being the pool's first user (and share=False beside it); each variant
            in a fresh worker, page cache warm. Target eager / shared >= 4x.

Where the core has no shared pages (features().shared_pages false, or a build without share=),
the shared variants are not run: ``result["skipped"]`` and a PROBLEM line say why, never a quiet
private restore in their place.
"""
from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import _ckpt as K
from . import _common as C
from . import reap, template_init

NAME = "shared"
PARTS = ("fanout", "second", "template", "reap")
NPROCS = 8
WRITE_EVERY = 100              # rank k writes the pages i with i % WRITE_EVERY == k (1%)
PRIVATE_MAX = (64 * C.MiB, 256 * C.MiB)   # the fan-out's private variant restores at most this much
                                          # (quick, full): 8 private copies are slow to fill on 2 CPUs
CHECK_PAGES = 4096             # pages per step of the contents check (16 MiB: small temporaries)
TARGET_PSS = 1.5               # fan-out: sum of the 8 Pss deltas per snapshot byte
TARGET_SECOND = 3.0            # first / second process
TARGET_MMAP = 1.5              # second process / np.load(mmap_mode="r")
TARGET_TEMPLATE = 20.0
TARGET_REAP = 4.0
REPLY_TIMEOUT = 900.0          # seconds a worker may take for one step before it is killed
SEED = 20241111
SHARE_STATS = ("pages_shared_mapped", "pages_published", "pool_fallback_pages", "pool_kernel_pages")
# the template part's sharing variants: Region keyword arguments (run where they exist)
CANONICAL_VARIANTS = {"plm_share_canonical": {"share_canonical": True},
                      "plm_kernel_first_touch": {"share_canonical": True, "shared_first_touch": False},
                      "plm_seen_first_touch": {"share_canonical": True, "shared_first_touch": True}}


# ---- availability ------------------------------------------------------------------------------

def share_unavailable(plm) -> str | None:
    """None when restore(share=True) can run here, else why not (for skips and problems)."""
    import inspect

    if "share" not in inspect.signature(plm.restore).parameters:
        return "this build's restore() has no share= argument (issue 11 not built)"
    f = plm.features()
    if not hasattr(f, "shared_pages"):
        return "features() has no shared_pages (issue 11 not built)"
    if not f.shared_pages:
        return f"features().shared_pages is false: {getattr(f, 'shared_pages_reason', '') or '?'}"
    return None


def canonical_kwargs(plm) -> dict:
    """{variant: Region keyword arguments} of the template part's sharing variants, None where the
    keyword does not exist in this build (Region() raises TypeError for it)."""
    out = {}
    for v, kw in CANONICAL_VARIANTS.items():
        try:
            plm.Region(C.PAGE, **kw).close()
            out[v] = kw
        except TypeError:
            out[v] = None
    return out


class _Shim:
    """pylazymem with some calls bound to keyword arguments, for reusing template_init's and
    reap's runs unchanged: Region(..., **region_kw), restore(..., share=True). Records each shared
    restore's r.pool (the reap part checks the restoring worker was the pool's first user)."""

    def __init__(self, plm, region_kw=None):
        self._plm = plm
        self.pools = []
        if region_kw:
            self.Region = functools.partial(plm.Region, **region_kw)

    def __getattr__(self, name):
        return getattr(self._plm, name)

    def restore(self, *a, **kw):
        r = self._plm.restore(*a, share=True, **kw)
        self.pools.append(dict(r.pool))
        return r


# ---- contents, memory ---------------------------------------------------------------------------

def page_checksums(flat_u8) -> np.ndarray:
    """(npages, 2) uint64: the wrapping sum and the xor of each page's 512 words. One wrong byte
    changes its page's sum."""
    n = flat_u8.size // C.PAGE
    out = np.empty((n, 2), np.uint64)
    words = flat_u8[:n * C.PAGE].view(np.uint64).reshape(n, -1)
    for i in range(0, n, CHECK_PAGES):
        w = words[i:i + CHECK_PAGES]
        out[i:i + CHECK_PAGES, 0] = w.sum(axis=1, dtype=np.uint64)
        out[i:i + CHECK_PAGES, 1] = np.bitwise_xor.reduce(w, axis=1)
    return out


def bad_pages(flat_u8, sums) -> list:
    """Pages of `flat_u8` whose checksums differ from `sums` (reads every byte; temporaries of
    one step only, so that a worker's Pss is its mapping's)."""
    n = flat_u8.size // C.PAGE
    bad = []
    for i in range(0, n, CHECK_PAGES):
        got = page_checksums(flat_u8[i * C.PAGE:min(n, i + CHECK_PAGES) * C.PAGE])
        bad.extend((i + np.nonzero((got != sums[i:i + CHECK_PAGES]).any(axis=1))[0]).tolist())
    return bad


def smaps_rollup(pid="self") -> dict:
    """{"Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", ...} in bytes."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


def meminfo(keys=("Shmem", "AnonPages", "Cached", "MemAvailable")) -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            if k in keys:
                out[k] = int(v.split()[0]) * 1024
    return out


# ---- the worker process ---------------------------------------------------------------------------

def _flat(obj):
    """uint8 view of a region's whole memory or of an array (np.load)."""
    if isinstance(obj, np.ndarray):
        return obj.reshape(-1).view(np.uint8)
    return obj.ndarray(np.uint8)


class _WorkerState:
    def __init__(self, plm):
        self.plm = plm
        self.held = []        # regions / arrays kept until "release"
        self._sums = {}

    def sums(self, path):
        """The page checksums of a state, loaded once (before any Pss is taken, kept after)."""
        if path not in self._sums:
            self._sums[path] = np.load(path)
        return self._sums[path]

    def open(self, kind, path):
        """(object holding the memory, its uint8 view, info) for a variant kind."""
        plm = self.plm
        if kind in ("shared", "shared_kernel", "private"):
            kw = {"shared": {"share": True}, "private": {},
                  # a complete, sealed pool served by the kernel (no working set recorded)
                  "shared_kernel": {"share": True, "shared_first_touch": False}}[kind]
            r = plm.restore(path, prefetch="none", background=False, **kw)
            self.held.append(r)
            info = {"shared": bool(getattr(r, "shared", False))}
            if kind != "private":
                info["pool"] = dict(r.pool)
            return r, _flat(r), info
        a = np.load(path, mmap_mode="r" if kind == "mmap_r" else "c")
        self.held.append(a)
        return a, _flat(a), {}

    def release(self):
        for h in self.held:
            if hasattr(h, "close"):
                h.close()
        self.held = []

    def stats(self, obj):
        if not hasattr(obj, "stats"):
            return {}
        st = obj.stats()
        return dict(K.plm_stats(st), **{k: st[k] for k in SHARE_STATS if k in st})


def _op_fanout(state, cmd):
    sums = state.sums(cmd["sums"])
    pss0 = smaps_rollup()["Pss"]
    with C.quiet_gc():
        t0 = C.now_ns()
        obj, flat, info = state.open(cmd["kind"], cmd["path"])
        t1 = C.now_ns()
        bad = bad_pages(flat, sums)    # reads every page
        t2 = C.now_ns()
        nwritten = 0
        if cmd["write"]:
            idx = np.arange(cmd["rank"], flat.size // C.PAGE, WRITE_EVERY, dtype=np.int64) * C.PAGE
            before = flat[idx]
            flat[idx] = before ^ 0xFF
            if not np.array_equal(flat[idx], before ^ 0xFF):
                bad.append(-1)        # a write not seen by its writer
            nwritten = int(idx.size)
        t3 = C.now_ns()
    del flat, sums
    return {"open_ns": t1 - t0, "read_ns": t2 - t1, "write_ns": t3 - t2, "pss_before": pss0,
            "bad": bad[:8], "nbad": len(bad), "written": nwritten, "stats": state.stats(obj), **info}


def _op_read(state, cmd):
    """Open, then read the whole region: one uint64 per page ("word") or every byte ("bytes")."""
    sums = state.sums(cmd["sums"])
    with C.quiet_gc():
        t0 = C.now_ns()
        obj, flat, info = state.open(cmd["kind"], cmd["path"])
        t1 = C.now_ns()
        words = flat[:flat.size // 8 * 8].view(np.uint64)
        if cmd["mode"] == "word":
            got = int(words[::C.PAGE // 8].sum(dtype=np.uint64))
        else:
            got = int(words.sum(dtype=np.uint64))
        t2 = C.now_ns()
    ok = got == cmd["expected"]
    bad = bad_pages(flat, sums)    # untimed: every byte
    st = state.stats(obj)
    del flat, words
    return {"open_ns": t1 - t0, "read_ns": t2 - t1, "sum_ok": ok, "bad": bad[:8], "nbad": len(bad),
            "stats": st, **info}


def _op_complete(state, cmd):
    """The region opened last completes its pool: the background fill runs to the end, finds
    every page in the pool, makes it huge folios and seals it (docs/shared-pages.md 2.5).
    Untimed setup of the "second" part; how long it took is reported."""
    r = state.held[-1]
    t0 = C.now_ns()
    r.background_start()
    deadline = time.monotonic() + 300
    while not r.pool["sealed"] and time.monotonic() < deadline:
        time.sleep(0.005)
    return {"sealed": bool(r.pool["sealed"]), "complete_ns": C.now_ns() - t0}


def _op_reap(state, cmd):
    """One of reap.py's runs in this (fresh) process: eager, or a working-set restore."""
    offsets = np.load(cmd["offsets"])
    if cmd["kind"] == "eager":
        t, s, st = reap._run_eager(cmd["npy"], offsets)
        pools = []
    else:
        shim = _Shim(state.plm) if cmd["kind"] == "ws_shared" else state.plm
        t, s, st = reap._run_lazy(shim, cmd["snap"], offsets, "working-set", False)
        pools = getattr(shim, "pools", [])
        st = dict(K.plm_stats(st), **{k: st[k] for k in SHARE_STATS if k in st}, again_ok=st["_again_ok"])
    return {"t": t, "sum": s, "stats": st, "pools": pools}


_OPS = {"fanout": _op_fanout, "read": _op_read, "complete": _op_complete, "reap": _op_reap}


def _worker() -> None:
    """Entry point of a worker: JSON commands on stdin, one JSON reply line each on stdout."""
    plm = C.import_plm()
    state = _WorkerState(plm)
    out = sys.stdout

    def reply(d):
        out.write(json.dumps(d, default=int) + "\n")
        out.flush()

    reply({"ready": os.getpid()})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "exit":
                state.release()
                reply({"bye": True})
                return
            if op == "pss":
                reply(smaps_rollup())
            elif op == "release":
                state.release()
                reply({"released": True})
            else:
                reply(_OPS[op](state, cmd))
        except Exception as e:   # the parent records it as a problem and goes on
            import traceback

            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


class Worker:
    """A spawned worker process (fresh interpreter, not a fork) running `module`'s _worker()
    (this module's by default; bench/arrays.py has its own commands)."""

    def __init__(self, module="pylazymem.bench.shared"):
        self._err = tempfile.TemporaryFile(mode="w+")
        self._buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", f"from {module} import _worker; _worker()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, bufsize=0)

    def send(self, **cmd) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    def recv(self, timeout=REPLY_TIMEOUT) -> dict:
        """The next reply; a dead, silent or failing worker raises RuntimeError with its stderr."""
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            chunk = os.read(fd, 1 << 16) if ready else b""
            if not chunk:
                self.kill()
                raise RuntimeError(f"worker {self.proc.pid} {'died' if ready else 'timed out'} "
                                   f"(exit {self.proc.poll()}): {self.stderr()[-2000:]}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        d = json.loads(line)
        if "error" in d:
            raise RuntimeError(f"worker {self.proc.pid}: {d['error']}\n{d.get('traceback', '')}")
        return d

    def call(self, **cmd) -> dict:
        self.send(**cmd)
        return self.recv()

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send(op="exit")
                self.recv(timeout=60)
                self.proc.wait(timeout=60)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            self.kill()
            self._err.close()


def spawn(n, module="pylazymem.bench.shared") -> list:
    ws = [Worker(module) for _ in range(n)]
    try:
        for w in ws:
            w.recv(timeout=120)    # "ready": imported
    except BaseException:
        for w in ws:
            w.kill()
        raise
    return ws


def close_all(ws) -> None:
    for w in ws:
        w.close()


# ---- the state on disk ------------------------------------------------------------------------------

def make_state(plm, d, nbytes, rng, name="state"):
    """A snapshot of `nbytes` random bytes (Region + fill + checkpoint, array "state"), a .npy of
    the same bytes, the page checksums (.npy) and the uint64 sums of the two reading modes.
    Returns a dict of paths and values; nothing of it stays in memory."""
    snap, npy, sums = (os.path.join(d, f"{name}{ext}") for ext in (".snap", ".npy", ".sums.npy"))
    r = plm.Region(nbytes)
    try:
        st = r.alloc("state", nbytes, np.uint8)
        K.fill_random(st, rng)
        words = st.view(np.uint64)
        out = {"snap": snap, "npy": npy, "sums": sums, "nbytes": nbytes,
               "word": int(words[::C.PAGE // 8].sum(dtype=np.uint64)),
               "bytes": int(words.sum(dtype=np.uint64))}
        np.save(sums, page_checksums(st))
        np.save(npy, st)
        del st, words
        info = plm.checkpoint(r, snap, working_set="none")
    finally:
        r.close()
    if info.pages_by_class.get("zero") or info.pages_by_class.get("duplicate"):
        raise RuntimeError(f"{snap}: expected unique pages only, got {info.pages_by_class}")
    out["snapshot_bytes"] = info.file_bytes
    os.sync()   # the files' writeback happens here, not while a variant runs
    return out


# ---- part 1: fan-out ------------------------------------------------------------------------------

FANOUT = ("shared", "mmap_r", "mmap_c", "private")


def _fanout(plm, d, nbytes, reps, problems, file, unavailable, quick, variants=FANOUT):
    rng = np.random.default_rng([SEED, 1])
    main = make_state(plm, d, nbytes, rng)
    pmax = PRIVATE_MAX[0 if quick else 1]
    priv = main if nbytes <= pmax else make_state(plm, d, pmax, rng, "private")
    variants = [v for v in variants if not (v == "shared" and unavailable)]
    state_of = {"shared": main, "mmap_r": main, "mmap_c": main, "private": priv}
    path_of = {"shared": "snap", "private": "snap", "mmap_r": "npy", "mmap_c": "npy"}
    print(f"## fanout: {NPROCS} spawned workers open {nbytes // C.MiB} MiB (private: {priv['nbytes'] // C.MiB} "
          f"MiB), read every page (checked), write 1% (not mmap_r), barrier, Pss; {reps} reps interleaved",
          file=file)
    K.warm([main["snap"], main["npy"]])
    samples = {v: {k: [] for k in ("pss", "pss_anon", "pss_file", "pss_shmem", "shmem", "anon", "read_ms",
                                   "open_ms", "write_ms")} for v in variants}
    extra = {v: {} for v in variants}
    for rep in range(reps):
        ws = spawn(NPROCS)
        try:
            for v in C.rotate(variants, rep):
                s = state_of[v]
                m0 = meminfo()
                for k, w in enumerate(ws):
                    w.send(op="fanout", kind=v, path=s[path_of[v]], sums=s["sums"], rank=k, write=v != "mmap_r")
                done = [w.recv() for w in ws]        # the barrier: every worker done
                pss = [w.call(op="pss") for w in ws]  # all alive
                m1 = meminfo()
                for w in ws:
                    w.call(op="release")
                for k, (r, p) in enumerate(zip(done, pss)):
                    if r["nbad"]:
                        problems.append(f"fanout {v} rep {rep} worker {k}: {r['nbad']} wrong pages, first {r['bad']}")
                    if r.get("stats", {}).get("errors"):
                        problems.append(f"fanout {v} rep {rep} worker {k}: stats errors {r['stats']['errors']}")
                if v == "shared":
                    _check_pools(done, problems, f"fanout rep {rep}")
                    extra[v]["pool"] = done[0].get("pool")
                    extra[v]["stats"] = [r["stats"] for r in done]
                nb = s["nbytes"]
                one = samples[v]
                one["pss"].append(sum(p["Pss"] - r["pss_before"] for r, p in zip(done, pss)) / nb)
                for key, field in (("pss_anon", "Pss_Anon"), ("pss_file", "Pss_File"), ("pss_shmem", "Pss_Shmem")):
                    one[key].append(sum(p.get(field, 0) for p in pss) / nb)
                one["shmem"].append((m1["Shmem"] - m0["Shmem"]) / nb)
                one["anon"].append((m1["AnonPages"] - m0["AnonPages"]) / nb)
                for key in ("read", "open", "write"):
                    one[key + "_ms"].append(float(np.median([r[key + "_ns"] for r in done])) / 1e6)
        finally:
            close_all(ws)
    rows = {}
    for v in variants:
        rows[v] = C.summary(samples[v]["pss"])
        for k, vals in samples[v].items():
            rows[v][k + "_median"] = float(np.median(vals))
        rows[v]["snapshot_MiB"] = state_of[v]["nbytes"] / C.MiB
        rows[v].update(extra[v])
    headers = ["variant", "MiB", "sumPss/size", "min", "max", "reps", "Pss_Anon", "Pss_File", "Pss_Shmem",
               "dShmem", "dAnon", "open_ms", "read_ms", "write_ms"]
    C.print_table(headers, [[v, rows[v]["snapshot_MiB"], rows[v]["median"], rows[v]["min"], rows[v]["max"],
                             rows[v]["n"]] + [rows[v][k + "_median"] for k in
                                              ("pss_anon", "pss_file", "pss_shmem", "shmem", "anon", "open_ms",
                                               "read_ms", "write_ms")] for v in variants], file)
    print(f"# sumPss/size = sum over the {NPROCS} workers of (Pss at the barrier - Pss before opening), per "
          f"byte of the snapshot opened (8 private copies = 8.0); Pss_* = the workers' whole Pss by kind at the "
          f"barrier, per byte; dShmem / dAnon = /proc/meminfo Shmem / AnonPages after - before (machine-wide: "
          f"other work on the machine moves them too); *_ms = median over the workers of the median rep; the "
          f"private variant restores its own {priv['nbytes'] // C.MiB} MiB snapshot, so its figures are per "
          f"byte of that one", file=file)
    ratios = []
    if "shared" in rows:
        ratios.append(C.ratio("fanout_pss_shared", rows["shared"]["median"], 1.0, "<=", TARGET_PSS,
                              f"sum of the {NPROCS} workers' Pss deltas / snapshot size, restore(share=True), "
                              f"each read all and wrote 1%"))
        ratios.append(C.ratio("fanout_system_shared", rows["shared"]["shmem_median"] + rows["shared"]["anon_median"],
                              1.0, "<=", TARGET_PSS, "informational: (meminfo Shmem + AnonPages delta) / snapshot "
                              "size, shared (counts pool pages that no Pss shows; machine-wide, noisy)"))
        if "private" in rows:
            ratios.append(C.ratio("fanout_pss_private_vs_shared", rows["private"]["median"], rows["shared"]["median"],
                                  ">=", 1.0, "informational: sum Pss per snapshot byte, private / shared"))
    for v in ("private", "mmap_r", "mmap_c"):
        if v in rows:
            ratios.append(C.ratio(f"fanout_pss_{v}", rows[v]["median"], 1.0, ">=", 0.0,
                                  f"informational: sum of the Pss deltas / snapshot size, {v}"))
    for s in {id(x): x for x in state_of.values()}.values():
        for k in ("snap", "npy"):
            os.unlink(s[k])
    return rows, ratios, {}


def _check_pools(done, problems, where):
    """All workers of one shared step: one pool (same id and inode), exactly one creator."""
    pools = [r.get("pool") or {} for r in done]
    if not all(r.get("shared") for r in done):
        problems.append(f"{where}: restore(share=True) gave an unshared region in "
                        f"{sum(not r.get('shared') for r in done)} workers")
    if len({(p.get("id"), p.get("inode")) for p in pools}) != 1:
        problems.append(f"{where}: workers report different pools {sorted({(p.get('id'), p.get('inode')) for p in pools})}")
    roles = [p.get("role") for p in pools]
    if roles.count("created") != 1 or roles.count("joined") != len(roles) - 1:
        problems.append(f"{where}: pool roles {roles} (expected one 'created', the rest 'joined')")


# ---- part 2: second process vs first, vs np.load(mmap_mode="r") ----------------------------------------------

def _second(plm, d, nbytes, reps, problems, file, unavailable, quick):
    state = make_state(plm, d, nbytes, np.random.default_rng([SEED, 2]))
    modes = ("word", "bytes")
    steps = (["first", "second", "second_kernel"] if not unavailable else []) + ["private", "mmap_r"]
    print(f"## second: {nbytes // C.MiB} MiB; first = worker 1 restore(share=True, prefetch='none', "
          f"background=False) + read (fresh pool), second = worker 2 the same while worker 1 holds its region; "
          f"private = restore(share=False) + read; mmap_r = np.load(mmap_mode='r') + read, file in the page cache; "
          f"reading modes: word = one uint64 per page, bytes = uint64 sum of every byte; {reps} reps "
          f"(+{C.WARMUP} warm-up), modes interleaved", file=file)
    times = {(m, s): {"total": [], "open": [], "read": []} for m in modes for s in steps}
    stats = {}
    complete_ms = []
    ws = spawn(2)
    try:
        for rep in range(-C.WARMUP, reps):
            for mode in C.rotate(modes, rep):
                K.warm([state["snap"], state["npy"]])
                res = {}
                if not unavailable:
                    res["first"] = ws[0].call(op="read", kind="shared", path=state["snap"], sums=state["sums"],
                                              mode=mode, expected=state[mode])
                    # worker 1 completes the pool (background fill: collapse, seal), untimed
                    done = ws[0].call(op="complete")
                    if not done["sealed"]:
                        problems.append(f"second {mode} rep {rep}: the pool was not sealed complete")
                    if rep >= 0:
                        complete_ms.append(done["complete_ns"] / 1e6)
                    res["second"] = ws[1].call(op="read", kind="shared", path=state["snap"], sums=state["sums"],
                                               mode=mode, expected=state[mode])
                    _check_pools([res["first"], res["second"]], problems, f"second {mode} rep {rep}")
                    ws[1].call(op="release")
                    res["second_kernel"] = ws[1].call(op="read", kind="shared_kernel", path=state["snap"],
                                                      sums=state["sums"], mode=mode, expected=state[mode])
                    if res["second_kernel"].get("stats", {}).get("pool_kernel_pages", 0) == 0:
                        problems.append(f"second {mode} rep {rep}: shared_first_touch=False was not served "
                                        f"by the kernel")
                    for w in ws:
                        w.call(op="release")
                res["private"] = ws[0].call(op="read", kind="private", path=state["snap"], sums=state["sums"],
                                            mode=mode, expected=state[mode])
                ws[0].call(op="release")
                res["mmap_r"] = ws[1].call(op="read", kind="mmap_r", path=state["npy"], sums=state["sums"],
                                           mode=mode, expected=state[mode])
                ws[1].call(op="release")
                for s, r in res.items():
                    if not r["sum_ok"] or r["nbad"]:
                        problems.append(f"second {mode} {s} rep {rep}: sum ok={r['sum_ok']}, {r['nbad']} wrong pages "
                                        f"(first {r['bad']})")
                    if rep >= 0:
                        t = times[(mode, s)]
                        t["open"].append(r["open_ns"] / 1e6)
                        t["read"].append(r["read_ns"] / 1e6)
                        t["total"].append((r["open_ns"] + r["read_ns"]) / 1e6)
                    stats[(mode, s)] = r.get("stats", {})
    finally:
        close_all(ws)
    rows = {}
    for (mode, s), t in times.items():
        v = f"{s}_{mode}"
        rows[v] = C.summary(t["total"])
        rows[v]["open_ms_median"] = float(np.median(t["open"]))
        rows[v]["read_ms_median"] = float(np.median(t["read"]))
        rows[v]["stats"] = stats.get((mode, s), {})
    headers = ["variant", "total_ms_med", "min", "max", "reps", "open_ms", "read_ms", "faults", "shared_mapped",
               "published", "fallback"]
    C.print_table(headers, [[v, r["median"], r["min"], r["max"], r["n"], r["open_ms_median"], r["read_ms_median"]]
                            + [r["stats"].get(k, "-") for k in ("faults", "pages_shared_mapped", "pages_published",
                                                                 "pool_fallback_pages")]
                            for v, r in rows.items()], file)
    print("# total = open (restore / np.load) + read, timed in the worker; stats of the last rep", file=file)
    print("# second = restore(share=True) (first touches seen: working set), second_kernel = restore(share=True, "
          "shared_first_touch=False) (the kernel maps the complete pool's huge pages; no working set)", file=file)
    if complete_ms:
        print(f"# worker 1 completing its pool (background fill to the end, collapse into huge pages, seal), untimed "
              f"setup: median {float(np.median(complete_ms)):.1f} ms", file=file)
    ratios = []
    for mode in modes:
        if unavailable:
            break
        ratios.append(C.ratio(f"first_vs_second_{mode}", rows[f"first_{mode}"]["median"],
                              rows[f"second_kernel_{mode}"]["median"], ">=", TARGET_SECOND,
                              f"first process / second process (pool complete, kernel-served: "
                              f"shared_first_touch=False), restore + read ({mode})"))
        ratios.append(C.ratio(f"second_vs_mmap_r_{mode}", rows[f"second_kernel_{mode}"]["median"],
                              rows[f"mmap_r_{mode}"]["median"], "<=", TARGET_MMAP,
                              f"second process (kernel-served) / np.load(mmap_mode='r') warm, open + read ({mode})"))
        ratios.append(C.ratio(f"first_vs_second_registered_{mode}", rows[f"first_{mode}"]["median"],
                              rows[f"second_{mode}"]["median"], ">=", 0.0,
                              f"informational: first / second process with first touches seen (the default), "
                              f"restore + read ({mode})"))
        ratios.append(C.ratio(f"second_registered_vs_mmap_r_{mode}", rows[f"second_{mode}"]["median"],
                              rows[f"mmap_r_{mode}"]["median"], ">=", 0.0,
                              f"informational: second process, first touches seen / np.load(mmap_mode='r') ({mode})"))
        ratios.append(C.ratio(f"first_vs_private_{mode}", rows[f"first_{mode}"]["median"],
                              rows[f"private_{mode}"]["median"], ">=", 0.0,
                              f"informational: first process (publishing) / restore(share=False), ({mode})"))
    for k in ("snap", "npy"):
        os.unlink(state[k])
    return rows, ratios, {}


# ---- part 3: template fill ---------------------------------------------------------------------------------

def _template(plm, d, nbytes, reps, problems, file, unavailable, quick):
    rng = np.random.default_rng([SEED, 3])
    npages = nbytes // C.PAGE
    template = rng.integers(0, 256, C.PAGE, dtype=np.uint8)
    offsets = rng.choice(npages, size=max(1, npages // 100), replace=False) * C.PAGE + template_init.TOUCH_OFFSET
    kwargs = canonical_kwargs(plm)
    runners = {"plm": plm, **{v: _Shim(plm, kw) for v, kw in kwargs.items() if kw is not None}}
    variants = ["plm", "numpy"] + [v for v in kwargs if kwargs[v] is not None]
    absent = [f"{v} (Region(**{CANONICAL_VARIANTS[v]}) raises TypeError)" for v, kw in kwargs.items() if kw is None]
    print(f"## template: {nbytes // C.MiB} MiB, canonical(template) + defer_fill(whole region) + {offsets.size} "
          f"random page reads (1%), vs np.empty + template fill + the same reads; {reps} reps interleaved "
          f"(+{C.WARMUP} warm-up)" + (f"; absent in this build: {'; '.join(absent)}" if absent else ""), file=file)
    parts = {v: {"total": [], "fill": [], "reads": []} for v in variants}
    stats = {}
    for rep in range(-C.WARMUP, reps):
        for v in C.rotate(variants, rep):
            if v == "numpy":
                t, bad = template_init._run_numpy(nbytes, template, offsets)
            else:
                t, bad, st = template_init._run_plm(runners[v], nbytes, template, offsets)
                stats[v] = {k: st.get(k) for k in ("faults", "readahead_pages", "pages_present", "errors",
                                                   "canonical_shared_pages", "canonical_copied_pages",
                                                   "map_budget_fallbacks")}
                if st.get("errors"):
                    problems.append(f"template {v} rep {rep}: stats errors {st.get('errors')}")
            if bad:
                problems.append(f"template {v} rep {rep}: {bad} of {offsets.size} bytes read wrong")
            if rep >= 0:
                for k in parts[v]:
                    parts[v][k].append(t[k] / 1e6)
    rows = {}
    for v in variants:
        rows[v] = C.summary(parts[v]["total"])
        rows[v]["fill_ms_median"] = float(np.median(parts[v]["fill"]))
        rows[v]["reads_ms_median"] = float(np.median(parts[v]["reads"]))
        if v in stats:
            rows[v]["stats"] = stats[v]
    C.print_table(["variant", "total_ms_med", "min", "max", "reps", "fill_ms", "reads_ms", "faults",
                   "canonical_shared"],
                  [[v, r["median"], r["min"], r["max"], r["n"], r["fill_ms_median"], r["reads_ms_median"],
                    r.get("stats", {}).get("faults", "-"), r.get("stats", {}).get("canonical_shared_pages", "-")]
                   for v, r in rows.items()], file)
    ratios = [C.ratio("template_speedup", rows["numpy"]["median"], rows["plm"]["median"], ">=", TARGET_TEMPLATE,
                      "numpy total / pylazymem total, Region() as built (defer_fill of a canonical page)")]
    for v in variants[2:]:
        ratios.append(C.ratio(f"template_speedup_{v[4:]}", rows["numpy"]["median"], rows[v]["median"], ">=",
                              TARGET_TEMPLATE, f"numpy total / pylazymem total, Region({kwargs[v]})"))
    return rows, ratios, {"absent": absent}


# ---- part 4: REAP, shared restore in the pool's first process ---------------------------------------------------

def _reap(plm, d, nbytes, reps, problems, file, unavailable, quick):
    npages = nbytes // C.PAGE
    rng = np.random.default_rng(20240611)     # reap.py's seed and draw: the same workload
    pages = rng.choice(npages, size=max(1, int(npages * reap.FRACTION)), replace=False)
    offsets = pages.astype(np.int64) * C.PAGE + reap.TOUCH_OFFSET
    ref, npy, snaps, setups = reap._setup(plm, d, nbytes, {reap.UNIFORM: offsets}, rng, problems, file)
    expected = reap._workload(ref, offsets)
    del ref
    off_path = os.path.join(d, "offsets.npy")
    np.save(off_path, offsets)
    snap = snaps[reap.UNIFORM]
    variants = ["eager", "ws_private"] + ([] if unavailable else ["ws_shared"])
    print(f"## reap: {nbytes // C.MiB} MiB, reap.py's uniform 10% workload ({offsets.size} pages) recorded and "
          f"replayed; eager np.load + workload vs restore(prefetch='working-set', background=False) + workload, "
          f"share=False / share=True (the worker is the pool's first user); each run in a fresh spawned worker, "
          f"files in the page cache; {reps} reps interleaved", file=file)
    parts = {v: {k: [] for k in ("total", "restore", "workload")} for v in variants}
    stats = {}
    for rep in range(reps):
        for v in C.rotate(variants, rep):
            K.warm([npy if v == "eager" else snap])
            ws = spawn(1)
            try:
                r = ws[0].call(op="reap", kind=v, npy=npy, snap=snap, offsets=off_path)
            finally:
                close_all(ws)
            if r["sum"] != expected:
                problems.append(f"reap {v} rep {rep}: workload sum {r['sum']} != {expected}")
            if v == "ws_shared":
                roles = [p.get("role") for p in r["pools"]]
                if roles != ["created"]:
                    problems.append(f"reap ws_shared rep {rep}: pool roles {roles}, expected ['created'] (first user)")
            if r["stats"].get("errors"):
                problems.append(f"reap {v} rep {rep}: stats errors {r['stats']['errors']}")
            if r["stats"].get("again_ok") is False:
                problems.append(f"reap {v} rep {rep}: the workload's second run gave a different sum")
            stats[v] = r["stats"]
            for k in parts[v]:
                parts[v][k].append(r["t"][k] / 1e6)
    rows = {}
    for v in variants:
        rows[v] = C.summary(parts[v]["total"])
        rows[v]["restore_ms_median"] = float(np.median(parts[v]["restore"]))
        rows[v]["workload_ms_median"] = float(np.median(parts[v]["workload"]))
        rows[v]["stats"] = stats.get(v, {})
    C.print_table(["variant", "total_ms_med", "min", "max", "reps", "restore_ms", "workload_ms", "prefetched",
                   "published", "fallback"],
                  [[v, r["median"], r["min"], r["max"], r["n"], r["restore_ms_median"], r["workload_ms_median"]]
                   + [r["stats"].get(k, "-") for k in ("prefetched_pages", "pages_published", "pool_fallback_pages")]
                   for v, r in rows.items()], file)
    ratios = [C.ratio("reap_eager_vs_ws_private", rows["eager"]["median"], rows["ws_private"]["median"], ">=",
                      TARGET_REAP, "informational: eager / restore(working-set, share=False), warm, end to end")]
    if "ws_shared" in rows:
        ratios.insert(0, C.ratio("reap_eager_vs_ws_shared", rows["eager"]["median"], rows["ws_shared"]["median"],
                                 ">=", TARGET_REAP, "eager / restore(working-set, share=True) in the pool's first "
                                 "process, warm, end to end"))
        ratios.append(C.ratio("reap_ws_shared_vs_private", rows["ws_shared"]["median"], rows["ws_private"]["median"],
                              "<=", 1.1, "informational: shared first process / private restore (design: 1.05-1.1x)"))
    for p in (npy, snap, off_path):
        os.unlink(p)
    setups[reap.UNIFORM].pop("ws_pages", None)   # an array of pages: not for the JSON output
    return rows, ratios, {"setup": setups[reap.UNIFORM]}


# ---- run ---------------------------------------------------------------------------------------------------

def run(quick: bool = False, *, reps: int | None = None, file=None, parts=None, nbytes: int | None = None) -> dict:
    """parts: a subset of PARTS (default all); nbytes: the state size instead of 1 GiB / quick
    256 MiB (tests use a few MiB)."""
    file, plm, env, default_bytes, _, _ = C.setup(quick, reps, file, sizes=(256 * C.MiB, C.GiB))
    nbytes = nbytes or default_bytes
    parts = list(parts or PARTS)
    for p in parts:
        if p not in PARTS:
            raise ValueError(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    unavailable = share_unavailable(plm)
    problems, rows, ratios, skipped, extra = [], {}, [], {}, {}
    print(f"# {NAME}: parts {', '.join(parts)}; state {nbytes // C.MiB} MiB of random bytes; {NPROCS} workers "
          f"for the fan-out", file=file)
    C.print_environment(env, file)
    if unavailable:
        for p in ("fanout", "second", "reap"):
            if p in parts:
                skipped[p] = f"shared variants not run: {unavailable}"
        problems.append(f"restore(share=True) unavailable, shared variants not run: {unavailable}")
        print(f"SKIP shared variants: {unavailable}", file=file)
    # part: (function, repetitions (quick, full), state size)
    plan = {"fanout": (_fanout, (1, 5), nbytes), "second": (_second, (2, 5), nbytes),
            "template": (_template, (3, 7), min(nbytes, 128 * C.MiB) if quick else nbytes),
            "reap": (_reap, (2, 5), nbytes)}
    with K.scratch_dir(NAME) as d:
        for p in parts:
            fn, (rq, rf), size = plan[p]
            t0 = C.now_ns()
            try:
                rows[p], q, info = fn(plm, d, size, reps or (rq if quick else rf), problems, file, unavailable, quick)
            except Exception as e:   # a failed part is a problem; the others still run
                problems.append(f"{p}: {type(e).__name__}: {e}")
                print(f"PROBLEM {p} failed: {type(e).__name__}: {e}", file=file)
                continue
            ratios += q
            print(f"# part {p} took {(C.now_ns() - t0) / 1e9:.1f} s", file=file)
            if info:
                extra[p] = info
                if info.get("absent"):
                    skipped[p] = "absent Region keywords: " + "; ".join(info["absent"])
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "parts": parts, "nprocs": NPROCS, "env": env,
            "rows": rows, "ratios": {r["name"]: r for r in ratios}, "skipped": skipped, "problems": problems,
            "info": extra}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
