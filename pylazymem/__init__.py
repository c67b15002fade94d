"""pylazymem: page-fault-driven lazy memory for Python on Linux userfaultfd.

Pages of a Region carry metadata (state, known content class, canonical page, signature,
first-touch order). Updates are recorded there and carried out by native serving threads when
a page is first loaded or stored; zero pages map the kernel's shared zero page.

Two backends (PYLAZYMEM_BACKEND=auto|cffi|ctypes, docs/backends.md): "cffi", the compiled core,
offers everything; "ctypes", pure Python, offers features(), inspect(), the exceptions and
enums, pylazymem.uffd and the page server (PageServer), and refuses Region/checkpoint/restore with UnavailableError saying
why. `backend` and `backend_features` say which one this process uses and what it offers.
"""
from ._version import __version__  # noqa: E402,F401

# First: decides the backend (an explicit PYLAZYMEM_BACKEND=cffi without a usable core is an
# ImportError here, naming the fix). Nothing below may need the core under ctypes.
from . import _backend  # noqa: E402
from ._backend import BackendFeatures  # noqa: E402
from ._errors import (  # noqa: E402
    BusyError,
    InvalidArgumentError,
    InvalidRangeError,
    LazyMemError,
    ObjectStoreError,
    PoisonedPageError,
    RegionClosedError,
    SharingUnavailableError,
    UffdError,
    UnavailableError,
)
from ._features import Features, features  # noqa: E402
from ._meta import META_DTYPE, ZERO, PageClass, PageFlag, PageState  # noqa: E402
# Serving other processes needs no core (native engine where the core is loaded).
from .server import PageServer, ProtocolError, ServerStoppedError  # noqa: E402

#: "cffi" (the compiled core) or "ctypes" (pure Python): see docs/backends.md.
backend = _backend.NAME
#: What this backend offers (BackendFeatures), and the reason for what it does not.
backend_features = _backend.FEATURES

if backend == "cffi":
    from .region import Canonical, Handler, Region  # noqa: E402
    from .snapshot import (  # noqa: E402
        SnapshotError, SnapshotInfo, checkpoint, compact, inspect, restore)
    from .arrays import LoadedState, load, record_working_set, save  # noqa: E402
    from ._bgckpt import CheckpointHandle  # noqa: E402
else:
    # Stand-ins that raise UnavailableError with the reason and the fix: a program written for
    # the cffi backend fails at the first call it cannot make, with words, not at import.
    _refusals = _backend.refusals()
    Region, Canonical, Handler = _refusals["Region"], _refusals["Canonical"], _refusals["Handler"]
    checkpoint, restore = _refusals["checkpoint"], _refusals["restore"]
    save, load = _refusals["save"], _refusals["load"]
    record_working_set = _refusals["record_working_set"]
    from .arrays import LoadedState  # noqa: E402  (a class only: nothing loads without the core)
    del _refusals

    def __getattr__(name):
        # The snapshot reader needs no core; it is imported on first use (PEP 562), which
        # keeps `import pylazymem` light where only the uffd binding is wanted.
        if name in ("SnapshotError", "SnapshotInfo", "inspect"):
            from . import _snapfile

            value = getattr(_snapfile, name)
            globals()[name] = value
            return value
        if name == "compact":   # a file operation: reads and writes files, maps nothing
            from .snapshot import compact

            globals()[name] = compact
            return compact
        raise AttributeError("module 'pylazymem' has no attribute %r" % name)

__all__ = [
    "__version__", "features", "Features", "Region", "Canonical", "Handler", "ZERO",
    "PageState", "PageClass", "PageFlag", "META_DTYPE", "LazyMemError", "InvalidArgumentError",
    "InvalidRangeError", "PoisonedPageError", "RegionClosedError", "UnavailableError",
    "SharingUnavailableError", "UffdError", "BusyError", "ObjectStoreError", "CheckpointHandle",
    "checkpoint", "restore", "compact", "inspect", "SnapshotInfo", "SnapshotError",
    "save", "load", "record_working_set", "LoadedState",
    "backend", "backend_features", "BackendFeatures", "PageServer", "ProtocolError",
    "ServerStoppedError",
]
