"""Issue 13: snapshots in an S3 object store (the real gateway of scripts/s3-server.sh: a Ceph
RADOS Gateway on loopback; start it first and export `bash scripts/s3-server.sh env`).

State: 1 GiB of random bytes (no dedup, no compression) in a named array. The working set is
recorded on reap.py's Zipf sample A (10% of the pages expected distinct) and every timed
workload is sample B (the brief: recorded on one sample, timed on another). The snapshot is
pushed with 512 KiB chunks.

  1. s3_cold    restore("s3://...", prefetch="working-set") + workload B, chunk cache empty
     download   pull the whole snapshot to a local file, restore it (working set) + workload B
     target: download / s3_cold >= 5x
  2. s3_warm    the same restore again, the machine's chunk cache warm (after a sync: the cold
                restore's cache writes are not in its time)
     local      restore(local file, working set) + workload B (the file in the page cache)
     target: s3_warm / local <= 1.2x
  3. 4 machines (network namespaces, each its own cache; where they cannot be made, 4
     processes with their own caches) restore at once, each with its own sample (C, D, E, F):
     bytes fetched from the gateway / the bytes of the distinct chunks each one's working set
     and workload need, summed: <= 1.1x. The union over the machines is printed beside it
     (no tier is shared between machines: each fetches what it needs once).
  4. push of a second snapshot that shares 90% of its pages with the first (10% of the pages,
     scattered, rewritten): bytes uploaded / its file size <= 0.15x.
Every workload's sum is checked against the state's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np

from . import _ckpt as K
from . import _common as C
from . import reap as R
from .._s3 import S3Client

NAME = "objstore"
# push's chunk size: 512 KiB (AWS Lambda's) unless PYLAZYMEM_BENCH_CHUNK_KIB says otherwise
CHUNK = int(os.environ.get("PYLAZYMEM_BENCH_CHUNK_KIB") or 512) << 10
MACHINES = 4


def _unavailable():
    if not os.environ.get("AWS_ENDPOINT_URL"):
        return ("no S3 gateway: bash scripts/s3-server.sh start; eval \"$(bash "
                "scripts/s3-server.sh env)\"")
    return None


def _timed(plm, src, offsets, cache, pull=None):
    """[pull `pull` (a URL) to the local file src,] restore(src, working set) + workload:
    (ms, sum, object-store stats or {})."""
    os.environ["PYLAZYMEM_CACHE_DIR"] = cache
    with C.quiet_gc():
        t0 = C.now_ns()
        if pull is not None:
            from pylazymem import objstore
            objstore.pull(pull, src)
        r = plm.restore(src, prefetch="working-set", background=False)
        try:
            view = r.arrays["state"]
            s = R._workload(view, offsets)
            t1 = C.now_ns()
            del view
            st = r.stats().get("object_store", {})
        finally:
            r.close()
    if pull is not None:
        os.unlink(src)
    return (t1 - t0) / 1e6, s, st


_MACHINE = r"""
import json, sys, time
import numpy as np
import pylazymem as plm
url, offsets_path = sys.argv[1], sys.argv[2]
offsets = np.load(offsets_path)
t0 = time.perf_counter()
with plm.restore(url, prefetch="working-set", background=False) as r:
    v = r.arrays["state"]
    s = int(v[offsets].sum(dtype=np.uint64))
    t = time.perf_counter() - t0
    del v
    print(json.dumps(dict(sum=s, ms=t * 1e3, **r.stats()["object_store"])), flush=True)
