"""Helpers for the checkpoint/restore benchmarks (reap, restore_none, restore_sequential, checkpoint).

Test data (random pages; the 50% zero / 25% duplicate / 25% unique mix), a scratch directory on a
real filesystem, and page-cache control: "cold" = sync + drop the page cache (root) plus
fadvise(DONTNEED) on the files; "warm" = the whole file read once, untimed, just before.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import shutil
import tempfile

import numpy as np

from . import _common as C

CHUNK = 64 * C.MiB   # bytes generated / copied per step (bounds temporaries)


# ---- test data -------------------------------------------------------------------------------

def fill_random(dst, rng) -> None:
    """Fill a contiguous uint8 array (size a multiple of 8) with random, incompressible bytes."""
    flat = dst.reshape(-1)
    for i in range(0, flat.size, CHUNK):
        part = flat[i:i + CHUNK]
        part.view(np.uint64)[:] = rng.bit_generator.random_raw(part.size // 8)


def copy_into(dst, src) -> None:
    """dst[:] = src in CHUNK pieces (every page of dst is written)."""
    d, s = dst.reshape(-1), src.reshape(-1)
    for i in range(0, d.size, CHUNK):
        d[i:i + CHUNK] = s[i:i + CHUNK]


def mixed_layout(npages: int, rng) -> dict:
    """Page kinds for the 50% zero / 25% duplicate / 25% unique mix, spread at random over the region.

    unique: pages with distinct random contents; dup: pages that copy one of the unique pages
    (dup_src, chosen at random), so the distinct stored contents are exactly the unique pages."""
    perm = rng.permutation(npages)
    nzero = npages // 2
    nuniq = npages // 4
    zero = np.sort(perm[:nzero])
    uniq = np.sort(perm[nzero:nzero + nuniq])
    dup = np.sort(perm[nzero + nuniq:])
    return {"zero": zero, "unique": uniq, "dup": dup, "dup_src": rng.choice(uniq, dup.size)}


def fill_mixed(dst, layout, rng) -> None:
    """Write every page of `dst` (contiguous uint8, whole pages): zeros, random unique pages, copies."""
    pages = dst.reshape(-1, C.PAGE)
    k = CHUNK // C.PAGE
    z = layout["zero"]
    for i in range(0, z.size, k):
        pages[z[i:i + k]] = 0
    u = layout["unique"]
    for i in range(0, u.size, k):
        idx = u[i:i + k]
        pages[idx] = rng.bit_generator.random_raw(idx.size * C.PAGE // 8).view(np.uint8).reshape(-1, C.PAGE)
    d, s = layout["dup"], layout["dup_src"]
    for i in range(0, d.size, k):
        pages[d[i:i + k]] = pages[s[i:i + k]]


class AnonPages:
    """Plain anonymous private memory with 4 KiB pages (MADV_NOHUGEPAGE), as a uint8 numpy array."""

    def __init__(self, nbytes: int):
        self._m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._m.madvise(mmap.MADV_NOHUGEPAGE)
        self.array = np.frombuffer(self._m, dtype=np.uint8)

    def close(self) -> None:
        self.array = None
        if self._m is not None:
            self._m.close()
            self._m = None


# ---- files, filesystem, page cache --------------------------------------------------------

@contextlib.contextmanager
def scratch_dir(name: str):
    """A temporary directory ($PYLAZYMEM_BENCH_DIR, else the system temp dir), removed afterwards."""
    d = tempfile.mkdtemp(prefix=f"plm-bench-{name}-", dir=os.environ.get("PYLAZYMEM_BENCH_DIR") or None)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def filesystem(path: str) -> str:
    """'fstype device on mountpoint' of the filesystem holding path (from /proc/self/mounts)."""
    p = os.path.realpath(path)
    best = None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if p == mnt or p.startswith(mnt.rstrip("/") + "/"):
                    if best is None or len(mnt) >= len(best[1]):
                        best = (dev, mnt, fstype)
    except OSError:
        return "?"
    return f"{best[2]} {best[0]} on {best[1]}" if best else "?"


_drop_ok = None


def drop_caches(paths=()) -> str:
    """Make the next reads of `paths` cold. Returns the method used:
    'drop_caches' (sync + echo 3 > /proc/sys/vm/drop_caches, needs root), else 'fadvise' (sync +
    POSIX_FADV_DONTNEED on each file: drops its clean cached pages), else 'none'."""
    global _drop_ok
    os.sync()
    method = "none"
    if _drop_ok is not False:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            _drop_ok = True
            method = "drop_caches"
        except OSError:
            _drop_ok = False
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if method == "none":
                method = "fadvise"
        except OSError:
            pass
        finally:
            os.close(fd)
    return method


_buf = None


def read_file(path: str) -> int:
    """Read the whole file into one reused, already-populated 64 MiB buffer; returns bytes read."""
    global _buf
    if _buf is None:
        _buf = bytearray(CHUNK)
        _buf[:] = b"\1" * CHUNK   # populated: the reads measure the file, not fresh memory
    mv = memoryview(_buf)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(mv)
            if not k:
                break
            n += k
    return n


def warm(paths) -> None:
    """Bring each file wholly into the page cache (untimed, before a warm variant)."""
    for p in paths:
        read_file(p)


_libc = None


def cached_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (mincore on a read-only mapping), or None."""
    global _libc
    try:
        size = os.path.getsize(path)
        if size == 0:
            return 0.0
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
        try:
            view = np.frombuffer(m, dtype=np.uint8)
            vec = np.zeros((size + C.PAGE - 1) // C.PAGE, np.uint8)
            rc = _libc.mincore(ctypes.c_void_p(view.ctypes.data), size, ctypes.c_void_p(vec.ctypes.data))
            del view
            if rc != 0:
                return None
            return float(np.count_nonzero(vec & 1)) / vec.size
        finally:
            m.close()
    except (OSError, AttributeError, ValueError):
        return None


def prepare(cache: str, paths) -> tuple:
    """Before a variant: cache == 'cold' drops the files from the page cache, 'warm' reads them in.
    Returns (method, fraction of the first file cached afterwards)."""
    if cache == "cold":
        method = drop_caches(paths)
    else:
        warm(paths)
        method = "read"
    return method, (cached_fraction(paths[0]) if paths else None)


def plm_stats(st: dict, keys=("faults", "readahead_pages", "pages_present", "prefetched_pages",
                              "background_pages", "source_bytes_read", "errors", "verify_failures",
                              "serving_threads")) -> dict:
    return {k: st.get(k) for k in keys}
