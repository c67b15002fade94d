"""The page server: serving other processes' memory through userfaultfd.

A client (Firecracker's VMM, a pylazymem Region, any program) creates a userfaultfd, registers
its memory and sends the fd over a Unix socket together with a JSON description of the ranges,
in the layout Firecracker sends to its page-fault handler (docs/page-server.md):

    [{"base_host_virt_addr": 140234..., "size": 1073741824, "offset": 0, "page_size": 4096}]

The server answers the client's faults from one source: a raw memory file (a range's bytes are
the file's bytes at `offset`), a pylazymem snapshot (offset 0 is the snapshot region's first
byte), or a Python page provider (a callable returning a page's bytes). Faults are served by a
native thread per client where the C core is available (backend "cffi") and the source is a
file; a provider, or the ctypes backend, is served by a Python thread per client. That is safe
here and only here: the faulting threads belong to another process, so they cannot hold our GIL.

Clients are checked with SO_PEERCRED (default: only our own uid); the socket is created 0600.
Each client's process is watched with a pidfd, so its serving thread ends when it exits.
"""
import bisect
import errno
import fcntl
import logging
import math
import operator
import os
import select
import socket
import stat
import threading
import time
from collections import deque
from typing import Dict, List, Optional

from . import _backend
# The wire protocol lives in ._protocol (a leaf module the clients import too); its names are
# re-exported here, where they have always been.
from ._protocol import (  # noqa: F401
    MAX_MAPPINGS,
    MAX_FDS,
    MAX_MESSAGE,
    MAX_SOCKET_PATH,
    PAGE_SIZE,
    SHARE_KEY,
    WATCHES_KEY,
    Mapping,
    asks_share,
    ProtocolError,
    connect,
    parse_mappings,
    peer_credentials,
    peer_pid,
    peer_pidfd,
    receive_handshake,
    send_answer,
)
from ._errors import InvalidArgumentError
from ._protocol import loads as _loads
from ._uffd_errors import InvalidRangeError, LazyMemError, UffdError, UnavailableError

log = logging.getLogger("pylazymem.server")

HANDSHAKE_TIMEOUT = 5.0     # seconds a connected client has for its whole handshake
MAX_HANDSHAKES = 16         # connections waiting for their handshake at once
SPIN_NS = 100_000           # python engine: look for the next fault this long before sleeping
MAX_CLUSTER_PAGES = 4096    # the native engine's readahead limit (LM_MAX_CLUSTER)
MAX_HANDSHAKE_TIMEOUT = 3600
MAX_CLIENTS = 1 << 16
# File descriptors the server needs (its RLIMIT_NOFILE budget, PageServer.start): a served
# client holds its uffd, its pidfd, its connection and the engine's own (stop eventfd and a
# dup of the source: 5, or a pipe pair: 5), one spare; a handshake its connection, its pidfd,
# the fds received and a reopen of the pool; and a margin for everything else.
FDS_PER_CLIENT = 6
FDS_PER_HANDSHAKE = 3 + MAX_FDS
FD_MARGIN = 64
ENGINES = ("auto", "c", "python")


# ---------------------------------------------------------------------------------------------
# Sources: where a page's bytes come from, by its offset in the source.
# ---------------------------------------------------------------------------------------------
class _FileSource:
    """A raw memory file: source offset o is the file's byte o (Firecracker's mem file)."""
    kind = "memory-file"
    table = None

    def __init__(self, path):
        # A str whatever was given: the path goes into the JSON answer (bytes would fail
        # there, after the client was admitted).
        self.path = os.fsdecode(os.fspath(path))
        # O_NONBLOCK: opening a FIFO must not wait for a writer (the server hung); cleared
        # once the file is known to be a regular one.
        self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise InvalidRangeError("%s is not a regular file" % self.path)
        os.set_blocking(self.fd, True)
        self.nbytes = st.st_size
        self.identity = {"kind": self.kind, "path": self.path, "bytes": self.nbytes}

    def page(self, offset):
        data = os.pread(self.fd, PAGE_SIZE, offset)
        if len(data) != PAGE_SIZE:
            raise EOFError("offset %d is past the end of %s (%d bytes)"
                           % (offset, self.path, self.nbytes))
        return data

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _SnapshotSource(_FileSource):
    """A pylazymem snapshot: source page i is the snapshot region's page i. A compressed store
    or a chain of files (docs/snapshot-format.md, version 3 and "Parents and chains") is a
    layered source: `chain` holds its files open, `layered` = (codes, layers, sigs) per page
    beside the offsets (Chain.locations), and pages are read and decoded through the chain
    (the Python engine) or by server.c (table_read)."""
    kind = "snapshot"
    chain = None
    layered = None

    def __init__(self, path):
        import numpy as np

        from ._snapfile import FLAG_COMPRESSED, FLAG_PARENT, _read, page_sources

        super().__init__(path)
        try:
            st = os.fstat(self.fd)
            self._stamps = [(self.path, self.fd, _file_stamp(st))]
            p = _read(self.fd, self.path)
            if p.header["flags"] & (FLAG_COMPRESSED | FLAG_PARENT):
                from ._chain import open_chain

                self.chain = open_chain(self.path, signatures=True)
                if os.fstat(self.chain.layers[0].fd).st_ino != st.st_ino:
                    raise InvalidRangeError("%s changed while it was being opened" % self.path)
                # Its parents are served as much as the leaf: each one's identity too.
                self._stamps += [(layer.path, layer.fd, _file_stamp(os.fstat(layer.fd)))
                                 for layer in self.chain.layers[1:]]
                offsets, codes, layers, sigs = self.chain.locations()
                self.layered = (codes, layers, sigs)
                file_bytes, page_size = p.header["file_bytes"], p.header["page_size"]
            else:
                info, offsets = page_sources(path)
                file_bytes, page_size = info.file_bytes, info.page_size
            if st.st_size != file_bytes or os.stat(self.path).st_ino != st.st_ino:
                raise InvalidRangeError("%s changed while it was being opened" % self.path)
            if page_size != PAGE_SIZE:
                raise InvalidRangeError("%s has %d-byte pages; this machine's are %d"
                                        % (self.path, page_size, PAGE_SIZE))
            self.check_unchanged()   # while the table was read
        except BaseException:
            self.close()
            raise
        self.table = np.ascontiguousarray(offsets, dtype=np.int64)
        self.nbytes = len(self.table) * PAGE_SIZE
        # What a client restoring the same snapshot compares (restore(server=...)).
        self.identity = {"kind": self.kind, "path": self.path, "bytes": self.nbytes,
                         "dev": st.st_dev, "ino": st.st_ino, "file_bytes": st.st_size,
                         "header_xxh3": p.header["header_xxh3"]}

    def check_unchanged(self):
        """Raises ProtocolError if a file of the snapshot (the leaf, or a parent of a chain)
        was written since it was opened (in place: the same inode), where the table read then
        no longer describes its bytes. Every file: a parent written over would be served
        with its new bytes under the leaf's old table."""
        for path, fd, stamp in self._stamps:
            if _file_stamp(os.fstat(fd)) != stamp:
                raise ProtocolError(
                    "the snapshot %s%s was written over since this server opened it: restart "
                    "the server to serve its new contents" % (
                        path, "" if path == self.path else " (a parent of %s)" % self.path))

    def page(self, offset):
        i = offset // PAGE_SIZE
        if i >= len(self.table):
            raise EOFError("offset %d is past the snapshot's %d pages" % (offset, len(self.table)))
        at = int(self.table[i])
        if at < 0:
            return None
        if self.chain is not None:   # decoded and checked against its signature
            return self.chain.read_pages([i])
        return super().page(at)

    def close(self):
        if self.chain is not None:
            self.chain.close()
            self.chain = None
        super().close()


