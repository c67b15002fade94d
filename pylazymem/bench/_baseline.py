"""Build and drive the minimal C userfaultfd handler in _baseline.c (the benchmarks' yardstick).

The C file is compiled with cffi at first use into a cache directory keyed by the hash of
its source (and of the cdef, the Python version and the platform), so later runs just import it.
Cache: $PYLAZYMEM_BENCH_CACHE, else ~/.cache/pylazymem/bench, else a directory under the
system temp dir.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

_SRC = Path(__file__).with_name("_baseline.c")

CDEF = """
typedef struct bl_handler bl_handler;
bl_handler *bl_create(size_t nbytes, const void *page, int cpu, int *err);
uintptr_t bl_address(bl_handler *h);
size_t bl_length(bl_handler *h);
uint64_t bl_faults(bl_handler *h);
int bl_error(bl_handler *h);
int bl_stop(bl_handler *h);
void bl_destroy(bl_handler *h);
"""

CFLAGS = ["-O2", "-Wall"]



def _cache_dirs():
    env = os.environ.get("PYLAZYMEM_BENCH_CACHE")
    if env:
        yield Path(env)
    yield Path.home() / ".cache" / "pylazymem" / "bench"
    yield Path(tempfile.gettempdir()) / f"pylazymem-bench-{os.getuid()}"


def _key(source: str, cdef: str = CDEF) -> str:
    h = hashlib.sha256()
    for part in (source, cdef, " ".join(CFLAGS), sys.version, sysconfig.get_platform(),
                 sysconfig.get_config_var("EXT_SUFFIX") or ""):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _load(path: Path, modname: str):
    loader = importlib.machinery.ExtensionFileLoader(modname, str(path))
    spec = importlib.util.spec_from_file_location(modname, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _build(source: str, modname: str, dest: Path, cdef: str = CDEF) -> Path:
    import cffi

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = dest / (modname + suffix)
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(modname, source, extra_compile_args=CFLAGS, libraries=["pthread"])
    # Build in a private directory, then rename into the cache: concurrent builders never
    # see a half-written module.
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=dest))
    try:
        built = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
        os.replace(built, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_compiled = {}


def compiled(src: Path, cdef: str, prefix: str):
    """(ffi, lib) of a C file of the benchmarks compiled with cffi (cached; built on first
    use)."""
    if src not in _compiled:
        source = src.read_text()
        modname = prefix + _key(source, cdef)
        errors = []
        for d in _cache_dirs():
            try:
                path = _build(source, modname, d, cdef)
            except OSError as e:  # unwritable cache dir: try the next one
                errors.append(f"{d}: {e}")
                continue
            mod = _load(path, modname)
            _compiled[src] = (mod.ffi, mod.lib)
            break
        else:
            raise RuntimeError(f"cannot build {src.name}: " + "; ".join(errors))
    return _compiled[src]


def lib():
    """The compiled baseline handler's (ffi, lib); builds it on first use."""
    return compiled(_SRC, CDEF, "_plm_bench_baseline_")


class BaselineRegion:
    """A region served by the minimal C handler; `cpu` pins its one thread (None/-1 = unpinned)."""

    def __init__(self, nbytes: int, page: bytes | None = None, cpu: int | None = None):
        ffi, L = lib()
        self._ffi, self._lib = ffi, L
        err = ffi.new("int *")
        self._page = page  # keep alive during the call
        src = ffi.from_buffer(page) if page is not None else ffi.NULL
        if page is not None and len(page) != os.sysconf("SC_PAGESIZE"):
            raise ValueError("page must be exactly one page")
        h = L.bl_create(nbytes, src, -1 if cpu is None else cpu, err)
        if h == ffi.NULL:
            raise OSError(err[0], "baseline handler: " + os.strerror(err[0]))
        self._h = h
        self.address = int(L.bl_address(h))
        self.nbytes = int(L.bl_length(h))
        self.cpu = cpu

    def buffer(self):
        """A writable zero-copy buffer over the region (only valid until close())."""
        return self._ffi.buffer(self._ffi.cast("char *", self.address), self.nbytes)

    def ndarray(self, dtype="uint8"):
        import numpy as np

        return np.frombuffer(self.buffer(), dtype=dtype)

    def stop(self) -> None:
        if self._h is not None:
            e = self._lib.bl_stop(self._h)
            if e:
                raise OSError(-e, "baseline bl_stop: " + os.strerror(-e))

    @property
    def faults(self) -> int:
        return int(self._lib.bl_faults(self._h))

    @property
    def error(self) -> int:
        return int(self._lib.bl_error(self._h))

    def close(self) -> None:
        """Stop, unregister and unmap. Drop every view of the region before calling this."""
        if self._h is not None:
            self._lib.bl_destroy(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
