"""Shared pages: the pool object and how processes of one uid find one another's pool
(csrc/pool.c, csrc/pooldir.c; docs/shared-pages.md, section 2).

Pools are opened through the cffi module (lm_pool_open), mostly in separate processes
("holders", which keep a pool open until told to exit): the point is what one process sees of
another's pool. Two processes hold the same pool exactly when their memfds have the same inode.
Each test uses fresh random content ids, so runs on one machine (both backends, other
worktrees) never meet each other's pools.
"""

import errno
import fcntl
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import xxhash

from _helpers import PAGE_SIZE, REPO_DIR, TESTS_DIR

pytestmark = [pytest.mark.core, pytest.mark.timeout(90)]

NPAGES = 64
CREATED, JOINED, UNSHARED = 1, 2, 3

# What every pool script starts with: the binding, and the pool's info as a dict.
POOL_PRELUDE = """\
import json, os, sys, time
from pylazymem._binding import ffi, lib, check
PS = lib.lm_page_size()

def pool_open(h, npages, max_bytes=0):
    pp = ffi.new("struct lm_pool **")
    check(lib.lm_pool_open(h, npages, PS, max_bytes, pp), "lm_pool_open")
    return pp[0]

def info(p):
    i = ffi.new("struct lm_pool_info *")
    check(lib.lm_pool_info(p, i), "lm_pool_info")
    return {k: getattr(i, k) for k in ("id", "npages", "page_size", "role", "slot", "sealed",
                                       "fd", "bytes", "inode")}

def nfds():
    return len(os.listdir("/proc/self/fd"))
"""

# A process that opens a pool, reports, and keeps it until its stdin says "exit" (or closes).
HOLDER = POOL_PRELUDE + """
h, npages, timeout_ms, wait = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lib.lm_pool_test_timeout(timeout_ms)
if wait == "wait":
    print("ready", flush=True)
    sys.stdin.readline()          # "go": start together with the others
before = nfds()
t0 = time.monotonic()
p = pool_open(h, npages)
d = info(p)
d.update(open_s=time.monotonic() - t0, new_fds=nfds() - before, pid=os.getpid())
print(json.dumps(d), flush=True)
for line in sys.stdin:
    if line.strip() == "exit":
        break
lib.lm_pool_release(p)
"""


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env["PYTHONFAULTHANDLER"] = "1"
    return env


