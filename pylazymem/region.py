"""Region: private anonymous memory whose pages are served lazily by the C core.

Python configures, starts, stops and observes; faults are resolved by native threads that
never need the GIL (docs/design.md, "The GIL rule").
"""
import contextlib
import errno
import math
import mmap
import operator
import os
import threading
import weakref

import numpy as np

from ._binding import PAGE_SIZE, check, ffi, lib
from ._buffer import AddressRange, Gate, set_closed_error
from ._errors import (InvalidArgumentError, InvalidRangeError, ObjectStoreError,
                      OutOfMemoryError, PoisonedPageError, RegionClosedError,
                      SharingUnavailableError)
from ._features import acquire_mode, features
from ._meta import META_DTYPE, PATHS, PageClass, PageState

set_closed_error(RegionClosedError)

_ZERO_WRITE = {"copy": lib.LM_ZW_COPY, "zeropage": lib.LM_ZW_ZEROPAGE}
_DIRTY_MODES = {lib.LM_DIRTY_NONE: "none", lib.LM_DIRTY_WP_ASYNC: "wp-async",
                lib.LM_DIRTY_PAGE_TABLES: "page-tables"}


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError("%s=%r is not an integer" % (name, value)) from None


def _int_arg(value, name):
    """An integer argument (not a float, not a bool), else InvalidArgumentError naming it."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise InvalidArgumentError("%s must be an integer, not %r" % (name, value)) from None


def _default_cpus():
    """One serving thread pinned to each CPU this process may run on (see csrc/serve.c)."""
    spec = os.environ.get("PYLAZYMEM_SERVE_CPUS", "")
    if spec == "unpinned":
        return []
    if spec:
        try:
            return [int(c) for c in spec.split(",")]
        except ValueError:
            raise InvalidArgumentError("PYLAZYMEM_SERVE_CPUS=%r: expected e.g. '0,1' or "
                                       "'unpinned'" % spec) from None
    # At most as many as the core serves with (LM_MAX_THREADS): on a larger machine, spread
    # over its CPUs (Region() failed there with the defaults)
    cpus = sorted(os.sched_getaffinity(0))
    limit = lib.LM_MAX_SERVE_THREADS
    return cpus if len(cpus) <= limit else [cpus[i * len(cpus) // limit] for i in range(limit)]


class Canonical:
    """A page with canonical contents, owned by one region. Equal contents, equal ids."""

    __slots__ = ("_region", "id", "signature", "__weakref__")

    def __init__(self, region, id, signature):
        self._region = weakref.ref(region)
        self.id = id
        self.signature = signature

    def __bytes__(self):
        region = self._region()
        if region is None:
            raise RegionClosedError("the canonical page's region is gone")
        out = bytearray(region.page_size)
        with region._use() as lm:
            check(lib.lm_canonical_read(lm, self.id, ffi.from_buffer(out)), "canonical")
        return bytes(out)

    def __eq__(self, other):
        return (isinstance(other, Canonical) and other.id == self.id
                and other._region() is self._region())

    def __hash__(self):
        return hash((self.id, id(self._region())))

    def __repr__(self):
        return "Canonical(id=%d, signature=0x%016x)" % (self.id, self.signature)


class Handler:
    """The region's serving threads, with a threading.Thread-like surface."""

    def __init__(self, region):
        self._region = weakref.ref(region)

    def _use(self):
        """The region's C struct for one call, which close() waits for (it cannot be freed
        in between)."""
        region = self._region()
        if region is None:
            raise RegionClosedError("the region is closed")
        return region._use(report=False)

    def start(self):
        with self._use() as lm:
            check(lib.lm_region_start(lm), "Handler.start")

    def stop(self):
        """Stop serving. Accesses to lazy pages then wait until start() is called again."""
        with self._use() as lm:
            lib.lm_region_stop(lm)

    def is_alive(self):
        try:
            with self._use() as lm:
                return lib.lm_region_serving(lm) > 0
        except RegionClosedError:
            return False

    @property
    def threads(self):
        region = self._region()
        return 0 if region is None else region._nthreads

    @property
    def cpus(self):
        region = self._region()
        return () if region is None else region._cpus

    def __repr__(self):
        return "<Handler threads=%d cpus=%s alive=%s>" % (self.threads, self.cpus, self.is_alive())


_live_regions = weakref.WeakSet()

# Teardowns of regions closed while views of them were alive: run when the last view goes
# (the buffer type's Mapping calls them), found here after a fork to be dropped in the child.
_pending_teardowns = set()


class _Pending:
    """What a region's teardown frees, held apart from the region: views do not keep the
    region alive (csrc/pybuffer.c), so it may be gone, or its attributes cleared by the
    garbage collector, when the last view goes. Not the region itself: a reference to it
    from here would make it immortal."""
    __slots__ = ("lm", "pool", "server_sock", "table", "region", "mapping")

    def __init__(self, region, lm):
        self.lm, self.pool, self.server_sock = lm, region._pool, region._server_sock
        # A restore's page table, which the core reads (not copied) while it serves pages
        # not yet filled: the views left may outlive the region object.
        self.table = region._base_table
        self.region = weakref.ref(region)
        self.mapping = None

    def __call__(self):   # the last view went (the range is unmapped already)
        _pending_teardowns.discard(self)
        self.mapping = None
        region = self.region()
        if region is not None:
            region._teardown(self)
        else:
            _free(self)


def _free(pending):
    """Stop serving and free everything; the data mapping is already gone (_detach) and
    the background fill stopped (close())."""
    lib.lm_region_stop(pending.lm)
    lib.lm_region_destroy(pending.lm, 0)
    pending.table = None   # nobody reads it now
    if pending.pool is not None:   # after the mappings are gone: others may hold it still
        pending.pool.release()
    if pending.server_sock is not None:
        pending.server_sock.close()   # after the watcher is gone: not a server loss


def _unavailable_reason():
    """Why no userfaultfd can be had here, with the fix (the cached feature probe)."""
    f = features()
    return f.reason if f.mode == "unavailable" else None