def _file_stamp(st):
    """What changes when a file is written in place (cp keeps the inode): size, mtime, and
    ctime, which a writer cannot set back as it can mtime (utime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _ProviderSource:
    """A Python callable: provider(offset) -> bytes-like of one page, or None for zeros."""
    kind = "provider"
    fd = -1
    table = None

    def __init__(self, provider):
        if not callable(provider):
            raise TypeError("provider must be callable: provider(offset) -> bytes or None")
        self.provider = provider
        self.identity = {"kind": self.kind, "name": getattr(provider, "__name__", repr(provider))}

    def page(self, offset):
        data = self.provider(offset)
        if data is None:
            return None
        mv = memoryview(data).cast("B")
        if mv.nbytes != PAGE_SIZE:
            raise ValueError("provider returned %d bytes for offset %d; a page is %d"
                             % (mv.nbytes, offset, PAGE_SIZE))
        return mv

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------
_SRV_STAT_FIELDS = ("faults", "pages_copied", "pages_zero", "removed_faults", "events_remove",
                    "events_unmap", "events_remap", "poisoned", "errors", "last_error",
                    "service_ns_total", "service_ns_max", "unsupported_faults", "redelivered",
                    "died", "pages_published", "pages_shared_mapped", "pool_fallback_pages")


def pool_id(header_xxh3, npages, page_size):
    """The content id of a snapshot's pool (docs/shared-pages.md 2.1), as 16 hex digits:
    XXH3-64 of b"plm-pool-1" and the header checksum, page size and page count (little-endian
    64-bit). Two copies of one snapshot have one id; a snapshot with other content another."""
    import struct

    import xxhash
    return "%016x" % xxhash.xxh3_64_intdigest(
        b"plm-pool-1" + struct.pack("<QQQ", header_xxh3, page_size, npages))


class ServerStoppedError(LazyMemError, RuntimeError):
    """start() of a PageServer that was stopped: a server is started once (make a new one)."""


class Client:
    """One connected client: its credentials, ranges and serving engine.

    stats()["died"] is the -errno that ended its serving by an error (0 while it runs, or
    when it ended because the client exited or the server stopped)."""

    def __init__(self, pid, uid, gid, mappings, watches, engine, shares=False):
        self.pid, self.uid, self.gid = pid, uid, gid
        self.mappings: List[Mapping] = mappings
        self.watches_server = watches
        self.shares = shares     # maps the server's pool (handed it at the handshake)
        self.engine = engine
        self.connected_at = time.time()
        self._c = None           # C engine: struct lm_srv *
        # Taken to read _c and call into it, and to take it away before it is freed: stats()
        # from another thread (pylazymem serve --stats-every) read a freed struct otherwise.
        self._c_lock = threading.Lock()
        self._c_final = None     # C engine: its stats when it ended
        self._thread = None      # Python engine
        self._py_stats = dict.fromkeys(_SRV_STAT_FIELDS, 0)
        self._stop_r = self._stop_w = -1
        self._conn = None

    @property
    def alive(self) -> bool:
        with self._c_lock:
            if self._c is not None:
                from ._binding import lib
                return bool(lib.lm_srv_running(self._c))
        return self._thread is not None and self._thread.is_alive()

    def _c_stats(self):   # with _c_lock held, _c set
        from ._binding import ffi, lib
        st = ffi.new("struct lm_srv_stats *")
        lib.lm_srv_stats(self._c, st)
        return {k: int(getattr(st, k)) for k in _SRV_STAT_FIELDS}

    def stats(self) -> Dict[str, int]:
        with self._c_lock:
            if self._c is not None:
                from ._binding import lib
                d = self._c_stats()
                d["running"] = int(bool(lib.lm_srv_running(self._c)))
                return d
            if self._c_final is not None:
                return dict(self._c_final, running=0)
        d = dict(self._py_stats)
        d["running"] = int(self.alive)
        return d

    def __repr__(self):
        return "<pylazymem.server.Client pid=%d uid=%d engine=%s ranges=%d %s>" % (
            self.pid, self.uid, self.engine, len(self.mappings),
            "alive" if self.alive else "gone")


def _poison_refused(fd, msg):
    """A refused client that sent its uffd must not wait forever: Firecracker never reads our
    answer, and its first fault would hang (its own example handler SIGKILLs the VMM instead).
    Poison whatever of the ranges it described is still missing, so that its accesses fail
    loudly (SIGBUS); best effort, with any page size it claimed. Whatever the message holds
    (integers of thousands of digits, nesting thousands deep) the ranges are read: nesting
    below the mappings' fields is dropped first (_protocol.loads)."""
    from .uffd import Userfaultfd

    try:
        doc = _loads(msg, keep=2)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return
    if not isinstance(doc, list):
        return
    u = Userfaultfd(fd, owned=False)
    u.eagain_timeout = 0.1
    for m in doc[:MAX_MAPPINGS]:
        if not isinstance(m, dict):
            continue
        base, size = m.get("base_host_virt_addr"), m.get("size")
        ps = m.get("page_size", m.get("page_size_kib", PAGE_SIZE))
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                   for x in (base, size, ps)) or ps & (ps - 1) or (base | size) % ps:
            continue
        u.page_size = ps
        try:
            u.poison(base, size)
        except (LazyMemError, OSError, ValueError):
            pass
    u.detach()


