"""Reliability: a restored region under concurrency, with injected fill failures, every byte
checked against a model (issue 10).

Eight threads work on a lazily restored snapshot at once: three fault pages in (and write
pages they own), two prefetch random page lists with repeated pages that overlap each other,
one takes signatures() of random ranges, one takes checkpoints in a loop (each one restored
and compared with the model), and one starts and stops the background fill and materializes
ranges. Runs with no injected failures (nothing may be poisoned, every checkpoint must succeed
and round-trip) and with every Nth fill attempt failing (Region(_test_broken_source=N)).

Pages are only ever touched by KERNEL accesses (os.pwrite from the region into a memfd, or
os.preadv from a memfd into the region), except for writes to pages their writer has already
seen served: in full-mode userfaultfd a kernel access to a missing page is served like a user
access, and an access to a poisoned page fails with EFAULT instead of killing the process with
SIGBUS, so a poisoned page is checked, not fatal. (Observed before writing this test: with
_test_broken_source=7 and readahead off, a pwrite of each page of a 256-page restored region
into a memfd failed with EFAULT on exactly the pages meta then flagged POISONED, 37 of them,
stats()["errors"] == 37; a second pwrite of those pages failed with EFAULT again, state
PRESENT; every other page read exactly its snapshot bytes.)

Invariants, checked while the threads run and again at the end:
  - a page that is not poisoned reads exactly the model's bytes (a page written by its owner:
    the owner's last version exactly; another thread sees, byte by byte, one of its versions);
  - a page whose kernel access fails with EFAULT is flagged POISONED in meta, and a poisoned
    page fails every later access; a page once served is never poisoned afterwards;
  - with no injected failures nothing is poisoned, and stats()["errors"] stays 0;
  - signatures() of a page not poisoned (after the call) is xxh3_64 of its model bytes;
  - prefetch() returns (or, injected failures only, raises UffdError naming the hook), and every
    page it was given is then PRESENT;
  - a checkpoint taken meanwhile either raises a LazyMemError naming poisoned pages (injected
    failures only) or writes a snapshot whose pages, restored, equal the model (pages poisoned
    by the time it returned excluded; pages being written: one of their versions, byte by byte);
  - materialize() succeeds (or, injected failures only, raises UffdError naming the hook) and
    leaves its range PRESENT.
A violation is reported with the invariant, the thread, the page and expected vs got. The
workload runs in a subprocess under a hard timeout: a crash or a hang fails the test with the
child's stderr (faulthandler dumps every thread's stack).
"""

import errno
import os
import sys
import threading
import time
import traceback

import numpy as np
import pytest

from _reliability import LONG, UNDER_ASAN, emit, last_json, record

pytestmark = [pytest.mark.uffd_full, pytest.mark.core,
              pytest.mark.timeout(3600 if LONG else 240)]

# Seconds of concurrent work per variant (spread over several restores); PYLAZYMEM_MODEL_SECONDS
# overrides (a long run: PYLAZYMEM_MODEL_SECONDS=600, or PYLAZYMEM_LONG=1).
SECONDS = float(os.environ.get("PYLAZYMEM_MODEL_SECONDS", 300 if LONG else 4))
NPAGES = 512
# A round's single operations take milliseconds: a thread still busy this long after the
# round's deadline is hung (the child then dumps every stack and fails).
HANG_SECONDS = 60 if UNDER_ASAN else 20


@pytest.mark.parametrize("fail_every", [0, 7], ids=["no-failures", "every-7th-fill-fails"])
def test_restored_region_model_under_concurrency(run_py, tmp_path, fail_every):
    res = run_py(f"""
        import test_reliability_model as m
        m.model_stress(seed={1000 + fail_every}, workdir=sys.argv[1], fail_every={fail_every},
                       seconds={SECONDS}, npages={NPAGES})
    """, timeout=SECONDS * 3 + (180 if UNDER_ASAN else 60), args=(str(tmp_path),))
    assert res.returncode == 0, (
        "model stress (fail_every=%d) failed; the child's stdout and stderr (a crash or a "
        "hang shows every thread's stack):\n%s" % (fail_every, res.describe()))
    m = last_json(res.stdout)
    record("model_stress_fail%d" % fail_every, m)
    assert m["rounds"] >= 1 and m["kernel_reads"] > 0, m
    assert m["prefetch_calls"] > 0 and m["signature_calls"] > 0, m
    assert m["checkpoints_ok"] + m["checkpoints_refused"] > 0, m
    if fail_every:
        assert m["poisoned"] > 0, ("injected failures poisoned nothing: the test did not test "
                                   "them", m)
    else:
        assert m["poisoned"] == 0 and m["checkpoints_refused"] == 0, m