def _forget_after_fork():
    # In the child the data mapping does not exist (MADV_DONTFORK) and no serving thread
    # runs: make every region refuse use instead of reading memory nobody serves.
    for region in list(_live_regions):
        region._forget()
    for pending in list(_pending_teardowns):   # regions gone, their views still alive
        if pending.mapping is not None:
            pending.mapping._abandon()   # drops the teardown: not the child's to run
        lib.lm_region_forget(pending.lm)
        if pending.pool is not None:
            pending.pool.forget()
    _pending_teardowns.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


class Region(AddressRange):
    """Private anonymous memory registered with userfaultfd; see the package docstring."""

    def __init__(self, nbytes, *, serve_cpus=None, serve_threads=None, max_cluster_pages=None,
                 timeline=None, server=None, share_canonical="auto", shared_first_touch=None,
                 _test_broken_source=False, _test_no_poison=False, _test_no_dirty=False,
                 _test_fail_publish=False, _test_fail_copyback=0, _start=True, _pool=None,
                 _verify_shared=False):
        # Every call into the native region is counted in and out by the gate (a context
        # manager in C: csrc/pybuffer.c, "Gate"), which owns the region's handle (_lm):
        # close() takes it from the gate once and waits for the calls in progress.
        self._gate = Gate()
        self._gate_quiet = self._gate.quiet()   # the same, without reporting remote failures
        self._server_sock = None
        self._empty_unknown = False
        self.server = None
        self.share_reason = "not a restore"   # restore(share=...) sets it: why not shared
        self._forked = False
        self._arrays = {}
        self._manifest_extra = {}   # manifest keys beside the arrays (arrays.py's state tree)
        self._snapshot = None       # (path, content id) of the snapshot restored into it
        # Content id of the snapshot this region last wrote or was restored from, while the
        # dirty-tracking epoch started then is unbroken: what an incremental checkpoint
        # against that snapshot may take unchanged pages from without reading them.
        self._epoch_id = None
        self._bg = None          # the CheckpointHandle of a background checkpoint, if any
        # Held by whatever ends a dirty-tracking epoch (_epoch_owner): a checkpoint, the start
        # of a background one up to its pause, reset_dirty().
        self._epoch_lock = threading.Lock()
        self._epoch_holder = None
        self._remote = None      # restored from an object store: [url, failures reported]
        self._alloc_next = 0
        self._alloc_lock = threading.Lock()   # alloc(): one placement at a time
        self._base_table = None
        self._ws_inherited = None
        self._pool = None   # a shared restore's pool reference (pylazymem._pool.Pool)
        self._chunks = False   # a canonical deferral may have mapped chunks (defer_fill)
        try:
            if isinstance(nbytes, (bool, np.bool_)):
                raise TypeError
            nbytes = operator.index(nbytes)
        except TypeError:
            raise InvalidArgumentError("Region size must be an integer number of bytes, not %s"
                                       % type(nbytes).__name__) from None
        if nbytes <= 0:
            raise InvalidArgumentError("Region size must be positive, got %d" % nbytes)
        if nbytes >= 1 << 62:
            raise InvalidArgumentError("Region size %d is beyond any address space" % nbytes)
        nbytes = -(-nbytes // PAGE_SIZE) * PAGE_SIZE

        cfg = ffi.new("struct lm_config *")
        cfg.acquire = acquire_mode()
        if serve_cpus is None and serve_threads is None:
            serve_cpus = _default_cpus()
        try:
            cpus = [operator.index(c) for c in (serve_cpus or [])]
        except TypeError:
            raise InvalidArgumentError("serve_cpus must be CPU numbers (a list of ints), not %r"
                                       % (serve_cpus,)) from None
        allowed = os.sched_getaffinity(0)
        for c in cpus:
            if c not in allowed:
                raise InvalidArgumentError(
                    "serve_cpus: CPU %d is not one this process may run on (allowed: %s)"
                    % (c, ",".join(map(str, sorted(allowed)))))
        keep = ffi.new("int[]", cpus or [0])
        if cpus:
            cfg.cpus, cfg.ncpus = keep, len(cpus)
        else:
            nthreads = 1 if serve_threads is None else _int_arg(serve_threads,
                                                                 "serve_threads")
            if not 1 <= nthreads <= lib.LM_MAX_SERVE_THREADS:
                raise InvalidArgumentError("serve_threads must be from 1 to %d, not %d"
                                           % (lib.LM_MAX_SERVE_THREADS, nthreads))
            cfg.nthreads = nthreads
        if max_cluster_pages is None:
            max_cluster_pages = _env_int("PYLAZYMEM_MAX_CLUSTER", 0)
        max_cluster_pages = _int_arg(max_cluster_pages, "max_cluster_pages")
        if not 0 <= max_cluster_pages < 1 << 31:
            raise InvalidArgumentError("max_cluster_pages must be >= 1 (0: the default), not %d"
                                       % max_cluster_pages)
        cfg.max_cluster_pages = max_cluster_pages
        zw = os.environ.get("PYLAZYMEM_ZERO_WRITE", "copy")
        if zw not in _ZERO_WRITE:
            raise InvalidArgumentError("PYLAZYMEM_ZERO_WRITE=%r: expected copy or zeropage" % zw)
        cfg.zero_write = _ZERO_WRITE[zw]
        # tests only: True = every fill fails; an int N > 1 = every Nth fill attempt fails
        cfg.test_fail_fills = int(_test_broken_source)
        # tests only: act as on a kernel without UFFDIO_POISON (before 6.6)
        cfg.test_no_poison = bool(_test_no_poison)
        cfg.test_fail_publish = bool(_test_fail_publish)
        cfg.test_fail_copyback = int(_test_fail_copyback)
        cfg.verify_shared = bool(_verify_shared)   # restore(share=True, verify=True)
        # tests only: dirty tracking as without WP_ASYNC + PAGEMAP_SCAN (mode "none")
        cfg.test_no_dirty = bool(_test_no_dirty)
        if timeline is None:
            timeline = os.environ.get("PYLAZYMEM_TIMELINE", "") not in ("", "0")
        cfg.timeline = bool(timeline)
        # Canonical deferrals map one shared chunk of the template per 2 MiB block
        # (docs/shared-pages.md, section 3): "auto" where the kernel can, True or an error.
        if share_canonical is True:
            cfg.share_canonical = lib.LM_SC_ON
        elif share_canonical is False:
            cfg.share_canonical = lib.LM_SC_OFF
        elif share_canonical == "auto":
            cfg.share_canonical = lib.LM_SC_AUTO
        else:
            raise InvalidArgumentError("share_canonical must be True, False or \"auto\", not %r"
                                       % (share_canonical,))
        # Who serves the first touches of those chunk blocks (section 3 item 3): True = us
        # (registered MINOR: every first touch is seen, in order, by the working set); False =
        # the kernel (unregistered: no uffd round trip, not seen). None: the default, False.
        # For a shared restore only an explicit False lets the kernel serve a pool found
        # complete (section 2.8: PMD reads, but no working set); None keeps pools registered.
        if shared_first_touch is None:
            cfg.shared_first_touch = lib.LM_FT_DEFAULT
        elif shared_first_touch is True:
            cfg.shared_first_touch = lib.LM_FT_SEEN
        elif shared_first_touch is False:
            cfg.shared_first_touch = lib.LM_FT_KERNEL
        else:
            raise InvalidArgumentError("shared_first_touch must be True, False or None, not %r"
                                       % (shared_first_touch,))

        out = ffi.new("struct lm_region **")
        rc = lib.lm_region_create(nbytes, cfg, out)
        if rc == -errno.EOPNOTSUPP and share_canonical is True:
            raise SharingUnavailableError(
                "Region(share_canonical=True): %s; share_canonical=\"auto\" copies instead"
                % ffi.string(lib.lm_last_op()).decode())
        if rc == -errno.ENOMEM:   # say what it was for: the size asked for, not an internal step
            op = ffi.string(lib.lm_last_op()).decode()
            if op == "mmap(region)":
                what = "its %d bytes of address space could not be reserved" % nbytes
            else:
                what = ("the metadata for its %d pages (page records, canonical store and "
                        "index) could not be allocated" % (nbytes // PAGE_SIZE))
            raise OutOfMemoryError(errno.ENOMEM, "Region(%d bytes): %s (%s: out of memory)"
                                   % (nbytes, what, op))
        check(rc, "Region", _unavailable_reason)
        lm = out[0]
        try:
            self._meta_map = mmap.mmap(lib.lm_region_meta_fd(lm), 0, mmap.MAP_SHARED,
                                       mmap.PROT_READ)
            self._meta = np.frombuffer(self._meta_map, dtype=META_DTYPE)
            if _pool is not None:   # before anything can touch the memory (restore)
                check(lib.lm_region_share(lm, _pool.fd), "restore(share=True)")
            self._attach(int(ffi.cast("uintptr_t", lib.lm_region_addr(lm))), nbytes)
        except BaseException:
            lib.lm_region_destroy(lm, 1)
            raise
        self._pool = _pool
        self._gate.open(lm)
        self.nbytes = nbytes
        self.page_size = PAGE_SIZE
        self.npages = nbytes // PAGE_SIZE
        self.address = int(ffi.cast("uintptr_t", lib.lm_region_addr(lm)))
        self._cpus = tuple(cpus)
        self._nthreads = len(cpus) or cfg.nthreads
        self.handler = Handler(self)
        _live_regions.add(self)
        if server is not None:
            try:
                self._serve_from(server, empty_unknown=True)
            except BaseException:
                self.close()
                raise
        elif _start:
            self.handler.start()

    # ---- served by a page server (pylazymem.server, csrc/remote.c) -----------------------

    def _serve_from(self, socket_path, empty_unknown, _connected=None):
        """Hand our userfaultfd to the page server at socket_path and watch it: when it is
        gone (process exit, or it stops serving us) a native thread takes over here.
        _connected: (socket, answer) of a handshake made already (restore(share=...) asks
        for the server's pool first, and maps it before the records are set up)."""
        from ._protocol import connect, peer_pidfd

        with self._use() as lm:
            if _connected is None:
                sock, answer = connect(socket_path, lib.lm_region_uffd(lm),
                                       [(self.address, self.nbytes, 0)], watches_server=True)
            else:
                sock, answer = _connected
            fds = [sock.fileno()]
            try:
                try:
                    fds.append(peer_pidfd(sock))   # SO_PEERPIDFD: no pid-reuse race
                except ProcessLookupError:
                    pass   # already gone: the connection is at EOF and says so at once
                check(lib.lm_region_watch_server(lm, ffi.new("int[]", fds), len(fds),
                                                 bool(empty_unknown)), "Region(server=...)")
            except BaseException:
                sock.close()
                raise
            finally:
                for fd in fds[1:]:
                    os.close(fd)
        self._server_sock = sock
        self._empty_unknown = bool(empty_unknown)
        self.server = answer

    @property
    def shared(self):
        """Whether the region maps a pool shared with other processes (restore(share=...))."""
        return self._pool is not None

    @property
    def pool(self):
        """The shared pool (restore(share=True)): a dict with "id", "role" (created, joined
        or unshared; "server" for a page server's pool, which adds "server_pid"), "slot",
        "sealed", "bytes" (resident) and "inode"; None when the region is not shared."""
        self._check_open()
        return None if self._pool is None else self._pool.info()

    @property
    def remote(self):
        """None for a region served here; "served" while a page server serves it; "lost"
        once that server is gone and the region is served here again."""
        with self._use() as lm:
            return {lib.LM_REMOTE_NONE: None, lib.LM_REMOTE_SERVED: "served",
                    lib.LM_REMOTE_LOST: "lost"}[lib.lm_region_remote(lm)]

    def _refuse_remote(self, what):
        with self._use() as lm:
            if lib.lm_region_remote(lm) == lib.LM_REMOTE_SERVED:
                raise InvalidArgumentError(
                    "%s: this region's faults are served by a page server (pid %s), which "
                    "does not know of updates recorded here" % (what, self.server.get(
                        "server_pid", "?")))

    def _read_through(self, first, n):
        """Pages whose contents only the server has: touch them (a read fault each, served by
        the server; safe with the GIL held, the server is another process), then record
        every present page as data."""
        if not self._empty_unknown:
            return
        with self._use() as lm:
            if lib.lm_region_remote(lm) == lib.LM_REMOTE_SERVED:
                view = np.frombuffer(memoryview(self), np.uint8)
                int(view[first * self.page_size:(first + n) * self.page_size:self.page_size]
                    .max())
            check(lib.lm_region_sync_present(lm), "sync with page server")

    def _page_bytes(self, page):
        """Page `page`'s contents, without faulting it in (a lazy page is read from where its
        update comes from)."""
        out = ffi.new("char[]", self.page_size)
        with self._use() as lm:
            check(lib.lm_page_read(lm, page, out), "page_read")
        return ffi.buffer(out)[:]

    def _sync_untracked(self, lm):
        """Without write-protect tracking (mode "none": kernels before 6.7) a page counts as
        changed when its record is not lazy; a store to a page the kernel serves (a canonical
        chunk's block, a shared pool's page) leaves its record lazy, and only the page tables
        know of the private copy: read them into the records first (a checkpoint(parent=)
        then kept the parent's page where the program had written)."""
        if (lib.lm_dirty_mode(lm) == lib.LM_DIRTY_NONE
                and (self._chunks or self._pool is not None)):
            check(lib.lm_meta_sync(lm), "dirty tracking")

    def _take_dirty(self):
        """Start a new dirty-tracking epoch; returns (content id of the epoch that ends, or
        None, and a bitmap of the pages that may have changed in it: ceil(npages / 64) u64
        words, or None where that is not known). A change lands in the epoch that ends or in
        the new one, never in neither (lm_dirty_reset takes both in one step)."""
        epoch, self._epoch_id = self._epoch_id, None
        words = np.zeros(-(-self.npages // 64), np.uint64)
        with self._use() as lm:
            self._sync_untracked(lm)
            rc = lib.lm_dirty_reset(lm, ffi.from_buffer("uint64_t[]", words))
        # A failed scan: the core counts every page as changed; so do we (compare them all).
        return epoch, (words if rc >= 0 else None)

    def _clean_since(self, content_id):
        """Words of a bitmap of pages known unchanged since the snapshot `content_id` was
        written from or restored into this region, or None (then every page is compared).
        Starts a new epoch."""
        epoch, dirty = self._take_dirty()
        if dirty is None or epoch != content_id:
            return None
        return ~dirty

    @contextlib.contextmanager
    def _epoch_owner(self):
        """Whatever ends the dirty-tracking epoch holds this throughout: a checkpoint from its
        check to its commit, the start of a background checkpoint up to its pause, and
        reset_dirty(). Two of them interleaved (two threads) would each take the other's
        epoch, and an incremental checkpoint after them could miss a store: they take turns.
        One started from a checkpoint's own callback (progress), on its thread, raises
        BusyError, as one started while a background checkpoint runs does."""
        from ._errors import BusyError
        me = threading.get_ident()
        if self._epoch_holder == me:
            raise BusyError(errno.EBUSY, "a checkpoint of this region is in progress on this "
                            "thread (called from its progress callback?)")
        with self._epoch_lock:
            self._epoch_holder = me
            try:
                self._check_no_background()
                yield
            finally:
                self._epoch_holder = None

    def _check_no_background(self):
        """Calls that a background checkpoint in progress excludes raise BusyError."""
        bg = getattr(self, "_bg", None)
        if bg is not None and not bg.done:
            from ._errors import BusyError
            raise BusyError(errno.EBUSY, "a background checkpoint of this region is in progress "
                            "(to %s): wait() for it first" % bg.path)

    def _prepare_checkpoint(self):
        """Before a checkpoint trusts our page records: bring them up to date with what a
        page server filled (and, where only it knows the contents, fetch them)."""
        with self._use() as lm:
            if lib.lm_region_remote(lm) == lib.LM_REMOTE_NONE:
                return
        if self._empty_unknown:
            self._read_through(0, self.npages)
        else:
            with self._use() as lm:
                check(lib.lm_region_sync_present(lm), "sync with page server")

    # ---- lifecycle ---------------------------------------------------------------------

    @property
    def _lm(self):
        """The native region (None once closed): the gate's."""
        return self._gate.lm

    def _use(self, report=True):
        """The gate of one call into the native region: `with self._use() as lm:` counts the
        call in and out (close() waits for it) and raises RegionClosedError once closed; with
        report, a region restored from an object store first raises the chunk failures not
        reported yet."""
        return self._gate if report else self._gate_quiet

    def _set_remote(self, url):
        """Restored from an object store: calls report its failures (_remote_failed)."""
        lm = self._lm
        self._remote = [url, 0]
        me = weakref.ref(self)   # the gate's hooks must not keep the region alive (a cycle)

        def on_enter(lm):
            region = me()
            err = region._remote_failed(lm) if region is not None else None
            if err is not None:
                raise err

        def on_error():   # the call raised ObjectStoreError: it reported them already
            region = me()
            if region is not None:
                region._remote_failed(lm)

        self._gate.set_hooks(on_enter, ObjectStoreError, on_error)

    @property
    def closed(self):
        return self._lm is None

    def close(self):
        """Close the region: no new calls or views. Idempotent.

        With no view left (memoryview, numpy array of its memory) the region is torn down now:
        serving stops, the memory is unmapped and freed. Views that are still alive keep the
        memory valid, with its contents, and served, until the last of them is released; then
        the teardown happens (Python's mmap raises BufferError instead; arrays outliving the
        object they came from are common in numpy code, so they stay correct here).
        A background checkpoint in progress is waited for first (its file completes); from
        its own thread (a progress callback), which holds the region until it ends: BusyError."""
        bg = getattr(self, "_bg", None)
        # A checkpoint whose thread runs it (not one still being started on this thread, a
        # signal handler's close() interrupting it: its hold defers the close instead).
        if bg is not None and getattr(bg, "_running", False) and not bg._done.is_set():
            if threading.current_thread() is getattr(bg, "_thread", None):
                from ._errors import BusyError
                raise BusyError(errno.EBUSY, "close() from the background checkpoint's own "
                                "thread (its progress callback), which holds the region until "
                                "the checkpoint ends: close it after wait()")
            bg._done.wait()
        # In C, in one call (csrc/pybuffer.c, gate_close): new calls fail from here on; the
        # calls in progress (GIL released) are waited for, then _finish_close(lm) runs. From
        # inside a call of this region on this thread (a signal handler that ran while the
        # call waited), waiting would wait for ourselves: the last call to end runs it.
        # Interrupted while it waits (KeyboardInterrupt), the region stays open (calls still
        # run) and close() can be called again. A second close() returns at once.
        self._gate.close(self._closed_reason(), self._finish_close)

    def _finish_close(self, lm):
        # A background checkpoint whose freeze could not end leaves it to the teardown, which
        # frees it: its handle keeps the counters and stops reading it.
        bg = self._bg
        if bg is not None:
            with bg._lock:
                bg._release_freeze()
        # The background fill copies into the range that is about to be unmapped (or kept only
        # for the views left, where it is optional work): it stops first either way.
        lib.lm_background_stop(lm)
        pending = _Pending(self, lm)
        if self._detach():   # no view: unmapped now, while still registered
            self._teardown(pending)
        else:
            # Views keep the memory: it stays mapped and served (serving started again if the
            # program had stopped it: a view of a region nobody serves waits forever); the
            # Mapping runs the teardown when the last one goes.
            if self._server_sock is None and lib.lm_region_serving(lm) <= 0:
                lib.lm_region_start(lm)
            # The Mapping runs the teardown when the last view goes (this region may be
            # gone by then: views do not hold it).
            pending.mapping = self._mapping
            _pending_teardowns.add(pending)
            pending.mapping._set_on_release(pending)

    def _teardown(self, pending):
        _live_regions.discard(self)
        self._meta_map = None   # existing r.meta arrays keep the mapping alive
        self._base_table = None
        self._pool = self._server_sock = None
        _free(pending)

    def _forget(self):
        # Locks another thread of the parent held at fork() stay held here for good: new ones,
        # so that a call in the child raises RegionClosedError instead of waiting forever.
        old = self._gate
        self._gate = Gate()
        self._gate_quiet = self._gate.quiet()
        self._forked = True
        self._gate.close(self._closed_reason(), None)   # closed from the start
        self._epoch_lock = threading.Lock()
        self._epoch_holder = None
        self._alloc_lock = threading.Lock()
        bg, self._bg = self._bg, None   # a background checkpoint's thread is the parent's
        if bg is not None:
            bg._forked()   # done here, with an error: wait() in the child returned never
        lm = old.forget()   # the parent's calls and a pending close() are not ours
        pending = None
        mapping = self._mapping
        if mapping is not None:
            p = mapping._set_on_release(None)
            if p is not None:
                _pending_teardowns.discard(p)
                pending = p.lm
        if self._pool is not None:
            self._pool.forget()
            self._pool = None
        for x in (lm, pending):
            if x is not None:
                lib.lm_region_forget(x)
        # Not mapped here: give the address range up without munmap, whatever state the
        # parent's region was in (a close() waiting in another thread at the fork left neither
        # handle nor teardown, and the range stayed open to views: memoryview(r) was handed
        # out over memory the child does not have). A no-op for a range given up already.
        self._abandon()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        gate = getattr(self, "_gate", None)
        if gate is not None and gate.lm is not None:
            self.close()

    def __len__(self):
        return self.nbytes

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return "<pylazymem.Region %s nbytes=%d address=0x%x>" % (
            state, self.nbytes, getattr(self, "address", 0))

    # ---- views -------------------------------------------------------------------------

    def ndarray(self, dtype, shape=None, offset=0):
        """A zero-copy numpy view of the region's memory."""
        self._check_open()
        try:
            dtype = np.dtype(dtype)
        except (TypeError, ValueError, SyntaxError) as e:
            raise InvalidArgumentError("not a dtype: %r (%s)" % (dtype, e)) from None
        if dtype.itemsize == 0 or dtype.hasobject:
            raise InvalidArgumentError("a region view needs a dtype with a size and no Python "
                                       "objects, not %s" % dtype)
        if dtype.subdtype is not None:
            # a sub-array dtype ("4f4"): its base with the sub-array's shape appended, as
            # alloc() takes it (numpy's frombuffer would count items of the base type); with
            # no shape, as many as fit
            if shape is None:
                shape = ((self.nbytes - self._index(offset, "offset")) // dtype.itemsize,)
            dtype, shape = _dtype_and_shape(dtype, shape)
        offset = self._index(offset, "offset")
        if offset < 0 or offset > self.nbytes:
            raise InvalidRangeError("offset %d outside the region (0..%d)" % (offset, self.nbytes))
        if shape is None:
            count = (self.nbytes - offset) // dtype.itemsize
            shape = (count,)
        else:
            shape = _view_shape(shape)
            if any(x < 0 for x in shape):   # two negatives would make a positive count
                raise InvalidRangeError("negative dimension in shape %r" % (shape,))
            count = math.prod(shape)   # Python integers: a huge shape cannot wrap
            if offset + count * dtype.itemsize > self.nbytes:
                raise InvalidRangeError("%d items of %s at offset %d do not fit in %d bytes"
                                        % (count, dtype, offset, self.nbytes))
        return np.frombuffer(self, dtype=dtype, count=count, offset=offset).reshape(shape)

    def alloc(self, name, shape, dtype):
        """Place a named numpy array in the region (page-aligned); it is saved by checkpoint()."""
        self._check_open()
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError("array name must be a non-empty string")
        dtype, shape = _dtype_and_shape(dtype, shape)
        if dtype.hasobject:
            raise InvalidArgumentError("arrays of Python objects cannot live in a region")
        if dtype.itemsize == 0:
            raise InvalidArgumentError("dtype %s has no size" % dtype)
        if any(x < 0 for x in shape):
            raise InvalidArgumentError("negative dimension in shape %r" % (shape,))
        nbytes = math.prod(shape) * dtype.itemsize   # Python integers: no wrap-around
        # The name's check, the offset's reservation and the record in one step: two threads
        # allocating at once were handed overlapping arrays (ndarray() lets other threads run).
        with self._alloc_lock:
            if name in self._arrays:
                raise InvalidArgumentError("an array named %r already exists" % name)
            offset = -(-self._alloc_next // self.page_size) * self.page_size
            if offset + nbytes > self.nbytes:
                raise InvalidArgumentError("array %r (%d bytes) does not fit: %d of %d bytes left"
                                           % (name, nbytes, max(0, self.nbytes - offset),
                                              self.nbytes))
            view = self.ndarray(dtype, shape, offset)   # before anything is recorded
            self._arrays[name] = {"offset": offset, "dtype": dtype, "shape": shape}
            self._alloc_next = offset + nbytes
        return view

    @property
    def arrays(self):
        """name -> numpy view of every array placed with alloc() (or restored)."""
        self._check_open()
        return {n: self.ndarray(a["dtype"], a["shape"], a["offset"])
                for n, a in self._arrays.items()}

    # ---- working sets and restore --------------------------------------------------------

    def working_set(self):
        """Pages touched in the current window: first touches in order, then pages present at
        the mark and written since (where the kernel tracks writes), as uint64 page indices."""
        out = np.empty(self.npages, np.uint64)
        with self._use() as lm:
            n = check(lib.lm_ws_collect(lm, ffi.from_buffer("uint64_t[]", out), self.npages),
                      "working_set")
        seen = out[:n]
        if self._ws_inherited is None:
            return seen.copy()
        # After a prefetching restore the prefetched pages are present: touching them causes
        # no fault, so the window keeps them (in their saved order) and appends what is new.
        return np.concatenate([self._ws_inherited,
                               seen[~np.isin(seen, self._ws_inherited)]])

    def mark_working_set(self, inherit=None):
        """Start a new working-set window (optionally seeded with pages known to be in it)."""
        seed = None if inherit is None else self._page_list(inherit, "mark_working_set(inherit)")
        with self._use() as lm:
            check(lib.lm_ws_mark(lm), "mark_working_set")
        self._ws_inherited = None if seed is None or not seed.size else seed.copy()

    @property
    def tracks_writes(self):
        """Whether the working-set window sees writes to pages present at the mark."""
        with self._use() as lm:
            return bool(lib.lm_ws_tracks_writes(lm))

    # ---- dirty tracking (docs/design.md, "Dirty tracking") ---------------------------------

    def dirty_pages(self):
        """Indices (uint64, ascending) of the pages whose contents may differ from what they
        held when the epoch began: region creation, the last restore() or reset_dirty()
        (checkpoint() resets it). A page that changed is always listed; a listed page may not
        have changed (which ones, per mode: docs/design.md). Not while a background
        checkpoint runs (BusyError): its staged pages are away from the region then, and would
        be taken for pages the program dropped, listed as dirty for good."""
        self._check_no_background()
        words = np.zeros(-(-self.npages // 64), np.uint64)
        with self._use() as lm:
            self._sync_untracked(lm)
            check(lib.lm_dirty_bitmap(lm, ffi.from_buffer("uint64_t[]", words)), "dirty_pages")
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:self.npages]
        return np.flatnonzero(bits).astype(np.uint64)

    def reset_dirty(self):
        """Start a new epoch: from now on dirty_pages() lists only pages changed after this call
        (call it before reading the pages whose state the epoch starts from). The epoch is no
        snapshot's: the next checkpoint(parent=) compares every page with its parent."""
        with self._epoch_owner():   # not during a checkpoint, whose epoch this would end
            self._epoch_id = None
            self._restart_epoch()

    def _restart_epoch(self):
        """reset_dirty() that keeps the epoch's snapshot: for restore(), whose prefetch filled
        pages with the snapshot's own contents after the epoch began."""
        with self._use() as lm:
            check(lib.lm_dirty_reset(lm, ffi.NULL), "reset_dirty")

    @property
    def dirty_tracking(self):
        """How dirty_pages() knows: "wp-async" (async write-protect, PAGEMAP_SCAN), "page-tables"
        (a shared restore: pages holding a private copy), or "none" (every page not lazy)."""
        with self._use() as lm:
            return _DIRTY_MODES[lib.lm_dirty_mode(lm)]

    def prefetch(self, pages):
        """Carry out the pending updates of the given pages now, in the given order."""
        pages = self._page_list(pages, "prefetch")
        if self._empty_unknown:
            self._refuse_remote("prefetch")
        with self._use() as lm:
            check(lib.lm_prefetch(lm, ffi.from_buffer("uint64_t[]", pages), pages.size),
                  "prefetch")

    def background_start(self):
        """Start filling every page that still needs an update, yielding to demand faults."""
        if self._empty_unknown:
            self._refuse_remote("background_start")
        with self._use() as lm:
            check(lib.lm_background_start(lm), "background_start")

    def background_stop(self):
        with self._use() as lm:
            check(lib.lm_background_stop(lm), "background_stop")

    @property
    def meta(self):
        """Read-only numpy structured array, one record per page (see docs/design.md)."""
        # Records of large deferrals and of restored pages are filled lazily (docs/design.md,
        # "Deferred metadata"): before anyone reads them, every record must say what its page
        # holds.
        # A shared restore's pages, and canonical pages mapped from a chunk, may have been
        # written behind the records' back (the kernel copies a shared page on a store without
        # telling us): the sync asks the page tables.
        with self._use() as lm:
            if lib.lm_meta_pending(lm) or self._pool is not None or self._chunks:
                lib.lm_meta_sync(lm)
        self._base_table = None   # the restore's table is not read any more
        return self._meta

    # ---- deferred updates --------------------------------------------------------------

    def canonical(self, page):
        """Register canonical contents (exactly one page); identical contents, same Canonical."""
        try:
            buf = memoryview(page).cast("B")
        except TypeError:
            raise InvalidArgumentError("canonical page must be a bytes-like object, not %s"
                                       % type(page).__name__) from None
        if buf.nbytes != self.page_size:
            raise InvalidArgumentError("canonical page must be exactly %d bytes, got %d"
                                       % (self.page_size, buf.nbytes))
        ident = ffi.new("uint32_t *")
        sig = ffi.new("uint64_t *")
        with self._use() as lm:
            check(lib.lm_canonical(lm, ffi.from_buffer(buf), ident, sig), "canonical")
        return Canonical(self, ident[0], sig[0])

    def defer_fill(self, offset, length, what):
        """Record that [offset, offset+length) should hold `what` (ZERO or a Canonical)."""
        first, n = self._pages(offset, length)
        if isinstance(what, Canonical):
            if what._region() is not self:
                raise InvalidArgumentError("canonical page belongs to another region")
            cls, canon = lib.LM_CLS_CANONICAL, what.id
            self._chunks = True
        elif what is PageClass.ZERO or (isinstance(what, int) and what == PageClass.ZERO
                                         and not isinstance(what, bool)):
            cls, canon = lib.LM_CLS_ZERO, 0
        else:
            raise InvalidArgumentError("defer_fill takes pylazymem.ZERO or a Canonical from "
                                       "Region.canonical(), not %r" % (what,))
        self._refuse_remote("defer_fill")
        with self._use() as lm:
            check(lib.lm_defer_fill(lm, first, n, cls, canon), "defer_fill")

    def materialize(self, offset=0, length=None):
        """Carry out pending updates now: every page in the range becomes present."""
        first, n = self._pages(offset, length)
        self._read_through(first, n)
        with self._poisoned_named(first, n), self._use() as lm:
            check(lib.lm_materialize(lm, first, n), "materialize")

    def signatures(self, offset=0, length=None):
        """XXH3-64 per page, also stored in meta["signature"]; lazy pages are not touched."""
        first, n = self._pages(offset, length)
        self._read_through(first, n)
        out = np.empty(n, dtype=np.uint64)
        # lm_signatures gives a poisoned page the signature 0 (no page's XXH3 in practice):
        # the pages it met poisoned, whatever a concurrent defer_fill did since.
        with self._poisoned_named(first, n, reported=lambda: first + np.nonzero(out == 0)[0]), \
                self._use() as lm:
            check(lib.lm_signatures(lm, first, n, ffi.from_buffer("uint64_t[]", out)),
                  "signatures")
        return out

    def _test_fail_fills(self, n):
        """Test hook: change Region(_test_broken_source=...) on the fly (0: fills work)."""
        with self._use() as lm:
            lib.lm_region_test_fail_fills(lm, int(n))

    def poisoned_pages(self, offset=0, length=None):
        """Indices of the pages in the range whose contents could not be served (state
        POISONED): an access to one raises SIGBUS; defer_fill() gives them new contents."""
        first, n = self._pages(offset, length)
        return first + np.nonzero(self.meta["state"][first:first + n]
                                  == int(PageState.POISONED))[0]

    @contextlib.contextmanager
    def _poisoned_named(self, first, n, what=None, reported=None):
        """A PoisonedPageError from the core names the pages: those the call reports
        (`reported()`, where it says which), else those the records say are poisoned now."""
        try:
            yield
        except PoisonedPageError as e:
            what = what or (e.strerror or "").split(":")[0]
            bad = np.zeros(0, np.int64) if reported is None else np.asarray(reported())
            if not bad.size:
                bad = self.poisoned_pages(first * self.page_size, n * self.page_size)
            if not bad.size:
                # The call met poisoned pages, and a defer_fill() on another thread has given
                # every one of them new contents since: none to name, and none lost any more.
                raise PoisonedPageError(
                    "%s: pages in the range were poisoned (their contents could not be "
                    "served) when it ran, and have since been given new contents by a "
                    "defer_fill(): call it again" % what) from None
            shown = ", ".join(str(int(p)) for p in bad[:16]) + (", ..." if bad.size > 16 else "")
            raise PoisonedPageError(
                "%s: %d poisoned page%s (%s): their contents could not be served (a failed "
                "fill, a verification mismatch or a lost page server; stats()['last_error'] "
                "says which) and are lost; defer_fill() gives them new contents"
                % (what, bad.size, "" if bad.size == 1 else "s", shown),
                bad.tolist()) from None

    def timeline(self):
        """When and how each page was first made present (Region(timeline=True)): a dict of
        numpy arrays "page", "t_us" (microseconds after the region was created) and "path"
        (a name from pylazymem._meta.PATHS), sorted by time."""
        us = np.empty(self.npages, np.uint32)
        path = np.empty(self.npages, np.uint8)
        with self._use() as lm:
            check(lib.lm_timeline(lm, ffi.from_buffer("uint32_t[]", us),
                                  ffi.from_buffer("uint8_t[]", path)), "timeline")
        pages = np.nonzero(us)[0]
        pages = pages[np.argsort(us[pages], kind="stable")]
        return {"page": pages, "t_us": us[pages].astype(np.int64) - 1,
                "path": np.array([PATHS[p] for p in path[pages]], dtype=object)}

    def page_counts(self):
        """Where the region's pages are now, from the page tables (explicit: a walk of the
        region's page tables, ~15-40 ms per mapped GiB): "shared" (mapped from a pool shared
        with other processes, not copied), "private" (this process's own copies: written
        pages, private fills), "zero" (the kernel's zero page), "not_present"."""
        out = ffi.new("uint64_t[4]")
        with self._use() as lm:
            check(lib.lm_page_counts(lm, out), "page_counts")
        return {"shared": out[0], "private": out[1], "zero": out[2], "not_present": out[3]}

    def stats(self):
        s = ffi.new("struct lm_stats *")
        objs = ffi.new("uint64_t[]", len(_OBJS_STATS)) if self._remote else None
        with self._gate_quiet as lm:
            lib.lm_stats(lm, s)
            if objs is not None:
                lib.lm_source_objs_stats(lm, objs)
        d = _stats_dict(s, self._nthreads)
        if objs is not None:   # restored from an object store: its fetches and cache
            d["object_store"] = dict(zip(_OBJS_STATS, objs))
        return d

    def _remote_failed(self, lm):
        """Chunks an object store could not deliver since the last report: their pages were
        poisoned (the accesses raised SIGBUS); the next call after that raises, once."""
        objs = ffi.new("uint64_t[]", len(_OBJS_STATS))
        if lib.lm_source_objs_stats(lm, objs) < 0:
            return None
        failures = objs[_OBJS_STATS.index("failures")]
        if failures <= self._remote[1]:
            return None
        self._remote[1] = failures
        return ObjectStoreError(
            "%s: %d chunk(s) could not be fetched from the object store (bounded retries "
            "exhausted, or refused): the pages that needed them are poisoned (an access "
            "raises SIGBUS); stats()['object_store'] has the counts" % (self._remote[0], failures),
            what="restore")

    # ---- argument checks ---------------------------------------------------------------

    def _check_open(self):
        if self._lm is None:
            raise self._closed_error()

    def _closed_reason(self):
        if self._forked:
            return ("region belongs to the parent process: after fork() a child cannot use "
                    "the parent's regions")
        return "operation on a closed region"

    def _closed_error(self):
        return RegionClosedError(self._closed_reason())

    @staticmethod
    def _index(value, name):
        try:
            return operator.index(value)
        except TypeError:
            raise InvalidRangeError("%s must be an integer, not %s"
                                    % (name, type(value).__name__)) from None

    def _page_list(self, pages, what):
        """Page indices (integers, each in the region) as a contiguous uint64 array: floats,
        bools, nested sequences and indices outside the region are refused, not converted."""
        self._check_open()
        try:
            a = np.asarray(pages)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError("%s: page indices expected (%s)" % (what, e)) from None
        if a.size == 0:
            return np.zeros(0, np.uint64)
        if a.ndim > 1 or a.dtype.kind not in "iuO":
            raise InvalidArgumentError("%s: page indices must be a sequence of integers, not %s "
                                       "of %s" % (what, "a %d-d array" % a.ndim if a.ndim > 1
                                                  else "an array", a.dtype))
        if a.dtype.kind == "O":   # Python integers beyond 64 bits, or other objects
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                       for x in a.ravel()):
                raise InvalidArgumentError("%s: page indices must be integers" % what)
            bad = [int(x) for x in a.ravel() if not 0 <= int(x) < self.npages]
        else:
            a = a.ravel()
            bad = a[(a < 0) | (a >= self.npages)] if a.dtype.kind == "i" else a[a >= self.npages]
        if len(bad):
            raise InvalidRangeError("%s: page index %d outside the region (0..%d)"
                                    % (what, int(bad[0]), self.npages - 1))
        return np.ascontiguousarray(np.asarray(a, dtype=np.uint64).ravel())

    def _pages(self, offset, length):
        """Validate a byte range and turn it into (first page, page count)."""
        self._check_open()
        offset = self._index(offset, "offset")
        length = self.nbytes - offset if length is None else self._index(length, "length")
        if offset < 0 or length <= 0:
            raise InvalidRangeError("offset %d, length %d: offset must be >= 0 and length > 0"
                                    % (offset, length))
        if offset % self.page_size or length % self.page_size:
            raise InvalidRangeError("offset %d, length %d: both must be multiples of the page "
                                    "size (%d)" % (offset, length, self.page_size))
        if offset + length > self.nbytes:
            raise InvalidRangeError("range [%d, %d) outside the region of %d bytes"
                                    % (offset, offset + length, self.nbytes))
        return offset // self.page_size, length // self.page_size


def _view_shape(shape):
    """A view's shape as a tuple of Python integers, or InvalidArgumentError: floats, bools,
    strings and nested sequences are refused here rather than by numpy (a bare TypeError or
    ValueError that does not say it was the shape)."""
    try:
        dims = (shape,) if np.ndim(shape) == 0 else tuple(shape)
        if any(isinstance(x, (bool, np.bool_)) for x in dims):
            raise TypeError
        return tuple(operator.index(x) for x in dims)
    except (TypeError, ValueError):   # ValueError: np.ndim of a ragged sequence
        raise InvalidArgumentError("shape must be an integer or a sequence of integers, not %r"
                                   % (shape,)) from None


def _dtype_and_shape(dtype, shape):
    """A checked dtype and shape; a sub-array dtype ("4f4") becomes its base with the
    sub-array's shape appended, the form numpy views and the snapshot manifest use."""
    try:
        dtype = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError) as e:
        raise InvalidArgumentError("not a dtype: %r (%s)" % (dtype, e)) from None
    shape = _view_shape(shape)
    if dtype.subdtype is not None:
        dtype, sub = dtype.subdtype
        shape = shape + tuple(sub)
    return dtype, shape


# lm_source_objs_stats's counters, in the order of enum lm_objs_stat (lazymem.h)
_OBJS_STATS = ("requests", "fetches", "fetch_bytes", "retries", "failures", "corrupt",
               "cache_hits", "cache_writes", "cache_write_errors", "cache_bad", "evicted")


def _quantile(hist, total, q):
    if not total:
        return 0
    rank = q * total
    seen = 0
    for bucket, count in enumerate(hist):
        seen += count
        if seen >= rank and count:
            return int(lib.lm_hist_bucket_upper(bucket))
    return int(lib.lm_hist_bucket_upper(len(hist) - 1))


def _stats_dict(s, nthreads):
    hist = list(s.hist)
    total = sum(hist)
    top = s.service_ns_max
    return {
        "faults": s.faults,
        "faults_by_class": {"zero": s.faults_zero, "canonical": s.faults_canonical,
                            "empty": s.faults_empty, "snapshot": s.faults_snapshot},
        "faults_spurious": s.faults_spurious,
        "faults_write": s.faults_write,
        "readahead_pages": s.readahead_pages,
        "pages_present": s.pages_present,
        "bytes_materialized": s.bytes_materialized,
        "materialized_pages": s.materialized_pages,
        "errors": s.errors,
        "last_error": -s.last_error,
        "serving_threads": s.serving_threads,
        "served_by_thread": list(s.served_by_thread)[:nthreads],
        "wakeups_empty": s.wakeups_empty,
        "prefetched_pages": s.prefetched_pages,
        "background_pages": s.background_pages,
        "background_running": bool(s.background_running),
        "source_bytes_read": s.source_bytes_read,
        "verify_failures": s.verify_failures,
        "pages_poisoned": s.pages_poisoned,
        "shared": bool(s.shared),
        "pages_shared_mapped": s.pages_shared_mapped,
        "pages_published": s.pages_published,
        "pool_fallback_pages": s.pool_fallback_pages,
        "share_canonical": bool(s.share_canonical),
        "canonical_shared_pages": s.canonical_shared_pages,
        "canonical_copied_pages": s.canonical_copied_pages,
        "map_budget_fallbacks": s.map_budget_fallbacks,
        "shared_first_touch": bool(s.shared_first_touch),
        "canonical_kernel_pages": s.canonical_kernel_pages,
        "pool_kernel_pages": s.pool_kernel_pages,
        "remote": {0: None, 1: "served", 2: "lost"}.get(s.remote, s.remote),
        "fault_service_ns": {
            "p50": min(_quantile(hist, total, 0.50), top),
            "p99": min(_quantile(hist, total, 0.99), top),
            "max": s.service_ns_max,
            "mean": s.service_ns_total // total if total else 0,
        },
    }
