"""Issue 12, benchmark 2: background checkpoints.

A 1 GiB region of random bytes and a thread storing to random pages of it throughout. Per
repetition: the writer's store rate over 1 s without a checkpoint (baseline), then
plm.checkpoint(region, path, background=True) and handle.wait(), the writer still storing: its
rate over that time. Two writers, each its own run:
  native   a C thread (_writer.c) storing 8-byte words to random pages: a program's threads that
           run without the GIL (numpy, torch)
  python   a Python thread storing batches of 64 words with numpy fancy indexing (holds the GIL
           between batches, so it also pays for every bit of Python the checkpoint thread runs)
Reported per writer: the pause (handle.pause: the core's mremap that moves the pages to
staging), how long checkpoint() took to return (handle.started), the time until the file was
written, the writer's longest stall during the checkpoint beside its longest stall without one
(both measured every 64 stores), and the store rates. The synchronous peer: a foreground
checkpoint of the same region with the writer stopped (the program is stopped for all of it;
the issue's "suspend" baseline). One repetition checks the file against a copy taken inside the
pause (test hook). Then the pause alone at 256 MiB, 1 GiB and 4 GiB (no writer): it does not grow
with the region.
Targets: pause <= 1 ms; writer rate during the checkpoint >= 0.5x its rate without one.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "bgckpt"
TARGET_PAUSE_MS = 1.0
TARGET_RATE = 0.5
WINDOW_S = 1.0

_CDEF = """
typedef struct wr_writer wr_writer;
wr_writer *wr_start(void *base, size_t nbytes, uint64_t seed);
void wr_window(wr_writer *w, uint64_t *stores, uint64_t *max_gap_ns);
void wr_stop(wr_writer *w);
"""


class _NativeWriter:
    def __init__(self, region, seed):
        from ._baseline import compiled
        self.ffi, self.lib = compiled(Path(__file__).with_name("_writer.c"), _CDEF, "_plm_bench_writer_")
        self.region = region
        base = self.ffi.cast("void *", region.address)
        self.w = self.lib.wr_start(base, region.nbytes, seed)
        if self.w == self.ffi.NULL:
            raise OSError("cannot start the native writer")

    def window(self):
        s, g = self.ffi.new("uint64_t *"), self.ffi.new("uint64_t *")
        self.lib.wr_window(self.w, s, g)
        return int(s[0]), g[0] / 1e6

    def stop(self):
        self.lib.wr_stop(self.w)


class _PythonWriter:
    def __init__(self, region, seed):
        self.view = region.ndarray(np.uint64)
        self.stores = 0
        self.max_gap = 0.0
        self._reset = True
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, args=(seed,), daemon=True)
        self.t.start()

    def _run(self, seed):
        rng = np.random.default_rng(seed)
        words = self.view.size
        last = time.perf_counter()
        vals = np.arange(64, dtype=np.uint64)
        while not self._stop.is_set():
            idx = rng.integers(0, words, size=64)
            self.view[idx] = vals
            self.stores += 64
            t = time.perf_counter()
            if self._reset:
                self._reset = False
                last = t
            self.max_gap = max(self.max_gap, t - last)
            last = t

    def window(self):
        s, g = self.stores, self.max_gap
        self.stores, self.max_gap, self._reset = 0, 0.0, True
        return s, g * 1e3

    def stop(self):
        self._stop.set()
        self.t.join()


def _fill_random(r, nbytes, rng):
    a = r.ndarray(np.uint8)
    for i in range(0, nbytes, 64 * C.MiB):
        a[i:i + 64 * C.MiB] = rng.integers(0, 256, min(64 * C.MiB, nbytes - i), dtype=np.uint8)
    return a


def _one(plm, r, path, writer, check_copy, problems):
    """One repetition: baseline window, then the background checkpoint's window."""
    from .. import snapshot

    time.sleep(0.2)
    writer.window()
    time.sleep(WINDOW_S)
    t_base = WINDOW_S
    base_stores, base_gap = writer.window()
    copy = np.zeros(r.nbytes, np.uint8) if check_copy else None
    t0 = time.perf_counter()
    if copy is None:
        h = plm.checkpoint(r, path, background=True)
    else:
        h = snapshot._start_background(r, path, "auto", None, True, None, None, _test_copy=copy)
    info = h.wait(600)
    t_ckpt = time.perf_counter() - t0
    stores, gap = writer.window()
    st = h.stats()
    if st["stray"]:
        problems.append(f"{st['stray']} stray faults in staging")
    if copy is not None:
        with plm.restore(info.path, prefetch="none", background=False) as r2:
            got = r2.ndarray(np.uint8)
            for i in range(0, r.nbytes, 64 * C.MiB):
                if not np.array_equal(got[i:i + 64 * C.MiB], copy[i:i + 64 * C.MiB]):
                    problems.append(f"file differs from the copy taken at the pause near byte {i}")
                    break
    os.unlink(path)
    return {"pause_ms": h.pause * 1e3, "started_ms": h.started * 1e3, "ckpt_ms": t_ckpt * 1e3,
            "rate_base": base_stores / t_base, "rate_ckpt": stores / t_ckpt,
            "gap_base_ms": base_gap, "gap_ckpt_ms": gap,
            "fault_served": st["fault_served"], "copied_back": st["copied_back"]}


