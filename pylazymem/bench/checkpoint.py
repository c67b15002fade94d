"""Checkpoint/restore benchmark 4: checkpoint vs np.save, time and file size.

1 GiB of 50% zero, 25% duplicate (copies of unique pages) and 25% unique random pages, spread at
random; every page written. The same bytes live in a Region (Region.alloc) and in a plain numpy
array. Per repetition, interleaved, each writing a new file in the same scratch directory (same
filesystem), deleted (and the page cache synced, untimed) before the next variant:
  checkpoint     plm.checkpoint(region, path)  (default working_set="auto"; fsyncs file and directory)
  checkpoint_nosync  plm.checkpoint(region, path, durable=False)  (atomic rename, no fsync)
  np_save        np.save(path, array)          (no fsync: the data may still be in the page cache)
  np_save_fsync  (extra) np.save to an open file, then flush + fsync (the same durability as checkpoint)
Targets: checkpoint / np_save time <= 1.0x, file size <= 0.27x. Once after the repetitions, a
checkpoint is restored (prefetch="none", then "all") and compared with the array byte for byte, and the .npy
reloaded and compared.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "checkpoint"
TARGET_TIME = 1.0
TARGET_SIZE = 0.27


def _run_ckpt(plm, region, path, durable=True):
    with C.quiet_gc():
        t0 = C.now_ns()
        info = plm.checkpoint(region, path, durable=durable)
        t1 = C.now_ns()
    return t1 - t0, os.path.getsize(path), info


def _run_save(arr, path, fsync):
    with C.quiet_gc():
        t0 = C.now_ns()
        if fsync:
            with open(path, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
        else:
            np.save(path, arr)
        t1 = C.now_ns()
    return t1 - t0, os.path.getsize(path)


def _chunks_equal(a, b) -> bool:
    a, b = a.reshape(-1), b.reshape(-1)
    return all(np.array_equal(a[i:i + K.CHUNK], b[i:i + K.CHUNK]) for i in range(0, a.size, K.CHUNK))


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file)

    rng = np.random.default_rng(20240614)
    variants = ["checkpoint", "checkpoint_nosync", "np_save", "np_save_fsync"]
    problems = []
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB ({npages} pages: 50% zero, 25% duplicate, 25% unique, every page "
              f"written) in a Region vs the same bytes in a numpy array; {reps} reps interleaved "
              f"(+{C.WARMUP} warm-up rep discarded); files in {d} ({K.filesystem(d)}), deleted after each variant",
              file=file)
        C.print_environment(env, file)
        t0 = C.now_ns()
        layout = K.mixed_layout(npages, rng)
        ref = np.empty(nbytes, np.uint8)
        K.fill_mixed(ref, layout, rng)
        r = plm.Region(nbytes)
        try:
            st = r.alloc("state", nbytes, np.uint8)
            K.copy_into(st, ref)
            del st
            print(f"# setup {(C.now_ns() - t0) / 1e9:.1f} s", file=file)

            samples = {v: [] for v in variants}
            sizes = {v: [] for v in variants}
            info = None
            for rep in range(-C.WARMUP, reps):   # rep < 0: warm-up, not recorded
                for v in C.rotate(variants, rep):
                    os.sync()
                    if v.startswith("checkpoint"):
                        path = os.path.join(d, f"state-{rep}.snap")
                        dt, size, info = _run_ckpt(plm, r, path, durable=(v == "checkpoint"))
                    else:
                        path = os.path.join(d, f"state-{rep}-{v}.npy")
                        dt, size = _run_save(ref, path, v == "np_save_fsync")
                    os.unlink(path)
                    if rep >= 0:
                        samples[v].append(dt / 1e6)   # ms
                        sizes[v].append(size)
            os.sync()

            # correctness, once: restore the checkpoint fully and compare; reload the .npy
            path = os.path.join(d, "check.snap")
            plm.checkpoint(r, path)
            st_before = r.stats()
            for mode in ("none", "all"):   # demand faults (+ readahead), then prefetch of every page
                r2 = plm.restore(path, prefetch=mode, background=False)
                try:
                    a2 = r2.arrays["state"]
                    if not _chunks_equal(a2, ref):
                        bad = int(np.count_nonzero((a2.reshape(-1, C.PAGE) != ref.reshape(-1, C.PAGE)).any(axis=1)))
                        problems.append(f"restore(prefetch={mode!r}) of the checkpoint differs from the source: "
                                        f"{bad} of {npages} pages wrong")
                    del a2
                    s2 = r2.stats()
                    if s2.get("errors"):
                        problems.append(f"restore(prefetch={mode!r}) of the check snapshot: errors={s2.get('errors')} "
                                        f"last_error={s2.get('last_error')!r}")
                finally:
                    r2.close()
            os.unlink(path)
            npy = os.path.join(d, "check.npy")
            np.save(npy, ref)
            if not _chunks_equal(np.load(npy, mmap_mode="r"), ref):
                problems.append("np.load of the .npy differs from the source bytes")
            os.unlink(npy)
            rstats = K.plm_stats(st_before)
        finally:
            r.close()
            del ref

    want = {"zero": layout["zero"].size, "untouched": 0, "unique": layout["unique"].size,
            "duplicate": layout["dup"].size}
    got = dict(info.pages_by_class)
    if got != want:
        problems.append(f"pages_by_class {got} != expected {want}")
    if rstats.get("errors"):
        problems.append(f"region stats errors={rstats.get('errors')}")

    rows = {}
    for v in variants:
        rows[v] = C.summary(samples[v])
        rows[v]["file_bytes"] = int(np.median(sizes[v]))
        rows[v]["GB_per_s_of_state"] = nbytes / (rows[v]["median"] * 1e6)
    rows["checkpoint"]["pages_by_class"] = got
    rows["checkpoint"]["working_set_pages"] = int(info.working_set.size)
    rows["checkpoint"]["stored_bytes"] = info.stored_bytes

    headers = ["variant", "ms_med", "min", "max", "reps", "state_GB/s", "file_MiB", "file/raw"]
    C.print_table(headers, [[v, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"],
                             rows[v]["GB_per_s_of_state"], rows[v]["file_bytes"] / C.MiB,
                             rows[v]["file_bytes"] / nbytes] for v in variants], file)
    print(f"# checkpoint: {got}, working set {info.working_set.size} pages (default 'auto': the pages first "
          f"touched since the region was created), store {info.stored_bytes / C.MiB:.1f} MiB; np_save and "
          f"checkpoint_nosync (durable=False) do not fsync, checkpoint and np_save_fsync do", file=file)

    ratios = [
        C.ratio("time_vs_np_save", rows["checkpoint_nosync"]["median"], rows["np_save"]["median"], "<=",
                TARGET_TIME, "plm.checkpoint(durable=False) / np.save time (neither fsyncs)"),
        C.ratio("durable_vs_np_save", rows["checkpoint"]["median"], rows["np_save"]["median"], "<=", TARGET_TIME,
                "informational: plm.checkpoint (fsync, the default) / np.save (no fsync)"),
        C.ratio("time_vs_np_save_fsync", rows["checkpoint"]["median"], rows["np_save_fsync"]["median"], "<=",
                TARGET_TIME, "plm.checkpoint / np.save + fsync time (same durability)"),
        C.ratio("size_vs_np_save", rows["checkpoint"]["file_bytes"], rows["np_save"]["file_bytes"], "<=",
                TARGET_SIZE, "snapshot file bytes / .npy file bytes"),
    ]
    C.print_ratios(ratios, file)
    for p in problems:
        print(f"PROBLEM {p}", file=file)
    return {"name": NAME, "quick": quick, "nbytes": nbytes, "pages": npages, "reps": reps, "env": env,
            "rows": rows, "ratios": {r["name"]: r for r in ratios}, "problems": problems}


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
