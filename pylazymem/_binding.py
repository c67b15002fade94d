"""The 1:1 layer over the compiled core: loads it, checks that it matches this package, and
turns its statuses into exceptions (check()).

Only the cffi backend imports this module (see _backend.py); its ImportErrors say what to do.
"""
try:
    from ._lazymem import ffi, lib  # noqa: F401  (re-exported)
except ImportError as e:
    from ._errors import CoreNotLoaded

    if isinstance(e, CoreNotLoaded):     # the ctypes backend was chosen: that message says so
        raise
    raise ImportError(
        "pylazymem: the compiled core pylazymem._lazymem cannot be imported (%s); build it with "
        "'pip install -e .' (or bash scripts/setup.sh), or use the pure-Python backend "
        "(PYLAZYMEM_BACKEND=ctypes: no in-process lazy regions)" % e, name=e.name) from e

from ._errors import status_error  # noqa: E402

ABI_VERSION = 18

if lib.lm_abi_version() != ABI_VERSION:  # a stale build left next to newer Python files
    raise ImportError(
        "pylazymem: compiled core has ABI %d, the Python package expects %d; rebuild it "
        "(pip install -e . or bash scripts/test.sh)" % (lib.lm_abi_version(), ABI_VERSION)
    )

PAGE_SIZE = lib.lm_page_size()


def check(rc, what="", why_unavailable=None):
    """Turn a C return value into an exception (pylazymem._errors.status_error, with the failing
    operation the core recorded for this thread); returns rc when it is not an error."""
    if rc >= 0:
        return rc
    raise status_error(-rc, ffi.string(lib.lm_last_op()).decode(), what, why_unavailable)