def _is_userfaultfd(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def _readable_now(fd):
    """True if fd polls readable at once (a pidfd: its process has exited)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


class _Intervals:
    """A set of page numbers kept as sorted, disjoint, non-touching half-open intervals: the
    pages a client removed. One MADV_DONTNEED of a TiB is one interval, not 2**28 numbers."""

    def __init__(self):
        self.starts: List[int] = []
        self.ends: List[int] = []

    def add(self, lo, hi):
        if lo >= hi:
            return
        # Intervals i..j-1 overlap or touch [lo, hi): those ending at or after lo and
        # starting at or before hi. They become one.
        i = bisect.bisect_left(self.ends, lo)
        j = bisect.bisect_right(self.starts, hi)
        if i < j:
            lo, hi = min(lo, self.starts[i]), max(hi, self.ends[j - 1])
        self.starts[i:j] = [lo]
        self.ends[i:j] = [hi]

    def discard(self, lo, hi):
        """Take [lo, hi) out of the set (the intervals it cuts keep their other parts)."""
        if lo >= hi:
            return
        i = bisect.bisect_right(self.ends, lo)    # the first interval ending after lo
        j = bisect.bisect_left(self.starts, hi)   # intervals i..j-1 start before hi
        if i >= j:
            return
        starts, ends = [], []
        if self.starts[i] < lo:
            starts.append(self.starts[i])
            ends.append(lo)
        if self.ends[j - 1] > hi:
            starts.append(hi)
            ends.append(self.ends[j - 1])
        self.starts[i:j] = starts
        self.ends[i:j] = ends

    def __contains__(self, page):
        i = bisect.bisect_right(self.starts, page) - 1
        return i >= 0 and page < self.ends[i]

    def __len__(self):
        return len(self.starts)


class _Unsupported(Exception):
    """A fault this server does not serve (write-protect or minor)."""


class _NoHandshake(Exception):
    """A connection closed before sending anything: not a client (a probe of the path)."""


class _PyEngine:
    """Serve one client in a Python thread with the ctypes binding (pylazymem.uffd).

    Ownership of the client's uffd and pidfd passes to the engine only once its thread has
    started (`started`); until then the caller closes them, and discard() releases only what
    the engine made itself. After that close() is their one closer."""

    def __init__(self, client, uffd_fd, pidfd, source, fail_after=0):
        from .uffd import Userfaultfd

        self.client, self.source = client, source
        self.uffd = Userfaultfd(uffd_fd, owned=False)
        self.uffd.eagain_timeout = 0        # EAGAIN: events are pending, and we must read them
        self.started = False
        self.fail_after = fail_after        # test hook: fail after this many faults (0: never)
        # poll() on a blocking uffd reports POLLERR; the flag is the shared file description's
        # and the client does not read from it.
        fcntl.fcntl(uffd_fd, fcntl.F_SETFL, fcntl.fcntl(uffd_fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        self.pidfd = pidfd
        self.removed = [_Intervals() for _ in client.mappings]   # removed pages per mapping
        # Pages no longer the mapping's (an mremap moved other memory there, or moved part of
        # the mapping away), per mapping: faults there are poisoned.
        self.dead = [_Intervals() for _ in client.mappings]
        self.bases = [m.base_host_virt_addr for m in client.mappings]
        client._stop_r, client._stop_w = os.pipe2(os.O_CLOEXEC)
        self.pending = deque()

    def _find(self, addr):
        """The mapping that serves addr: a mapping's dead pages are not its own (after a
        whole mapping moved over part of another, the moved one is found there)."""
        for i, m in enumerate(self.client.mappings):
            if self.bases[i] <= addr < self.bases[i] + m.size and \
                    (addr - self.bases[i]) // PAGE_SIZE not in self.dead[i]:
                return i, m
        return None, None

    def _mark(self, sets, start, end, add, skip=None):
        """Add [start, end) of the client's address space to (or take it out of) the page
        sets `sets` (self.removed or self.dead) of every mapping it overlaps but `skip`."""
        for i, m in enumerate(self.client.mappings):
            lo, hi = max(start, self.bases[i]), min(end, self.bases[i] + m.size)
            if i != skip and lo < hi:
                lo, hi = ((lo - self.bases[i]) // PAGE_SIZE,
                          (hi - self.bases[i] + PAGE_SIZE - 1) // PAGE_SIZE)
                if add:
                    sets[i].add(lo, hi)
                else:
                    sets[i].discard(lo, hi)

    def _event(self, ev):
        from . import uffd as U

        st = self.client._py_stats
        if isinstance(ev, (U.Remove, U.Unmap)):
            st["events_remove" if isinstance(ev, U.Remove) else "events_unmap"] += 1
            # Zeros from now on, the kernel's semantics of a dropped anonymous page, also
            # where an mremap had left pages dead.
            self._mark(self.removed, ev.start, ev.end, True)
            self._mark(self.dead, ev.start, ev.end, False)
        elif isinstance(ev, U.Remap):
            # Whatever was at the destination is gone (mremap replaced it): dead in every
            # mapping but the one moved there, so no fault there is served with another
            # range's bytes. A whole mapping moved is followed; a partial move is not: the
            # part moved away is dead in its mapping too, and faults there are poisoned.
            st["events_remap"] += 1
            i, m = self._find(ev.from_)
            whole = m is not None and self.bases[i] == ev.from_ and m.size == ev.len
            if whole:
                self.bases[i] = ev.to   # its removed and dead pages move with it
            else:
                self._error(-errno.ENOTSUP, "partial mremap of a served range is not followed: "
                            "faults on the moved pages are poisoned")
                self._mark(self.dead, ev.from_, ev.from_ + ev.len, True)
            self._mark(self.dead, ev.to, ev.to + ev.len, True, skip=i if whole else None)
        elif isinstance(ev, U.Fork):
            # Not served. Closing the child's uffd alone would leave its registered ranges
            # plain memory (its missing pages read as zeros): poisoned first, it fails loudly.
            try:
                self._poison_child(ev.ufd, 0)
            finally:
                os.close(ev.ufd)
            self._error(-errno.ENOTSUP, "forked children are not served: the child's missing "
                        "pages were poisoned")

    def _poison_child(self, fd, depth):
        """Poison every page of the client's ranges still missing in a forked child, through
        the child's uffd `fd` (as refused clients are poisoned); the markers outlive the
        registration when the fd is closed, so the child's access fails with SIGBUS. Present
        pages (copied at fork) are stepped over. The child may run already: an event of its
        own makes POISON fail with EAGAIN until it is read; its messages are read and dropped
        (a fault's thread is woken by the poisoning of its page or by the close), a
        grandchild's uffd poisoned the same way. Bounded: best effort (as the native
        engine's poison_child)."""
        from . import uffd as U
        from .uffd import Userfaultfd

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        u = Userfaultfd(fd, owned=False)
        u.eagain_timeout = 0
        try:
            for i, m in enumerate(self.client.mappings):
                for _ in range(1000):
                    try:
                        u.poison(self.bases[i], m.size)
                        break
                    except UffdError as e:
                        if e.errno != errno.EAGAIN:
                            break   # ENOENT: not mapped in the child; ESRCH: it is gone
                    try:
                        evs = u.read_events(max=64)
                    except UffdError:
                        break
                    for ev in evs:
                        if isinstance(ev, U.Fork):
                            try:
                                if depth < 4:
                                    self._poison_child(ev.ufd, depth + 1)
                            finally:
                                os.close(ev.ufd)
                    if not evs:
                        time.sleep(0)   # its event is read; its madvise has not finished
        finally:
            u.detach()

    def _read(self):
        """Read everything pending (events handled now, faults queued); returns the count.
        Never stops because faults are queued: an unread REMOVE blocks every fill."""
        from . import uffd as U

        n = 0
        while True:
            evs = self.uffd.read_events(max=64)
            if not evs:
                return n
            n += len(evs)
            for ev in evs:
                if isinstance(ev, U.PageFault):
                    self.pending.append(ev)
                else:
                    self._event(ev)

    def _error(self, rc, why):
        st = self.client._py_stats
        st["errors"] += 1
        st["last_error"] = rc
        log.warning("client pid %d: %s", self.client.pid, why)

    def _poison(self, addr, rc, why):
        self._error(rc, why)
        self.client._py_stats["poisoned"] += 1
        try:
            self.uffd.poison(addr, PAGE_SIZE)
        except UffdError as e:
            log.warning("client pid %d: cannot poison %#x: %s", self.client.pid, addr, e)

    def _serve(self, addr):
        """Fill one page; raises UffdError(EAGAIN) when events must be read first."""
        st = self.client._py_stats
        i, m = self._find(addr)
        if m is None:
            return self._poison(addr, -errno.EFAULT, "fault at %#x outside every range" % addr)
        page = (addr - self.bases[i]) // PAGE_SIZE
        if page in self.removed[i]:
            self.uffd.zeropage(addr, PAGE_SIZE)
            st["removed_faults"] += 1
            return
        offset = m.offset + page * PAGE_SIZE
        try:
            data = self.source.page(offset)
        except Exception as e:   # a provider's bug must fail the access loudly, not hang it
            return self._poison(addr, -errno.EIO, "page at source offset %d: %s: %s"
                                % (offset, type(e).__name__, e))
        if data is None:
            self.uffd.zeropage(addr, PAGE_SIZE)
            st["pages_zero"] += 1
        else:
            self.uffd.copy(addr, data, PAGE_SIZE)
            st["pages_copied"] += 1

    def run(self):
        try:
            self._loop()
        except BaseException as e:   # never die silently: the client would wait forever
            err = getattr(e, "errno", None)
            rc = -(errno.EOPNOTSUPP if isinstance(e, _Unsupported) else
                   err if isinstance(err, int) and err > 0 else errno.EIO)
            self._die(rc, "%s: %s" % (type(e).__name__, e))

    def _loop(self):
        st = self.client._py_stats
        poller = select.poll()
        poller.register(self.uffd.fileno(), select.POLLIN)
        poller.register(self.client._stop_r, select.POLLIN)
        if self.pidfd >= 0:
            poller.register(self.pidfd, select.POLLIN)
        last = 0
        while True:
            while self.pending:
                ev = self.pending[0]
                if ev.wp or ev.minor:
                    # Registered WP or MINOR by the client: the page is there, a copy gets
                    # EEXIST and the thread faults again, forever. Only MISSING is served.
                    st["unsupported_faults"] += 1
                    raise _Unsupported("a %s fault at %#x: this server serves missing pages "
                                       "only (the client registered its memory with %s)"
                                       % (("write-protect", ev.address, "UFFDIO_REGISTER_MODE_WP")
                                          if ev.wp else ("minor", ev.address,
                                                         "UFFDIO_REGISTER_MODE_MINOR")))
                t0 = time.monotonic_ns()
                try:
                    self._serve(ev.address & ~(PAGE_SIZE - 1))
                except UffdError as e:
                    if e.errno == errno.EAGAIN:
                        # the event that blocks the fill; then retry (if it was read
                        # already, its madvise has not finished yet: let it run)
                        if not self._read():
                            time.sleep(0)
                        continue
                    if e.errno in (errno.ENOENT, errno.ESRCH):
                        pass                  # the range or the client went away
                    else:
                        self._poison(ev.address & ~(PAGE_SIZE - 1), -e.errno, str(e))
                self.pending.popleft()
                ns = time.monotonic_ns() - t0
                st["faults"] += 1
                st["service_ns_total"] += ns
                st["service_ns_max"] = max(st["service_ns_max"], ns)
                last = time.monotonic_ns()
                if self.fail_after and st["faults"] >= self.fail_after:
                    raise OSError(errno.EIO, "injected failure (test hook) after %d faults"
                                  % st["faults"])
            # In a fault storm the next fault follows within microseconds: look for it
            # briefly before sleeping in poll() (a wake-up on another CPU costs more than
            # the service itself); bounded after the last fault, so idle costs nothing.
            if time.monotonic_ns() - last < SPIN_NS:
                if not self._read():
                    time.sleep(0)
                continue
            ready = dict(poller.poll())
            if self.client._stop_r in ready:
                return
            if self.uffd.fileno() in ready:
                if ready[self.uffd.fileno()] & select.POLLIN:
                    self._read()
                    continue
                raise OSError(errno.EBADF, "the userfaultfd reported an error")
            if self.pidfd in ready:
                return      # the client has exited

    def _die(self, rc, why):
        """The serving thread ends from an error: do not leave the client waiting on faults
        nobody will serve (as the native engine's srv_die)."""
        st = self.client._py_stats
        self._error(rc, "serving stopped by an error: %s" % why)
        st["died"] = rc
        if self.client.watches_server:
            conn = self.client._conn   # the client sees the server gone and serves itself
            if conn is not None:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        else:
            self._poison_all()

    def _poison_all(self):
        """Poison every page of the client's ranges that is still missing (present ones are
        stepped over). An unread event makes POISON fail with EAGAIN: read it, then go on."""
        self.pending.clear()   # their pages get poisoned here, which wakes their threads
        for i, m in enumerate(self.client.mappings):
            for _ in range(10000):
                try:
                    self.uffd.poison(self.bases[i], m.size)
                    break
                except UffdError as e:
                    if e.errno != errno.EAGAIN:
                        break   # ENOENT/ESRCH: the client has gone
                    try:
                        self._read()
                    except UffdError:
                        break
                    self.pending.clear()
                    time.sleep(0)

    def discard(self):
        """The thread did not start: release what the engine made; the uffd and the pidfd
        stay the caller's."""
        self.uffd.detach()
        for fd in (self.client._stop_r, self.client._stop_w):
            if fd >= 0:
                os.close(fd)
        self.client._stop_r = self.client._stop_w = -1

    def close(self, poison):
        if poison and not self.uffd.closed:
            self._poison_all()
        if not self.uffd.closed:
            os.close(self.uffd.detach())   # ours since the thread started
        for fd in (self.pidfd, self.client._stop_r, self.client._stop_w):
            if fd >= 0:
                os.close(fd)
        self.pidfd = self.client._stop_r = self.client._stop_w = -1


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------
class PageServer:
    """Serve page faults of other processes, received over a Unix socket.

    Exactly one of `snapshot`, `memory_file`, `provider`. `allow_uids`: the uids that may
    connect (default: only ours); the socket is 0600, given to the one other allowed uid, or
    0660 with group `socket_group`. `engine`: "c" (native serving threads; file sources, cffi
    backend), "python" (a Python thread per client through pylazymem.uffd; needed for a
    provider), or "auto". `max_clients`: clients served at once (one thread each, 1 to
    65536); more are refused (and poisoned). Each client holds about FDS_PER_CLIENT file
    descriptors: start() raises the soft RLIMIT_NOFILE toward the hard limit as far as
    max_clients needs, and lowers max_clients (logged) where the hard limit is too low.
    `handshake_timeout`: seconds a connected client has for its whole handshake (one
    deadline, however slowly it sends; above 0, at most 3600). Paths are str or bytes; the
    socket path is at most 107 bytes (AF_UNIX). Use as a context manager, or start()/stop();
    serve_forever() blocks. A server serves once: start() after stop() raises
    ServerStoppedError, and a start() that fails stops it (nothing left open).

    A client in this very process is refused with the python engine (its serving thread
    needs the GIL, which the client's faulting thread holds); the native engine serves it.

    share (snapshot source, native engine): one pool memfd for the snapshot, shared by the
    clients that ask for it (restore(..., server=, share=...)): they map its pages, the
    server publishes pages into it as they are first needed (docs/shared-pages.md 5.3).
    Clients of another uid get the pool only once it is complete (every non-zero page in it):
    prefetch_pool=True publishes every page at start, before the socket listens.
    """

    def __init__(self, socket_path, *, snapshot=None, memory_file=None, provider=None,
                 allow_uids=None, socket_group=None, engine="auto", max_cluster_pages=None,
                 max_clients=256, handshake_timeout=HANDSHAKE_TIMEOUT, share=False,
                 prefetch_pool=False, _test_inject=None):
        # Every argument is checked before anything is opened: a refused one leaves nothing
        # open behind it.
        given = [x is not None for x in (snapshot, memory_file, provider)]
        if sum(given) != 1:
            raise TypeError("PageServer needs exactly one of snapshot=, memory_file=, provider=")
        if engine not in ENGINES:
            raise ValueError("engine must be one of %s, got %r" % (", ".join(ENGINES), engine))
        # A str, whatever was given: paths go into the log and the JSON answer.
        self.path = os.fsdecode(os.fspath(socket_path))
        n = len(os.fsencode(self.path))
        if not 0 < n <= MAX_SOCKET_PATH:
            raise InvalidArgumentError(
                "the socket path %r: AF_UNIX path too long (%d bytes, at most %d)"
                % (self.path, n, MAX_SOCKET_PATH) if n else "the socket path is empty")
        self.allow_uids = frozenset([os.getuid()] if allow_uids is None else
                                    [int(u) for u in allow_uids])
        self.max_cluster_pages = int(max_cluster_pages or 0)
        if not 0 <= self.max_cluster_pages <= MAX_CLUSTER_PAGES:
            raise ValueError("max_cluster_pages must be 1 to %d (or None: the default), got %r"
                             % (MAX_CLUSTER_PAGES, max_cluster_pages))
        try:
            self.handshake_timeout = float(handshake_timeout)
        except (TypeError, ValueError):
            self.handshake_timeout = math.nan
        # Finite and bounded: the deadline becomes a socket timeout (inf: "timestamp out of
        # range" for every client), and a slot held for hours is a denial of service.
        if isinstance(handshake_timeout, bool) or \
                not 0 < self.handshake_timeout <= MAX_HANDSHAKE_TIMEOUT:
            raise InvalidArgumentError("handshake_timeout must be a number of seconds above 0 "
                                       "and at most %d, got %r"
                                       % (MAX_HANDSHAKE_TIMEOUT, handshake_timeout))
        try:
            self.max_clients = operator.index(max_clients)
        except TypeError:
            self.max_clients = 0
        if isinstance(max_clients, bool) or not 1 <= self.max_clients <= MAX_CLIENTS:
            raise InvalidArgumentError("max_clients must be an integer from 1 to %d (clients "
                                       "served at once), got %r" % (MAX_CLIENTS, max_clients))
        # Test hooks (tests/test_server.py): {"fail_after": N} makes each client's engine fail
        # after N faults; {"queue_cap": N} bounds the native engine's fault queue.
        self._test_inject = dict(_test_inject or {})
        self.socket_group = None if socket_group is None else int(socket_group)
        have_core = _backend.NAME == "cffi"   # the C engine needs the compiled core
        if provider is not None:
            if engine == "c":
                raise ValueError("a Python page provider is served by the python engine; "
                                 "engine='c' serves files only")
            self.engine = "python"
        elif engine == "c" and not have_core:
            raise UnavailableError(errno.ENOSYS, "engine='c' needs the C core (backend cffi); "
                                   "this process uses the ctypes backend")
        else:
            self.engine = "c" if engine in ("auto", "c") and have_core else "python"
        self.share = bool(share)
        if prefetch_pool and not self.share:
            raise ValueError("prefetch_pool fills the shared pool: it needs share=True")
        if self.share and snapshot is None:
            raise ValueError("share=True shares a snapshot's pages: it needs snapshot=")
        if self.share and self.engine != "c":
            raise UnavailableError(errno.ENOSYS, "share=True needs the native engine (the C "
                                   "core, backend cffi, engine 'c' or 'auto'): the python "
                                   "engine cannot serve a shared pool")
        self._clients: List[Client] = []
        self._engines: Dict[int, object] = {}
        self._lock = threading.Lock()
        # Taken to use or free the native table and pool (_ctable, _cpool): stats() from
        # another thread (pylazymem serve --stats-every) must not read them as stop() frees
        # them. Reentrant: stats() -> pool_stats() -> pool_complete().
        self._res_lock = threading.RLock()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        self._finished = dict.fromkeys(_SRV_STAT_FIELDS + ("engines_died",), 0)   # clients gone
        self._served = 0
        self.refused = 0
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._handshake_threads = set()
        self.source = None
        self._ctable = None
        self._cpool = None
        self.pool_info = None   # what sharing clients are told: {"id", "npages", "page_size"}
        self._stop_r = self._stop_w = -1
        try:
            if snapshot is not None:
                self.source = _SnapshotSource(snapshot)
            elif memory_file is not None:
                self.source = _FileSource(memory_file)
            else:
                self.source = _ProviderSource(provider)
            # The snapshot's page table, made once for the native engine and shared by all
            # its clients (each takes a reference; released in stop() after the last client).
            if self.engine == "c" and self.source.table is not None:
                self._make_table()
            # The shared pool (share=True): made once, before any client can connect.
            if self.share:
                self._make_pool(bool(prefetch_pool))
            self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        except BaseException:
            self._release()
            raise

    def _make_table(self):
        from ._binding import check, ffi, lib

        out = ffi.new("struct lm_srv_table **")
        t = ffi.from_buffer("int64_t[]", self.source.table)
        if self.source.layered is None:
            check(lib.lm_srv_table_new(t, len(self.source.table), out), "page server")
        else:
            codes, layers, sigs = self.source.layered
            fds = ffi.new("int[]", [x.fd for x in self.source.chain.layers])
            check(lib.lm_srv_table_new_layered(
                t, ffi.from_buffer("uint32_t[]", codes),
                ffi.from_buffer("uint8_t[]", layers), ffi.from_buffer("uint64_t[]", sigs),
                len(self.source.table), fds, len(self.source.chain.layers), out),
                "page server")
        self._ctable = out[0]

    def _release(self):
        """Close what the constructor opened (stop(), or a constructor that fails)."""
        with self._res_lock:
            if self._ctable is not None or self._cpool is not None:
                from ._binding import lib
                if self._ctable is not None:
                    lib.lm_srv_table_release(self._ctable)   # after every client's reference
                    self._ctable = None
                if self._cpool is not None:
                    lib.lm_srv_pool_release(self._cpool)   # clients' mappings keep it alive
                    self._cpool = None
        if self.source is not None:
            self.source.close()
        for fd in (self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = -1

    def _make_pool(self, prefetch):
        from ._binding import check, ffi, lib
        from ._features import acquire_mode
        from ._snapfile import _read

        h = _read(self.source.fd, self.source.path).header
        npages = len(self.source.table)
        out = ffi.new("struct lm_srv_pool **")
        check(lib.lm_srv_pool_new(npages, PAGE_SIZE, acquire_mode(), out), "page server pool")
        self._cpool = out[0]
        self.pool_info = {"id": pool_id(h["header_xxh3"], npages, PAGE_SIZE), "npages": npages,
                          "page_size": PAGE_SIZE}
        if prefetch:
            n = ffi.new("uint64_t *")
            check(lib.lm_srv_pool_fill(self._cpool, self._ctable, self.source.fd, n),
                  "page server pool (prefetch)")
            log.info("pool: %d pages published at start", n[0])

    def pool_complete(self):
        """Whether every non-zero page of the snapshot is in the pool (False without one)."""
        with self._res_lock:
            if self._cpool is None:
                return False
            from ._binding import check, lib
            return bool(check(lib.lm_srv_pool_complete(self._cpool, self._ctable),
                              "page server pool"))

    def pool_stats(self):
        """The pool's resident bytes and the pages published into it (None without one)."""
        with self._res_lock:
            if self._cpool is None:
                return None
            from ._binding import lib
            return {"bytes": int(lib.lm_srv_pool_bytes(self._cpool)),
                    "published": int(lib.lm_srv_pool_published(self._cpool)),
                    "complete": self.pool_complete()}

    def _pool_for(self, uid):
        """(answer's "pool", O_RDONLY fd or -1, why not) for a client of `uid` that asked
        for it. Another uid gets it only once it is complete: until then a client could plant
        zero pages in its holes (mapping it privately without a userfaultfd makes shmem
        allocate one) that every other client would then map (docs/shared-pages.md 2.6)."""
        with self._res_lock:
            if self._cpool is None:
                return None, -1, ("the page server (pid %d) does not share its pages (started "
                                  "without --share)" % os.getpid())
            if uid != os.getuid() and not self.pool_complete():
                return None, -1, ("the page server (pid %d) gives its pool to other uids only "
                                  "once it is complete (--prefetch-pool)" % os.getpid())
            from ._binding import lib
            # A reopen, not a dup: O_RDONLY is a property of the open file description, and
            # with it the client can map the pool privately and continue pages, never publish
            # (registering a shared view needs a writable fd: EPERM).
            fd = os.open("/proc/self/fd/%d" % lib.lm_srv_pool_fd(self._cpool),
                         os.O_RDONLY | os.O_CLOEXEC)
            return dict(self.pool_info), fd, ""

    # -- lifetime -------------------------------------------------------------------------
    def _bind(self):
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise FileExistsError(errno.EEXIST, "%s exists and is not a socket; not "
                                      "replacing it" % self.path)
            # A live server takes the probe's connection for a client that closed without a
            # handshake, which it drops without counting it refused (_handshake).
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                probe.connect(self.path)
                raise FileExistsError(errno.EADDRINUSE, "a server is already listening on %s"
                                      % self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(self.path)   # a stale socket left by a server that died
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # The mode of the socket inode is what bind() gives the path (masked by the umask):
        # set 0600 before bind, so there is no moment at which the path is more open.
        os.fchmod(s.fileno(), 0o600)
        try:
            s.bind(self.path)
        except OSError as e:
            s.close()
            raise type(e)(e.errno, "cannot create the socket %s: %s" % (self.path, e.strerror),
                          self.path) from None
        try:
            self._open_to_allowed()
            s.listen(16)
            self._sock_ino = os.stat(self.path).st_ino   # to remove ours, never a successor's
        except BaseException:
            s.close()
            os.unlink(self.path)
            raise
        return s

    def _open_to_allowed(self):
        """The filesystem decides who may connect() before SO_PEERCRED is checked: give the
        socket to the one other uid allowed (as Firecracker's jailer set-ups do), or to a
        group (mode 0660) when socket_group is given."""
        others = self.allow_uids - {os.getuid()}
        if self.socket_group is not None:
            os.chown(self.path, -1, self.socket_group)
            os.chmod(self.path, 0o660)
        elif len(others) == 1:
            try:
                os.chown(self.path, next(iter(others)), -1)
            except PermissionError:
                raise PermissionError(
                    errno.EPERM, "cannot give the socket to uid %d (allow_uids): that needs "
                    "root; or pass socket_group=GID (--socket-group) for a group both share"
                    % next(iter(others))) from None
        elif len(others) > 1:
            raise ValueError("allow_uids names %d uids besides ours: the socket can belong to "
                             "only one; pass socket_group=GID (--socket-group) and make them "
                             "members" % len(others))

    def start(self):
        """Listen on the socket and serve clients; returns self. A PageServer serves once:
        start() after stop() raises ServerStoppedError (make a new PageServer), and a start()
        that fails stops it (everything it opened is closed, the socket removed)."""
        if self._stopped:
            raise ServerStoppedError(
                "this PageServer (socket %s) was stopped: a server is started once; make a new "
                "PageServer to serve again" % self.path)
        if self._thread is not None:
            return self
        try:
            self._fit_fd_budget()
            self._sock = self._bind()
            t = threading.Thread(target=self._accept_loop, name="pylazymem-server", daemon=True)
            t.start()
            self._thread = t
        except BaseException:
            self.stop()
            raise
        return self

    def _fit_fd_budget(self):
        """Every client holds file descriptors (FDS_PER_CLIENT), each handshake more. A server
        out of them cannot receive a client's userfaultfd (the kernel drops it, and that
        client waits for its faults forever) nor accept (the accept loop spun). So the soft
        RLIMIT_NOFILE is raised toward the hard limit as far as max_clients needs, and where
        the hard limit is too low fewer clients are served at once (max_clients lowered, and
        logged): later ones are refused, and poisoned, while there are fds to do it with."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return
        used = len(os.listdir("/proc/self/fd"))
        reserve = used + FD_MARGIN + MAX_HANDSHAKES * FDS_PER_HANDSHAKE
        need = reserve + self.max_clients * FDS_PER_CLIENT
        if need > soft:
            raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
            if raised > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                    log.info("RLIMIT_NOFILE raised from %d to %d for %d clients", soft, raised,
                             self.max_clients)
                    soft = raised
                except (ValueError, OSError) as e:
                    log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, raised, e)
        fit = (soft - reserve) // FDS_PER_CLIENT
        if fit < 1:
            raise UnavailableError(errno.EMFILE, "the page server needs at least %d file "
                                   "descriptors (%d in use, %d for handshakes and one client); "
                                   "RLIMIT_NOFILE allows %d (raise it: ulimit -n)"
                                   % (reserve + FDS_PER_CLIENT, used, reserve - used
                                      + FDS_PER_CLIENT, soft))
        if fit < self.max_clients:
            log.warning("max_clients lowered from %d to %d: RLIMIT_NOFILE (%d, hard limit %s) "
                        "leaves file descriptors for %d clients at once (%d each); raise the "
                        "hard limit to serve more", self.max_clients, fit, soft,
                        "unlimited" if hard == resource.RLIM_INFINITY else hard, fit,
                        FDS_PER_CLIENT)
            self.max_clients = fit

    def serve_forever(self):
        self.start()
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self, poison=None):
        """Stop accepting, stop serving, remove the socket. Clients still running lose their
        server: with poison (default: for clients that do not watch the server themselves),
        their pages not yet received are poisoned so that touching them raises SIGBUS instead
        of waiting forever or reading zeros."""
        if self._stopped:
            return
        self._stopped = True
        os.write(self._stop_w, b"x")   # the accept loop ends (a stopped server never restarts)
        if self._thread is not None:
            self._thread.join()
        for t in list(self._handshake_threads):
            t.join()   # at most handshake_timeout; a client it admits is ended below
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            self._end_client(c, poison)
        if self._sock is not None:
            try:
                if os.lstat(self.path).st_ino == self._sock_ino:
                    os.unlink(self.path)
            except OSError:
                pass
            self._sock.close()
        self._release()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- observation ----------------------------------------------------------------------
    @property
    def clients(self) -> List[Client]:
        with self._lock:
            return list(self._clients)

    def stats(self) -> Dict[str, int]:
        """Counters summed over every client served so far (gone ones included); "clients"
        is the number of clients served, "clients_alive" of those still connected."""
        with self._res_lock:   # stop() frees the table and the pool only after this
            return self._stats()

    def _stats(self):
        with self._lock:
            clients = list(self._clients)
            total = dict(self._finished)
        for c in clients:
            _add_stats(total, c.stats())
        total["clients"] = self._served
        # One page table per server, however many clients it serves.
        total["page_table_bytes"] = (0 if self.source.table is None else
                                     int(self.source.table.nbytes))
        if self._ctable is not None:
            from ._binding import lib
            total["page_table_refs"] = int(lib.lm_srv_table_refs(self._ctable))
        total["clients_alive"] = sum(c.alive for c in clients)
        total["refused"] = self.refused
        ps = self.pool_stats()
        if ps is not None:
            total["pool_bytes"], total["pool_published"] = ps["bytes"], ps["published"]
        return total

    # -- serving --------------------------------------------------------------------------
    def _accept_loop(self):
        # A connection is accepted only with a handshake slot in hand. Accepting one to turn
        # it away unread threw its userfaultfd away with the unread message: a client that
        # does not read the answer (Firecracker) then waited for its faults forever. Without
        # a slot, connections wait in the listen backlog (their handshake deadline is ours).
        listening = select.poll()
        listening.register(self._sock.fileno(), select.POLLIN)
        listening.register(self._stop_r, select.POLLIN)
        waiting = select.poll()
        waiting.register(self._stop_r, select.POLLIN)
        slot = False
        pause = 0.0    # seconds not listening after accept() failed (out of fds); 0: none
        resume = 0.0   # time.monotonic() at which listening resumes
        while True:
            if not slot:
                slot = self._handshakes.acquire(blocking=False)
            wait = resume - time.monotonic()
            if wait > 0:
                ready = dict(waiting.poll(max(1, int(wait * 1000))))
            else:
                ready = dict(listening.poll(500) if slot else waiting.poll(50))
            if self._stop_r in ready:
                if slot:
                    self._handshakes.release()
                return
            self._reap()
            if self._sock.fileno() not in ready:
                continue
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue   # that connection went away, or none was there: nothing to wait for
            except OSError as e:
                # Out of fds (EMFILE, ENFILE) or memory: the connection stays in the backlog
                # with its message and userfaultfd unread (not lost) until a client ends and
                # frees some. The socket stays readable, and polling it again at once spun a
                # CPU writing this line: listen again after a pause, longer each time.
                if not pause:
                    log.warning("accept: %s: connections wait in the backlog until file "
                                "descriptors are free (%d clients served now, max_clients %d)",
                                e, len(self._clients), self.max_clients)
                pause = min(pause * 2 or 0.01, 1.0)
                resume = time.monotonic() + pause
                continue
            if pause:
                log.info("accept: accepting again")
                pause = 0.0
            # The connecting process, taken now: a pid looked up later may have been reused.
            # Without it the handshake is still read, so that the client's ranges are
            # poisoned when it is refused (it would wait for its faults forever otherwise).
            why = None
            try:
                pidfd = peer_pidfd(conn)
            except OSError as e:
                pidfd = -1
                why = ("the server is out of file descriptors (%s)" % e
                       if e.errno in (errno.EMFILE, errno.ENFILE) else
                       "the connecting process cannot be watched (%s): it has exited already?"
                       % e)
            # Each handshake in its own short-lived thread (which gives the slot back): a
            # client that connects and sends nothing must not hold up the others for the
            # handshake's deadline.
            slot = False
            t = threading.Thread(target=self._handshake_thread, args=(conn, pidfd, why),
                                 daemon=True, name="pylazymem-handshake")
            self._handshake_threads.add(t)
            try:
                t.start()
            except BaseException as e:
                self._handshake_threads.discard(t)
                self._handshakes.release()
                if pidfd >= 0:
                    os.close(pidfd)
                self._refuse(conn, "cannot start a handshake thread: %s" % e)

    def _refuse(self, conn, why):
        with self._lock:
            self.refused += 1
        log.warning("client refused: %s", why)
        send_answer(conn, {"ok": False, "error": why})
        conn.close()

    def _handshake_thread(self, conn, pidfd, why=None):
        try:
            self._handshake(conn, pidfd, why)
        except _NoHandshake:
            # Closed without sending anything (another server's probe of the path, _bind):
            # no client, nothing to refuse.
            log.debug("a connection closed without a handshake")
            conn.close()
        except Exception as e:   # one bad client must not stop the server
            self._refuse(conn, str(e))
        finally:
            self._handshakes.release()
            self._handshake_threads.discard(threading.current_thread())

    def _reap(self):
        with self._lock:
            gone = [c for c in self._clients if not c.alive]
        for c in gone:
            st = c.stats()
            if st["died"]:
                log.error("client pid %d: serving stopped by an error (%s); %s", c.pid,
                          os.strerror(-st["died"]), "it was told to serve itself"
                          if c.watches_server else "its missing pages were poisoned")
            self._end_client(c, False)
            with self._lock:
                self._clients.remove(c)
                _add_stats(self._finished, st)

    def _handshake(self, conn, pidfd, why=None):
        """Admit one client. `pidfd` is the connecting process's, taken at accept: ours to
        close unless an engine takes it (with the uffd) when it starts (-1: none could be
        taken, and `why` says why the client is refused once its message is read)."""
        fds, msg, watches, pid = [], b"", False, 0
        try:
            pid, uid, gid = peer_credentials(conn)
            try:
                msg, fds = receive_handshake(conn, time.monotonic() + self.handshake_timeout)
            except BaseException as e:
                # The fds received before the failure are ours to close (after poisoning),
                # whatever the failure: a deadline missed too.
                fds = getattr(e, "fds", [])
                if isinstance(e, TimeoutError):
                    raise ProtocolError("the handshake was not complete within %g s (one "
                                        "deadline for the whole handshake)"
                                        % self.handshake_timeout) from None
                raise
            if not msg and not fds:
                raise _NoHandshake()
            if why is not None:
                raise ProtocolError(why)
            # Refused only now, after its message is read: the client then gets our answer
            # instead of a broken pipe in the middle of its send.
            if uid not in self.allow_uids:
                raise PermissionError("pid %d runs as uid %d, which may not use this server "
                                      "(allowed: %s)" % (pid, uid, sorted(self.allow_uids)))
            with self._lock:
                if len(self._clients) >= self.max_clients or self._stopped:
                    raise ProtocolError("the server is stopping" if self._stopped else
                                        "the server serves %d clients already (max_clients)"
                                        % len(self._clients))
            if len(fds) != 1:
                raise ProtocolError("expected one userfaultfd with the mappings, got %d fds"
                                    % len(fds))
            if not _is_userfaultfd(fds[0]):
                raise ProtocolError("the fd sent is not a userfaultfd")
            maps, watches = parse_mappings(msg)
            wants_pool = asks_share(msg)
            if pid == os.getpid() and self.engine == "python":
                # Its faulting thread holds our GIL while it waits for the fault, and the
                # python engine's thread needs the GIL to serve it: a deadlock at once.
                raise ProtocolError("the client is in the server's own process (pid %d): the "
                                    "python engine would need the GIL its faulting thread "
                                    "holds (a deadlock); serve it with engine='c', or from "
                                    "another process" % pid)
            if hasattr(self.source, "check_unchanged"):
                self.source.check_unchanged()
            if self.source.table is not None:
                for i, m in enumerate(maps):
                    if m.offset + m.size > self.source.nbytes:
                        raise ProtocolError(
                            "mapping %d: source bytes [%d, %d) are past the end of the "
                            "snapshot (%d bytes)" % (i, m.offset, m.offset + m.size,
                                                     self.source.nbytes))
            # When to stop serving: a client that watches us closes the connection when it no
            # longer needs us (or exits); Firecracker before 1.12 closed it at once, so for
            # other clients only the end of the process counts.
            if _readable_now(pidfd):
                raise ProtocolError("the process that connected (pid %d) has exited; the "
                                    "handshake came from another one" % pid)
            if watches:
                fd, pidfd = pidfd, -1
                os.close(fd)
                pidfd = os.dup(conn.fileno())
            pool, pool_fd, why_not = self._pool_for(uid) if wants_pool else (None, -1, "")
            if pool is not None:
                # The pool's offsets are the snapshot's: a client maps it at offset 0 over
                # one range (restore); other layouts are not ours to guess.
                if len(maps) != 1 or maps[0].offset != 0 or maps[0].size != self.source.nbytes:
                    os.close(pool_fd)
                    pool, pool_fd = None, -1
                    why_not = ("the pool is mapped by one range covering the whole snapshot "
                               "at offset 0")
            client = Client(pid, uid, gid, maps, watches, self.engine, shares=pool is not None)
            client._conn = conn   # kept open while we serve: its closing tells the client
            try:
                self._start_engine(client, fds[0], pidfd)   # on success it owns fds[0], pidfd
            except BaseException:
                if pool_fd >= 0:
                    os.close(pool_fd)
                raise
        except BaseException:
            # A refused client that watches us learns it from the answer; any other (say
            # Firecracker, which never reads it) would hang at its first fault.
            try:
                if len(fds) == 1 and _is_userfaultfd(fds[0]):
                    _poison_refused(fds[0], msg)
            except Exception as e:   # still closed below, and still refused
                log.warning("pid %d: cannot poison the ranges of a refused client: %s",
                            pid, e)
            finally:
                for fd in fds:
                    os.close(fd)
                if pidfd >= 0:
                    os.close(pidfd)
            raise
        with self._lock:
            self._clients.append(client)
            self._served += 1
        log.info("serving pid %d (uid %d): %d ranges, %s engine%s", pid, uid, len(maps),
                 self.engine, ", shares the pool" if pool is not None else
                 ", asked for the pool, served privately" if wants_pool else "")
        try:
            answer = {"ok": True, "server_pid": os.getpid(), "engine": self.engine,
                      "source": self.source.identity, "pool": pool}
            if why_not:
                answer["pool_reason"] = why_not
            send_answer(conn, answer, [pool_fd] if pool_fd >= 0 else ())
        except Exception as e:
            # Admitted and served already: not a refusal (a client counted both served and
            # refused). One that reads the answer sees the connection end without one.
            log.warning("client pid %d: the answer could not be sent: %s", pid, e)
        finally:
            if pool_fd >= 0:
                os.close(pool_fd)   # the client has its own reference now (or is gone)

    def _start_engine(self, client, uffd_fd, pidfd):
        """Start serving: on success the engine owns uffd_fd and pidfd (it closes them); when
        this raises, they are still the caller's, untouched."""
        fail_after = int(self._test_inject.get("fail_after", 0))
        if self.engine == "c":
            from ._binding import check, ffi, lib

            maps = ffi.new("struct lm_srv_map[]", len(client.mappings))
            for i, m in enumerate(client.mappings):
                maps[i].base, maps[i].size, maps[i].offset = (m.base_host_virt_addr, m.size,
                                                               m.offset)
            out = ffi.new("struct lm_srv **")
            check(lib.lm_srv_start(uffd_fd, pidfd,
                                   lib.LM_SRV_WATCHED if client.watches_server else 0,
                                   maps, len(client.mappings), PAGE_SIZE, self.source.fd,
                                   ffi.NULL if self._ctable is None else self._ctable,
                                   self._cpool if client.shares else ffi.NULL,
                                   self.max_cluster_pages, out), "page server")
            client._c = out[0]
            if fail_after:
                lib.lm_srv_test_inject(client._c, lib.LM_SRV_TEST_FAIL_AFTER, fail_after)
            if self._test_inject.get("queue_cap"):
                lib.lm_srv_test_inject(client._c, lib.LM_SRV_TEST_QUEUE_CAP,
                                       int(self._test_inject["queue_cap"]))
        else:
            eng = _PyEngine(client, uffd_fd, pidfd, self.source, fail_after)
            client._thread = threading.Thread(target=eng.run, daemon=True,
                                              name="pylazymem-serve-%d" % client.pid)
            self._engines[id(client)] = eng
            try:
                client._thread.start()
            except BaseException:
                # Not started: nothing of the client's is the engine's yet. The caller
                # closes the uffd and the pidfd, once.
                del self._engines[id(client)]
                eng.discard()
                client._thread = None
                raise
            eng.started = True

    def _end_client(self, c, poison):
        if poison is None:
            poison = not c.watches_server
        if c._c is not None:
            from ._binding import lib
            with c._c_lock:   # no reader holds it once it is taken away
                srv, c._c_final = c._c, c._c_stats()
                running = lib.lm_srv_running(srv)
                c._c = None
            lib.lm_srv_destroy(srv, bool(poison) and running)
        else:
            eng = self._engines.pop(id(c), None)
            if eng is not None:
                serving = c._thread.is_alive()   # one that died has poisoned already
                if c._stop_w >= 0:
                    os.write(c._stop_w, b"x")
                c._thread.join()
                eng.close(poison and serving and _pid_alive(c.pid))
        if c._conn is not None:
            c._conn.close()
            c._conn = None


def _add_stats(total, st):
    for k in _SRV_STAT_FIELDS:
        if k == "service_ns_max":
            total[k] = max(total[k], st[k])
        elif k in ("last_error", "died"):
            total[k] = st[k] or total[k]
        else:
            total[k] += st[k]
    total["engines_died"] = total.get("engines_died", 0) + bool(st["died"])


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