"""


def _needed_chunks(m, pmap, pages):
    """The distinct chunks that hold the entries of `pages` (stored pages only)."""
    e = pmap[pages].astype(np.int64) - 2
    e = e[e >= 0]
    return np.unique(m.entries["chunk"][e])


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file, sizes=(128 * C.MiB, C.GiB))
    why = _unavailable()
    if why:
        print(f"# {NAME}: skipped: {why}", file=file)
        return {"name": NAME, "quick": quick, "skipped": why, "ratios": {}, "problems": [why]}
    bucket = "plm-bench-%s" % uuid.uuid4().hex[:12]
    try:
        return _run(plm, file, env, nbytes, reps, npages, bucket, quick)
    finally:
        try:   # the test gateway keeps its data in memory
            S3Client().remove_bucket(bucket)
        except Exception as e:
            print(f"# could not remove s3://{bucket}: {e}", file=file)


def _run(plm, file, env, nbytes, reps, npages, bucket, quick):
    from pylazymem import objstore
    from pylazymem import _snapfile as S
    from ._machines import Machines, unavailable as no_machines
    problems = []
    sample, winfo = R.zipf_workload(npages, np.random.default_rng([R.ZIPF_SEED, 0]))
    draws = {k: sample(np.random.default_rng([R.ZIPF_SEED, k])) for k in range(1, 7)}
    rec, timed = draws[1], draws[2]
    with K.scratch_dir(NAME) as d:
        print(f"# {NAME}: {nbytes // C.MiB} MiB of random bytes; Zipf workload ({winfo['requests']} requests of "
              f"{R.CHUNK_BYTES // 1024} KiB), working set recorded on sample A, timed on B; chunks of "
              f"{CHUNK // 1024} KiB in s3://{bucket} at {os.environ['AWS_ENDPOINT_URL']}; {reps} reps", file=file)
        C.print_environment(env, file)
        ref = np.empty(nbytes, np.uint8)
        K.fill_random(ref, np.random.default_rng(7))
        base, snap = os.path.join(d, "base.plm"), os.path.join(d, "state.plm")
        with plm.Region(nbytes) as r0:
            K.copy_into(r0.alloc("state", nbytes, np.uint8), ref)
            plm.checkpoint(r0, base, working_set="none")
        with plm.restore(base, prefetch="none", background=False) as r1:
            view = r1.arrays["state"]
            if R._workload(view, rec) != R._workload(ref, rec):
                problems.append("recording: wrong sum")
            del view
            info = plm.checkpoint(r1, snap, working_set="auto")
        os.unlink(base)
        t0 = time.perf_counter()
        pushed = objstore.push(snap, f"s3://{bucket}/bench", chunk_bytes=CHUNK)
        push_s = time.perf_counter() - t0
        url = pushed.url
        m = objstore.read_manifest(url)
        fd = os.open(snap, os.O_RDONLY)
        try:
            pmap = S._read(fd, snap).map.astype(np.int64)
        finally:
            os.close(fd)
        print(f"# pushed {pushed.snapshot_bytes / C.MiB:.0f} MiB in {push_s:.1f} s ({pushed.chunks_uploaded} chunks); "
              f"working set {len(info.working_set)} pages", file=file)
        want = R._workload(ref, timed)
        caches = os.path.join(d, "caches")
        samples = {"s3_cold": [], "download": [], "s3_warm": [], "local": []}
        fetched = []
        for rep in range(-1, reps):
            cold = tempfile.mkdtemp(dir=d)
            order = C.rotate(["s3", "download", "local"], max(rep, 0))
            for v in order:
                if v == "s3":
                    t, s, st = _timed(plm, url, timed, cold)
                    os.sync()   # untimed: the cold restore's cache writes reach the disk first
                    t2, s2, st2 = _timed(plm, url, timed, cold)   # warm: a later restore
                    for name, tt, ss in (("s3_cold", t, s), ("s3_warm", t2, s2)):
                        if ss != want:
                            problems.append(f"{name} rep {rep}: wrong sum")
                        if rep >= 0:
                            samples[name].append(tt)
                    if rep >= 0:
                        fetched.append(st["fetch_bytes"])
                    if st2.get("requests"):
                        problems.append(f"s3_warm rep {rep}: {st2['requests']} requests with a warm cache")
                elif v == "download":
                    t, s, _ = _timed(plm, os.path.join(d, "dl.plm"), timed, cold, pull=url)
                    if s != want:
                        problems.append(f"download rep {rep}: wrong sum")
                    if rep >= 0:
                        samples["download"].append(t)
                else:
                    K.prepare("warm", [snap])
                    t, s, _ = _timed(plm, snap, timed, cold)
                    if s != want:
                        problems.append(f"local rep {rep}: wrong sum")
                    if rep >= 0:
                        samples["local"].append(t)
            shutil.rmtree(cold, ignore_errors=True)
        rows = {v: C.summary(samples[v]) for v in samples}
        C.print_table(["variant", "ms_median", "min", "max", "reps"],
                      [[v, rows[v]["median"], rows[v]["min"], rows[v]["max"], rows[v]["n"]] for v in rows], file)
        ws_pages = np.asarray(info.working_set, np.int64)
        need = _needed_chunks(m, pmap, np.union1d(ws_pages, timed // C.PAGE))
        print(f"# s3_cold fetched {np.median(fetched) / C.MiB:.1f} MiB (median); its working set and workload need "
              f"{need.size} chunks ({m.chunks['length'][need].sum() / C.MiB:.1f} MiB)", file=file)

        # 3. machines at once
        where = no_machines()
        offs_paths, need_bytes, union = [], 0, set()
        for k in range(MACHINES):
            offs = draws[3 + k] if 3 + k in draws else sample(np.random.default_rng([R.ZIPF_SEED, 10 + k]))
            pth = os.path.join(d, f"offsets{k}.npy")
            np.save(pth, offs)
            offs_paths.append(pth)
            nk = _needed_chunks(m, pmap, np.union1d(ws_pages, offs // C.PAGE))
            need_bytes += int(m.chunks["length"][nk].sum())
            union.update(nk.tolist())
        union_bytes = int(m.chunks["length"][sorted(union)].sum())
        envs = [dict(os.environ, PYLAZYMEM_CACHE_DIR=os.path.join(caches, str(k))) for k in range(MACHINES)]
        argvs = [[sys.executable, "-c", _MACHINE, url, offs_paths[k]] for k in range(MACHINES)]
        results = []
        t0 = time.perf_counter()
        if where is None:
            with Machines(MACHINES, os.environ["AWS_ENDPOINT_URL"]) as ms:
                procs = [ms.popen(k, argvs[k], env=envs[k], stdout=subprocess.PIPE, text=True)
                         for k in range(MACHINES)]
                for p in procs:
                    out, _ = p.communicate(timeout=600)
                    results.append(json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else None)
            how = "network namespaces"
        else:
            procs = [subprocess.Popen(argvs[k], env=envs[k], stdout=subprocess.PIPE, text=True)
                     for k in range(MACHINES)]
            for p in procs:
                out, _ = p.communicate(timeout=600)
                results.append(json.loads(out.strip().splitlines()[-1]) if p.returncode == 0 else None)
            how = f"processes with their own caches ({where})"
        wall = time.perf_counter() - t0
        if any(x is None for x in results):
            problems.append("a machine failed")
            results = [x for x in results if x]
        for k, x in enumerate(results):
            exp = R._workload(ref, np.load(offs_paths[k]))
            if x["sum"] != exp:
                problems.append(f"machine {k}: wrong sum")
        got = sum(x["fetch_bytes"] for x in results)
        print(f"# {MACHINES} machines ({how}) at once: {wall:.2f} s; fetched {got / C.MiB:.1f} MiB; their needs "
              f"summed {need_bytes / C.MiB:.1f} MiB, union {union_bytes / C.MiB:.1f} MiB; per machine ms "
              + ", ".join("%.0f" % x["ms"] for x in results), file=file)

        # 4. a second snapshot sharing 90% of its pages
        second = os.path.join(d, "second.plm")
        rng = np.random.default_rng(11)
        changed = rng.choice(npages, npages // 10, replace=False)
        with plm.Region(nbytes) as r2:
            st2 = r2.alloc("state", nbytes, np.uint8)
            K.copy_into(st2, ref)
            pv = st2.reshape(npages, C.PAGE)
            pv[changed] = rng.integers(0, 256, size=(changed.size, C.PAGE), dtype=np.uint8)
            del pv, st2
            plm.checkpoint(r2, second, working_set="none")
        p2 = objstore.push(second, f"s3://{bucket}/bench")
        print(f"# second snapshot: {p2.new_entries} of {p2.entries} entries new, {p2.bytes_uploaded / C.MiB:.1f} MiB "
              f"sent for a {p2.snapshot_bytes / C.MiB:.1f} MiB file", file=file)

    ratios = [C.ratio("download_vs_s3", rows["download"]["median"], rows["s3_cold"]["median"], ">=", 5.0,
                      "pull the whole snapshot + restore + workload / restore from the bucket + workload (cold cache)"),
              C.ratio("s3_warm_vs_local", rows["s3_warm"]["median"], rows["local"]["median"], "<=", 1.2,
                      "restore from the bucket, chunk cache warm / restore from a local file (page cache warm)"),
              C.ratio("machines_fetched", got, need_bytes, "<=", 1.1,
                      f"{MACHINES} machines at once: bytes fetched / the bytes of the chunks each one needs, summed"),
              C.ratio("second_push", p2.bytes_uploaded, p2.snapshot_bytes, "<=", 0.15,
                      "push of a snapshot sharing 90% of its pages: bytes uploaded / its size")]
    return C.finish(NAME, quick, nbytes, reps, env, rows, ratios, problems, file)


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main([NAME] + sys.argv[1:]))
