"""Compressed snapshots (issue 12): file size and time with compress=None / "zstd" / "lz4" beside
np.savez_compressed and zstd over the raw bytes, on state made by real libraries.

States (full / quick):
  mlp     the weights and biases of a scikit-learn MLPClassifier (hidden layers 2048 x 2048 /
          512 x 512, float64) trained for 3 epochs on sklearn's digits
  text    Python's standard library sources (*.py under sysconfig's stdlib directory)
          concatenated, held as a uint8 array: 64 MiB / 8 MiB
  sparse  a float32 array, 2% of its elements set (standard normal) at random places:
          64 MiB / 8 MiB (every page has some set: no zero pages to skip)

Per state, reps interleaved (+1 warm-up), files written to a scratch directory and deleted:
  ckpt_none / ckpt_zstd / ckpt_lz4  plm.checkpoint(region, path, compress=..., durable=False) of
                                  a Region holding the array (Region.alloc, filled untimed)
  plm_none / plm_zstd / plm_lz4   plm.save(path, {name: array}, compress=..., durable=False)
                                  (zstd at the default level, codec.c says why)
  savez_compressed                np.savez_compressed(path, x=array)  (zlib, one thread)
  zstd_raw_1 / zstd_raw_3         ZSTD_compress of the array's bytes as one frame, level 1 / 3
                                  (libzstd through ctypes, one thread; the bytes written to a
                                  file): what a whole-stream compressor gets, without random
                                  access to pages
and the load of each file with the page cache warm: plm.restore(prefetch="all",
background=False) of a checkpoint, plm.load(prefetch="all", background=False)
(every page read and decompressed), np.load(...)["x"], ZSTD_decompress of the whole file.
Every load is compared with the state. Ratios (informative targets): plm_zstd size vs
savez_compressed <= 1.5x; plm_zstd save time vs savez_compressed <= 1.0x.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sysconfig
import warnings

import numpy as np

from . import _ckpt as K
from . import _common as C

NAME = "compress"
VARIANTS = ("ckpt_none", "ckpt_zstd", "ckpt_lz4", "plm_none", "plm_zstd", "plm_lz4",
            "savez_compressed", "zstd_raw_1", "zstd_raw_3")


def state_mlp(quick):
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    h = 512 if quick else 2048
    m = MLPClassifier(hidden_layer_sizes=(h, h), max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # ConvergenceWarning: 3 epochs on purpose
        m.fit(X / 16.0, y)
    parts = [a.ravel() for a in m.coefs_ + m.intercepts_]
    return np.concatenate(parts)


def state_text(nbytes):
    out, n = [], 0
    root = sysconfig.get_paths()["stdlib"]
    for f in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        try:
            with open(f, "rb") as fh:
                b = fh.read()
        except OSError:
            continue
        out.append(b)
        n += len(b)
        if n >= nbytes:
            break
    return np.frombuffer(b"".join(out)[:nbytes], np.uint8)


def state_sparse(nbytes, seed=7):
    rng = np.random.default_rng(seed)
    n = nbytes // 4
    a = np.zeros(n, np.float32)
    idx = rng.choice(n, n // 50, replace=False)
    a[idx] = rng.standard_normal(idx.size).astype(np.float32)
    return a


class _Zstd:
    def __init__(self):
        lib = ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1")
        for f in ("ZSTD_compress", "ZSTD_decompress", "ZSTD_compressBound"):
            getattr(lib, f).restype = ctypes.c_size_t
        lib.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                      ctypes.c_size_t, ctypes.c_int]
        lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                        ctypes.c_size_t]
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        self.lib = lib

    def save(self, a, path, level):
        src = a.reshape(-1).view(np.uint8)
        out = np.empty(self.lib.ZSTD_compressBound(src.size), np.uint8)
        n = self.lib.ZSTD_compress(out.ctypes.data, out.size, src.ctypes.data, src.size, level)
        assert not self.lib.ZSTD_isError(n)
        with open(path, "wb") as f:
            f.write(memoryview(out)[:n])

    def load(self, path, like):
        with open(path, "rb") as f:
            data = np.frombuffer(f.read(), np.uint8)
        out = np.empty(like.nbytes, np.uint8)
        n = self.lib.ZSTD_decompress(out.ctypes.data, out.size, data.ctypes.data, data.size)
        assert n == out.size
        return out.view(like.dtype)


def _save(plm, zs, v, a, path, region):
    if v.startswith("ckpt_"):
        c = v[5:]
        plm.checkpoint(region, path, working_set="none", compress=None if c == "none" else c,
                       durable=False)
    elif v.startswith("plm_"):
        c = v[4:]
        plm.save(path, {"x": a}, compress=None if c == "none" else c, durable=False)
    elif v == "savez_compressed":
        np.savez_compressed(path, x=a)
    else:
        zs.save(a, path, int(v[-1]))


def _load(plm, zs, v, path, a):
    if v.startswith("ckpt_"):
        with plm.restore(path, prefetch="all", background=False) as r:
            ok = np.array_equal(r.arrays["x"], a)
        return ok
    if v.startswith("plm_"):
        st = plm.load(path, prefetch="all", background=False)
        ok = np.array_equal(st["x"], a)
        del st
        return ok
    if v == "savez_compressed":
        with np.load(path) as z:
            return np.array_equal(z["x"], a)
    return np.array_equal(zs.load(path, a), a)


def run(quick: bool = False, *, reps: int | None = None, file=None) -> dict:
    file, plm, env, _, reps, _ = C.setup(quick, reps, file)
    reps = reps if reps else 3
    size = (8 if quick else 64) * C.MiB
    zs = _Zstd()
    print(f"# {NAME}: plm.save(compress=None/zstd/lz4) vs np.savez_compressed vs zstd over the raw "
          f"bytes; {reps} reps interleaved (+{C.WARMUP} warm-up), load with a warm page cache",
          file=file)
    C.print_environment(env, file)
    states = {"mlp": state_mlp(quick), "text": state_text(size), "sparse": state_sparse(size)}
    problems, rows, ratios = [], {}, []
    with K.scratch_dir(NAME) as d:
        for sname, a in states.items():
            region = plm.Region(-(-a.nbytes // C.PAGE) * C.PAGE)
            region.alloc("x", a.shape, a.dtype)[...] = a
            save_ms = {v: [] for v in VARIANTS}
            load_ms = {v: [] for v in VARIANTS}
            sizes = {}
            for rep in range(-C.WARMUP, reps):
                for v in C.rotate(list(VARIANTS), rep):
                    path = os.path.join(d, f"{sname}-{v}" + (".npz" if v == "savez_compressed"
                                                             else ".bin"))
                    with C.quiet_gc():
                        t0 = C.now_ns()
                        _save(plm, zs, v, a, path, region)
                        t1 = C.now_ns()
                        ok = _load(plm, zs, v, path, a)
                        t2 = C.now_ns()
                    if not ok:
                        problems.append(f"{sname}/{v}: loaded contents differ")
                    sizes[v] = os.path.getsize(path)
                    os.unlink(path)
                    if rep >= 0:
                        save_ms[v].append((t1 - t0) / 1e6)
                        load_ms[v].append((t2 - t1) / 1e6)
            region.close()
            rows[sname] = {v: {"bytes": sizes[v], "size_ratio": sizes[v] / a.nbytes,
                               "save_ms": float(np.median(save_ms[v])),
                               "load_ms": float(np.median(load_ms[v]))} for v in VARIANTS}
            print(f"\n## {sname}: {a.nbytes / C.MiB:.1f} MiB ({a.dtype})", file=file)
            C.print_table(["variant", "MiB", "of raw", "save ms", "load ms"],
                          [[v, r["bytes"] / C.MiB, r["size_ratio"], r["save_ms"], r["load_ms"]]
                           for v, r in rows[sname].items()], file=file)
            z, sc = rows[sname]["ckpt_zstd"], rows[sname]["savez_compressed"]
            ratios.append(C.ratio(f"{sname}.zstd_size_vs_savez", z["bytes"], sc["bytes"], "<=",
                                  1.5, "checkpoint(compress='zstd') file / np.savez_compressed"))
            ratios.append(C.ratio(f"{sname}.zstd_save_vs_savez", z["save_ms"], sc["save_ms"],
                                  "<=", 1.0, "checkpoint(compress='zstd') time / savez_compressed"))
    print(file=file)
    C.print_ratios(ratios, file)
    return {"rows": rows, "ratios": {r["name"]: r for r in ratios}, "problems": problems,
            "env": env}