def _pause_only(plm, nbytes, d, reps):
    """The pause alone, at one size: a region of ones, no writer."""
    out = []
    with plm.Region(nbytes) as r:
        a = r.ndarray(np.uint8)
        for i in range(0, nbytes, 256 * C.MiB):
            a[i:i + 256 * C.MiB] = 1
        for _ in range(reps):
            path = os.path.join(d, "scale.plm")
            h = plm.checkpoint(r, path, background=True, working_set="none")
            h.wait(600)
            out.append(h.pause * 1e3)
            os.unlink(path)
    return out


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)
    reps = reps if reps else 5
    rng = np.random.default_rng(20241206)
    problems = []
    results = {"native": [], "python": []}
    sync_ms = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB region of random bytes, a writer storing to random pages "
              f"throughout; checkpoint(background=True) then wait(); {reps} reps per writer; files in {d} "
              f"({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        f = plm.features()
        if not f.background_checkpoint:
            print(f"# SKIPPED: {f.background_checkpoint_reason}", file=file)
            return {"name": NAME, "skipped": f.background_checkpoint_reason, "env": env}
        r = plm.Region(nbytes)
        try:
            _fill_random(r, nbytes, rng)
            for rep in range(reps):   # the synchronous peer: the program stopped throughout
                path = os.path.join(d, "sync.plm")
                t0 = time.perf_counter()
                plm.checkpoint(r, path)
                sync_ms.append((time.perf_counter() - t0) * 1e3)
                os.unlink(path)
            for kind, cls in (("native", _NativeWriter), ("python", _PythonWriter)):
                w = cls(r, 7)
                try:
                    for rep in range(-1, reps):
                        row = _one(plm, r, os.path.join(d, "bg.plm"), w, rep == reps - 1, problems)
                        if rep >= 0:
                            results[kind].append(row)
                finally:
                    w.stop()
        finally:
            r.close()
        sizes = [64 * C.MiB, 128 * C.MiB] if quick else [256 * C.MiB, C.GiB, 4 * C.GiB]
        scale = {s: _pause_only(plm, s, d, 3) for s in sizes}

    def med(kind, key):
        return float(np.median([x[key] for x in results[kind]]))

    headers = ["writer", "pause_ms", "returned_ms", "written_ms", "rate_ratio", "stall_ms", "stall_base_ms",
               "by_fault", "copied_back"]
    C.print_table(headers, [[k, med(k, "pause_ms"), med(k, "started_ms"), med(k, "ckpt_ms"),
                             float(np.median([x["rate_ckpt"] / x["rate_base"] for x in results[k]])),
                             med(k, "gap_ckpt_ms"), med(k, "gap_base_ms"), med(k, "fault_served"),
                             med(k, "copied_back")] for k in results], file)
    print(f"# synchronous checkpoint (writer stopped): median {np.median(sync_ms):.1f} ms", file=file)
    for s, v in scale.items():
        print(f"# pause alone, {s // C.MiB} MiB region: median {np.median(v):.3f} ms (min {min(v):.3f}, "
              f"max {max(v):.3f})", file=file)
    rate = {k: float(np.median([x["rate_ckpt"] / x["rate_base"] for x in results[k]])) for k in results}
    pause = float(np.median([x["pause_ms"] for k in results for x in results[k]]))
    ratios = [C.ratio("pause", pause, 1.0, "<=", TARGET_PAUSE_MS,
                      "pause (ms, median over both writers) / 1 ms"),
              C.ratio("writer_rate_native", rate["native"], 1.0, ">=", TARGET_RATE,
                      "native writer's store rate during the checkpoint / without one"),
              C.ratio("writer_rate_python", rate["python"], 1.0, ">=", TARGET_RATE,
                      "Python writer's store rate during the checkpoint / without one"),
              C.ratio("pause_vs_sync", pause, float(np.median(sync_ms)), "<=", 0.01,
                      "informational: pause / synchronous checkpoint time (the program stopped)"),
              C.ratio("pause_scaling", float(np.median(scale[sizes[-1]])), float(np.median(scale[sizes[0]])),
                      "<=", 4.0, f"informational: pause at {sizes[-1] // C.MiB} MiB / at {sizes[0] // C.MiB} MiB "
                      f"({sizes[-1] // sizes[0]}x the pages)")]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "env": env,
            "results": results, "sync_ms": sync_ms, "scale": {str(k): v for k, v in scale.items()},
            "ratios": {x["name"]: x for x in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
