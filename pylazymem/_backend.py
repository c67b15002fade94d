"""Which implementation this process uses: the compiled core (cffi) or pure Python (ctypes).

    PYLAZYMEM_BACKEND=auto    (default, also when unset or empty) cffi if the compiled core
                              pylazymem._lazymem imports and has the ABI this package expects,
                              else ctypes, with the reason kept in backend_features.reason
    PYLAZYMEM_BACKEND=cffi    the compiled core, or ImportError naming the fix: an explicit
                              request never degrades silently
    PYLAZYMEM_BACKEND=ctypes  pure Python: the compiled modules are never loaded, even when
                              they are built (an explicit choice holds for pylazymem.region too)

What the ctypes backend cannot offer is in-process lazy regions (Region, and so checkpoint and
restore): a page of such a region must be served while the faulting thread is blocked in the
kernel, possibly holding the GIL, so the server must be native code that never needs the GIL. A
Python fault handler in the same process would deadlock. Everything that touches no lazy memory
of this process works under both: features(), inspect(), the exceptions and enums,
pylazymem.uffd (serving *another* process's faults). See docs/backends.md.

This module is imported first by the package and imports nothing that needs the core.
"""
import dataclasses
import errno
import importlib.util
import os
import sys

from . import uffd as _uffd
from ._errors import CoreNotLoaded, UnavailableError

ENV = "PYLAZYMEM_BACKEND"
CHOICES = ("auto", "cffi", "ctypes")
#: The compiled modules; under the ctypes backend neither is ever loaded.
CORE_MODULES = ("pylazymem._lazymem", "pylazymem._buffer")
#: The package's names that need in-process lazy regions, with their docs: under the ctypes
#: backend each is a stand-in raising UnavailableError (tests/conftest.py reads this too).
CORE_API = {
    "Region": "A lazy region of this process's memory.",
    "Canonical": "A canonical page of a Region.",
    "Handler": "A Region's serving threads.",
    "checkpoint": "Write a Region to a snapshot file.",
    "restore": "A Region restored from a snapshot file.",
    "save": "Write named arrays, tensors and tables to a snapshot file.",
    "load": "Load a snapshot (or .npy/.npz/.safetensors file) lazily as named arrays.",
    "record_working_set": "Store the pages a loaded state touched as its snapshot's working set.",
}
#: Command-line commands that run in-process lazy regions (pylazymem demo, pylazymem bench).
CORE_COMMANDS = ("demo", "bench")

BUILD_FIX = ("build the compiled core with 'pip install -e .' in the source tree (needs a C "
             "compiler, the Python headers and libxxhash-dev; 'bash scripts/setup.sh' installs "
             "them and builds it)")
GIL_REASON = ("in-process lazy regions need the native fault path: a Python fault handler in "
              "the same process would deadlock on the GIL (a thread that touches a missing page "
              "while holding the GIL blocks in the kernel, and the handler needs the GIL to "
              "serve it)")


@dataclasses.dataclass(frozen=True)
class BackendFeatures:
    """What the selected backend offers (plm.backend_features). Whether the *kernel* offers
    userfaultfd is a separate question: plm.features()."""
    name: str                   # "cffi" | "ctypes"
    regions: bool               # in-process lazy regions: Region(...)
    checkpoint_restore: bool    # checkpoint() and restore() (both act on in-process regions)
    page_server: bool           # out-of-process page serving (pylazymem.server) is present
    inspect: bool               # inspect() of snapshot files (always)
    uffd_binding: bool          # pylazymem.uffd knows this machine's syscall and ioctl layout
    reason: str                 # what is missing, why, and the fix ("" when nothing is)


