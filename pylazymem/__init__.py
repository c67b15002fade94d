"""pylazymem: page-fault-driven lazy memory for Python on Linux userfaultfd.

Pages of a Region carry metadata (state, known content class, canonical page, signature,
first-touch order). Updates are recorded there and carried out by native serving threads when
a page is first loaded or stored; zero pages map the kernel's shared zero page.
"""
__version__ = "0.1.0"

from ._errors import (  # noqa: E402
    InvalidArgumentError,
    InvalidRangeError,
    LazyMemError,
    RegionClosedError,
    UffdError,
    UnavailableError,
)
from ._features import Features, features  # noqa: E402
from ._meta import META_DTYPE, ZERO, PageClass, PageFlag, PageState  # noqa: E402
from .region import Canonical, Handler, Region  # noqa: E402
from .snapshot import SnapshotError, SnapshotInfo, checkpoint, inspect, restore  # noqa: E402

__all__ = [
    "__version__", "features", "Features", "Region", "Canonical", "Handler", "ZERO",
    "PageState", "PageClass", "PageFlag", "META_DTYPE", "LazyMemError", "InvalidArgumentError",
    "InvalidRangeError", "RegionClosedError", "UnavailableError", "UffdError",
    "checkpoint", "restore", "inspect", "SnapshotInfo", "SnapshotError",
]
