"""Build: the C core (cffi, pylazymem/_build.py) and the buffer type (csrc/pybuffer.c).

Both are optional for the package: without them it runs on the pure-Python ctypes backend
(docs/backends.md: page server, uffd binding, inspect; no in-process regions). They are built
unless PYLAZYMEM_BUILD_CORE=0, or when no C compiler is found (then a warning says what is
lost and how to get it), so `pip install` works on a machine without a compiler.
"""
import os
import shutil
import sys

from setuptools import Extension, setup


def _want_core():
    v = os.environ.get("PYLAZYMEM_BUILD_CORE", "auto")
    if v in ("0", "no", "false"):
        return False
    if v in ("1", "yes", "true"):
        return True
    cc = os.environ.get("CC", "cc").split()[0]
    if shutil.which(cc) or shutil.which("gcc"):
        return True
    sys.stderr.write(
        "pylazymem: no C compiler found: installing without the compiled core (ctypes backend: "
        "page server, uffd binding and inspect work; in-process lazy regions, checkpoint and "
        "restore need the core). Install gcc, libxxhash-dev, libzstd-dev and liblz4-dev and reinstall to get them.\n")
    return False


core = {}
if _want_core():
    core = dict(
        cffi_modules=["pylazymem/_build.py:ffibuilder"],
        ext_modules=[
            Extension(
                "pylazymem._buffer",
                sources=["csrc/pybuffer.c"],
                extra_compile_args=["-Wall", "-Wextra", "-Werror", "-std=gnu11"],
            )
        ],
    )

setup(**core)
