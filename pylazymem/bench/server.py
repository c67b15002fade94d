"""Page server benchmark: 4K fault service through a server process vs in-process.

One Python thread in this process reads one byte of each of N random pages of a 64 MiB region
(16,384 pages; quick: 16 MiB) whose contents come from the same snapshot (random pages, file in
the page cache). Per repetition, interleaved:
  inproc       plm.restore(snapshot, prefetch="none", background=False): pylazymem's native
               serving threads in this process (default placement)
  server_c     plm.Region(nbytes, server=SOCK) served by `pylazymem serve --snapshot` in another
               process, native serving thread (engine "c")
  server_py    the same server with engine "python" (a Python thread, ctypes binding)
  provider     a PageServer in another process whose Python page provider returns each page
               from a memory-mapped copy of the contents (engine "python")
Every page read is checked against the source afterwards. Reported: time per fault (median),
ratios server_c / inproc and provider / inproc (targets 2x and 8x: a page fault crossing into
another process needs one more wake-up than in-process serving; a provider adds a Python call).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time

import numpy as np

from . import _common as C

NAME = "server"
PROVIDER = r"""
import mmap, os, signal, sys, threading
from pylazymem.server import PageServer
f = open(sys.argv[2], "rb")
mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
PS = mmap.PAGESIZE
def provider(offset):
    return mm[offset:offset + PS]
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: done.set())
with PageServer(sys.argv[1], provider=provider):
    print("pylazymem serve: listening on %s (pid %d)" % (sys.argv[1], os.getpid()), flush=True)
    done.wait()
"""


def _start(args):
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], 30)
    line = p.stdout.readline() if ready else ""
    if "listening on" not in line:
        p.kill()
        raise RuntimeError("server did not start: %r %s" % (line, p.communicate()[1]))
    return p


def _stop(p):
    p.terminate()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _touch(view, order):
    """Read one byte of each page in `order`: one fault each. Returns ns per fault."""
    with C.quiet_gc():
        t0 = C.now_ns()
        s = 0
        for p in order:
            s += view[p]
        t1 = C.now_ns()
    return (t1 - t0) / len(order)


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, nbytes, reps, npages = C.setup(quick, reps, file, (16 * C.MiB, 64 * C.MiB))
    nfaults = npages // 2
    rng = np.random.default_rng(20261128)
    problems = []
    with tempfile.TemporaryDirectory(prefix="plm-bench-server-") as d:
        ref = rng.integers(0, 256, nbytes, dtype=np.uint8)
        mem = os.path.join(d, "mem.bin")
        ref.tofile(mem)
        snap = os.path.join(d, "state.snap")
        r0 = plm.Region(nbytes)
        try:
            np.frombuffer(memoryview(r0), np.uint8)[:] = ref
            plm.checkpoint(r0, snap, working_set="none")
        finally:
            r0.close()
        print(f"# {NAME}: {nfaults} random 4K faults per repetition, one Python thread, "
              f"{nbytes // C.MiB} MiB region; {reps} reps interleaved (+{C.WARMUP} warm-up "
              f"discarded); files in the page cache", file=file)
        C.print_environment(env, file)
        py = sys.executable
        socks = {k: os.path.join(d, k + ".sock") for k in ("server_c", "server_py", "provider")}
        servers = {
            "server_c": [py, "-m", "pylazymem", "serve", "--socket", socks["server_c"],
                         "--snapshot", snap, "--engine", "c"],
            "server_py": [py, "-m", "pylazymem", "serve", "--socket", socks["server_py"],
                          "--snapshot", snap, "--engine", "python"],
            "provider": [py, "-c", PROVIDER, socks["provider"], mem],
        }
        procs = {k: _start(v) for k, v in servers.items()}
        variants = ["inproc", *servers]
        per = {v: [] for v in variants}
        try:
            for rep in range(-C.WARMUP, reps):
                for v in C.rotate(variants, rep):
                    order = rng.choice(npages, nfaults, replace=False) * C.PAGE
                    if v == "inproc":
                        r = plm.restore(snap, prefetch="none", background=False)
                    else:
                        r = plm.Region(nbytes, server=socks[v])
                    try:
                        view = np.frombuffer(memoryview(r), np.uint8)
                        ns = _touch(view, order.tolist())
                        pages = order // C.PAGE
                        got = view.reshape(-1, C.PAGE)[pages]
                        bad = int(np.count_nonzero((got != ref.reshape(-1, C.PAGE)[pages])
                                                   .any(axis=1)))
                        del view, got
                        st = r.stats()
                    finally:
                        r.close()
                    if bad:
                        problems.append(f"{v} rep {rep}: {bad} pages differ from the source")
                    if st.get("errors"):
                        problems.append(f"{v} rep {rep}: errors={st['errors']}")
                    if rep >= 0:
                        per[v].append(ns)
        finally:
            for p in procs.values():
                _stop(p)
    med = {v: C.summary(per[v])["median"] for v in variants}
    rows = [[v, med[v] / 1000, min(per[v]) / 1000, max(per[v]) / 1000, med[v] / med["inproc"]]
            for v in variants]
    C.print_table(["variant", "us/fault", "min", "max", "vs inproc"], rows, file)
    ratios = {
        "server_c": C.ratio("server_c_vs_inproc", med["server_c"], med["inproc"], "<=", 2.0,
                            "4K fault through a server process (native thread) / in-process"),
        "provider": C.ratio("provider_vs_inproc", med["provider"], med["inproc"], "<=", 8.0,
                            "4K fault through a Python page provider / in-process"),
        "server_py": C.ratio("server_py_vs_inproc", med["server_py"], med["inproc"], "<=", 8.0,
                             "4K fault through a server's Python thread (ctypes) / in-process"),
    }
    C.print_ratios(ratios.values(), file)
    for p in problems:
        print("PROBLEM", p, file=file)
    return {"rows": {v: C.summary(per[v]) for v in variants}, "ratios": ratios,
            "problems": problems, "env": env}
