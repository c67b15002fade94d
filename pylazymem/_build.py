"""cffi build of the C core: the public header *is* the cdef, so the two cannot drift."""
import os
import re
import shutil
import subprocess
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
# In layer order, bottom first (csrc/lm_internal.h, "LAYERS"; tests/test_layering.py).
CORE_SOURCES = ["util.c", "codec.c", "objstore.c", "uffd.c", "server.c", "dirty.c", "meta.c", "wstrack.c", "store.c", "pool.c",
                "pooldir.c", "fill.c", "freeze.c", "serve.c", "prefetch.c", "checkpoint.c", "remote.c",
                "region.c"]


def header_cdef(path=os.path.join(CSRC, "lazymem.h")):
    """The declarations between the CDEF markers, without preprocessor lines."""
    with open(path) as f:
        text = f.read()
    body = text.split("/* CDEF BEGIN */", 1)[1].split("/* CDEF END */", 1)[0]
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))


_DISPATCH_PROBE = r"""
#include <xxhash.h>
#define XXH_DISPATCH_DISABLE_REPLACE
#include <xxh_x86dispatch.h>
int main(void) { return (int)(XXH3_64bits_dispatch("", 0) & 1); }
"""


def xxh_dispatch_available():
    """Whether the system's libxxhash carries its x86 run-time dispatcher (header and symbols:
    upstream installs them only when built with DISPATCH=1; Debian's has them). A program is
    linked against it, since a shared library would link with the symbols missing and fail at
    import instead."""
    import platform
    if platform.machine() not in ("x86_64", "AMD64") or os.environ.get("PYLAZYMEM_XXH_DISPATCH") == "0":
        return False
    cc = os.environ.get("CC", "cc").split()
    if not shutil.which(cc[0]):
        return False
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.c")
        with open(src, "w") as f:
            f.write(_DISPATCH_PROBE)
        try:
            return subprocess.run(cc + [src, "-o", os.path.join(d, "probe"), "-lxxhash"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=60).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def compile_args():
    args = ["-std=gnu11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden"]
    link = []
    # csrc/util.c: XXH3 through the library's dispatcher where it has one
    if xxh_dispatch_available():
        args.append("-DLM_XXH_DISPATCH")
    # PYLAZYMEM_SANITIZE=1 builds the core with ASan/UBSan (valgrind cannot run uffd code).
    if os.environ.get("PYLAZYMEM_SANITIZE"):
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
        # LM_CHECK_STATES: every end of a page claim checks its transition (csrc/meta.c).
        args += san + ["-DLM_CHECK_STATES"]
        link += san
    return args, link


ffibuilder = FFI()
ffibuilder.cdef(re.sub(r"/\*.*?\*/", "", header_cdef(), flags=re.S))
_args, _link = compile_args()
ffibuilder.set_source(
    "pylazymem._lazymem",
    '#include "lazymem.h"\n',
    sources=[os.path.relpath(os.path.join(CSRC, s)) for s in CORE_SOURCES],
    include_dirs=[CSRC],
    depends=[os.path.relpath(os.path.join(CSRC, h)) for h in ("lazymem.h", "lm_internal.h")],
    libraries=["xxhash", "zstd", "lz4", "curl", "pthread"],
    extra_compile_args=_args,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
