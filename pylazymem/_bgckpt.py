"""Background checkpoints: checkpoint(region, path, background=True).

The pause is the core's (freeze.c): one mremap moves the region's present pages to a staging
range, after which the program runs on and every page it touches first is brought back from
staging by the fault path. This module runs the rest on a thread: find what was staged, bring
the remaining pages back, then the ordinary checkpoint (snapshot._checkpoint) with the core
reading every page as it was at the pause, and end the freeze whatever happened. The handle
reports on it. docs/design.md, "Background checkpoints".
"""
import errno
import os
import threading
import time

import numpy as np

from ._binding import check, ffi, lib
from ._errors import BusyError, InvalidArgumentError


class CheckpointHandle:
    """A checkpoint being written in the background (checkpoint(..., background=True)).

    pause: seconds the program's threads were stopped (the move of the pages to staging);
    started: seconds the checkpoint() call took in all. done: the checkpoint has finished,
    written or failed. progress: 0.0 to 1.0. wait(timeout=None): the SnapshotInfo, or the
    exception the checkpoint failed with (the file at `path` is then what it was before).
    stats(): the freeze's counters."""

    def __init__(self, region, path, fz):
        self.region = region
        self.path = path
        # The freeze is freed by its end (_end) or by the region's teardown: _fz is read and
        # cleared under _lock, its counters kept in _final first (stats() from another thread
        # read it while it was freed). Reentrant: a close() from a signal handler that runs
        # inside stats() takes it again (the teardown's _release_freeze).
        self._lock = threading.RLock()
        self._fz = fz
        self._thread = None
        self._done = threading.Event()
        self._running = False   # its thread has taken it over (close() waits for it then)
        self._result = None
        self._error = None
        self._nstored = None
        self._final = None     # the freeze's counters once it has ended
        st = self._stats()
        self.pause = st["pause_ns"] / 1e9
        self.started = None

    def _stats(self):
        with self._lock:
            return dict(self._final) if self._final is not None else _read_stats(self._fz)

    def _release_freeze(self):
        """The freeze is about to be freed (its end, the region's teardown): keep its
        counters and forget it. Under _lock."""
        if self._fz is not None:
            self._final = _read_stats(self._fz)
            self._fz = None

    def _forked(self):
        """In a fork child: the checkpoint is the parent's (its thread is not here), so this
        handle is done, with an error that says so, and its freeze is not read (the parent
        may have been freeing it). Its locks may have been held by the parent's threads."""
        self._lock = threading.RLock()
        if self._final is None:
            self._final = dict.fromkeys(_STATS, 0)
            self._final["pause_ns"] = int(self.pause * 1e9)
        self._fz = None
        if not self._done.is_set():
            from ._errors import RegionClosedError
            self._error = RegionClosedError(
                "background checkpoint to %s: it is written by the parent process; after "
                "fork() a child cannot wait for it" % self.path)
        self._done = threading.Event()
        self._done.set()

    def stats(self):
        """The freeze's counters: arm_ns, pause_ns, begin_ns, staged (pages present at the
        pause), copied_back and fault_served (how staged pages came back), written (store
        pages written), stray (faults in staging: always 0 unless something is wrong)."""
        return self._stats()

    @property
    def done(self):
        return self._done.is_set()

    @property
    def progress(self):
        """A fifth for bringing the staged pages back, the rest for writing the store."""
        if self.done:
            return 1.0
        st = self._stats()
        back = 1.0 if not st["staged"] else min(
            1.0, (st["copied_back"] + st["fault_served"]) / st["staged"])
        written = 0.0 if not self._nstored else min(1.0, st["written"] / self._nstored)
        return min(0.99, 0.2 * back + 0.8 * written)

    def wait(self, timeout=None):
        """Block until the checkpoint is written; its SnapshotInfo, or its exception raised.
        TimeoutError when `timeout` seconds pass first."""
        if threading.current_thread() is self._thread and not self._done.is_set():
            # (a progress callback: the checkpoint would wait for itself, like Thread.join())
            raise BusyError(errno.EDEADLK, "wait() from the background checkpoint's own thread "
                            "(its progress callback): it ends only after the callback returns")
        if not self._done.wait(timeout):
            raise TimeoutError("background checkpoint to %s: not done after %s s"
                               % (self.path, timeout))
        if self._error is not None:
            raise self._error
        return self._result

    def __repr__(self):
        state = "done" if self.done else "%.0f%%" % (100 * self.progress)
        return "<CheckpointHandle %s %s pause %.3f ms>" % (self.path, state, self.pause * 1e3)


