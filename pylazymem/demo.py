"""Suspend a vector-search service and resume it lazily in a new process.

The state is an inverted-file (IVF) index over embeddings: centroids, and the vectors grouped by
cluster, as named numpy arrays in a Region. A query probes the few clusters nearest to it;
popular clusters (Zipf) are asked about most, so requests touch a sparse, skewed part of the
state. Process A builds the state, serves a warm-up stream, checkpoints with its working set and
exits; process B, a fresh interpreter, resumes and serves the next requests, three ways (eager
load, lazy restore, lazy restore with working-set prefetch), and A's own timing of those requests
with the state resident is the floor. Every answer B gives must equal A's.

    pylazymem demo [--size MiB] [--requests N] [--json] [--quiet]
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

DIM = 128
NPROBE = 4
TOPK = 10
ZIPF = 1.3
VARIANTS = ("eager", "lazy", "lazy+ws")


# ---- the workload -------------------------------------------------------------------------

def plan(size_mib):
    nvec = max(4096, (size_mib << 20) // (DIM * 4))
    nclusters = max(64, min(8192, nvec // 512))
    return nvec, nclusters


def build(region, size_mib, seed, progress):
    """Centroids, offsets, vectors (grouped by cluster) and ids, placed in the region."""
    nvec, nc = plan(size_mib)
    rng = np.random.default_rng(seed)
    centroids = region.alloc("centroids", (nc, DIM), np.float32)
    centroids[:] = rng.standard_normal((nc, DIM), dtype=np.float32) * 4
    sizes = rng.multinomial(nvec - nc, rng.dirichlet(np.full(nc, 4.0))) + 1
    offsets = region.alloc("offsets", (nc + 1,), np.int64)
    offsets[0] = 0
    np.cumsum(sizes, out=offsets[1:])
    vectors = region.alloc("vectors", (nvec, DIM), np.float32)
    ids = region.alloc("ids", (nvec,), np.int64)
    ids[:] = rng.permutation(nvec)
    for c in range(nc):
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        noise = rng.random((hi - lo, DIM), dtype=np.float32)
        noise -= 0.5
        noise *= 3
        noise += centroids[c]
        vectors[lo:hi] = noise
        if progress and (c % 64 == 0 or c == nc - 1):
            progress(c + 1, nc)
    return nvec, nc


def make_requests(centroids, n, seed):
    """Queries near clusters drawn from a Zipf law: a few clusters are asked about most."""
    rng = np.random.default_rng(seed)
    nc = centroids.shape[0]
    popularity = rng.permutation(nc)
    ranks = np.minimum(rng.zipf(ZIPF, n), nc) - 1
    picked = popularity[ranks]
    q = centroids[picked] + (rng.random((n, DIM), dtype=np.float32) - 0.5) * 3
    return q.astype(np.float32)


def answer(arrays, q):
    """Top-k ids for one query: the NPROBE nearest clusters, then exact distances in them."""
    cent, off, vec, ids = arrays["centroids"], arrays["offsets"], arrays["vectors"], arrays["ids"]
    d = ((cent - q) ** 2).sum(axis=1)
    probe = np.argpartition(d, NPROBE)[:NPROBE]
    best_d, best_i = [], []
    for c in probe:
        lo, hi = int(off[c]), int(off[c + 1])
        block = vec[lo:hi]
        dist = ((block - q) ** 2).sum(axis=1)
        k = min(TOPK, hi - lo)
        top = np.argpartition(dist, k - 1)[:k]
        best_d.append(dist[top])
        best_i.append(ids[lo:hi][top])
    dd, ii = np.concatenate(best_d), np.concatenate(best_i)
    order = np.lexsort((ii, dd))[:TOPK]
    return [int(x) for x in ii[order]]


def serve(arrays, queries):
    """Answer every query; returns (answers, seconds to the first answer, seconds in all)."""
    t0 = time.perf_counter()
    out, first = [], None
    for q in queries:
        out.append(answer(arrays, q))
        if first is None:
            first = time.perf_counter() - t0
    return out, first, time.perf_counter() - t0


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ---- progress -----------------------------------------------------------------------------

class Bar:
    def __init__(self, label, quiet):
        self.label, self.quiet, self.last = label, quiet, -1

    def __call__(self, done, total):
        if self.quiet or not total:
            return
        pct = int(100 * done / total)
        if pct == self.last:
            return
        self.last = pct
        fill = pct * 30 // 100
        sys.stderr.write("\r  %-14s [%s%s] %3d%%" % (self.label, "#" * fill, "." * (30 - fill), pct))
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ---- process A and B ----------------------------------------------------------------------

def process_a(workdir, size_mib, nwarm, nreq, seed, quiet):
    """Build, save, resume, serve the warm-up stream, suspend; then the resident floor."""
    import pylazymem as plm

    nvec, nc = plan(size_mib)
    nbytes = nc * DIM * 4 + (nc + 1) * 8 + nvec * DIM * 4 + nvec * 8 + 8 * 4096
    snap = os.path.join(workdir, "state.plm")
    t0 = time.perf_counter()
    with plm.Region(nbytes) as r:
        build(r, size_mib, seed, Bar("building", quiet))
        t_build = time.perf_counter() - t0
        # First save, as a service does when it is deployed. A working set is only seen for
        # pages that fault: a freshly built state is all present, and reads of present pages
        # leave no trace (docs/design.md, "Working sets"); so the service resumes from this
        # save and its warm-up traffic then shows which pages it really uses.
        plm.checkpoint(r, snap, working_set="none", progress=Bar("saving", quiet))
        arrays = r.arrays
        raw = sum(a.nbytes for a in arrays.values())
        warm = make_requests(arrays["centroids"], nwarm, seed + 1)
        test = make_requests(arrays["centroids"], nreq, seed + 2)
        del arrays
    np.save(os.path.join(workdir, "requests.npy"), test)

    r = plm.restore(snap, prefetch="none", background=False)
    arrays = r.arrays
    r.mark_working_set()
    serve(arrays, warm)
    t0 = time.perf_counter()
    info = plm.checkpoint(r, snap, progress=Bar("suspending", quiet))   # pages still lazy are
    t_ckpt = time.perf_counter() - t0                                    # copied from the store
    # Everything resident from here on: np.save below writes from the arrays (a kernel read,
    # which user-mode-only userfaultfd cannot serve), and the floor needs the state resident.
    r.materialize()
    t0 = time.perf_counter()
    for name, a in arrays.items():   # the eager baseline: plain .npy files, as people save state
        np.save(os.path.join(workdir, name + ".npy"), a)
    t_npsave = time.perf_counter() - t0
    # The floor: the same requests with the whole state resident, after the checkpoint (so
    # they are not in its working set), once the files above are on disk.
    os.sync()
    answers, first, total = serve(arrays, test)
    with open(os.path.join(workdir, "answers.json"), "w") as f:
        json.dump(answers, f)
    result = {
        "variant": "resident", "first_answer_s": first, "total_s": total, "faults": 0,
        "prefetched": 0, "rss_mib": rss_mib(), "build_s": t_build, "checkpoint_s": t_ckpt,
        "np_save_s": t_npsave, "raw_bytes": raw, "snapshot_bytes": info.file_bytes,
        "working_set_pages": int(len(info.working_set)), "npages": info.npages,
        "pages_by_class": info.pages_by_class,
    }
    del arrays
    r.close()
    return result


def process_b(workdir, variant, timeline_path=None):
    import pylazymem as plm

    os.sync()   # files written by earlier steps must not be flushed while we are timed
    t_start = time.perf_counter()
    test = np.load(os.path.join(workdir, "requests.npy"))
    region = None
    if variant == "eager":
        arrays = {n: np.load(os.path.join(workdir, n + ".npy"))
                  for n in ("centroids", "offsets", "vectors", "ids")}
    else:
        region = plm.restore(os.path.join(workdir, "state.plm"),
                             prefetch="working-set" if variant == "lazy+ws" else "none",
                             background=True, timeline=bool(timeline_path))
        arrays = region.arrays
    t_ready = time.perf_counter() - t_start
    answers, first, total = serve(arrays, test)
    st = region.stats() if region is not None else {}
    with open(os.path.join(workdir, "answers.json")) as f:
        expected = json.load(f)
    result = {
        "variant": variant, "ready_s": t_ready, "first_answer_s": t_ready + first,
        "total_s": t_ready + total, "serve_s": total,
        "faults": st.get("faults", 0), "prefetched": st.get("prefetched_pages", 0),
        "background": st.get("background_pages", 0), "rss_mib": rss_mib(),
        "answers_match": answers == expected,
        "mismatches": sum(a != b for a, b in zip(answers, expected)),
    }
    if region is not None and timeline_path:
        tl = region.timeline()
        np.savez(timeline_path, page=tl["page"], t_us=tl["t_us"], path=tl["path"].astype(str))
    del arrays
    if region is not None:
        region.close()
    return result


def _child(args):
    """Run process A or one B variant in this (fresh) interpreter; print one JSON line."""
    if args.role == "a":
        res = process_a(args.workdir, args.size, args.warmup, args.requests, args.seed, args.quiet)
    else:
        res = process_b(args.workdir, args.role,
                        os.path.join(args.workdir, "timeline-%s.npz" % args.role)
                        if args.plot else None)
    print("RESULT " + json.dumps(res))
    return 0


def _spawn(role, args, workdir):
    cmd = [sys.executable, "-m", "pylazymem.demo", "--child", role, "--workdir", workdir,
           "--size", str(args.size), "--requests", str(args.requests), "--warmup",
           str(args.warmup), "--seed", str(args.seed)] + (["--quiet"] if args.quiet else []) + (
               ["--plot", args.plot] if args.plot else [])
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if not args.quiet else
                       subprocess.PIPE, text=True, timeout=args.timeout)
    if p.returncode != 0:
        raise RuntimeError("demo process %s failed (exit %d)%s" % (
            role, p.returncode, ": " + p.stderr.strip().splitlines()[-1] if p.stderr else ""))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _table(a, rows, out):
    print("\nvector search, %d MiB of state, %d requests after a warm-up of %d" % (
        a["raw_bytes"] >> 20, a["requests"], a["warmup"]), file=out)
    print("snapshot %.1f MiB (%.0f%% of raw state), working set %d of %d pages; checkpoint "
          "%.2f s (np.save of the same arrays %.2f s)" % (
              a["snapshot_bytes"] / 2**20, 100.0 * a["snapshot_bytes"] / a["raw_bytes"],
              a["working_set_pages"], a["npages"], a["checkpoint_s"], a["np_save_s"]), file=out)
    print("%-10s %12s %12s %10s %10s %12s %9s %7s" % (
        "resume", "1st answer", "all answers", "faults", "prefetched", "background", "RSS MiB",
        "same"), file=out)
    for r in rows:
        print("%-10s %10.1f ms %10.1f ms %10d %10d %12d %9.0f %7s" % (
            r["variant"], r["first_answer_s"] * 1e3, r["total_s"] * 1e3, r["faults"],
            r["prefetched"], r.get("background", 0), r["rss_mib"],
            "yes" if r.get("answers_match", True) else "NO"), file=out)


def run(args):
    import pylazymem as plm

    f = plm.features()
    if f.mode == "unavailable":
        raise RuntimeError(f.reason)
    workdir = args.workdir or tempfile.mkdtemp(prefix="pylazymem-demo-")
    os.makedirs(workdir, exist_ok=True)
    out = sys.stderr if args.json else sys.stdout
    # SIGTERM (a CI timeout, `kill`) as an exception: subprocess.run() then kills the running
    # process A or B and the finally below removes the work directory (about a GiB), where
    # the default action left both behind.
    old_term = None
    if threading.current_thread() is threading.main_thread():
        def _terminated(signum, frame):
            raise SystemExit(128 + signum)
        old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        if not args.quiet:
            print("process A: build %d MiB of state, serve %d warm-up requests, suspend"
                  % (args.size, args.warmup), file=out)
        a = _spawn("a", args, workdir)
        a.update(requests=args.requests, warmup=args.warmup)
        rows = []
        for v in VARIANTS:
            if not args.quiet:
                print("process B (%s): resume and serve %d requests" % (v, args.requests),
                      file=out)
            rows.append(_spawn(v, args, workdir))
        rows.append(a)
        by = {r["variant"]: r for r in rows}
        summary = {
            "first_answer_speedup": by["eager"]["first_answer_s"] / by["lazy+ws"]["first_answer_s"],
            "total_speedup": by["eager"]["total_s"] / by["lazy+ws"]["total_s"],
            "all_answers_match": all(r.get("answers_match", True) for r in rows),
        }
        if not args.quiet or not args.json:
            _table(a, rows, out)
            print("eager / lazy+ws: time to first answer %.1fx, total %.1fx; answers %s" % (
                summary["first_answer_speedup"], summary["total_speedup"],
                "identical" if summary["all_answers_match"] else "DIFFER"), file=out)
        if args.plot:
            summary["plots"] = _plots(args.plot, workdir, out, args.quiet)
        if args.json:
            print(json.dumps({"process_a": a, "resumes": rows[:-1], "summary": summary},
                             indent=1))
        if not summary["all_answers_match"]:
            raise RuntimeError("resumed answers differ from process A's")
        return 0
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _plots(outdir, workdir, out, quiet):
    """The snapshot's page map and the fault timelines of the lazy resumes, as PNG files."""
    from . import plot
    from ._snapfile import inspect_tables

    os.makedirs(outdir, exist_ok=True)
    info, table = inspect_tables(os.path.join(workdir, "state.plm"))
    pm = os.path.join(outdir, "pagemap.png")
    plot.page_map(table, info.working_set, pm, title="demo snapshot: %d pages" % info.npages)
    panels = []
    for v in ("lazy", "lazy+ws"):
        with np.load(os.path.join(workdir, "timeline-%s.npz" % v)) as z:
            panels.append(("resume: %s" % v, {k: z[k] for k in ("page", "t_us", "path")}))
    tl = os.path.join(outdir, "timeline.png")
    plot.timelines(panels, tl, title="when each page was brought in, and how")
    if not quiet:
        print("plots: %s, %s" % (pm, tl), file=out)
    return [pm, tl]


def add_arguments(ap):
    ap.add_argument("--size", type=int, default=1024, help="state size in MiB (default 1024)")
    ap.add_argument("--requests", type=int, default=300, help="requests after resume (300)")
    ap.add_argument("--warmup", type=int, default=300, help="warm-up requests before suspend")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="machine-readable results on stdout")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    ap.add_argument("--workdir", help="keep the snapshot and files here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900, help="per process, seconds")
    ap.add_argument("--plot", metavar="DIR", help="write the page map and the fault timelines "
                    "(PNG) into DIR")
    ap.add_argument("--child", dest="role", help=argparse.SUPPRESS)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pylazymem demo", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    for name in ("size", "requests", "warmup"):
        if getattr(args, name) <= 0:
            ap.error("--%s must be positive" % name)
    if args.role:
        if not args.workdir:
            ap.error("--child needs --workdir")
        return _child(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
