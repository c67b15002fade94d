"""The 1:1 layer over the compiled core: loads it and checks that it matches this package."""
from ._lazymem import ffi, lib  # noqa: F401  (re-exported)

ABI_VERSION = 4

if lib.lm_abi_version() != ABI_VERSION:  # a stale build left next to newer Python files
    raise ImportError(
        "pylazymem: compiled core has ABI %d, the Python package expects %d; rebuild it "
        "(pip install -e . or bash scripts/test.sh)" % (lib.lm_abi_version(), ABI_VERSION)
    )

PAGE_SIZE = lib.lm_page_size()