# ==== the workload (runs in the child) =========================================================

def _xxh3(b):
    import xxhash
    return xxhash.xxh3_64_intdigest(bytes(b))


class ModelViolation(AssertionError):
    pass


class _Model:
    """What every page of the restored region must hold.

    base: the snapshot's bytes. Pages in `owner` (>= 0) may be written by that thread only;
    versions[p] lists every content page p has had in this round: versions[k] is the page after
    its kth write (the owner appends under `lock` before it stores, and counts the write in
    done[p] once the store is complete). Whoever saw done[p] == k before looking at page p
    must see, byte by byte, one of versions[k:]. `poisoned` holds pages seen failing with
    EFAULT, `served` pages seen served with the right bytes."""

    def __init__(self, base, owner):
        self.base = base
        self.nonzero = base.any(axis=1)
        self.owner = owner
        self.versions = {int(p): [base[p].copy()] for p in np.nonzero(owner >= 0)[0]}
        self.done = dict.fromkeys(self.versions, 0)
        self.lock = threading.Lock()
        self.poisoned = set()
        self.served = set()

    def current(self, p):
        with self.lock:
            vs = self.versions.get(p)
            return self.base[p] if vs is None else vs[-1]

    def completed(self):
        """done[] now: the first version each written page may still show."""
        with self.lock:
            return dict(self.done)

    def versions_since(self, p, done):
        """The versions page p may show to whoever saw `done` (from completed()) before."""
        with self.lock:
            vs = self.versions.get(p)
            return [self.base[p]] if vs is None else vs[done.get(p, 0):]

    def stored(self, p):
        with self.lock:
            self.done[p] += 1