def start(region, path, chain, write, progress, _test_copy=None):
    """The pause, then write(frozen, progress) on a thread (snapshot._start_background made
    everything ready). Owns `chain` from here: closed when the checkpoint ends, or here when it
    fails before its thread has taken it over."""
    t0 = time.perf_counter()
    # Whoever takes `claim` first owns the pause and the chain: the checkpoint's thread (it runs
    # the checkpoint), or this function when it fails or is interrupted before that thread
    # took them (it undoes the pause and closes the chain). A thread start() created before an
    # interrupt may still run; it then finds `claim` taken and returns.
    claim = threading.Lock()
    out = ffi.new("struct lm_freeze **")   # the pause, once it happened
    hold = handle = None
    epoch, taken = None, False
    try:
        if _test_copy is not None and memoryview(_test_copy).nbytes != region.nbytes:
            raise InvalidArgumentError("_test_copy must be region.nbytes long")
        # Counted as a call until the checkpoint's thread ends it (close() waits for the
        # checkpoint): a hold, counted out when released or freed, and this thread's call
        # until that thread adopts it (a close() from a signal handler here is deferred).
        hold = region._gate.hold()
        tc = ffi.NULL if _test_copy is None else ffi.from_buffer(_test_copy)
        check(lib.lm_freeze_begin(hold.lm, tc, out), "checkpoint(background=True)")
        fz = out[0]
        # The epoch that ended at the pause is the freeze's now: the file, once whole, is the
        # new epoch's snapshot; if it fails, the old epoch goes on (lm_freeze_end merges it
        # back). (Two stores, no call between: no interrupt can split them.)
        epoch, region._epoch_id = region._epoch_id, None
        taken = True
        handle = CheckpointHandle(region, path, fz)
        region._bg = handle
        # Not a daemon: the interpreter's exit waits for the file to be complete (a daemon
        # thread was dropped mid-write at exit, its temporary left behind, the checkpoint
        # silently lost).
        t = threading.Thread(target=_run, name="pylazymem-checkpoint",
                             args=(handle, region, hold, fz, chain, write, progress, epoch,
                                   claim),
                             daemon=False)
        handle._thread = t
        t.start()
    except BaseException:   # (a bad argument, the pause refused, no thread, an interrupt)
        if claim.acquire(blocking=False):   # no thread took over: undo what was done
            if out[0] != ffi.NULL:
                lib.lm_freeze_end(out[0], 1)
            if taken:
                region._epoch_id = epoch
            if handle is not None and region._bg is handle:
                region._bg = None
            if chain is not None:
                chain.close()
            if hold is not None:
                hold.release()
        raise
    handle.started = time.perf_counter() - t0
    return handle


def _run(handle, region, hold, fz, chain, write, progress, epoch, claim):
    if not claim.acquire(blocking=False):
        return   # start() failed or was interrupted, and undid the pause
    hold.adopt()            # this thread's call now, not the starting thread's
    handle._running = True  # close() waits for the checkpoint from here
    failed = True
    _lower_priority()
    try:
        # The scan says what was staged; the core's copier goes on bringing staged pages back
        # while the file is written from staging (the two overlap: neither changes staging).
        check(lib.lm_freeze_scan(fz), "background checkpoint")
        clean = None
        if chain is not None and epoch is not None and epoch == chain.content_id:
            words = np.zeros(-(-region.npages // 64), np.uint64)
            check(lib.lm_freeze_old_dirty(fz, ffi.from_buffer("uint64_t[]", words)),
                  "background checkpoint")
            clean = ~words
        handle._result = write((fz, clean), _Progress(handle, progress))
        # The file is whole: from here on nothing fails the checkpoint. Staged pages that
        # cannot come back yet (no memory) are served from staging and tried again (_end).
        failed = False
        lib.lm_freeze_copy_back(fz)
    except BaseException as e:   # handed to wait()
        handle._error = e
    finally:
        end_rc = _end(handle, fz, failed)
        if end_rc < 0 and handle._error is None:
            handle._error = _status(end_rc, None if failed else handle.path)
        if failed:
            region._epoch_id = epoch
        try:
            if chain is not None:
                chain.close()
            hold.release()   # may run a close() left pending: its error must not skip _done
        finally:
            handle._done.set()


_STATS = ("arm_ns", "pause_ns", "begin_ns", "staged", "copied_back", "fault_served", "written",
          "stray")


def _read_stats(fz):
    st = ffi.new("struct lm_freeze_stats *")
    lib.lm_freeze_stats(fz, st)
    return {k: getattr(st, k) for k in _STATS}


def _lower_priority():
    """The checkpoint's CPU time is the program's to lend, not to take: this thread (and the
    threads the core starts from it, which inherit it: hashing, compression) runs at nice
    +10 (Linux's nice is per thread). Pages the program touches are brought back by the
    serving threads and the core's copier, which keep their priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
    except OSError:
        pass   # not allowed (a container's limits): the checkpoint simply competes


def _end(handle, fz, failed):
    """End the freeze; retried a few times (bringing pages back can fail for want of memory).
    While it cannot end, the fault path keeps serving staged pages from staging."""
    for attempt in range(50):
        # the staged pages back first, outside the lock (stats() is not held up meanwhile;
        # lm_freeze_end brings back what is left, then frees)
        lib.lm_freeze_copy_back(fz)
        with handle._lock:
            final = _read_stats(fz)
            rc = lib.lm_freeze_end(fz, 1 if failed else 0)
            if rc == 0:
                handle._final = final
                handle._fz = None
                return 0
        time.sleep(0.1)
    return rc


def _status(rc, complete=None):
    """The error of a failed freeze end; complete: the path of the file, if it was written
    whole (then the error is the region's, not the file's, and says so)."""
    from ._errors import status_error
    what = "background checkpoint"
    if complete is not None:
        what = ("background checkpoint: the snapshot %s is complete, but the region's pages "
                "could not all be brought back from staging (they are still served from it)"
                % complete)
    return status_error(-rc, ffi.string(lib.lm_last_op()).decode(), what)


class _Progress:
    """progress= of the background checkpoint: the user's callback, and the store's size for
    the handle (the first call after the plan knows the total)."""

    def __init__(self, handle, user):
        self.handle, self.user = handle, user

    def __call__(self, done, total):
        if self.handle._nstored is None:
            self.handle._nstored = max(1, total // self.handle.region.page_size)
        if self.user is not None:
            self.user(done, total)

    def __bool__(self):
        return True
