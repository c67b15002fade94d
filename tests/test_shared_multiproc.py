"""restore(share=True) across processes (issue 11, docs/shared-pages.md): processes restoring
one snapshot share one pool of its pages, stores stay private (COW), a pool holds only complete
pages of the content it is named for, and it goes away with its last user.

Every process here is a spawned interpreter (a long-lived worker taking Python snippets on its
stdin and answering one JSON line each, or a one-shot script), every reply is awaited with a
timeout (a hang fails the test after a stack dump), and every byte the processes read is
compared with the snapshot's contents, which each process regenerates from a seed.
"""

import json
import os
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time

import numpy as np
import pytest

import pylazymem as plm
from conftest import PRELUDE
from _helpers import PAGE_SIZE as PS
from _reliability import kill_tree, start_py


pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.shared_pages, pytest.mark.timeout(300)]

REPLY_TIMEOUT = 120

# Defined in every worker and one-shot script (after conftest's PRELUDE).
COMMON = """
def expected(seed, npages):
    '''The contents of the test snapshot made from `seed`: random bytes, no zero page.'''
    e = np.random.default_rng(seed).integers(0, 256, (npages, PS), dtype=np.uint8)
    e[:, 0] |= 1
    return e

def restore_shared(path, **kw):
    kw.setdefault("prefetch", "none")
    kw.setdefault("background", False)
    r = plm.restore(path, share=True, **kw)
    assert r.shared, "restore(share=True) returned an unshared region"
    return r

def check(r, exp, order=None):
    '''Every byte of region r against exp (order: page by page in that order, each page's first
    touch being its read).'''
    v = pages(r)
    if order is None:
        bad, n = first_bad_pages(v, exp)
    else:
        allbad = [int(i) for i in order if not np.array_equal(v[i], exp[i])]
        bad, n = allbad[:8], len(allbad)
    return {"bad": bad, "nbad": n}

def pool_of(r):
    return {k: r.pool.get(k) for k in ("id", "role", "slot", "sealed", "bytes", "inode")}
"""

WORKER = PRELUDE + COMMON + """
def _jsonable(o):
    return o.item() if hasattr(o, "item") else str(o)

print(json.dumps({"ready": os.getpid()}), flush=True)
for _line in sys.stdin:
    out = None
    try:
        exec(json.loads(_line)["code"], globals())
        _msg = {"out": out}
    except BaseException:
        _msg = {"error": traceback.format_exc()}
    print(json.dumps(_msg, default=_jsonable), flush=True)
"""


