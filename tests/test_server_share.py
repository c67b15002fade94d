"""restore(path, server=SOCK, share=...) with a sharing page server (docs/shared-pages.md 5.3,
docs/page-server.md "Sharing"): the server holds one pool of the snapshot's pages, publishes
pages into it as its clients first need them and maps them into the clients with
UFFDIO_CONTINUE; clients hold one copy between them, their stores are their own, and when the
server dies they serve themselves from their read-only pool and the file."""
import ctypes
import fcntl
import json
import mmap
import os
import pwd
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE
from test_server import start_server

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.shared_pages,
              pytest.mark.timeout(180)]

PS = PAGE_SIZE
TESTS = os.path.dirname(os.path.abspath(__file__))
F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_FUTURE_WRITE = 0x2, 0x4, 0x10
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)


def make_snapshot(d, npages, seed=3, zero_every=5, name="s.snap"):
    """A snapshot of random pages, every `zero_every`th page zero, written by a subprocess;
    returns (path, expected bytes as a uint8 array)."""
    path = os.path.join(d, name)
    raw = path + ".raw"
    data = np.random.default_rng(seed).integers(0, 256, npages * PS, dtype=np.uint8)
    data.reshape(npages, PS)[::zero_every] = 0
    data.tofile(raw)
    code = ("import sys, numpy as np, pylazymem as plm\n"
            "n = int(sys.argv[3])\n"
            "r = plm.Region(n * %d)\n"
            "np.frombuffer(memoryview(r), np.uint8)[:] = np.fromfile(sys.argv[1], np.uint8)\n"
            "plm.checkpoint(r, sys.argv[2], working_set=np.arange(0, n, 97))\n"
            "r.close()\n" % PS)
    res = subprocess.run([sys.executable, "-c", code, raw, path, str(npages)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return path, data


def nonzero_pages(data):
    return int(np.count_nonzero(data.reshape(-1, PS).any(axis=1)))


def pool_fd(srv):
    from pylazymem._binding import lib
    return lib.lm_srv_pool_fd(srv._cpool)


# A client process: restores through the server, then obeys commands on stdin, one per line,
# answering one JSON line each: "read" (check every byte against what it should hold), "mem"
# (the region's smaps), "write K" (store into every page p with p % 50 == K), "exit".
CLIENT = r"""
import json, os, random, sys, threading
import numpy as np
import pylazymem as plm
PS = 4096
snap, sock, share = sys.argv[1], sys.argv[2], sys.argv[3]
share = {"True": True, "auto": "auto", "False": False}[share]
want = np.fromfile(snap + ".raw", np.uint8)
r = plm.restore(snap, prefetch="none", server=sock, share=share)
view = np.frombuffer(memoryview(r), np.uint8)
npages = len(want) // PS

def smaps(addr):
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                inside = int(head.split("-")[0], 16) == addr
            elif inside and head in ("Rss:", "Pss:", "Shared_Clean:", "Shared_Dirty:",
                                     "Private_Dirty:", "Anonymous:"):
                out[head[:-1]] = int(line.split()[1]) * 1024
    return out

def read_all():
    order = list(range(npages))
    random.Random(os.getpid()).shuffle(order)
    bad = [p for p in order if not np.array_equal(view[p * PS:(p + 1) * PS],
                                                   want[p * PS:(p + 1) * PS])]
    return bad

print(json.dumps({"ready": True, "shared": r.shared, "reason": r.share_reason,
                  "pool": r.pool}), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "read":
        bad = read_all()
        st = r.stats()
        print(json.dumps({"bad": bad[:10], "nbad": len(bad), "smaps": smaps(r.address),
                          "stats": {k: st[k] for k in ("pages_shared_mapped", "pages_published",
                                                       "pool_fallback_pages", "errors",
                                                       "pages_poisoned", "shared")},
                          "remote": r.remote}), flush=True)
    elif cmd[0] == "mem":
        print(json.dumps({"smaps": smaps(r.address)}), flush=True)
    elif cmd[0] == "write":
        k = int(cmd[1])
        for p in range(k, npages, 50):
            view[p * PS:(p + 1) * PS] = (p * 7 + k) % 251 + 1
            want[p * PS:(p + 1) * PS] = (p * 7 + k) % 251 + 1
        print(json.dumps({"written": len(range(k, npages, 50))}), flush=True)
    elif cmd[0] == "exit":
        r.close()
        print(json.dumps({"closed": True}), flush=True)
        break
"""


class Client:
    def __init__(self, snap, sock, share=True):
        env = dict(os.environ, PYTHONPATH=TESTS, PYTHONFAULTHANDLER="1")
        self.p = subprocess.Popen([sys.executable, "-c", CLIENT, snap, sock, str(share)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True)

    def answer(self, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.p.stdout], [], [], 0.5)
            if r:
                line = self.p.stdout.readline()
                if line:
                    return json.loads(line)
            if self.p.poll() is not None:
                break
        self.kill()
        pytest.fail("client gave no answer (rc %s): %s" % (self.p.returncode,
                                                           self.p.stderr.read()))

    def ask(self, cmd, timeout=90):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.answer(timeout)

    def kill(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()

    def finish(self):
        out = self.ask("exit")
        assert out == {"closed": True}
        assert self.p.wait(30) == 0, self.p.stderr.read()


@pytest.fixture
def workdir():
    """A directory other uids can enter (the foreign-uid test reads the snapshot from it)."""
    d = tempfile.mkdtemp(prefix="plm-srvshare-")
    os.chmod(d, 0o755)
    yield d
    for name in os.listdir(d):
        try:
            os.unlink(os.path.join(d, name))
        except OSError:
            pass
    os.rmdir(d)


# ---------------------------------------------------------------------------------------------
def test_pool_seals_and_read_only_fd(workdir):
    """The server's pool: sealed SHRINK | GROW | FUTURE_WRITE after its view was registered,
    and the view still publishes (prefetch_pool fills every page after the seal). An O_RDONLY
    reopen (what clients get) maps PROT_NONE shared but cannot be registered as a view (EPERM):
    clients cannot publish; nobody can map the pool writable shared or write() it."""
    from pylazymem import uffd as U
    snap, data = make_snapshot(workdir, 256)
    sock = os.path.join(workdir, "sock")
    with plm.PageServer(sock, snapshot=snap, share=True, prefetch_pool=True) as srv:
        fd = pool_fd(srv)
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        assert seals & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE) == (
            F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE), seals
        assert os.fstat(fd).st_size == (256 + 1) * PS
        ps = srv.pool_stats()
        assert ps["complete"] and ps["published"] == nonzero_pages(data)
        assert ps["bytes"] == nonzero_pages(data) * PS          # zero pages stay holes
        for p in range(256):                                     # every page, as published
            assert os.pread(fd, PS, p * PS) == data[p * PS:(p + 1) * PS].tobytes(), p
        ro = os.open("/proc/self/fd/%d" % fd, os.O_RDONLY | os.O_CLOEXEC)
        rw = os.open("/proc/self/fd/%d" % fd, os.O_RDWR | os.O_CLOEXEC)
        u = U.open_userfaultfd()
        try:
            u.api()
            # a view as a client would make one: MAP_SHARED PROT_NONE of the read-only fd
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int, ctypes.c_long)
            libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
            view = libc.mmap(None, 256 * PS, 0, mmap.MAP_SHARED, ro, 0)
            assert view not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
            try:
                with pytest.raises(plm.LazyMemError) as e:
                    u.register(view, 256 * PS)
                assert "EPERM" in str(e.value) or "not permitted" in str(e.value), e.value
            finally:
                libc.munmap(view, 256 * PS)
            with pytest.raises(PermissionError):
                mmap.mmap(rw, PS, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 300 * PS)
            with pytest.raises(PermissionError):
                os.ftruncate(rw, PS)
        finally:
            u.close()
            os.close(ro)
            os.close(rw)


def test_two_clients_share_one_copy(workdir):
    """Two client processes restore through a sharing server and read every page, at once:
    every byte right, every page published once (the pool holds one copy), both map it (Pss
    of each region about half its Rss). Then one writes pages: its stores are its own, the
    other client and the pool unchanged."""
    npages = 4096                                   # 16 MiB
    snap, data = make_snapshot(workdir, npages)
    nz = nonzero_pages(data)
    sock = os.path.join(workdir, "sock")
    with plm.PageServer(sock, snapshot=snap, share=True) as srv:
        a, b = Client(snap, sock), Client(snap, sock)
        try:
            for c in (a, b):
                hello = c.answer()
                assert hello["shared"] and hello["reason"] == "", hello
                assert hello["pool"]["role"] == "server" and hello["pool"]["sealed"], hello
            # both read at once, racing to publish
            for c in (a, b):
                c.p.stdin.write("read\n")
                c.p.stdin.flush()
            ra, rb = a.answer(), b.answer()
            for res in (ra, rb):
                assert res["nbad"] == 0, res
                st = res["stats"]
                assert st["shared"] and st["pages_published"] == 0, st   # the server publishes
                assert st["errors"] == 0 and st["pages_poisoned"] == 0, st
            for c in (a, b):                             # both done: both map every page
                sm = c.ask("mem")["smaps"]
                # the stored pages are mapped from the pool (file pages, shared by the two)
                assert sm["Rss"] >= 0.95 * nz * PS, (sm, nz)
                # (shmem pages are dirty: never written back to a file)
                assert sm["Shared_Clean"] + sm["Shared_Dirty"] >= 0.95 * nz * PS, sm
                assert sm["Anonymous"] == 0, sm                # no private copies
                assert 0.4 * sm["Rss"] <= sm["Pss"] <= 0.6 * sm["Rss"], sm
            st = srv.stats()
            assert st["pages_published"] == nz and st["pool_published"] == nz, st
            assert st["pool_bytes"] == nz * PS, st      # each page once
            assert st["pages_copied"] == 0 and st["pool_fallback_pages"] == 0, st
            per = [c.stats() for c in srv.clients]
            assert len(per) == 2 and all(s["pages_shared_mapped"] > 0 for s in per), per
            assert sum(s["pages_shared_mapped"] for s in per) == 2 * nz, per
            # a writes: private to a
            assert a.ask("write 1")["written"] == len(range(1, npages, 50))
            res = a.ask("read")
            assert res["nbad"] == 0 and res["smaps"]["Private_Dirty"] > 0, res
            res = b.ask("read")
            assert res["nbad"] == 0, res                 # b still reads the snapshot's bytes
            fd = pool_fd(srv)
            for p in range(1, npages, 50):
                assert os.pread(fd, PS, p * PS) == data[p * PS:(p + 1) * PS].tobytes(), p
            assert srv.stats()["pool_bytes"] == nz * PS
            a.finish()
            b.finish()
        finally:
            a.kill()
            b.kill()


def test_server_killed_clients_take_over(workdir):
    """kill -9 of a sharing server while two clients read (4 threads each): the clients serve
    themselves from their read-only pool (pages in it: UFFDIO_CONTINUE) and the file (holes:
    private copies); every byte of every page right, nothing hangs."""
    npages = 16384                                  # 64 MiB
    snap, data = make_snapshot(workdir, npages, zero_every=7)
    sock = os.path.join(workdir, "sock")
    srv = start_server(sock, "--snapshot", snap, "--share", engine="c")
    code = r"""
import json, os, random, sys, threading, time
import numpy as np
import pylazymem as plm
PS = 4096
r = plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2], share=True)
assert r.shared, r.share_reason
want = np.fromfile(sys.argv[1] + ".raw", np.uint8)
view = np.frombuffer(memoryview(r), np.uint8)
n = len(want) // PS
done = [0] * 4
def worker(k):
    order = list(range(n))
    random.Random(os.getpid() * 10 + k).shuffle(order)
    for i, p in enumerate(order):
        if not np.array_equal(view[p * PS:(p + 1) * PS], want[p * PS:(p + 1) * PS]):
            print("WRONG", p, flush=True)
            os._exit(3)
        done[k] = i + 1
        if i % 64 == 0:
            time.sleep(0.0005)   # keep the storm going until the server is killed
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in ts:
    t.start()
while sum(done) < n // 2:
    time.sleep(0.001)
print("HALF", sum(done), flush=True)
for t in ts:
    t.join()
st = r.stats()
print("ALL", sum(done), r.remote, json.dumps({k: st[k] for k in (
    "pages_shared_mapped", "pool_fallback_pages", "errors", "pages_poisoned")}), flush=True)
"""
    env = dict(os.environ, PYTHONPATH=TESTS, PYTHONFAULTHANDLER="1")
    clients = [subprocess.Popen([sys.executable, "-c", code, snap, sock], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True) for _ in range(2)]
    try:
        for c in clients:
            first = c.stdout.readline()
            assert first.startswith("HALF"), (first, c.stderr.read())
        srv.kill()                                   # SIGKILL in the middle of the reads
        srv.communicate()
        for c in clients:
            out, err = c.communicate(timeout=120)
            assert c.returncode == 0, (c.returncode, out, err)
            assert "WRONG" not in out, out
            last = out.strip().splitlines()[-1].split(None, 3)
            assert last[0] == "ALL" and int(last[1]) == 4 * npages and last[2] == "lost", out
            st = json.loads(last[3])
            assert st["errors"] == 0 and st["pages_poisoned"] == 0, st
            # served here after the takeover: pool pages mapped, holes copied privately
            assert st["pages_shared_mapped"] + st["pool_fallback_pages"] > 0, st
    except subprocess.TimeoutExpired:
        for c in clients:
            os.killpg(c.pid, signal.SIGABRT)
        time.sleep(1)
        pytest.fail("a client hung after the server was killed: %s"
                    % [c.communicate()[1][-3000:] for c in clients])
    finally:
        srv.kill()
        srv.communicate()
        for c in clients:
            if c.poll() is None:
                os.killpg(c.pid, signal.SIGKILL)
                c.wait()


def test_server_without_share(workdir, run_py):
    """A server without share answers "pool": null: restore(share=True) raises
    SharingUnavailableError saying why, share="auto" restores privately (and right). A sharing
    server serves share=False clients privately, as before."""
    snap, data = make_snapshot(workdir, 512)
    sock = os.path.join(workdir, "sock")
    code = """
want = np.fromfile(sys.argv[1] + ".raw", np.uint8)
try:
    plm.restore(sys.argv[1], server=sys.argv[2], share=True)
    raise SystemExit("share=True must raise without a sharing server")
except plm.SharingUnavailableError as e:
    assert "--share" in str(e), e
r = plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2], share="auto")
assert not r.shared and "--share" in r.share_reason, r.share_reason
assert r.server["pool"] is None and r.remote == "served"
assert np.array_equal(np.frombuffer(memoryview(r), np.uint8), want)
r.close()
r = plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2])
assert not r.shared
assert np.array_equal(np.frombuffer(memoryview(r), np.uint8), want)
r.close()
print("OK")
"""
    with plm.PageServer(sock, snapshot=snap) as srv:
        res = run_py(code, args=(snap, sock), timeout=120)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        assert srv.stats()["pages_copied"] > 0
    code_plain = """
want = np.fromfile(sys.argv[1] + ".raw", np.uint8)
r = plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2])
assert not r.shared and r.server["pool"] is None
assert np.array_equal(np.frombuffer(memoryview(r), np.uint8), want)
r.close()
print("OK")
"""
    with plm.PageServer(sock, snapshot=snap, share=True) as srv:
        res = run_py(code_plain, args=(snap, sock), timeout=120)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        st = srv.stats()
        assert st["pages_copied"] > 0 and st["pool_published"] == 0, st


def test_share_needs_snapshot_and_native_engine(workdir):
    snap, _ = make_snapshot(workdir, 16)
    sock = os.path.join(workdir, "sock")
    with pytest.raises(plm.UnavailableError, match="native engine"):
        plm.PageServer(sock, snapshot=snap, share=True, engine="python")
    with pytest.raises(ValueError, match="snapshot"):
        plm.PageServer(sock, memory_file=snap, share=True)
    with pytest.raises(ValueError, match="share=True"):
        plm.PageServer(sock, snapshot=snap, prefetch_pool=True)


FOREIGN = """
import json, os, sys
import numpy as np
import pylazymem as plm
import pylazymem.snapshot, pylazymem.server, pylazymem._protocol, pylazymem._pool
plm.features()
os.setgid(int(sys.argv[4]))
os.setuid(int(sys.argv[3]))
want = np.fromfile(sys.argv[1] + ".raw", np.uint8)
out = {}
try:
    plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2], share=True)
    out["strict"] = "shared"
except plm.SharingUnavailableError as e:
    out["strict"] = str(e)
except plm.UnavailableError as e:
    print(json.dumps({"skip": str(e)}))
    sys.exit(0)
r = plm.restore(sys.argv[1], prefetch="none", server=sys.argv[2], share="auto")
out["shared"], out["reason"], out["pool"] = r.shared, r.share_reason, r.server["pool"]
out["right"] = bool(np.array_equal(np.frombuffer(memoryview(r), np.uint8), want))
r.close()
print(json.dumps(out))
"""


def test_foreign_uid_gets_only_a_complete_pool(workdir, run_py):
    """A client of another uid gets "pool": null while the pool has holes (it could plant zero
    pages in them) and is served privately; once the pool is complete it shares it."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid (setuid)")
    nobody = pwd.getpwnam("nobody")
    snap, data = make_snapshot(workdir, 512)
    for f in (snap, snap + ".raw"):
        os.chmod(f, 0o644)
    sock = os.path.join(workdir, "sock")

    def run():
        res = run_py(FOREIGN, prelude=False, args=(snap, sock, str(nobody.pw_uid), str(nobody.pw_gid)),
                     timeout=120)
        assert res.returncode == 0, res.describe()
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if "skip" in out:
            pytest.skip("uid %d cannot restore here: %s" % (nobody.pw_uid, out["skip"]))
        return out

    with plm.PageServer(sock, snapshot=snap, share=True, allow_uids=[nobody.pw_uid]) as srv:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        out = run()
        assert "complete" in out["strict"], out
        assert out["shared"] is False and out["pool"] is None and out["right"], out
        assert not srv.pool_complete()
        assert srv.stats()["pool_published"] == 0     # served privately: nothing published
    with plm.PageServer(sock, snapshot=snap, share=True, prefetch_pool=True,
                        allow_uids=[nobody.pw_uid]) as srv:
        assert srv.pool_complete()
        out = run()
        assert out["strict"] == "shared", out
        assert out["shared"] is True and out["pool"]["npages"] == 512 and out["right"], out