class Proc:
    """A child Python process that reports JSON lines; every wait is bounded."""

    def __init__(self, code, args, registry):
        self.proc = subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=child_env(),
                                     cwd=REPO_DIR, start_new_session=True)
        registry.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def line(self, timeout=30):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            self.kill()
            pytest.fail("child %d said nothing within %ss; stderr:\n%s"
                        % (self.pid, timeout, self.proc.stderr.read()))
        text = self.proc.stdout.readline()
        if not text:
            self.proc.wait(10)
            pytest.fail("child %d exited (%s) without a line; stderr:\n%s"
                        % (self.pid, self.proc.returncode, self.proc.stderr.read()))
        return text

    def send(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def exit(self):
        """Let it release its pool and exit; it must exit cleanly."""
        self.send("exit")
        self.proc.stdin.close()
        rc = self.proc.wait(30)
        assert rc == 0, "child %d: exit status %d; stderr:\n%s" % (self.pid, rc,
                                                                   self.proc.stderr.read())

    def kill(self):
        if self.proc.poll() is None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    pass
        self.proc.wait(30)


@pytest.fixture
def procs():
    made = []
    yield made
    for p in made:
        p.kill()
        for f in (p.proc.stdin, p.proc.stdout, p.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def holder(procs, h, npages=NPAGES, timeout_ms=100, wait=False):
    return Proc(HOLDER, [h, npages, timeout_ms, "wait" if wait else "now"], procs)


def hold(procs, h, **kw):
    """A holder that has opened its pool: (process, its info)."""
    p = holder(procs, h, **kw)
    return p, json.loads(p.line())


def fresh_id():
    return secrets.randbits(64)


def pool_id(h, npages, ps=PAGE_SIZE):
    """docs/shared-pages.md, 2.1, written independently of the C core."""
    return xxhash.xxh3_64_intdigest(b"plm-pool-1" + struct.pack("<QQQ", h, ps, npages))


def shm_names():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


# ---- one process ------------------------------------------------------------------------------

def open_here(h, npages=NPAGES, max_bytes=0):
    from pylazymem._binding import check, ffi, lib
    pp = ffi.new("struct lm_pool **")
    check(lib.lm_pool_open(h, npages, PAGE_SIZE, max_bytes, pp), "lm_pool_open")
    return pp[0]


def info_here(p):
    from pylazymem._binding import check, ffi, lib
    i = ffi.new("struct lm_pool_info *")
    check(lib.lm_pool_info(p, i), "lm_pool_info")
    return i


def test_a_new_pool_is_a_sealed_memfd_with_only_its_header_page():
    from pylazymem._binding import lib
    h = fresh_id()
    before = shm_names()
    p = open_here(h)
    try:
        i = info_here(p)
        assert (i.id, i.npages, i.page_size) == (pool_id(h, NPAGES), NPAGES, PAGE_SIZE)
        assert (i.role, i.slot, i.sealed) == (CREATED, 0, 0)
        assert os.readlink("/proc/self/fd/%d" % i.fd).startswith("/memfd:pylazymem-pool")
        st = os.fstat(i.fd)
        assert st.st_size == (NPAGES + 1) * PAGE_SIZE and st.st_ino == i.inode
        # Nothing but the header page was written: every region page is a hole.
        assert i.bytes == PAGE_SIZE == st.st_blocks * 512
        assert os.lseek(i.fd, 0, os.SEEK_DATA) == NPAGES * PAGE_SIZE
        hdr = os.pread(i.fd, 64, NPAGES * PAGE_SIZE)
        magic, version, reserved, ps, n, pid_, hx, creator, created = struct.unpack(
            "=8sIIQQQQQQ", hdr)
        assert (magic, version, reserved) == (b"PLMPOOL\0", 1, 0)
        assert (ps, n, pid_, hx, creator) == (PAGE_SIZE, NPAGES, i.id, h, os.getpid())
        assert abs(created / 1e9 - time.time()) < 60
        # Nobody can shrink or grow it under its users' mappings; sealing is left open for
        # F_SEAL_FUTURE_WRITE when the pool is complete.
        seals = fcntl.fcntl(i.fd, fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW) == (
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        assert not seals & fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(i.fd, PAGE_SIZE)
        assert fcntl.fcntl(i.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert shm_names() == before            # nothing is named in a filesystem
    finally:
        lib.lm_pool_release(p)


def test_one_process_opening_a_pool_twice_gets_one_object_and_the_last_release_frees_it():
    from pylazymem._binding import lib
    h = fresh_id()
    a = open_here(h)
    b = open_here(h)
    other = open_here(h ^ 1)
    try:
        assert a == b and a != other
        ia = info_here(a)
        inode, fd = ia.inode, ia.fd
        assert info_here(other).inode != inode and info_here(other).slot == 0
        lib.lm_pool_release(b)
        assert info_here(a).inode == inode          # one reference left: still open
        nfds = len(os.listdir("/proc/self/fd"))
        lib.lm_pool_release(a)
        # The memfd and the listening socket are closed, and the name is free at once: the
        # next open creates a new pool on slot 0 (no wait for a listener that is gone).
        assert len(os.listdir("/proc/self/fd")) == nfds - 2
        with pytest.raises(OSError):
            os.readlink("/proc/self/fd/%d" % fd)
        t0 = time.monotonic()
        c = open_here(h)
        took = time.monotonic() - t0
        ic = info_here(c)
        assert (ic.role, ic.slot) == (CREATED, 0) and ic.inode != inode
        assert took < 0.19, "the released pool's name was still bound (%.3fs)" % took
        lib.lm_pool_release(c)
    finally:
        lib.lm_pool_release(other)


def test_bounds_and_bad_arguments_are_refused():
    import pylazymem as plm
    from pylazymem._binding import check, ffi, lib
    h = fresh_id()
    with pytest.raises(OSError) as e:
        open_here(h, 16, max_bytes=16 * PAGE_SIZE)    # the pool is 17 pages
    assert e.value.errno == errno.EFBIG and "PYLAZYMEM_POOL_MAX_BYTES" in str(e.value)
    p = open_here(h, 16, max_bytes=17 * PAGE_SIZE)    # exactly the bound
    lib.lm_pool_release(p)
    pp = ffi.new("struct lm_pool **")
    for npages, ps in [(0, PAGE_SIZE), (16, 2 * PAGE_SIZE), (16, PAGE_SIZE // 2), (16, 0),
                       (1 << 41, PAGE_SIZE), (2 ** 64 - 1, PAGE_SIZE)]:
        rc = lib.lm_pool_open(h, npages, ps, 0, pp)
        assert rc == -errno.EINVAL, (npages, ps, rc)
        with pytest.raises(plm.InvalidArgumentError):
            check(rc)
    assert lib.lm_pool_open(h, 16, PAGE_SIZE, 0, ffi.NULL) == -errno.EINVAL
    assert lib.lm_pool_info(ffi.NULL, ffi.new("struct lm_pool_info *")) == -errno.EINVAL
    lib.lm_pool_release(ffi.NULL)                      # a no-op, like free(NULL)


# ---- between processes --------------------------------------------------------------------------

def test_processes_restoring_one_content_share_one_pool_and_other_content_does_not(procs):
    h = fresh_id()
    a, ia = hold(procs, h)
    b, ib = hold(procs, h)
    c, ic = hold(procs, h ^ (1 << 63))
    assert (ia["role"], ia["slot"]) == (CREATED, 0)
    assert (ib["role"], ib["slot"]) == (JOINED, 1)     # the joiner answers too
    assert ib["inode"] == ia["inode"] and ib["id"] == ia["id"] == pool_id(h, NPAGES)
    assert (ic["role"], ic["slot"]) == (CREATED, 0) and ic["inode"] != ia["inode"]
    # Another page count is another content too.
    d, idd = hold(procs, h, npages=NPAGES + 1)
    assert idd["role"] == CREATED and idd["inode"] != ia["inode"]
    # A joiner keeps exactly the pool's memfd, its listening socket and the pool thread's
    # eventfd: the fd it was sent is the one it keeps, nothing else leaks.
    assert ib["new_fds"] == 3
    for p in (a, b, c, d):
        p.exit()


def test_processes_started_together_end_up_with_one_pool(procs):
    h = fresh_id()
    # A generous answer timeout: under load, a creator that binds first must still be heard by
    # the one that finds the slot taken (else that one correctly makes a second pool).
    ps = [holder(procs, h, timeout_ms=3000, wait=True) for _ in range(4)]
    for p in ps:
        assert p.line().strip() == "ready"
    for p in ps:
        p.send("go")
    infos = [json.loads(p.line()) for p in ps]
    assert len({i["inode"] for i in infos}) == 1, infos
    assert sorted(i["role"] for i in infos) == [CREATED, JOINED, JOINED, JOINED], infos
    assert sorted(i["slot"] for i in infos) == [0, 1, 2, 3], infos
    # A fifth finds every slot bound: it joins, and answers on none.
    e, ie = hold(procs, h)
    assert (ie["role"], ie["slot"], ie["inode"]) == (JOINED, -1, infos[0]["inode"])
    for p in ps + [e]:
        p.exit()


def test_a_pool_outlives_its_creator_and_goes_with_its_last_user(procs):
    h = fresh_id()
    before = shm_names()
    a, ia = hold(procs, h)
    b, ib = hold(procs, h)
    assert ib["inode"] == ia["inode"]
    a.exit()
    # The creator is gone; the joiner still answers (slot 1), slot 0 is free.
    c, ic = hold(procs, h)
    assert (ic["role"], ic["inode"]) == (JOINED, ia["inode"])
    assert ic["slot"] == 2                            # a joiner answers on 1..3 only
    b.exit()
    c.exit()
    # Every holder exited: nobody answers, the next open makes a new pool.
    d, idd = hold(procs, h)
    assert (idd["role"], idd["slot"]) == (CREATED, 0) and idd["inode"] != ia["inode"]
    d.exit()
    assert shm_names() == before


def test_crashed_holders_leave_nothing_behind(procs):
    h = fresh_id()
    before = shm_names()
    a, ia = hold(procs, h)
    b, ib = hold(procs, h)
    assert ib["inode"] == ia["inode"]
    for p in (a, b):
        os.kill(p.pid, signal.SIGKILL)
        p.proc.wait(30)
    c, ic = hold(procs, h)
    assert (ic["role"], ic["slot"]) == (CREATED, 0) and ic["inode"] != ia["inode"]
    # Fast: nothing bound the names any more, so nobody was waited for.
    assert ic["open_s"] < 0.19, ic
    c.exit()
    assert shm_names() == before


def test_a_stopped_listener_is_skipped_after_the_timeout(procs):
    h = fresh_id()
    a, ia = hold(procs, h)
    os.kill(a.pid, signal.SIGSTOP)
    try:
        b, ib = hold(procs, h, timeout_ms=50)
        # Slot 0 was asked twice (join, then again after bind found it taken), each for the
        # answer timeout; then b made its own pool on the next slot.
        assert (ib["role"], ib["slot"]) == (CREATED, 1) and ib["inode"] != ia["inode"]
        assert 0.1 <= ib["open_s"] < 10, ib
    finally:
        os.kill(a.pid, signal.SIGCONT)
    # Both answer again: a newcomer joins one of them.
    c, ic = hold(procs, h, timeout_ms=3000)
    assert ic["role"] == JOINED and ic["inode"] in (ia["inode"], ib["inode"])
    for p in (a, b, c):
        p.exit()


# ---- listeners that are not to be trusted ------------------------------------------------------

# Binds slot 0 of a pool's name (for uid argv[4]) and answers every connection with a pool that
# it makes itself, as argv[1] says (good: a proper pool, built here from the documented layout;
# every other kind is wrong in one respect); with argv[5] != "-", first becomes that uid.
FAKE = """\
import fcntl, os, socket, struct, sys, time
import xxhash
kind, h, npages, victim, become = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    int(sys.argv[4]), sys.argv[5]
PS = os.sysconf("SC_PAGE_SIZE")
if become != "-":
    os.setgroups([])
    os.setgid(int(become))
    os.setuid(int(become))
pid_ = xxhash.xxh3_64_intdigest(b"plm-pool-1" + struct.pack("<QQQ", h, PS, npages))
fd = os.memfd_create("something-else" if kind == "name" else "pylazymem-pool",
                     os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
os.ftruncate(fd, (npages + 1 + (kind == "size")) * PS)
hdr = struct.pack("=8sIIQQQQQQ", b"PLMPOOL\\0", 1, 0, PS, npages, pid_,
                  h ^ 1 if kind == "header" else h, os.getpid(), time.time_ns())
os.pwrite(fd, hdr, npages * PS)
if kind != "seals":
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
if kind == "sealed_writes":   # F_SEAL_FUTURE_WRITE: no region could publish into it
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0x0010)
if kind == "readonly":
    ro = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    fd = ro
line = '{"pool": 1, "id": "%016x", "npages": %d, "page_size": %d}\\n' % (
    pid_, npages + (kind == "line"), PS)
fds = {"no_fd": [], "two_fds": [fd, fd]}.get(kind, [fd])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0pylazymem-pool/%d/%016x/0" % (victim, pid_))
s.listen(16)
print(os.fstat(fd).st_ino, os.geteuid(), flush=True)
while True:
    c, _ = s.accept()
    try:
        socket.send_fds(c, [line.encode()], fds)
    except OSError:
        pass
    c.close()
"""


def fake_listener(procs, kind, h, become="-"):
    p = Proc(FAKE, [kind, h, NPAGES, os.geteuid(), become], procs)
    inode, uid = map(int, p.line().split())
    return p, inode, uid


@pytest.mark.parametrize("kind", ["good", "header", "size", "seals", "name", "readonly", "line",
                                  "two_fds", "no_fd"])
def test_an_answer_that_is_not_the_pool_is_refused(procs, kind):
    h = fresh_id()
    fake, fake_inode, _ = fake_listener(procs, kind, h)
    o, io = hold(procs, h, timeout_ms=2000)
    if kind == "good":
        # The control: a pool built to the documented layout by another program is joined,
        # so the refusals below are the checks' doing.
        assert (io["role"], io["slot"], io["inode"]) == (JOINED, 1, fake_inode)
    else:
        # Refused twice (join, then again when slot 0 was found taken): a pool of its own
        # on slot 1.
        assert (io["role"], io["slot"]) == (CREATED, 1) and io["inode"] != fake_inode
    # Refused fds were closed: the opener keeps its pool, its socket and the eventfd only.
    assert io["new_fds"] == 3, io
    o.exit()


@pytest.mark.uffd
@pytest.mark.shared_pages
def test_a_pool_sealed_against_writes_is_joined_without_a_view(procs, tmp_path):
    # F_SEAL_FUTURE_WRITE (what a completed pool is to get, docs/shared-pages.md 2.5): no
    # shared writable view can be mapped, so nothing is published; the pool's holes (here
    # every page: the listener's pool holds only its header) are copied privately. Such a
    # pool used to fail the restore (EPERM registering the view), even with share="auto".
    import numpy as np
    import pylazymem as plm
    from pylazymem import _snapfile as S
    path = str(tmp_path / "s.snap")
    data = np.random.default_rng(3).integers(0, 256, NPAGES * PAGE_SIZE, dtype=np.uint8)
    with plm.Region(NPAGES * PAGE_SIZE) as r:
        a = r.ndarray(np.uint8)
        a[:] = data
        del a
        plm.checkpoint(r, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        h = S._read(fd, path).header["header_xxh3"]
    finally:
        os.close(fd)
    fake, fake_inode, _ = fake_listener(procs, "sealed_writes", h)
    with plm.restore(path, share=True, prefetch="none", background=False) as r:
        assert (r.pool["role"], r.pool["inode"]) == ("joined", fake_inode)
        got = r.ndarray(np.uint8)
        assert np.array_equal(got, data)
        del got
        st = r.stats()
        assert st["pages_published"] == 0 and st["pool_fallback_pages"] == NPAGES
        assert st["errors"] == 0 and st["pages_poisoned"] == 0
    fake.kill()


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root: the foreign listener is a child that setuid(65534)s")
def test_a_listener_of_another_uid_is_never_trusted(procs):
    h = fresh_id()
    # A proper pool (the "good" kind above, which a same-uid opener joins), offered on our
    # name by uid 65534.
    fake, fake_inode, uid = fake_listener(procs, "good", h, become=65534)
    assert uid == 65534
    o, io = hold(procs, h, timeout_ms=2000)
    assert (io["role"], io["slot"]) == (CREATED, 1) and io["inode"] != fake_inode
    # Not even asked for an answer: skipped at SO_PEERCRED, without waiting.
    assert io["open_s"] < 1.0, io
    o.exit()


# ---- fork ---------------------------------------------------------------------------------------

FORK = POOL_PRELUDE + """
import subprocess
h = int(sys.argv[1]); N = int(sys.argv[2]); JOIN = sys.argv[3]
p = pool_open(h, N)
mine = info(p)

def join_from_another_process(hh):
    out = subprocess.run([sys.executable, "-c", JOIN, str(hh), str(N)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)

def in_child(fn):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            res = fn()
        except BaseException as e:
            res = {"error": repr(e)}
        os.write(w, json.dumps(res).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        data += b
    os.waitpid(pid, 0)
    res = json.loads(data)
    assert "error" not in res, res
    return res

def child():
    links = []
    for f in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink("/proc/self/fd/" + f))
        except FileNotFoundError:
            pass                               # the directory listing's own fd
    res = {"inherited": [l for l in links if "pylazymem-pool" in l or l.startswith("socket:")
                         or "eventfd" in l]}
    try:
        info(p)
        res["info"] = "answered"
    except OSError as e:
        res["info"] = e.errno
    lib.lm_pool_release(p)                     # the parent's struct: only memory is freed
    q = pool_open(h ^ 1, N)                    # a pool of its own, answered for
    res["own"] = info(q)
    res["own_joined"] = join_from_another_process(h ^ 1)
    r2 = pool_open(h, N)                       # the parent's pool, found through its socket
    res["parents"] = info(r2)
    lib.lm_pool_release(q)
    lib.lm_pool_release(r2)
    return res

first = in_child(child)
second = in_child(lambda: info(pool_open(h, N)))  # the parent still answers after that child
after = info(p)
print(json.dumps({"mine": mine, "first": first, "second": second, "after": after}))
lib.lm_pool_release(p)
"""

JOIN_ONCE = POOL_PRELUDE + """
p = pool_open(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps(info(p)))
lib.lm_pool_release(p)
"""


def test_fork_child_has_no_pools_of_the_parent_and_can_have_its_own(run_py):
    h = fresh_id()
    res = run_py(FORK, prelude=False, args=(str(h), str(NPAGES), JOIN_ONCE), timeout=60)
    assert res.returncode == 0, res.describe()
    out = json.loads(res.stdout.strip().splitlines()[-1])
    mine, first, second = out["mine"], out["first"], out["second"]
    assert (mine["role"], mine["slot"]) == (CREATED, 0)
    # The child inherited no memfd, listening socket or eventfd of the parent's pools, and the
    # parent's struct in it is dead.
    assert first["inherited"] == [] and first["info"] == errno.ESTALE
    own = first["own"]
    assert (own["role"], own["slot"]) == (CREATED, 0) and own["inode"] != mine["inode"]
    assert first["own_joined"]["role"] == JOINED
    assert first["own_joined"]["inode"] == own["inode"]
    assert (first["parents"]["role"], first["parents"]["inode"]) == (JOINED, mine["inode"])
    assert (second["role"], second["inode"]) == (JOINED, mine["inode"])
    assert out["after"] == mine


# ---- churn ----------------------------------------------------------------------------------

CHURN = POOL_PRELUDE + """
import threading
h, rounds = int(sys.argv[1]), int(sys.argv[2])
lib.lm_pool_test_timeout(50)
p0 = pool_open(h ^ 7, 8)               # the pool thread and its eventfd stay for the run
before = nfds()
print("ready", flush=True)
sys.stdin.readline()                   # "go": all start together
roles = {}

def churn():
    for _ in range(rounds):
        p = pool_open(h, 8)
        r = info(p)["role"]
        roles[r] = roles.get(r, 0) + 1
        time.sleep(0.003)              # held a moment: long enough to be found by others
        lib.lm_pool_release(p)

ts = [threading.Thread(target=churn) for _ in range(2)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(json.dumps({"roles": roles, "new_fds": nfds() - before}), flush=True)
lib.lm_pool_release(p0)
"""


def test_pools_opened_and_released_in_a_loop_by_several_processes_and_threads(procs):
    """Releases race with the pool thread's answers (a socket closed while it is polled, a
    joiner whose pool goes away meanwhile): every open still gives a pool, nothing leaks."""
    h = fresh_id()
    ps = [Proc(CHURN, [h, 50], procs) for _ in range(3)]
    for p in ps:
        assert p.line().strip() == "ready"
    for p in ps:
        p.send("go")
    outs = [json.loads(p.line(timeout=80)) for p in ps]
    for out in outs:
        assert out["new_fds"] == 0, outs
        assert sum(out["roles"].values()) == 100, outs
        assert set(out["roles"]) <= {str(CREATED), str(JOINED)}, outs
    assert any(str(JOINED) in out["roles"] for out in outs), outs   # they did meet
    for p in ps:
        p.proc.stdin.close()
        assert p.proc.wait(30) == 0, p.proc.stderr.read()