def requested(environ=None):
    """The backend asked for in PYLAZYMEM_BACKEND: "auto", "cffi" or "ctypes".

    A value that is none of these is an ImportError (it is read when the package is imported),
    so a typo never silently picks a backend."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ImportError("pylazymem: %s=%r is not a backend: expected one of %s (or unset, "
                          "which means auto)" % (ENV, value, ", ".join(CHOICES)))
    return value


def _load_core():
    """Import the compiled core (pylazymem._binding checks its ABI); None, or why it failed."""
    try:
        from . import _binding  # noqa: F401
    except ImportError as e:
        return e
    return None


def select(environ=None):
    """(backend name, why the core is not in use or None): the decision made at import."""
    want = requested(environ)
    if want == "ctypes":
        return "ctypes", "%s=ctypes was requested" % ENV
    err = _load_core()
    if err is None:
        return "cffi", None
    if want == "cffi":
        raise ImportError(
            "pylazymem: %s=cffi, but the compiled core cannot be used (%s). Fix: %s; or select "
            "the pure-Python backend with %s=ctypes (features(), inspect() and pylazymem.uffd "
            "work there; in-process lazy regions, checkpoint and restore do not)"
            % (ENV, err, BUILD_FIX, ENV), name="pylazymem._lazymem") from err
    return "ctypes", "the compiled core cannot be used (%s)" % err


class _CoreBlocker:
    """A sys.meta_path finder refusing the compiled modules once the ctypes backend is chosen:
    code that reaches for them (pylazymem.region, pylazymem._binding) gets an ImportError that
    says why, instead of quietly running on a backend the user did not select."""

    def __init__(self, why):
        self.why = why

    def find_spec(self, name, path=None, target=None):
        if name in CORE_MODULES:
            raise CoreNotLoaded("%s is not loaded under the ctypes backend (%s); in-process "
                                "lazy regions, checkpoint and restore need the cffi backend: "
                                "unset %s or set it to cffi" % (name, self.why, ENV), name=name)
        return None


def _features(name, core_error):
    missing = []
    if name != "cffi":
        missing.append("no in-process lazy regions, checkpoint or restore: %s; %s. Fix: %s and "
                       "select the cffi backend (unset %s or set it to cffi)"
                       % (core_error, GIL_REASON, BUILD_FIX, ENV))
    # Looked up, not imported: the server module is another engineer's and may need the core.
    page_server = importlib.util.find_spec("pylazymem.server") is not None
    if not page_server:
        missing.append("no out-of-process page server: pylazymem.server is not part of this "
                       "version")
    uffd_binding = _uffd.SYS_userfaultfd is not None
    if not uffd_binding:
        missing.append("pylazymem.uffd does not support this machine: %s"
                       % _uffd._unsupported_machine().strerror)
    return BackendFeatures(name=name, regions=name == "cffi",
                           checkpoint_restore=name == "cffi", page_server=page_server,
                           inspect=True, uffd_binding=uffd_binding, reason="; ".join(missing))


NAME, CORE_ERROR = select()
FEATURES = _features(NAME, CORE_ERROR)
if NAME == "ctypes" and not any(isinstance(f, _CoreBlocker) for f in sys.meta_path):
    sys.meta_path.insert(0, _CoreBlocker(CORE_ERROR))


def unavailable(what):
    """The UnavailableError for `what` (e.g. "pylazymem.Region") under the ctypes backend."""
    return UnavailableError(
        errno.ENOSYS,
        "%s is not offered by the ctypes backend (%s): %s. Fix: %s and select the cffi backend "
        "(unset %s or set it to cffi). What the ctypes backend offers: features(), inspect(), "
        "pylazymem.uffd and the page server (serving other processes' faults)"
        % (what, CORE_ERROR, GIL_REASON, BUILD_FIX, ENV))


def require_core(what):
    """Raise unavailable(what) unless the cffi backend is in use."""
    if NAME != "cffi":
        raise unavailable(what)


def refusals():
    """{name: stand-in} for every name of CORE_API: classes for the capitalised names."""
    return {name: (refusing_class if name[0].isupper() else refusing_function)(name, doc)
            for name, doc in CORE_API.items()}


def refusing_class(name, doc):
    """A stand-in for a class of the core: constructing it raises unavailable()."""
    def __new__(cls, *args, **kwargs):
        raise unavailable("pylazymem.%s" % name)
    return type(name, (), {"__new__": __new__, "__module__": "pylazymem",
                           "__doc__": "%s Not offered by the ctypes backend: see "
                                      "pylazymem.backend_features." % doc})


def refusing_function(name, doc):
    """A stand-in for a function of the core: calling it raises unavailable()."""
    def refused(*args, **kwargs):
        raise unavailable("pylazymem.%s()" % name)
    refused.__name__ = refused.__qualname__ = name
    refused.__module__ = "pylazymem"
    refused.__doc__ = "%s Not offered by the ctypes backend: see pylazymem.backend_features." % doc
    return refused