class Worker:
    """A spawned Python worker that runs snippets (in one namespace; `out` is the reply)."""

    def __init__(self):
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = start_py(WORKER, stdin=subprocess.PIPE, stderr=self._err)
        self._buf = b""
        self.pid = self.recv(60)["ready"]

    def send(self, code):
        self.proc.stdin.write(json.dumps({"code": code}) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout=REPLY_TIMEOUT):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], left)[0] if left > 0 else []
            if not ready:
                self._abort("timed out after %ss (hang?)" % timeout)
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.proc.wait()
                self._abort("died (exit %s)" % self.proc.returncode)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if "error" in msg:
            pytest.fail("worker %d raised:\n%s\n--- stderr ---\n%s"
                        % (self.pid, msg["error"], self.stderr()[-3000:]), pytrace=False)
        return msg.get("out", msg)

    def run(self, code, timeout=REPLY_TIMEOUT):
        self.send(code)
        return self.recv(timeout)

    def stderr(self):
        self._err.seek(0)
        return self._err.read()

    def _abort(self, what):
        try:
            os.kill(self.proc.pid, signal.SIGABRT)   # faulthandler: every thread's stack
            self.proc.wait(timeout=3)
        except Exception:
            pass
        self.kill()
        pytest.fail("worker %d %s\n--- stderr ---\n%s" % (self.pid, what, self.stderr()[-4000:]),
                    pytrace=False)

    def kill(self, sig=signal.SIGKILL):
        kill_tree(self.proc, sig)
        self.proc.wait()

    def exit(self):
        """Leave normally (closing the worker's regions through interpreter exit)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def workers():
    """workers(n) -> n spawned Workers (ready); all killed at teardown."""
    made = []

    def spawn(n):
        ws = [Worker() for _ in range(n)]
        made.extend(ws)
        return ws

    yield spawn
    for w in made:
        if w.proc.poll() is None:
            w.kill()
        w._err.close()


def run_all(ws, code, timeout=REPLY_TIMEOUT):
    """The same snippet in every worker at once (a str, or one per worker); their replies."""
    for w, c in zip(ws, [code] * len(ws) if isinstance(code, str) else code):
        w.send(c)
    return [w.recv(timeout) for w in ws]


def make_snapshot(path, npages, seed):
    """A snapshot of `npages` random pages (the workers' expected(seed, npages))."""
    e = np.random.default_rng(seed).integers(0, 256, (npages, PS), dtype=np.uint8)
    e[:, 0] |= 1
    r = plm.Region(npages * PS)
    try:
        r.ndarray(np.uint8).reshape(npages, PS)[:] = e
        info = plm.checkpoint(r, path, working_set="none")
    finally:
        r.close()
    assert info.pages_by_class.get("zero", 0) == 0 and info.pages_by_class.get("duplicate", 0) == 0
    return path


def assert_all_good(replies, what):
    for k, rep in enumerate(replies):
        assert rep["nbad"] == 0, "%s: process %d read %d wrong pages, first %s" % (
            what, k, rep["nbad"], rep["bad"])


def assert_one_pool(pools, what):
    assert len({(p["id"], p["inode"]) for p in pools}) == 1, "%s: several pools %s" % (what, pools)
    roles = [p["role"] for p in pools]
    assert roles.count("created") == 1 and roles.count("joined") == len(roles) - 1, \
        "%s: roles %s (one creator, the others joined)" % (what, roles)


def shm_entries():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


# ---- COW in several processes ------------------------------------------------------------------

def test_cow_in_each_process_leaves_the_others_and_the_pool_unchanged(workers, tmp_path):
    npages = 2048
    snap = make_snapshot(str(tmp_path / "s.snap"), npages, 11)
    ws = workers(4)
    setup = "exp = expected(11, %d); snap = %r\n" % (npages, snap)
    pools = [w.run(setup + "r = restore_shared(snap); out = pool_of(r)") for w in ws]
    assert_one_pool(pools, "4 restores")
    # every process reads the even pages (in its own random order), then each writes its own
    # pages: the even ones are mapped from the pool (COW), the odd ones are still pool holes (the
    # first touch is the store: the pool must get the snapshot's bytes, not the written ones)
    assert_all_good(run_all(ws, ["order = np.random.default_rng(%d).permutation(np.arange(0, %d, 2))\n"
                                 "out = check(r, exp, order)" % (k, npages) for k in range(4)]),
                    "before the writes")
    write = """
mine = np.arange(%d, %d, 16)           # pages i with i %% 16 == rank
new = np.random.default_rng(100 + %d).integers(0, 256, (mine.size, PS), dtype=np.uint8)
new[:, 0] |= 1
pages(r)[mine] = new
mine_exp = exp.copy()
mine_exp[mine] = new
out = {"written": int(mine.size)}
"""
    run_all(ws, [write % (k, npages, k) for k in range(4)])
    # each sees its own writes and the snapshot's bytes everywhere else, also after the others wrote
    assert_all_good(run_all(ws, "out = check(r, mine_exp)"), "after the writes")
    st = run_all(ws, "out = r.stats()")
    for k, s in enumerate(st):
        assert s["pool_fallback_pages"] == 0, (k, s)
        assert s["pages_shared_mapped"] + s["pool_fallback_pages"] >= npages, (k, s)
    # fresh restores, shared (joining the same pool) and private, read the original bytes
    fresh = workers(2)
    assert fresh[0].run(setup + "r = restore_shared(snap); out = pool_of(r)")["inode"] == pools[0]["inode"]
    assert_all_good([fresh[0].run("out = check(r, exp)"),
                     fresh[1].run(setup + "r = plm.restore(snap, prefetch='none', background=False)\n"
                                          "out = check(r, exp)")], "fresh restores after the writes")
    # and the writers still see their own pages
    assert_all_good(run_all(ws, "out = check(r, mine_exp)"), "after the fresh restores")


# ---- checkpoint of a shared restore ------------------------------------------------------------

def test_checkpoint_of_a_shared_restore_differs_exactly_at_the_written_pages(workers, tmp_path):
    npages = 1024
    snap = make_snapshot(str(tmp_path / "s.snap"), npages, 12)
    out_snap = str(tmp_path / "out.snap")
    other, w = workers(2)
    # another process holds the pool with every page published: the writer COWs pool pages
    other.run("exp = expected(12, %d); r = restore_shared(%r); out = check(r, exp)" % (npages, snap))
    written = sorted((1 + np.random.default_rng(5).choice(npages - 1, 60, replace=False)).tolist())
    res = w.run("""
exp = expected(12, %d)
r = restore_shared(%r)
v = pages(r)
written = np.array(%r)
# half of the written pages are read first (mapped from the pool, then COWed), half are written
# on their first touch; page 0 is written with the byte it already holds (not a change)
_ = [int(v[i].sum()) for i in written[::2]]
new = np.random.default_rng(6).integers(0, 256, (written.size, PS), dtype=np.uint8)
new[:, 0] |= 1
v[written] = new
v[0, 5] = exp[0, 5]
exp_after = exp.copy(); exp_after[written] = new
c = check(r, exp_after)
src = plm.restore(%r, prefetch="none", background=False)
sig_src = src.signatures()
sig_shared = r.signatures()
src.close()
info = plm.checkpoint(r, %r)
out = dict(c, changed=np.nonzero(sig_src != sig_shared)[0].tolist(),
           pages_hashed=getattr(info, "pages_hashed", None), pool=pool_of(r))
""" % (npages, snap, written, snap, out_snap))
    assert res["nbad"] == 0, res
    assert res["pool"]["role"] == "joined"
    assert res["changed"] == written, "signatures() of the shared region after the writes"
    if res["pages_hashed"] is not None:
        # the written pages and page 0 (written with its own byte): hashed, nothing else
        assert res["pages_hashed"] == len(set(written) | {0}), res["pages_hashed"]
    # the checkpoint: its signatures differ from the source's exactly at the written pages, and
    # it holds the new bytes there and the old ones elsewhere
    res = w.run("""
a = plm.restore(%r, prefetch="none", background=False)
b = plm.restore(%r, prefetch="none", background=False)
out = dict(check(b, exp_after), changed=np.nonzero(a.signatures() != b.signatures())[0].tolist())
a.close(); b.close()
""" % (snap, out_snap))
    assert res["nbad"] == 0, res
    assert res["changed"] == written
    # the writer's stores did not reach the pool: the other process still reads the snapshot
    assert other.run("out = check(r, exp)")["nbad"] == 0


# ---- 8 processes at once -----------------------------------------------------------------------

def test_eight_processes_restore_and_read_concurrently(workers, tmp_path):
    npages = 4096
    snap = make_snapshot(str(tmp_path / "s.snap"), npages, 13)
    ws = workers(8)
    code = """
exp = expected(13, %d)
order = np.random.default_rng(%d).permutation(%d)
r = restore_shared(%r)
c = check(r, exp, order)
out = dict(c, pool=pool_of(r), stats={k: r.stats()[k] for k in
           ("pages_shared_mapped", "pages_published", "pool_fallback_pages", "errors")})
"""
    res = run_all(ws, [code % (npages, k, npages, snap) for k in range(8)])
    assert_all_good(res, "8 concurrent readers")
    assert_one_pool([r["pool"] for r in res], "8 concurrent restores")
    st = [r["stats"] for r in res]
    assert all(s["errors"] == 0 and s["pool_fallback_pages"] == 0 for s in st), st
    # every page was published by exactly one process, and mapped from the pool by each
    assert sum(s["pages_published"] for s in st) == npages, st
    assert all(s["pages_shared_mapped"] == npages for s in st), st
    # all alive, all still right
    assert_all_good(run_all(ws, "out = check(r, exp)"), "8 readers, second pass")


# ---- a filler killed mid-publication -----------------------------------------------------------

FILLER = PRELUDE + COMMON + """
path, seed, background = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
r = restore_shared(path, background=background)
v = pages(r)
order = np.random.default_rng(seed).permutation(r.npages)
print("started", flush=True)
while True:            # fill by random first touches until killed
    for i in order:
        v[i, 7]
"""


def test_filler_killed_while_publishing_leaves_no_partial_page(workers, tmp_path):
    npages = 16384                    # 64 MiB: a random-order fill takes a good fraction of a second
    snap = make_snapshot(str(tmp_path / "s.snap"), npages, 14)
    holder, checker = workers(2)
    rng = random.Random(14)
    mid_fill = 0
    for rnd in range(8):
        # a fresh pool each round: the holder creates it and keeps it alive across the kill
        hp = holder.run("exp = expected(14, %d); r = restore_shared(%r); out = pool_of(r)" % (npages, snap))
        assert hp["role"] == "created", hp
        filler = start_py(FILLER, args=(snap, rnd, rnd % 2))
        try:
            ready = select.select([filler.stdout], [], [], 60)[0]
            line = filler.stdout.readline() if ready else ""
            assert line.strip() == "started", "filler did not start: %r %s" % (line, filler.stderr.read()
                                                                            if filler.poll() is not None else "")
            time.sleep(rng.uniform(0.0, 0.4))
            kill_tree(filler, signal.SIGKILL)
            filler.wait(timeout=30)
        finally:
            kill_tree(filler, signal.SIGKILL)
            filler.wait()
            filler.stdout.close()
            filler.stderr.close()
        published = holder.run("out = r.pool['bytes']")
        if 2 * PS < published < npages * PS:    # (the pool's size may count a header page)
            mid_fill += 1
        # a fresh process joins the pool the killed filler was publishing into and reads every byte
        res = checker.run("exp = expected(14, %d); c = restore_shared(%r)\n"
                          "out = dict(check(c, exp, np.random.default_rng(%d).permutation(%d)), pool=pool_of(c))\n"
                          "c.close()" % (npages, snap, 1000 + rnd, npages))
        assert res["pool"]["inode"] == hp["inode"] and res["pool"]["role"] == "joined", (res["pool"], hp)
        assert res["nbad"] == 0, "round %d (pool held %d bytes at the kill): %d wrong pages, first %s" % (
            rnd, published, res["nbad"], res["bad"])
        assert holder.run("out = check(r, exp); r.close()")["nbad"] == 0
    assert mid_fill >= 2, "only %d of 8 kills landed while the pool was partly filled" % mid_fill


# ---- the pool's lifetime ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_pool_goes_away_with_its_last_user(workers, tmp_path, how):
    npages = 2048
    snap = make_snapshot(str(tmp_path / "s.snap"), npages, 15)
    shm_before = shm_entries()
    a, b = workers(2)
    code = "exp = expected(15, %d); r = restore_shared(%r); out = dict(check(r, exp), pool=pool_of(r))" % (
        npages, snap)
    ra, rb = a.run(code), b.run(code)
    assert_all_good([ra, rb], "two users")
    assert_one_pool([ra["pool"], rb["pool"]], "two users")
    old = ra["pool"]
    leave = {"exit": Worker.exit, "sigkill": Worker.kill}[how]
    leave(a)            # one user leaves: the pool stays for the other
    c, = workers(1)
    rc = c.run(code)
    assert rc["nbad"] == 0 and rc["pool"]["inode"] == old["inode"] and rc["pool"]["role"] == "joined", rc
    # the last users leave (one closes its region, one goes away), then a newcomer makes a new pool
    c.run("r.close()")
    leave(b)
    d, = workers(1)
    rd = d.run(code)
    assert rd["nbad"] == 0
    assert rd["pool"]["role"] == "created", rd["pool"]
    assert rd["pool"]["inode"] != old["inode"], (rd["pool"], old)
    assert rd["pool"]["id"] == old["id"]      # same content, same name
    new_shm = shm_entries() - shm_before
    assert not new_shm, "files appeared in /dev/shm: %s" % sorted(new_shm)


# ---- a replaced snapshot never meets the old pool ----------------------------------------------

@pytest.mark.parametrize("how", ["rename", "in_place"])
def test_replaced_snapshot_never_serves_old_pool_pages(workers, tmp_path, how):
    npages = 2048
    path = str(tmp_path / "s.snap")
    make_snapshot(path, npages, 21)
    old_copy = str(tmp_path / "old-copy.snap")
    shutil.copyfile(path, old_copy)
    new = make_snapshot(str(tmp_path / "new.snap"), npages, 22)
    assert os.path.getsize(new) == os.path.getsize(path)
    holder, newcomer, oldcomer = workers(3)
    # the holder's pool holds every page of the old content
    h = holder.run("old = expected(21, %d); r = restore_shared(%r); out = dict(check(r, old), pool=pool_of(r))"
                   % (npages, path))
    assert h["nbad"] == 0 and h["pool"]["role"] == "created"
    st = os.stat(path)
    if how == "rename":
        os.replace(new, path)
    else:   # rewritten in place, times put back: only the contents tell them apart
        with open(new, "rb") as f:
            data = f.read()
        with open(path, "r+b") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = newcomer.run("new = expected(22, %d); r = restore_shared(%r)\n"
                       "out = dict(check(r, new, np.random.default_rng(3).permutation(%d)), pool=pool_of(r))"
                       % (npages, path, npages))
    assert res["nbad"] == 0, "the new file read %d pages wrong (old pool pages?), first %s" % (
        res["nbad"], res["bad"])
    assert res["pool"]["role"] == "created" and res["pool"]["id"] != h["pool"]["id"], (res["pool"], h["pool"])
    assert res["pool"]["inode"] != h["pool"]["inode"]
    # the holder, still alive, keeps the old bytes; a copy of the old content joins its pool
    assert holder.run("out = check(r, old)")["nbad"] == 0
    o = oldcomer.run("old = expected(21, %d); r = restore_shared(%r); out = dict(check(r, old), pool=pool_of(r))"
                     % (npages, old_copy))
    assert o["nbad"] == 0 and o["pool"]["inode"] == h["pool"]["inode"] and o["pool"]["role"] == "joined", o
    # and another newcomer joins the new content's pool
    assert newcomer.run("out = check(r, new)")["nbad"] == 0