class _Run:
    """One round: a restored region, eight threads, a model, and the violations found."""

    def __init__(self, r, model, rng, fail_every, workdir, deadline, round_no):
        import pylazymem as plm
        self.plm = plm
        self.r = r
        self.mv = memoryview(r)
        self.v = r.ndarray(np.uint8).reshape(r.npages, r.page_size)
        self.ps = r.page_size
        self.n = r.npages
        self.model = model
        self.fail_every = fail_every
        self.workdir = workdir
        self.deadline = deadline
        self.round_no = round_no
        self.seeds = rng.integers(0, 2 ** 63, 16)
        self.violations = []
        self.vlock = threading.Lock()
        self.stop = threading.Event()
        self.counts = dict(kernel_reads=0, kernel_writes=0, numpy_writes=0, efault=0,
                           prefetch_calls=0, prefetch_raised=0, signature_calls=0,
                           checkpoints_ok=0, checkpoints_refused=0, materialize_calls=0,
                           materialize_raised=0, background_toggles=0)
        self.clock = threading.Lock()

    # ---- reporting ----

    def violation(self, invariant, thread, page=None, **detail):
        d = dict(round=self.round_no, invariant=invariant, thread=thread, page=page, **detail)
        with self.vlock:
            self.violations.append(d)
        print("VIOLATION %r" % (d,), file=sys.stderr, flush=True)
        self.stop.set()

    def count(self, key, k=1):
        with self.clock:
            self.counts[key] += k

    def _page_diff(self, got, want):
        bad = np.nonzero(got != want)[0]
        return dict(bytes_differ=int(bad.size), first_offset=int(bad[0]) if bad.size else None,
                    got_head=got[:16].tolist(), want_head=want[:16].tolist(),
                    got_zero=bool(not got.any()))

    def is_poisoned(self, p):
        return bool(self.r.meta["flags"][p] & int(self.plm.PageFlag.POISONED))

    # ---- kernel accesses ----

    def kread(self, fd, p):
        """Page p's bytes through a kernel access (served in full mode), or None on EFAULT."""
        ps = self.ps
        try:
            k = os.pwrite(fd, self.mv[p * ps:(p + 1) * ps], 0)
        except OSError as e:
            if e.errno != errno.EFAULT:
                raise
            return None
        if k != ps:
            raise ModelViolation("pwrite of page %d from the region wrote %d of %d bytes"
                                 % (p, k, ps))
        return np.frombuffer(os.pread(fd, ps, 0), np.uint8)

    def on_efault(self, who, p, how):
        """An access to page p failed with EFAULT: it must be poisoned, and never served."""
        self.count("efault")
        if not self.fail_every:
            self.violation("no fill fails, yet a kernel %s failed with EFAULT" % how, who, p,
                           meta=self.meta_of(p))
            return
        # The record may still be BUSY: whoever poisons the page sets the flag (and releases
        # the page) just after installing the poison that failed us.
        settle = time.monotonic() + 2
        while (self.r.meta["state"][p] == int(self.plm.PageState.BUSY)
               and time.monotonic() < settle):
            time.sleep(0.001)
        if not self.is_poisoned(p):
            self.violation("a kernel %s failed with EFAULT but meta does not flag the page "
                           "POISONED" % how, who, p, meta=self.meta_of(p))
        if p in self.model.served:
            self.violation("page was served with the right bytes earlier, then a kernel %s "
                           "failed with EFAULT (a present page was refilled?)" % how, who, p)
        self.model.poisoned.add(p)

    def first_pending(self, pp):
        """The first of pages pp whose update has not been carried out: DEFERRED, or EMPTY
        (reads as zero) where the model has bytes. BUSY is another path filling it now."""
        PS_ = self.plm.PageState
        st = self.r.meta["state"][pp]
        bad = (st == int(PS_.DEFERRED)) | ((st == int(PS_.EMPTY)) & self.model.nonzero[pp])
        i = np.nonzero(bad)[0]
        return int(pp[i[0]]) if i.size else None

    def names_poisoned(self, e):
        """Whether an error's message says poisoned pages are the cause: the word, or the
        number of a page poisoned now."""
        import re
        msg = str(e)
        if "poison" in msg.lower():
            return True
        flags = self.r.meta["flags"]
        POISONED = int(self.plm.PageFlag.POISONED)
        return any(int(x) < self.n and flags[int(x)] & POISONED
                   for x in re.findall(r"\b\d+\b", msg))

    def meta_of(self, p):
        m = self.r.meta[p]
        return dict(state=int(m["state"]), cls=int(m["cls"]), flags=int(m["flags"]))

    def check_read(self, who, p, got, exact, before=None):
        """got: page p's bytes read by `who`; exact: nobody else may be writing it;
        before: the model's completed() from before the read."""
        m = self.model
        if p in m.poisoned:
            self.violation("a page that failed with EFAULT before was served later", who, p)
            return
        if exact or m.owner[p] < 0:
            want = m.current(p)
            if not np.array_equal(got, want):
                self.violation("a page that is not poisoned reads other bytes than the model",
                               who, p, **self._page_diff(got, want))
                return
        else:
            vs = np.stack(m.versions_since(p, before))
            if not (vs == got[None, :]).any(axis=0).all():
                self.violation("a page being written by its owner reads bytes none of its "
                               "versions since the read began had (a lost or torn write?)",
                               who, p, versions=len(vs), **self._page_diff(got, vs[-1]))
                return
        m.served.add(p)

    # ---- threads ----

    def faulter(self, t):
        """Kernel reads of random pages (checked against the model); writes to own pages:
        kernel writes (preadv into the region, also into pages not yet served: the fill
        must come first) and numpy writes into own pages already seen served."""
        who = "faulter-%d" % t
        rng = np.random.default_rng(self.seeds[t])
        fd = os.memfd_create("model-read-%d" % t)
        src = os.memfd_create("model-src-%d" % t)
        mine = np.nonzero(self.model.owner == t)[0]
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                if mine.size and rng.random() < 0.15:
                    self.write_own(who, rng, src, int(rng.choice(mine)))
                    continue
                p = int(rng.integers(0, self.n))
                before = self.model.completed()
                got = self.kread(fd, p)
                self.count("kernel_reads")
                if got is None:
                    self.on_efault(who, p, "read (pwrite from the region)")
                else:
                    self.check_read(who, p, got, exact=self.model.owner[p] == t,
                                    before=before)
        finally:
            os.close(fd)
            os.close(src)

    def write_own(self, who, rng, src, p):
        m, ps = self.model, self.ps
        a = int(rng.integers(0, ps))
        b = int(rng.integers(a + 1, ps + 1)) if rng.random() < 0.7 else ps
        if rng.random() < 0.2:
            a = 0
        data = rng.integers(0, 256, b - a, dtype=np.uint8)
        new = m.current(p).copy()
        new[a:b] = data
        if p in m.served and rng.random() < 0.5:
            # served earlier, so present and not poisoned: a plain store cannot fault
            with m.lock:
                m.versions[p].append(new)    # readers may see it before it is complete
            self.v[p, a:b] = data
            m.stored(p)
            self.count("numpy_writes")
        elif p in m.poisoned:
            return
        else:
            os.pwrite(src, data.tobytes(), 0)
            with m.lock:
                m.versions[p].append(new)
            try:
                k = os.preadv(src, [self.mv[p * ps + a:p * ps + b]], 0)
            except OSError as e:
                if e.errno != errno.EFAULT:
                    raise
                with m.lock:
                    m.versions[p].pop()       # nothing was written
                self.on_efault(who, p, "write (preadv into the region)")
                return
            if k != b - a:
                self.violation("a kernel write into a page wrote a part of it", who, p,
                               wrote=k, expected=b - a)
                return
            m.stored(p)
            self.count("kernel_writes")
        got = np.array(self.v[p])             # own page, just served: safe to read directly
        if not np.array_equal(got, new):
            self.violation("a page reads other bytes right after its owner wrote it (bytes "
                           "outside the write must be the page's earlier contents)", who, p,
                           write=(a, b), **self._page_diff(got, new))
        m.served.add(p)

    def prefetcher(self, t):
        """Prefetch random lists with repeated pages, drawn from windows that overlap the
        other prefetcher's."""
        who = "prefetcher-%d" % t
        rng = np.random.default_rng(self.seeds[4 + t])
        meta = self.r.meta
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            w = int(rng.integers(0, max(1, self.n - 64)))
            k = int(rng.integers(1, 48))
            lst = rng.integers(w, min(self.n, w + 64), k).astype(np.uint64)
            lst = np.concatenate([lst, lst[:int(rng.integers(1, k + 1))]])   # repeats
            rng.shuffle(lst)
            self.count("prefetch_calls")
            try:
                self.r.prefetch(lst)
            except self.plm.LazyMemError as e:
                self.count("prefetch_raised")
                if not (self.fail_every and isinstance(e, self.plm.UffdError)
                        and "test hook" in str(e)):
                    self.violation("prefetch raised", who, pages=lst.tolist()[:20],
                                   error="%s: %s" % (type(e).__name__, e))
                continue
            p = self.first_pending(lst.astype(np.int64))
            if p is not None:
                self.violation("prefetch returned but a page it was given is still DEFERRED "
                               "(or EMPTY where the snapshot has contents)", who, p,
                               meta=self.meta_of(p))

    def signer(self):
        """signatures() of random ranges: every page not poisoned afterwards has the xxh3 of
        its model bytes (pages that may be being written are checked at the end)."""
        who = "signer"
        rng = np.random.default_rng(self.seeds[6])
        ps, m = self.ps, self.model
        POISONED = int(self.plm.PageFlag.POISONED)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            first = int(rng.integers(0, self.n))
            cnt = int(rng.integers(1, min(64, self.n - first) + 1))
            self.count("signature_calls")
            try:
                sig = self.r.signatures(first * ps, cnt * ps)
            except self.plm.LazyMemError as e:
                flags = self.r.meta["flags"][first:first + cnt]
                if not (flags & POISONED).any():
                    self.violation("signatures() raised on a range with no poisoned page",
                                   who, first, count=cnt, error="%s: %s" % (type(e).__name__, e))
                elif not self.names_poisoned(e):
                    self.violation("signatures() raised on a range with poisoned pages, but "
                                   "does not say so", who, first, count=cnt, error=str(e))
                continue
            flags = self.r.meta["flags"][first:first + cnt]
            for i in range(cnt):
                p = first + i
                if flags[i] & POISONED or m.owner[p] >= 0:
                    continue
                want = _xxh3(m.base[p])
                if int(sig[i]) != want:
                    self.violation("signatures() of a page that is not poisoned is not the "
                                   "xxh3 of its model bytes", who, p, got=hex(int(sig[i])),
                                   want=hex(want), meta=self.meta_of(p))
                    return

    def checkpointer(self):
        """Checkpoints in a loop, each restored (without failures) and compared with the model."""
        who = "checkpointer"
        i = 0
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            path = os.path.join(self.workdir, "model-r%d-c%d.snap" % (self.round_no, i))
            i += 1
            self.checkpoint_and_compare(who, path)
            time.sleep(0.01)

    def checkpoint_and_compare(self, who, path):
        plm, m = self.plm, self.model
        before = m.completed()   # every write completed by now must be in the file
        try:
            plm.checkpoint(self.r, path, working_set="none", durable=False)
        except plm.LazyMemError as e:
            self.count("checkpoints_refused")
            npois = int(np.count_nonzero(self.r.meta["flags"] & int(plm.PageFlag.POISONED)))
            if not self.fail_every or npois == 0:
                self.violation("checkpoint raised with no page poisoned", who,
                               error="%s: %s" % (type(e).__name__, e), poisoned_now=npois)
            elif not self.names_poisoned(e):
                self.violation("checkpoint refused a region with poisoned pages, but the "
                               "error does not name them", who,
                               error="%s: %s" % (type(e).__name__, e), poisoned_now=npois)
            return
        # pages poisoned by the time it returned are excluded (whatever the file holds there)
        poisoned = set(np.nonzero(self.r.meta["flags"] & int(plm.PageFlag.POISONED))[0]
                       .tolist())
        if poisoned and not self.fail_every:
            self.violation("pages poisoned with no injected failures", who,
                           sorted(poisoned)[0], npoisoned=len(poisoned))
        self.count("checkpoints_ok")
        fd = os.memfd_create("model-ckpt")
        try:
            with plm.restore(path, prefetch="none", background=False) as r2:
                mv2 = memoryview(r2)
                ps = self.ps
                for p in range(self.n):
                    if p in poisoned:
                        continue
                    try:
                        os.pwrite(fd, mv2[p * ps:(p + 1) * ps], 0)
                    except OSError as e:
                        self.violation("a page of a checkpoint, restored, fails to read",
                                       who, p, error=str(e), file=path)
                        return
                    got = np.frombuffer(os.pread(fd, ps, 0), np.uint8)
                    vs = np.stack(m.versions_since(p, before))
                    if not (vs == got[None, :]).any(axis=0).all():
                        self.violation("a page of a checkpoint, restored, differs from the "
                                       "model (for a page being written: from every version "
                                       "since the checkpoint began)", who, p, file=path,
                                       versions=len(vs), source_meta=self.meta_of(p),
                                       **self._page_diff(got, vs[-1]))
                        return
                del mv2
        finally:
            os.close(fd)
        os.unlink(path)

    def toggler(self):
        """Start and stop the background fill; materialize random ranges."""
        who = "toggler"
        plm = self.plm
        rng = np.random.default_rng(self.seeds[7])
        ps = self.ps
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            x = rng.random()
            if x < 0.3:
                self.r.background_start()
                self.count("background_toggles")
            elif x < 0.6:
                self.r.background_stop()
                self.count("background_toggles")
            else:
                first = int(rng.integers(0, self.n))
                cnt = int(rng.integers(1, min(32, self.n - first) + 1))
                self.count("materialize_calls")
                try:
                    self.r.materialize(first * ps, cnt * ps)
                except plm.LazyMemError as e:
                    self.count("materialize_raised")
                    # with failures injected: a fill failed ("test hook"), or the range has
                    # pages poisoned by earlier failures (PoisonedPageError names them, and
                    # they must be POISONED in meta)
                    hook = isinstance(e, plm.UffdError) and "test hook" in str(e)
                    named = (isinstance(e, plm.PoisonedPageError) and e.pages and all(
                        self.r.meta["state"][p] == int(plm.PageState.POISONED)
                        for p in e.pages))
                    if not (self.fail_every and (hook or named)):
                        self.violation("materialize raised", who, first, count=cnt,
                                       error="%s: %s" % (type(e).__name__, e))
                    continue
                p = self.first_pending(np.arange(first, first + cnt))
                if p is not None:
                    self.violation("materialize returned but a page of its range is still "
                                   "DEFERRED (or EMPTY where the snapshot has contents)", who, p,
                                   meta=self.meta_of(p))
            time.sleep(0.002)

    def _guard(self, fn, who, *args):
        try:
            fn(*args)
        except BaseException as e:
            self.violation("the thread raised", who, error="%s: %s" % (type(e).__name__, e),
                           traceback=traceback.format_exc())

    def run(self):
        specs = [(self.faulter, "faulter-%d" % t, t) for t in range(3)]
        specs += [(self.prefetcher, "prefetcher-%d" % t, t) for t in range(2)]
        specs += [(self.signer, "signer"), (self.checkpointer, "checkpointer"),
                  (self.toggler, "toggler")]
        ts = [threading.Thread(target=self._guard, args=(s[0], s[1], *s[2:]), name=s[1],
                               daemon=True) for s in specs]
        assert len(ts) == 8
        for th in ts:
            th.start()
        for th in ts:
            th.join(max(0.1, self.deadline - time.monotonic() + HANG_SECONDS))
            if th.is_alive():
                import faulthandler
                faulthandler.dump_traceback(all_threads=True)
                names = ", ".join("%s=0x%016x" % (x.name, x.ident) for x in ts)
                # the raw records (r.meta would first sync them, which may itself wait)
                st = self.r._meta["state"]
                busy = np.nonzero(st == int(self.plm.PageState.BUSY))[0]
                print("HANG round %d: thread %s still runs %d s after the round's deadline "
                      "(stacks above; threads: %s); %d pages BUSY: %s"
                      % (self.round_no, th.name, HANG_SECONDS, names, busy.size,
                         busy[:20].tolist()), file=sys.stderr, flush=True)
                os._exit(3)   # close() would wait for the hung calls forever

    def final_check(self):
        """Quiescent: every page is read (kernel access), compared, and agrees with meta;
        then signatures() of the whole region and one more checkpoint."""
        plm, m = self.plm, self.model
        who = "main (final check)"
        self.r.background_stop()
        fd = os.memfd_create("model-final")
        POISONED = int(plm.PageFlag.POISONED)
        try:
            for p in range(self.n):
                got = self.kread(fd, p)
                if got is None:
                    self.on_efault(who, p, "read (pwrite from the region)")
                    continue
                if self.r.meta["flags"][p] & POISONED:
                    self.violation("meta flags the page POISONED but a kernel read of it "
                                   "succeeds", who, p, meta=self.meta_of(p))
                    return
                self.check_read(who, p, got, exact=True)
                if self.violations:
                    return
        finally:
            os.close(fd)
        p = self.first_pending(np.arange(self.n))
        if p is not None:
            self.violation("every page was read, yet a record still says DEFERRED (or EMPTY "
                           "where the snapshot has contents)", who, p, meta=self.meta_of(p))
            return
        flags = self.r.meta["flags"]
        npois = int(np.count_nonzero(flags & POISONED))
        st = self.r.stats()
        if not self.fail_every and (npois or st["errors"]):
            self.violation("no injected failures, yet pages are poisoned or errors counted", who,
                           npoisoned=npois, errors=st["errors"], last_error=st["last_error"])
            return
        if st["errors"] < npois:
            self.violation("fewer errors counted than pages poisoned", who, npoisoned=npois,
                           errors=st["errors"])
        sig = None
        try:
            sig = self.r.signatures()
        except plm.LazyMemError as e:
            if not npois or not self.names_poisoned(e):
                self.violation("signatures() of the whole region raised", who,
                               error="%s: %s" % (type(e).__name__, e), npoisoned=npois)
        if sig is not None:
            meta = self.r.meta
            present = int(plm.PageState.PRESENT)
            for p in range(self.n):
                if flags[p] & POISONED:
                    continue
                want = _xxh3(m.current(p))
                if int(sig[p]) != want:
                    self.violation("signatures() of a page that is not poisoned is not the "
                                   "xxh3 of its model bytes (final)", who, p,
                                   got=hex(int(sig[p])), want=hex(want), meta=self.meta_of(p))
                    break
                if meta["state"][p] == present and int(meta["signature"][p]) != want:
                    self.violation("meta[\"signature\"] of a present page is not the xxh3 of "
                                   "its model bytes after signatures() (final)", who, p,
                                   got=hex(int(meta["signature"][p])), want=hex(want),
                                   meta=self.meta_of(p))
                    break
        self.checkpoint_and_compare(who, os.path.join(self.workdir,
                                                      "model-r%d-final.snap" % self.round_no))
        return npois


