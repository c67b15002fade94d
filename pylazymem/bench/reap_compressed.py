"""Issue 12, benchmark 3 (second half): the REAP flow over a compressed snapshot.

State: text held as bytes (Python's standard library sources, compress.state_text, repeated to
the state size with a shift per repetition so that no two pages are equal): 1 GiB / 128 MiB
(quick), in a named array (Region.alloc). Workload: reap.py's Zipf one (128 KiB chunks, requests
drawn until 10% of the pages are expected to be read; one byte per page, summed). The working
set is recorded on sample A (a lazy restore of a snapshot with none, the workload, then
checkpoints with working_set="auto" of that region: one compress="zstd", one uncompressed), and
every variant runs sample B, cold (page cache dropped before each):
  eager        np.load of the state's .npy (the whole file into fresh memory), then the workload
  ws_zstd      plm.restore(zstd snapshot, prefetch="working-set", background=False), workload
  ws_raw       the same over the uncompressed snapshot (informational)
  none_zstd    plm.restore(zstd snapshot, prefetch="none", background=False), workload (inf.)
Target: eager / ws_zstd end to end >= 4x (the issue: the REAP flow over the compressed snapshot
still at least 4x faster than eager). Every sum is checked against the state's.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C
from . import reap as R
from .compress import state_text

NAME = "reap_compressed"
TARGET = 4.0


def _state(nbytes):
    text = state_text(min(nbytes, 64 * C.MiB))
    out = np.empty(nbytes, np.uint8)
    pos, k = 0, 0
    while pos < nbytes:
        part = np.roll(text, 97 * k)   # shifted: repetitions never line up into equal pages
        n = min(part.size, nbytes - pos)
        out[pos:pos + n] = part[:n]
        pos, k = pos + n, k + 1
    return out


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file, sizes=(128 * C.MiB, C.GiB))
    problems = []
    sample, winfo = R.zipf_workload(npages, np.random.default_rng([R.ZIPF_SEED, 0]))
    rec, timed = sample(np.random.default_rng([R.ZIPF_SEED, 1])), sample(np.random.default_rng([R.ZIPF_SEED, 2]))
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB of text (stdlib sources) as bytes; Zipf workload "
              f"({winfo['requests']} requests of {R.CHUNK_BYTES // 1024} KiB), working set recorded on sample A, "
              f"timed on sample B; cold page cache; {reps} reps; files in {d} ({K.filesystem(d)})", file=file)
        C.print_environment(env, file)
        ref = _state(nbytes)
        want = R._workload(ref, timed)
        npy = os.path.join(d, "state.npy")
        np.save(npy, ref)
        base = os.path.join(d, "base.snap")
        with plm.Region(nbytes) as r0:
            K.copy_into(r0.alloc("state", nbytes, np.uint8), ref)
            plm.checkpoint(r0, base, working_set="none")
        snaps = {"zstd": os.path.join(d, "zstd.snap"), "raw": os.path.join(d, "raw.snap")}
        with plm.restore(base, prefetch="none", background=False) as r1:
            view = r1.arrays["state"]
            if R._workload(view, rec) != R._workload(ref, rec):
                problems.append("recording: wrong sum on the lazily restored base")
            del view
            ws = r1.working_set()
            zi = plm.checkpoint(r1, snaps["zstd"], working_set=ws, compress="zstd")
            ri = plm.checkpoint(r1, snaps["raw"], working_set=ws)
        os.unlink(base)
        os.sync()
        print(f"# snapshot bytes: zstd {zi.file_bytes / C.MiB:.1f} MiB (stored {zi.stored_bytes / C.MiB:.1f} of raw "
              f"{zi.raw_bytes / C.MiB:.1f}), uncompressed {ri.file_bytes / C.MiB:.1f} MiB; .npy "
              f"{os.path.getsize(npy) / C.MiB:.1f} MiB; working set {ws.size} pages", file=file)
        variants = [("eager", lambda: R._run_eager(npy, timed), [npy]),
                    ("ws_zstd", lambda: R._run_lazy(plm, snaps["zstd"], timed, "working-set", False), [snaps["zstd"]]),
                    ("ws_raw", lambda: R._run_lazy(plm, snaps["raw"], timed, "working-set", False), [snaps["raw"]]),
                    ("none_zstd", lambda: R._run_lazy(plm, snaps["zstd"], timed, "none", False), [snaps["zstd"]])]
        samples = {v: [] for v, _, _ in variants}
        for rep in range(-1, reps):
            for name, fn, paths in C.rotate(variants, max(rep, 0)):
                K.prepare("cold", paths)
                t, s, _ = fn()
                if s != want:
                    problems.append(f"{name} rep {rep}: sum {s} != {want}")
                if rep >= 0:
                    samples[name].append(t["total"] / 1e6)
    rows = {v: C.summary(samples[v]) for v in samples}
    C.print_table(["variant", "ms_median", "min", "max", "reps"],
                  [[v, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"]] for v in rows], file)
    ratios = [C.ratio("eager_vs_ws_zstd", rows["eager"]["median"], rows["ws_zstd"]["median"], ">=", TARGET,
                      "eager np.load + workload / zstd snapshot restored with its working set + workload (cold)"),
              C.ratio("ws_zstd_vs_ws_raw", rows["ws_zstd"]["median"], rows["ws_raw"]["median"], "<=", 1.5,
                      "informational: compressed / uncompressed snapshot, same flow")]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "reps": reps, "env": env, "rows": rows,
            "ratios": {x["name"]: x for x in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