def model_stress(seed, workdir, fail_every, seconds, npages=512, round_seconds=1.0):
    """Rounds of: restore a snapshot (random, zero, duplicate and untouched pages) lazily,
    with every `fail_every`th fill failing (0: none); run the eight threads for
    `round_seconds`; check every page. Prints a JSON summary; raises ModelViolation."""
    import pylazymem as plm
    from _reliability import _snapshot_contents
    rng = np.random.default_rng(seed)
    ps = plm.Region(1).page_size
    base, how = _snapshot_contents(rng, npages, ps)
    path = os.path.join(workdir, "model-base.snap")
    with plm.Region(npages * ps, max_cluster_pages=1) as r:
        v = r.ndarray(np.uint8).reshape(npages, ps)
        for p in np.nonzero(how == 1)[0]:
            if v[p].any():                             # a read: the zero page
                raise ModelViolation("fresh page %d does not read as zero" % p)
        w = np.nonzero(how >= 2)[0]
        v[w] = base[w]
        plm.checkpoint(r, path, working_set=rng.permutation(npages)[:npages // 8],
                       durable=False)
    t0 = time.monotonic()
    totals = None
    rounds = poisoned = 0
    while rounds == 0 or time.monotonic() - t0 < seconds:
        variant = rounds % 3
        kw = dict(max_cluster_pages=1 if variant != 1 else 0)   # 0: the default readahead
        if fail_every:
            kw["_test_broken_source"] = fail_every
        r = plm.restore(path, prefetch="none", background=variant == 2, **kw)
        try:
            owner = np.full(npages, -1, np.int16)
            mine = rng.choice(npages, npages // 8, replace=False)
            owner[mine] = rng.integers(0, 3, mine.size)          # the faulters' pages
            model = _Model(base, owner)
            run = _Run(r, model, rng, fail_every, workdir,
                       time.monotonic() + min(round_seconds, max(0.2, seconds)), rounds)
            run.run()
            if not run.violations:
                poisoned += run.final_check() or 0
            if run.violations:
                raise ModelViolation("round %d (fail_every=%d, %s): %d invariant violations; "
                                     "first: %r" % (rounds, fail_every, kw, len(run.violations),
                                                    run.violations[:3]))
            if totals is None:
                totals = dict(run.counts)
            else:
                for k, x in run.counts.items():
                    totals[k] += x
            del run
        finally:
            r.close()
        rounds += 1
    totals.update(rounds=rounds, poisoned=poisoned, npages=npages, fail_every=fail_every,
                  seconds=round(time.monotonic() - t0, 2))
    emit(totals)
