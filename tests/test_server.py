"""plm.PageServer: serving other processes' userfaultfds over a Unix socket.

The server runs in this (pytest) process; clients are child processes (tests/_server_client.py)
that register private anonymous memory, send the uffd and read their memory, each under a
deadline. Both engines are exercised where they apply: "c" (native serving threads, file
sources) and "python" (a Python thread per client through the ctypes binding).
"""
import errno
import json
import os
import pwd
import signal
import socket
import stat
import tempfile

import numpy as np
import pytest

import pylazymem as plm
from pylazymem.server import PageServer, ProtocolError, parse_mappings

PS = os.sysconf("SC_PAGE_SIZE")

pytestmark = [pytest.mark.uffd_full, pytest.mark.timeout(120)]


def _engines():
    """Both engines; the native one needs the compiled core (skipped as such under ctypes)."""
    return [pytest.param("c", marks=pytest.mark.core(reason="engine c: native serving "
                                                          "threads of the compiled core")),
            "python"]


CLIENT = """
import sys
sys.path.insert(0, {tests!r})
from _server_client import ServedMemory, first_mismatch, PS
"""


def client_code(body, tests=os.path.dirname(os.path.abspath(__file__))):
    return CLIENT.format(tests=tests) + body


def memory_file(tmp_path, npages, seed=1, zero_every=5):
    """A memory file of random pages with every `zero_every`-th page zero."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, npages * PS, dtype=np.uint8)
    for p in range(0, npages, zero_every):
        data[p * PS:(p + 1) * PS] = 0
    path = tmp_path / "mem.bin"
    data.tofile(path)
    return path, data.tobytes()


@pytest.fixture
def sock(tmp_path):
    return str(tmp_path / "srv.sock")


@pytest.mark.parametrize("source", ["memory-file", "snapshot"])
@pytest.mark.parametrize("engine", _engines())
def test_two_clients(tmp_path, sock, engine, source, run_py):
    """Two clients at once, each with two ranges at different offsets; every byte checked."""
    path, data = memory_file(tmp_path, 96)
    if source == "snapshot":
        kw = {"snapshot": _snapshot_of_file(tmp_path, path, 96)}
    else:
        kw = {"memory_file": path}
    with PageServer(sock, engine=engine, **kw) as srv:
        code = client_code("""
m = ServedMemory(sys.argv[1], [32 * PS, 16 * PS], [int(sys.argv[2]) * PS, 80 * PS])
want = open(sys.argv[3], "rb").read()
off = int(sys.argv[2]) * PS
# reverse order first (no readahead help), then the rest sequentially
for p in reversed(range(0, 32, 3)):
    assert m.maps[0][p * PS:(p + 1) * PS] == want[off + p * PS: off + (p + 1) * PS], p
bad = first_mismatch(m.maps[0][:], want[off:off + 32 * PS])
assert bad is None, ("range 0 page", bad)
bad = first_mismatch(m.maps[1][:], want[80 * PS:96 * PS])
assert bad is None, ("range 1 page", bad)
print("OK", m.answer["engine"], m.answer["source"]["kind"])
""")
        import subprocess
        import sys
        procs = [subprocess.Popen([sys.executable, "-c", code, sock, str(start), str(path)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for start in (0, 40)]
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=60))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("client hung")
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, out + err
            assert out.split() == ["OK", engine, source]
        st = srv.stats()
        assert st["clients"] >= 1 and st["errors"] == 0 and st["poisoned"] == 0
        assert st["faults"] >= 2


@pytest.mark.parametrize("engine", _engines())
def test_remove_faults_back_as_zeros(tmp_path, sock, engine, run_py):
    """Balloon semantics: after MADV_DONTNEED of served pages they read as zeros, again and
    again, while the rest keeps the file's contents."""
    path, data = memory_file(tmp_path, 64, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [64 * PS], [0])
want = open(sys.argv[2], "rb").read()
assert m.maps[0][:] == want
m.remove(0, 8 * PS, 16 * PS)
got = m.maps[0][:]
assert got[8 * PS:24 * PS] == bytes(16 * PS), "removed pages must read as zeros"
assert got[:8 * PS] == want[:8 * PS] and got[24 * PS:] == want[24 * PS:]
m.maps[0][10 * PS] = 7          # written after removal: ordinary memory again
m.remove(0, 8 * PS, 16 * PS)     # removed again
assert m.maps[0][8 * PS:24 * PS] == bytes(16 * PS)
print("OK")
"""), args=(sock, str(path)), prelude=False)
        assert res.returncode == 0, res.describe()
        st = srv.stats()
        assert st["events_remove"] == 2 and st["removed_faults"] >= 16
        assert st["errors"] == 0


def test_python_provider(sock, run_py):
    """A callable gives each page; None means zeros; the offset passed is the source offset."""
    seen = []

    def provider(offset):
        seen.append(offset)
        p = offset // PS
        if p % 4 == 0:
            return None
        return (p.to_bytes(8, "little") * (PS // 8))

    with PageServer(sock, provider=provider) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [16 * PS], [100 * PS])
for p in range(16):
    page = m.maps[0][p * PS:(p + 1) * PS]
    src = 100 + p
    want = bytes(PS) if src % 4 == 0 else src.to_bytes(8, "little") * (PS // 8)
    assert page == want, p
print("OK")
"""), args=(sock,), prelude=False)
        assert res.returncode == 0, res.describe()
        assert sorted(set(seen)) == [(100 + p) * PS for p in range(16)]
        st = srv.stats()
        assert st["pages_zero"] == 4 and st["pages_copied"] == 12


def test_provider_failure_is_loud(sock, run_py):
    """A provider that raises (or returns the wrong size) fails the access with SIGBUS: the
    client never waits forever and never reads zeros."""
    def provider(offset):
        if offset // PS == 3:
            raise RuntimeError("backing store unreachable")
        if offset // PS == 5:
            return b"short"
        return bytes([1]) * PS

    with PageServer(sock, provider=provider) as srv:
        for page in (3, 5):
            res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [8 * PS], [0])
assert m.maps[0][0] == 1
print("touching", flush=True)
m.maps[0][int(sys.argv[2]) * PS]
print("READ")
"""), args=(sock, str(page)), prelude=False)
            assert res.returncode == -signal.SIGBUS, res.describe()
            assert "touching" in res.stdout and "READ" not in res.stdout
        st = srv.stats()
        assert st["poisoned"] == 2 and st["errors"] == 2


def test_foreign_uid_refused(tmp_path, sock, run_py):
    """SO_PEERCRED: a client of another uid is refused with a reason, and the server goes on.
    The socket is 0600 (the filesystem refuses others first); to reach the credential check
    the test opens the socket's mode up."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    nobody = pwd.getpwnam("nobody").pw_uid
    path, data = memory_file(tmp_path, 8)
    # pytest's tmp directories are 0700: give the socket a directory others can enter
    pub = tempfile.mkdtemp(prefix="plm-srv-")
    os.chmod(pub, 0o755)
    sock = os.path.join(pub, "srv.sock")
    with PageServer(sock, memory_file=path) as srv:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # The userfaultfd is had as root, before setuid: another uid may not be able to get
        # one here (a container's seccomp profile); the server judges the connecting uid.
        body = """
import os
from pylazymem import uffd as U
u = U.open_userfaultfd()
u.api()
os.setuid(%d)
from pylazymem.server import connect
try:
    connect(sys.argv[1], u.fileno(), [(1 << 30, 8 * PS, 0)])
except PermissionError as e:
    print("EACCES" if e.errno == 13 else repr(e))
except Exception as e:
    print(type(e).__name__, e)
""" % nobody
        res = run_py(client_code(body), args=(sock,), prelude=False)
        assert res.stdout.strip() == "EACCES", res.describe()
        os.chmod(sock, 0o666)
        res = run_py(client_code(body), args=(sock,), prelude=False)
        assert res.stdout.startswith("ProtocolError"), res.describe()
        assert "uid %d" % nobody in res.stdout and "may not use this server" in res.stdout
        assert srv.refused == 1
        # and an allowed client is still served afterwards (root)
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [8 * PS], [0])
assert m.maps[0][:] == open(sys.argv[2], "rb").read()
print("OK")
"""), args=(sock, str(path)), prelude=False)
        assert res.returncode == 0, res.describe()
    os.rmdir(pub)


def test_allow_uids(tmp_path, sock, run_py):
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path, allow_uids=[os.getuid() + 12345],
                    socket_group=os.getgid()):
        res = run_py(client_code("""
try:
    ServedMemory(sys.argv[1], [4 * PS], [0])
except Exception as e:
    print(type(e).__name__, e)
"""), args=(sock,), prelude=False)
        assert res.stdout.startswith("ProtocolError") and "may not use" in res.stdout


def test_refused_client_fails_loudly(tmp_path, sock, run_py):
    """A refused client that does not read the answer (Firecracker never does) must not hang
    on its first fault: the ranges it described are poisoned."""
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path, allow_uids=[os.getuid() + 12345],
                    socket_group=os.getgid()):
        res = run_py(client_code("""
import json, mmap, socket, time
from pylazymem import uffd as U
u = U.open_userfaultfd()
u.api(U.Feature.EVENT_REMOVE)
m = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
u.register(U.address_of(m), 4 * PS)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
socket.send_fds(s, [json.dumps([{"base_host_virt_addr": U.address_of(m), "size": 4 * PS,
                                 "offset": 0, "page_size": PS}]).encode()], [u.fileno()])
time.sleep(1)           # the server reads, refuses, answers; we do not read the answer
print("touching", flush=True)
m[0]
print("READ")
"""), args=(sock,), prelude=False)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert "touching" in res.stdout and "READ" not in res.stdout


@pytest.mark.parametrize("payload, fds, why", [
    (b"{not json", 1, "not UTF-8 JSON"),
    (b"[]", 1, "non-empty JSON array"),
    (json.dumps([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}]).encode(), 0,
     "expected one userfaultfd"),
    (json.dumps([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}]).encode(), "pipe",
     "not a userfaultfd"),
])
def test_bad_handshakes_refused(tmp_path, sock, payload, fds, why):
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sock)
        if fds == "pipe":
            r, w = os.pipe()
            socket.send_fds(s, [payload], [r])
            os.close(r)
            os.close(w)
        elif fds:
            from pylazymem import uffd as U
            with U.open_userfaultfd() as u:
                u.api()
                socket.send_fds(s, [payload], [u.fileno()])
        else:
            s.sendall(payload)
        answer = json.loads(s.makefile().readline())
        s.close()
        assert answer["ok"] is False and why in answer["error"], answer
        assert srv.refused == 1 and srv.clients == []


@pytest.mark.parametrize("doc, why", [
    ([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0, "page_size": 2 << 20}],
     "page size"),
    ([{"base_host_virt_addr": 4097, "size": 4096, "offset": 0}], "multiples of the page size"),
    ([{"base_host_virt_addr": 4096, "size": 0, "offset": 0}], "size > 0"),
    ([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0},
      {"base_host_virt_addr": 8192, "size": 4096, "offset": 0}], "overlap"),
    ([{"base_host_virt_addr": -4096, "size": 4096, "offset": 0}], "unsigned 64-bit"),
    ([{"base_host_virt_addr": True, "size": 4096, "offset": 0}], "unsigned 64-bit"),
    ([{"base_host_virt_addr": "4096", "size": 4096, "offset": 0}], "unsigned 64-bit"),
    ([{"size": 4096, "offset": 0}], "base_host_virt_addr"),
    ([[4096, 4096, 0]], "not a JSON object"),
    ([{"base_host_virt_addr": 4096, "size": 4096, "offset": 0}] * 65, "at most 64"),
])
def test_parse_mappings_rejects(doc, why):
    with pytest.raises(ProtocolError, match=why):
        parse_mappings(json.dumps(doc).encode())


def test_parse_mappings_firecracker_layouts():
    """Every layout Firecracker has sent (docs/page-server.md): page_size + page_size_kib
    (both bytes), page_size_kib only, neither; unknown keys ignored."""
    base = {"base_host_virt_addr": 1 << 40, "size": 3 << 30, "offset": 0}
    for extra in ({"page_size": PS, "page_size_kib": PS}, {"page_size_kib": PS}, {},
                  {"page_size": PS, "future_field": [1, 2]}):
        maps, watches = parse_mappings(json.dumps([dict(base, **extra)]).encode())
        assert maps[0].base_host_virt_addr == 1 << 40 and maps[0].size == 3 << 30
        assert maps[0].page_size == PS and not watches


def test_socket_file_handling(tmp_path, sock):
    path, _ = memory_file(tmp_path, 4)
    # a stale socket (its server died) is replaced
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sock)
    s.close()
    with PageServer(sock, memory_file=path):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # a live one is not
        with pytest.raises(FileExistsError, match="already listening"):
            PageServer(sock, memory_file=path).start()
    assert not os.path.exists(sock)   # removed on stop
    # anything that is not a socket is never replaced
    (tmp_path / "file").write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        PageServer(str(tmp_path / "file"), memory_file=path).start()
    assert (tmp_path / "file").read_text() == "precious"


def test_constructor_errors(tmp_path, sock):
    path, _ = memory_file(tmp_path, 4)
    with pytest.raises(TypeError, match="exactly one"):
        PageServer(sock)
    with pytest.raises(TypeError, match="exactly one"):
        PageServer(sock, memory_file=path, provider=lambda o: None)
    with pytest.raises(ValueError, match="engine"):
        PageServer(sock, memory_file=path, engine="rust")
    with pytest.raises(ValueError, match="python engine"):
        PageServer(sock, provider=lambda o: None, engine="c")
    with pytest.raises(FileNotFoundError):
        PageServer(sock, memory_file=tmp_path / "missing")


@pytest.mark.parametrize("engine", _engines())
def test_past_end_of_file_is_loud(tmp_path, sock, engine, run_py):
    """A range that reaches past the memory file: pages there fail with SIGBUS."""
    path, data = memory_file(tmp_path, 4, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [8 * PS], [0])
assert m.maps[0][:4 * PS] == open(sys.argv[2], "rb").read()
print("touching", flush=True)
m.maps[0][6 * PS]
print("READ")
"""), args=(sock, str(path)), prelude=False)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert srv.stats()["poisoned"] >= 1


@pytest.mark.parametrize("engine", _engines())
def test_client_exit_ends_its_thread(tmp_path, sock, engine, run_py):
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [4 * PS], [0])
m.maps[0][0]
print("OK")
"""), args=(sock,), prelude=False)
        assert res.returncode == 0, res.describe()
        import time
        deadline = time.monotonic() + 10
        while srv.clients and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.clients == [], "a client that exited is still listed"


@pytest.mark.parametrize("engine", _engines())
def test_snapshot_source(tmp_path, sock, engine, run_py):
    """A snapshot (zero, duplicate and unique pages) served to a client whose one range
    starts at page 3 of the snapshot region."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 64 * PS, dtype=np.uint8)
    for p in range(64):
        if p % 4 == 2:
            data[p * PS:(p + 1) * PS] = 0                # zero
        elif p % 4 == 3:
            data[p * PS:(p + 1) * PS] = 9                # duplicates
    path = tmp_path / "want.bin"
    data.tofile(path)
    snap = _snapshot_of_file(tmp_path, path, 64)
    info = plm.inspect(snap)
    assert info.pages_by_class["zero"] == 16 and info.pages_by_class["duplicate"] == 15
    with PageServer(sock, snapshot=snap, engine=engine) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [61 * PS], [3 * PS])
want = open(sys.argv[2], "rb").read()[3 * PS:]
bad = first_mismatch(m.maps[0][:], want)
assert bad is None, bad
assert m.answer["source"]["kind"] == "snapshot"
print("OK")
"""), args=(sock, str(path)), prelude=False)
        assert res.returncode == 0, res.describe()
        st = srv.stats()
        assert st["errors"] == 0 and st["pages_zero"] > 0 and st["pages_copied"] > 0


# ---------------------------------------------------------------------------------------------
# Region(server=...): our own region served by a server process, and that server's death
# ---------------------------------------------------------------------------------------------
def start_server(sock, *args, engine="auto"):
    """`pylazymem serve` as a separate process; returns the Popen once it listens."""
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "pylazymem", "serve", "--socket", sock,
                          "--engine", engine, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    import select
    line = ""
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], 0.5)
        if r:
            line = p.stdout.readline()
            break
        if p.poll() is not None:
            break
    if "listening on" not in line:
        p.kill()
        out, err = p.communicate()
        pytest.fail("server did not start: %r %s %s" % (line, out, err))
    return p


def stop_server(p):
    import subprocess
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("server did not stop on SIGTERM")
    return p.communicate()


@pytest.mark.core
@pytest.mark.parametrize("engine", _engines())
def test_region_served_by_server(tmp_path, sock, engine, run_py):
    """A Region's contents come from the server's memory file; writes stay local; the region
    reports who serves it; closing the region ends the server's client."""
    path, data = memory_file(tmp_path, 256)
    srv = start_server(sock, "--memory-file", str(path), engine=engine)
    try:
        res = run_py("""
r = plm.Region(256 * PS, server=sys.argv[1])
want = open(sys.argv[2], "rb").read()
assert r.remote == "served" and r.server["engine"] == sys.argv[3], (r.remote, r.server)
mv = memoryview(r)
assert bytes(mv[100 * PS:101 * PS]) == want[100 * PS:101 * PS]
mv[5 * PS:6 * PS] = b"x" * PS
got = bytes(mv)
assert got[5 * PS:6 * PS] == b"x" * PS
assert got[:5 * PS] == want[:5 * PS] and got[6 * PS:] == want[6 * PS:]
st = r.stats()
assert st["remote"] == "served" and st["faults"] == 0, st   # none served here
try:
    r.defer_fill(0, PS, plm.ZERO)
    raise SystemExit("defer_fill must be refused while a server serves the region")
except plm.InvalidArgumentError as e:
    assert "page server" in str(e)
r.close()
print("OK")
""", args=(sock, str(path), engine))
        assert res.returncode == 0, res.describe()
    finally:
        out, err = stop_server(srv)
    assert srv.returncode == 0, err


STORM = """
import random, signal
r = plm.Region(NPAGES * PS, server=sys.argv[1]) if not sys.argv[3] else plm.restore(
    sys.argv[3], prefetch="none", server=sys.argv[1])
want = np.fromfile(sys.argv[2], dtype=np.uint8)
view = np.frombuffer(memoryview(r), dtype=np.uint8)
done = [0] * 4
wrong = []

def worker(k):
    rng = random.Random(k)
    order = list(range(NPAGES))
    rng.shuffle(order)
    for n, p in enumerate(order):
        page = view[p * PS:(p + 1) * PS]
        if not np.array_equal(page, want[p * PS:(p + 1) * PS]):
            wrong.append(p)
            print("WRONG page", p, "zero" if not page.any() else "", flush=True)
            os._exit(3)
        done[k] = n + 1

ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
for t in ts:
    t.start()
while sum(done) < NPAGES // 2:
    time.sleep(0.001)
print("HALF", sum(done), flush=True)
for t in ts:
    t.join()
print("ALL", sum(done), r.remote, json.dumps(r.stats()["remote"]), flush=True)
"""


def _storm(tmp_path, sock, engine, snapshot):
    """4 threads read a 128 MiB region in random order through the server; the server is
    killed with SIGKILL half way. The client must never hang and never read a wrong page."""
    import subprocess
    import sys
    import time
    npages = 32768
    path, data = memory_file(tmp_path, npages, zero_every=7)
    args = ["--snapshot", str(snapshot)] if snapshot else ["--memory-file", str(path)]
    srv = start_server(sock, *args, engine=engine)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)),
               PYTHONFAULTHANDLER="1")
    from conftest import PRELUDE
    client = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + "NPAGES = %d\n" % npages + STORM, sock, str(path),
         str(snapshot or "")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True)
    try:
        first = client.stdout.readline()
        assert first.startswith("HALF"), (first, client.stderr.read())
        srv.kill()                                   # kill -9 in the middle of the storm
        t0 = time.monotonic()
        out, err = client.communicate(timeout=60)
        return client.returncode, first + out, err, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(client.pid, signal.SIGABRT)
        time.sleep(1)
        os.killpg(client.pid, signal.SIGKILL)
        pytest.fail("client hung after the server was killed:\n%s" % client.communicate()[1])
    finally:
        srv.kill()
        srv.communicate()


@pytest.mark.core
@pytest.mark.parametrize("engine", _engines())
def test_server_killed_plain_region_fails_loudly(tmp_path, sock, engine):
    """Region(server=...) holds pages only the server could give: after kill -9 of the server
    an access to one of them raises SIGBUS; pages already received stay correct."""
    rc, out, err, secs = _storm(tmp_path, sock, engine, snapshot=None)
    assert rc == -signal.SIGBUS, (rc, out, err)
    assert "WRONG" not in out and "ALL" not in out, out



def _snapshot_of_file(tmp_path, path, npages, name="state.snap"):
    """A snapshot holding the memory file's bytes, written by a subprocess with the cffi
    backend: the ctypes suite serves snapshots too, it just cannot write them."""
    import subprocess
    import sys
    snap = tmp_path / name
    code = (
        "import sys, numpy as np, pylazymem as plm\n"
        "n = int(sys.argv[3])\n"
        "r = plm.Region(n * %d)\n"
        "np.frombuffer(memoryview(r), np.uint8)[:] = np.fromfile(sys.argv[1], np.uint8)\n"
        "plm.checkpoint(r, sys.argv[2], working_set=np.arange(0, n, 97))\n"
        "r.close()\n" % PS)
    env = dict(os.environ, PYLAZYMEM_BACKEND="cffi")
    res = subprocess.run([sys.executable, "-c", code, str(path), str(snap), str(npages)],
                         env=env, capture_output=True, text=True, timeout=120)
    if res.returncode and "compiled core" in res.stderr:
        pytest.skip("writing a snapshot needs the compiled core, which is not built")
    assert res.returncode == 0, res.stderr
    return snap


@pytest.mark.core(reason="restore() needs the compiled core")
@pytest.mark.parametrize("engine", _engines())
def test_server_killed_restored_region_taken_over(tmp_path, sock, engine):
    """restore(path, server=...): after kill -9 of the server mid-storm the region is served
    from the snapshot here; every page of every thread is right, nothing hangs."""
    path, _ = memory_file(tmp_path, 32768, zero_every=7)
    snap = _snapshot_of_file(tmp_path, path, 32768)
    rc, out, err, secs = _storm(tmp_path, sock, engine, snapshot=snap)
    assert rc == 0, (rc, out, err)
    assert "WRONG" not in out
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "ALL" and int(last[1]) == 4 * 32768 and last[2] == "lost", out


@pytest.mark.core(reason="restore() needs the compiled core")
def test_restore_served_then_checkpoint(tmp_path, sock, run_py):
    """A restored region served by the server: contents right, writes kept, and a checkpoint
    of it sees what the server filled and what the program wrote (not the store's copy)."""
    path, data = memory_file(tmp_path, 512)
    snap = _snapshot_of_file(tmp_path, path, 512)
    srv = start_server(sock, "--snapshot", str(snap))
    try:
        res = run_py("""
snap, out = sys.argv[2], sys.argv[3]
want = bytearray(open(sys.argv[4], "rb").read())
r = plm.restore(snap, prefetch="working-set", server=sys.argv[1])
assert r.remote == "served"
mv = memoryview(r)
assert bytes(mv[:200 * PS]) == bytes(want[:200 * PS])        # served by the server
mv[10 * PS:11 * PS] = b"w" * PS                               # changed after the server filled it
want[10 * PS:11 * PS] = b"w" * PS
st = r.stats()
assert st["faults"] == 0 and st["remote"] == "served", st
plm.checkpoint(r, out, working_set="none")
r.close()
r2 = plm.restore(out, prefetch="none")
assert bytes(memoryview(r2)) == bytes(want)
r2.close()
try:
    plm.restore(sys.argv[5], server=sys.argv[1])
    raise SystemExit("a different snapshot must be refused")
except plm.SnapshotError as e:
    assert "not this snapshot" in str(e), e
print("OK")
""", args=(sock, str(snap), str(tmp_path / "again.snap"), str(path),
           str(_snapshot_of_file(tmp_path, path, 512, "other.snap"))))
        assert res.returncode == 0, res.describe()
    finally:
        out, err = stop_server(srv)


@pytest.mark.core
def test_region_served_checkpoint_reads_through(tmp_path, sock, run_py):
    """Region(server=...) then checkpoint: pages only the server had are fetched, so the
    snapshot holds the server's contents, not zeros."""
    path, data = memory_file(tmp_path, 128)
    srv = start_server(sock, "--memory-file", str(path))
    try:
        res = run_py("""
r = plm.Region(128 * PS, server=sys.argv[1])
memoryview(r)[:PS] = b"a" * PS
plm.checkpoint(r, sys.argv[2], working_set="none")
r.close()
want = bytearray(open(sys.argv[3], "rb").read())
want[:PS] = b"a" * PS
r2 = plm.restore(sys.argv[2], prefetch="none")
assert bytes(memoryview(r2)) == bytes(want)
print("OK")
""", args=(sock, str(tmp_path / "c.snap"), str(path)))
        assert res.returncode == 0, res.describe()
    finally:
        stop_server(srv)


def test_silent_connection_does_not_block_others(tmp_path, sock, run_py):
    """A client that connects and sends nothing must not hold up the next one (handshakes
    run in their own threads); max_clients bounds the clients served at once."""
    import time
    path, _ = memory_file(tmp_path, 8)
    with PageServer(sock, memory_file=path, max_clients=1) as srv:
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(sock)
        t0 = time.monotonic()
        body = """
import time
m = ServedMemory(sys.argv[1], [8 * PS], [0])
assert m.maps[0][:] == open(sys.argv[2], "rb").read()
print("OK", flush=True)
time.sleep(float(sys.argv[3]))
"""
        res = run_py(client_code(body), args=(sock, str(path), "0"), prelude=False)
        assert res.returncode == 0, res.describe()
        assert time.monotonic() - t0 < 4.0, "a silent connection delayed the next client"
        import subprocess
        import sys
        holder = subprocess.Popen([sys.executable, "-c", client_code(body), sock, str(path),
                                   "30"], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "OK"
            res = run_py(client_code("""
try:
    ServedMemory(sys.argv[1], [8 * PS], [0])
except Exception as e:
    print(type(e).__name__, e)
"""), args=(sock,), prelude=False)
            assert "max_clients" in res.stdout, res.describe()
        finally:
            holder.kill()
            holder.wait()
        silent.close()


def test_allowed_foreign_uid_served(tmp_path, run_py):
    """allow_uids=[nobody]: the socket is given to that uid, which is then served."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a client as another uid")
    nobody = pwd.getpwnam("nobody").pw_uid
    path, _ = memory_file(tmp_path, 8)
    os.chmod(path, 0o644)
    pub = tempfile.mkdtemp(prefix="plm-srv-")
    os.chmod(pub, 0o755)
    sock = os.path.join(pub, "srv.sock")
    try:
        with PageServer(sock, memory_file=path, allow_uids=[nobody]) as srv:
            st = os.stat(sock)
            assert st.st_uid == nobody and stat.S_IMODE(st.st_mode) == 0o600
            # memory and userfaultfd set up as root (another uid may not get a uffd here),
            # then the client becomes nobody and connects: the server judges that uid
            res = run_py(client_code("""
import mmap, os
from pylazymem import uffd as U
from pylazymem.server import connect
data = open(sys.argv[2], "rb").read()
u = U.open_userfaultfd()
u.api()
m = mmap.mmap(-1, 8 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
u.register(U.address_of(m), 8 * PS)
os.setuid(%d)
sock, answer = connect(sys.argv[1], u.fileno(), [(U.address_of(m), 8 * PS, 0)])
assert m[:] == data
print("OK", answer["ok"])
""" % nobody), args=(sock, str(path)), prelude=False)
            assert res.returncode == 0 and "OK True" in res.stdout, res.describe()
            assert srv.stats()["refused"] == 0
        with pytest.raises(ValueError, match="socket_group"):
            PageServer(sock, memory_file=path, allow_uids=[nobody, nobody + 1]).start()
        assert not os.path.exists(sock)
        with PageServer(sock, memory_file=path, allow_uids=[nobody, nobody + 1],
                        socket_group=nobody):
            st = os.stat(sock)
            assert st.st_gid == nobody and stat.S_IMODE(st.st_mode) == 0o660
    finally:
        for f in os.listdir(pub):
            os.unlink(os.path.join(pub, f))
        os.rmdir(pub)


# ---------------------------------------------------------------------------------------------
# Failure cases (issue 10): handshake deadline, same-process clients, huge removals, shared
# page tables, pidfds taken at accept, WP/minor faults, engine death, thread-start failure,
# faults the queue cannot take, lm_srv_start's own checks, and the protocol module's layering.
# ---------------------------------------------------------------------------------------------
def test_handshake_deadline_drops_trickling_client(tmp_path, sock):
    """One deadline for the whole handshake: a client that sends a byte every 0.3 s (each
    recv() would be well within any per-recv timeout) is dropped at the deadline, with a
    reason, and its handshake slot is freed."""
    import time
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path, handshake_timeout=1.0) as srv:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock)
        t0 = time.monotonic()
        s.sendall(b"[")
        s.settimeout(0.3)
        answer, dropped_after = b"", None
        while time.monotonic() - t0 < 6:
            try:
                s.sendall(b" ")      # the JSON stays incomplete: more could always come
                answer += s.recv(4096)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                pass
            dropped_after = time.monotonic() - t0
            break
        s.close()
        assert dropped_after is not None, "a trickling client held its handshake for 6 s"
        assert 0.9 <= dropped_after < 2.5, dropped_after
        doc = json.loads(answer.decode().splitlines()[0])
        assert doc["ok"] is False and "not complete within 1 s" in doc["error"], doc
        assert srv.refused == 1 and srv._handshakes.acquire(blocking=False)
        srv._handshakes.release()


@pytest.mark.core(reason="Region(server=...) in the server's own process needs the core")
def test_same_process_client(tmp_path, sock, run_py):
    """A Region served by a server in its own process: the python engine would deadlock on the
    GIL (the faulting thread holds it, the engine needs it), so that client is refused with
    the reason; the native engine needs no GIL and serves it."""
    path, _ = memory_file(tmp_path, 64)
    res = run_py("""
srv = plm.PageServer(sys.argv[1], memory_file=sys.argv[2], engine="python").start()
try:
    r = plm.Region(64 * PS, server=sys.argv[1])
    print("NOT REFUSED", flush=True)
    bytes(memoryview(r)[:PS])     # the deadlock this refusal prevents (run_py's timeout)
except plm.ProtocolError as e:
    print("REFUSED:", e)
srv.stop()
srv = plm.PageServer(sys.argv[1], memory_file=sys.argv[2], engine="c").start()
r = plm.Region(64 * PS, server=sys.argv[1])
assert r.server["engine"] == "c" and r.server["server_pid"] == os.getpid()
assert bytes(memoryview(r)) == open(sys.argv[2], "rb").read()
r.close()
st = srv.stats()
srv.stop()
assert st["faults"] >= 1 and st["errors"] == 0, st
print("C OK")
""", args=(sock, str(path)), timeout=30)
    assert res.returncode == 0, res.describe()
    assert "NOT REFUSED" not in res.stdout and "REFUSED:" in res.stdout, res.describe()
    assert "own process" in res.stdout and "GIL" in res.stdout, res.stdout
    assert "C OK" in res.stdout


def test_removed_pages_are_intervals():
    """The python engine's removed pages: merged intervals, whatever the order of removals."""
    from pylazymem.server import _Intervals
    iv = _Intervals()
    iv.add(10, 20)
    iv.add(30, 40)
    iv.add(0, 5)
    assert len(iv) == 3 and 10 in iv and 19 in iv and 20 not in iv and 25 not in iv
    iv.add(20, 30)                      # touches both neighbours: one interval
    assert len(iv) == 2 and all(p in iv for p in range(10, 40)) and 40 not in iv
    iv.add(3, 1 << 40)                  # swallows everything after 3
    assert len(iv) == 1 and 0 in iv and (1 << 40) - 1 in iv and 1 << 40 not in iv
    iv.add(7, 7)
    assert len(iv) == 1


@pytest.mark.parametrize("engine", _engines())
def test_remove_huge_range_is_cheap(tmp_path, sock, engine, run_py):
    """A balloon removing 8 GiB (2**21 pages) of a MAP_NORESERVE range costs the server no
    memory per page (the python engine once kept a set of page numbers: hundreds of MB here,
    minutes for a TiB); faults in the removed range read zeros, the rest the file."""
    import tracemalloc
    path, data = memory_file(tmp_path, 16, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        tracemalloc.start()
        try:
            res = run_py(client_code("""
import time
size = 8 << 30
m = ServedMemory(sys.argv[1], [size], [0], noreserve=True)
want = open(sys.argv[2], "rb").read()
assert m.maps[0][:16 * PS] == want
t0 = time.monotonic()
m.remove(0, PS, size - 2 * PS)                # all but the first and the last page
for off in (PS, 5 * PS, size // 2, size - 2 * PS):
    assert m.maps[0][off:off + PS] == bytes(PS), off
assert m.maps[0][:PS] == want[:PS]
print("OK %.3f" % (time.monotonic() - t0))
"""), args=(sock, str(path)), prelude=False, timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert res.returncode == 0, res.describe()
        assert float(res.stdout.split()[1]) < 10, res.stdout
        assert peak < 16 << 20, "the server allocated %d bytes of Python objects" % peak
        st = srv.stats()
        assert st["events_remove"] == 1 and st["removed_faults"] == 4 and st["errors"] == 0, st


@pytest.mark.core(reason="the native engine's shared page table")
def test_clients_share_one_page_table(tmp_path, sock):
    """Six clients of one snapshot server hold references to one page table: the memory of
    the tables alive in this process is one table's, not six; every client reads its bytes
    right; the table is freed with the server."""
    import subprocess
    import sys
    from pylazymem._binding import lib
    npages = 512
    path, data = memory_file(tmp_path, npages)
    snap = _snapshot_of_file(tmp_path, path, npages)
    before = lib.lm_srv_table_bytes_live()
    body = """
m = ServedMemory(sys.argv[1], [128 * PS], [int(sys.argv[3]) * PS])
want = open(sys.argv[2], "rb").read()[int(sys.argv[3]) * PS:][:128 * PS]
bad = first_mismatch(m.maps[0][:], want)
print("OK" if bad is None else "BAD %s" % bad, flush=True)
sys.stdin.read()      # hold the connection until the test lets go
"""
    with PageServer(sock, snapshot=snap, engine="c") as srv:
        assert lib.lm_srv_table_bytes_live() - before == npages * 8
        holders = [subprocess.Popen([sys.executable, "-c", client_code(body), sock, str(path),
                                     str(k * 64)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True) for k in range(6)]
        try:
            for h in holders:
                assert h.stdout.readline().strip() == "OK"
            st = srv.stats()
            assert st["clients_alive"] == 6 and st["page_table_refs"] == 7, st
            assert st["page_table_bytes"] == npages * 8
            assert lib.lm_srv_table_bytes_live() - before == npages * 8, \
                "the page table was copied per client"
        finally:
            for h in holders:
                h.stdin.close()
                h.wait(30)
    assert lib.lm_srv_table_bytes_live() == before


def test_peer_pidfd(tmp_path):
    """peer_pidfd(): a close-on-exec pidfd of the process that connected (SO_PEERPIDFD, or
    pidfd_open of the SO_PEERCRED pid where the kernel lacks it), readable once it exits."""
    import errno
    import fcntl
    import select
    import subprocess
    import sys
    from pylazymem._protocol import SO_PEERPIDFD, peer_pidfd

    def pid_of(fd):
        with open("/proc/self/fdinfo/%d" % fd) as f:
            return int(next(x for x in f if x.startswith("Pid:")).split()[1])

    class OldKernel:
        """A socket whose kernel has no SO_PEERPIDFD."""
        def __init__(self, s):
            self.s = s

        def getsockopt(self, level, opt, size):
            if opt == SO_PEERPIDFD:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")
            return self.s.getsockopt(level, opt, size)

    path = str(tmp_path / "p.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    child = subprocess.Popen([sys.executable, "-c", "import socket, sys\n"
                              "s = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
                              "sys.stdin.read()\n", path], stdin=subprocess.PIPE)
    conn, _ = lsock.accept()
    fds = []
    try:
        for sock_like in (conn, OldKernel(conn)):
            fd = peer_pidfd(sock_like)
            fds.append(fd)
            assert pid_of(fd) == child.pid
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert not select.select([fd], [], [], 0)[0]
        child.stdin.close()
        child.wait(10)
        for fd in fds:
            assert select.select([fd], [], [], 10)[0], "the pidfd did not see the exit"
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()
        lsock.close()
        if child.poll() is None:
            child.kill()


def test_handshake_from_other_process_than_connected_refused(tmp_path, sock, run_py):
    """The client is the process that connected: its pidfd is taken at accept. A connection
    handed to another process after the connecting one exited is refused with the reason;
    the server never looks its pid up later (when it may name another process)."""
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path) as srv:
        res = run_py(client_code("""
import json, mmap, os, socket, time
from pylazymem import uffd as U
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
time.sleep(0.5)                       # accepted by now
parent = os.getpid()
if os.fork():
    os._exit(0)                       # the connecting process exits
while os.getppid() == parent:
    time.sleep(0.01)
u = U.open_userfaultfd()
u.api()
m = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
u.register(U.address_of(m), 4 * PS)
socket.send_fds(s, [json.dumps([{"base_host_virt_addr": U.address_of(m), "size": 4 * PS,
                                 "offset": 0, "page_size": PS}]).encode()], [u.fileno()])
print(s.makefile().readline().strip(), flush=True)
os._exit(0)
"""), args=(sock,), prelude=False, timeout=30)
        assert res.stdout.strip(), res.describe()
        answer = json.loads(res.stdout.strip().splitlines()[-1])
        assert answer["ok"] is False and "has exited" in answer["error"], res.describe()
        assert srv.refused == 1 and srv.clients == []


WP_CLIENT = """
import ctypes, threading, time
from pylazymem import uffd as U
m = ServedMemory(sys.argv[1], [8 * PS], [0], wp=True,
                 features=U.Feature.EVENT_REMOVE | U.Feature.PAGEFAULT_FLAG_WP)
want = open(sys.argv[2], "rb").read()
assert m.maps[0][:PS] == want[:PS]          # a missing fault: served
addr = U.address_of(m.maps[0])
m.uffd.writeprotect(addr, PS, wp=True)
libc = ctypes.CDLL(None)
# A write to the protected page: a write-protect fault, which goes to the server. From a
# thread, through libc (no GIL held while it waits).
w = threading.Thread(target=libc.memset, args=(ctypes.c_void_p(addr), 1, 1), daemon=True)
w.start()
w.join(3)
print("WRITER", "blocked" if w.is_alive() else "done", flush=True)
print("touching", flush=True)
m.maps[0][3 * PS]                            # missing: poisoned once serving stopped
print("READ")
"""


@pytest.mark.parametrize("engine", _engines())
def test_write_protect_fault_stops_serving_loudly(tmp_path, sock, engine, run_py):
    """A client that registered WP with the uffd it sent and writes a protected page: the
    server serves MISSING only. No busy loop (a COPY of a present page gets EEXIST, its wake
    makes the thread fault again, forever): the serving stops with EOPNOTSUPP, counted and
    logged, and the client's missing pages fail loudly."""
    import time
    path, _ = memory_file(tmp_path, 8, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code(WP_CLIENT), args=(sock, str(path)), prelude=False, timeout=30)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert "WRITER blocked" in res.stdout and "READ" not in res.stdout, res.describe()
        deadline = time.monotonic() + 5
        while srv.clients and time.monotonic() < deadline:
            time.sleep(0.05)
        st = srv.stats()
        assert st["unsupported_faults"] == 1 and st["died"] == -errno.EOPNOTSUPP, st
        assert st["engines_died"] == 1
        assert st["faults"] <= 2, st   # the first page (plus nothing spinning)


@pytest.mark.parametrize("engine", _engines())
def test_engine_death_poisons_client(tmp_path, sock, engine, run_py):
    """A serving thread that dies from an unexpected error (injected after 3 faults) does not
    leave its client waiting: its missing pages are poisoned (SIGBUS), the error recorded."""
    import time
    path, data = memory_file(tmp_path, 32, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine,
                    _test_inject={"fail_after": 3}) as srv:
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [32 * PS], [0])
want = open(sys.argv[2], "rb").read()
for p in (31, 20, 9):                # no sequential stream: one page per fault
    assert m.maps[0][p * PS:(p + 1) * PS] == want[p * PS:(p + 1) * PS], p
print("touching", flush=True)
m.maps[0][15 * PS]
print("READ")
"""), args=(sock, str(path)), prelude=False, timeout=30)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert "touching" in res.stdout and "READ" not in res.stdout
        deadline = time.monotonic() + 5
        while srv.clients and time.monotonic() < deadline:
            time.sleep(0.05)
        st = srv.stats()
        assert st["died"] == -errno.EIO and st["engines_died"] == 1 and st["faults"] == 3, st


@pytest.mark.core(reason="Region(server=...) needs the core")
@pytest.mark.parametrize("engine", _engines())
def test_engine_death_watching_client_takes_over(tmp_path, sock, engine, run_py):
    """A client that watches the server (a Region) is told at once when its serving thread
    dies (the connection is shut down): the region serves itself ("lost"); its pages only the
    server knew fail loudly, none hangs, none reads zeros."""
    path, data = memory_file(tmp_path, 32, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine, _test_inject={"fail_after": 2}):
        res = run_py("""
r = plm.Region(32 * PS, server=sys.argv[1])
want = open(sys.argv[2], "rb").read()
mv = memoryview(r)
for p in (31, 20):
    assert bytes(mv[p * PS:(p + 1) * PS]) == want[p * PS:(p + 1) * PS], p
deadline = time.monotonic() + 10
while r.remote != "lost" and time.monotonic() < deadline:
    time.sleep(0.01)
print("REMOTE", r.remote, flush=True)
bytes(mv[5 * PS:6 * PS])
print("READ")
""", args=(sock, str(path)), timeout=30)
        assert "REMOTE lost" in res.stdout, res.describe()
        assert res.returncode == -signal.SIGBUS and "READ" not in res.stdout, res.describe()


def test_python_engine_thread_start_failure(tmp_path, sock, monkeypatch, run_py):
    """The python engine's thread fails to start: the client is refused with the reason and
    its uffd is closed exactly once (an engine object left behind used to close the fd
    number again when collected, by then another file's)."""
    import gc
    import threading
    real_start = threading.Thread.start

    def start(self):
        if self.name.startswith("pylazymem-serve-"):
            raise RuntimeError("can't start new thread (injected)")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    path, _ = memory_file(tmp_path, 4)
    srv = PageServer(sock, memory_file=path, engine="python").start()
    res = run_py(client_code("""
try:
    ServedMemory(sys.argv[1], [4 * PS], [0])
except Exception as e:
    print(type(e).__name__, e)
"""), args=(sock,), prelude=False, timeout=30)
    assert res.stdout.startswith("ProtocolError") and "can't start new thread" in res.stdout, \
        res.describe()
    assert srv.refused == 1 and srv.clients == [] and not srv._engines
    srv.stop()
    # The numbers freed by the refused client are now other files': nothing may close them.
    sentinels = [fd for _ in range(16) for fd in os.pipe()]
    try:
        del srv
        gc.collect()
        for fd in sentinels:
            os.fstat(fd)      # EBADF if a stale owner closed it
    finally:
        for fd in sentinels:
            os.close(fd)


@pytest.mark.core(reason="the native engine's fault queue")
def test_fault_queue_full_never_drops_a_fault(tmp_path, sock, run_py):
    """The native engine's fault queue cannot grow (test hook: at most 1 message, as if
    malloc failed): faults it cannot keep are handed back to the kernel (their threads woken
    to fault again), never dropped. 16 threads fault concurrently, every one finishes with
    the right bytes. The queue fills only when two faults are pending at once, which the
    scheduler decides: the client runs again (a new process each time, every run checked)
    until it has, at most 5 times."""
    npages = 256
    path, data = memory_file(tmp_path, npages)
    with PageServer(sock, memory_file=path, engine="c", _test_inject={"queue_cap": 1}) as srv:
        code = client_code("""
import ctypes, random, threading
m = ServedMemory(sys.argv[1], [256 * PS], [0])
want = open(sys.argv[2], "rb").read()
from pylazymem import uffd as U
addr = U.address_of(m.maps[0])
libc = ctypes.CDLL(None)
libc.memcpy.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
bad = []

def worker(k):
    buf = ctypes.create_string_buffer(PS)
    pages = list(range(k, 256, 16))
    random.Random(k).shuffle(pages)
    for p in pages:
        libc.memcpy(buf, addr + p * PS, PS)      # faults without the GIL held
        if buf.raw != want[p * PS:(p + 1) * PS]:
            bad.append(p)

ts = [threading.Thread(target=worker, args=(k,)) for k in range(16)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print("BAD", bad) if bad else print("OK")
""")
        for run in range(5):
            res = run_py(code, args=(sock, str(path)), prelude=False, timeout=60)
            assert res.returncode == 0 and res.stdout.strip() == "OK", res.describe()
            st = srv.stats()
            assert st["errors"] == 0 and st["poisoned"] == 0, st
            if st["redelivered"]:
                break
        assert st["redelivered"] > 0, "the queue never filled in 5 runs: nothing was tested"


@pytest.mark.core(reason="calls lm_srv_start of the compiled core")
def test_srv_start_checks_its_arguments():
    """lm_srv_start checks its inputs itself (not only the Python caller): -EINVAL and the
    reason in lm_last_op, nothing started, nothing taken."""
    from pylazymem._binding import ffi, lib
    null = os.open("/dev/null", os.O_RDONLY)
    table = ffi.new("struct lm_srv_table **")
    assert lib.lm_srv_table_new(ffi.new("int64_t[]", [0, -1, PS, 2 * PS]), 4, table) == 0
    try:
        def start(maps, nmaps=None, ps=PS, uffd=null, src=null, tab=ffi.NULL, cluster=0,
                  flags=0, pidfd=-1, out=True):
            arr = ffi.new("struct lm_srv_map[]", max(1, len(maps)))
            for i, (b, s, o) in enumerate(maps):
                arr[i].base, arr[i].size, arr[i].offset = b, s, o
            o = ffi.new("struct lm_srv **") if out else ffi.NULL
            rc = lib.lm_srv_start(uffd, pidfd, flags, arr, len(maps) if nmaps is None else nmaps,
                                  ps, src, tab, ffi.NULL, cluster, o)
            assert not out or o[0] == ffi.NULL
            return rc, ffi.string(lib.lm_last_op()).decode()

        ok = [(1 << 30, 4 * PS, 0)]
        cases = [
            (dict(maps=ok, nmaps=0), "1 to 64"),
            (dict(maps=ok, nmaps=65), "1 to 64"),
            (dict(maps=ok, ps=0), "page_size"),
            (dict(maps=ok, ps=PS + 1), "page_size"),
            (dict(maps=ok, ps=PS * 2), "page_size"),
            (dict(maps=[(1 << 30, PS + 1, 0)]), "page aligned"),
            (dict(maps=[(1 << 30, 0, 0)]), "empty"),
            (dict(maps=[((1 << 64) - PS, 2 * PS, 0)]), "wraps"),
            (dict(maps=[(1 << 30, 2 * PS, (1 << 64) - PS)]), "wraps"),
            (dict(maps=[(1 << 30, 4 * PS, 0), ((1 << 30) + 2 * PS, 4 * PS, 0)]), "overlap"),
            (dict(maps=[(1 << 30, 8 * PS, 0)], tab=table[0]), "past the end of the page table"),
            (dict(maps=[(1 << 30, 2 * PS, 3 * PS)], tab=table[0]), "past the end"),
            (dict(maps=ok, cluster=4097), "max_cluster"),
            (dict(maps=ok, flags=2), "flags"),
            (dict(maps=ok, uffd=-1), "fds"),
            (dict(maps=ok, src=-1), "fds"),
            (dict(maps=ok, pidfd=-2), "fds"),
            (dict(maps=ok, out=False), "out is NULL"),
        ]
        for kw, why in cases:
            rc, op = start(**kw)
            assert rc == -errno.EINVAL and why in op, (kw, rc, op)
        assert lib.lm_srv_table_refs(table[0]) == 1      # no failed start kept a reference
        t2 = ffi.new("struct lm_srv_table **")
        assert lib.lm_srv_table_new(ffi.new("int64_t[]", [0, -2]), 2, t2) == -errno.EINVAL
        assert "below -1" in ffi.string(lib.lm_last_op()).decode() and t2[0] == ffi.NULL
    finally:
        lib.lm_srv_table_release(table[0])
        os.close(null)


def test_protocol_module_is_a_leaf():
    """pylazymem._protocol imports only the standard library and _uffd_errors (region,
    server and snapshot can all import it without a cycle); server.py re-exports its names."""
    import ast
    import sys
    import pylazymem._protocol as proto
    import pylazymem.server as server
    tree = ast.parse(open(proto.__file__).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module == "_uffd_errors", node.module
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for n in names:
                assert n.split(".")[0] in sys.stdlib_module_names, n
    for name in ("ProtocolError", "connect", "peer_pid", "peer_pidfd", "parse_mappings",
                 "Mapping"):
        assert getattr(server, name) is getattr(proto, name)
    assert plm.ProtocolError is proto.ProtocolError


@pytest.mark.core(reason="Region(server=...) needs the compiled core")
@pytest.mark.parametrize("engine", _engines())
def test_server_lost_materialize_and_checkpoint_never_zeros(tmp_path, sock, engine, run_py):
    """Issue 10, case 5: after the page server of a Region(server=...) was lost, materialize()
    zero-filled and checkpoint() recorded as untouched the pages only the server had: silent
    zeros. Now those pages are POISONED at the loss: materialize() and checkpoint() raise
    PoisonedPageError naming them, and the pages received before the loss stay right."""
    path, data = memory_file(tmp_path, 64)
    srv = start_server(sock, "--memory-file", str(path), engine=engine)
    try:
        res = run_py("""
want = open(sys.argv[2], "rb").read()
r = plm.Region(64 * PS, server=sys.argv[1])
mv = memoryview(r)
got = bytes(mv[:8 * PS])                      # pages 0..7 received from the server
print("RECEIVED", got == want[:8 * PS], flush=True)
os.kill(int(sys.argv[3]), 9)
deadline = time.monotonic() + 20
while r.remote != "lost" and time.monotonic() < deadline:
    time.sleep(0.01)
out = {"remote": r.remote}
for name, fn in (("materialize", lambda: r.materialize()),
                 ("checkpoint", lambda: plm.checkpoint(r, sys.argv[4]))):
    try:
        fn()
        out[name] = "returned"
    except plm.PoisonedPageError as e:
        out[name] = sorted(int(p) for p in e.pages)
out["kept"] = bytes(mv[:8 * PS]) == want[:8 * PS]
out["exists"] = os.path.exists(sys.argv[4])
print(json.dumps(out), flush=True)
""", args=(sock, str(path), str(srv.pid), str(tmp_path / "s.plm")), timeout=90)
    finally:
        srv.kill()
        srv.wait()
    assert res.returncode == 0, res.describe()
    assert "RECEIVED True" in res.stdout, res.describe()
    m = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
    assert m["remote"] == "lost", m
    # the pages the server had not sent (its readahead may have sent some past page 7)
    lost = m["materialize"]
    assert isinstance(lost, list) and lost == m["checkpoint"], m
    assert lost and min(lost) >= 8 and 63 in lost, m
    assert m["kept"] and not m["exists"], m


# ---- found by a review (session 14) ------------------------------------------------------------

@pytest.mark.core(reason="Region and restore need the compiled core")
def test_a_snapshot_written_over_in_place_is_not_served_with_the_old_layout(tmp_path, sock):
    # `cp new.plm state.plm` keeps the inode: the client accepted the server (same device and
    # inode) and was served the old page table over the new bytes (zeros, wrong pages).
    import shutil
    snap, other = str(tmp_path / "s.plm"), str(tmp_path / "t.plm")
    rng = np.random.default_rng(3)
    for path, zero in ((snap, True), (other, False)):
        with plm.Region(16 * PS) as r:
            data = rng.integers(0, 256, 16 * PS, dtype=np.uint8)
            if zero:
                data[:8 * PS] = 0
            np.frombuffer(memoryview(r), np.uint8)[:] = data
            plm.checkpoint(r, path)
    with PageServer(sock, snapshot=snap, engine="c"):
        ino = os.stat(snap).st_ino
        shutil.copyfile(other, snap)                       # in place
        assert os.stat(snap).st_ino == ino
        with pytest.raises((ProtocolError, plm.SnapshotError), match="written over"):
            plm.restore(snap, server=sock, prefetch="none")


@pytest.mark.core(reason="Region and save need the compiled core")
def test_connecting_to_no_server_names_the_socket(tmp_path):
    snap = str(tmp_path / "s.plm")
    with plm.Region(4 * PS) as r:
        plm.checkpoint(r, snap)
    missing = str(tmp_path / "none.sock")
    with pytest.raises(FileNotFoundError, match="none.sock.*not running"):
        plm.restore(snap, server=missing, prefetch="none")
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()                                              # a socket file nobody listens on
    with pytest.raises(ConnectionRefusedError, match="stale.sock.*nobody listens"):
        plm.restore(snap, server=stale, prefetch="none")


@pytest.mark.core(reason="engine c needs the compiled core")
def test_a_client_arriving_while_every_handshake_slot_is_taken_is_served_later(tmp_path, sock,
                                                                              run_py):
    # Sixteen connections that send nothing hold every handshake slot. The server accepted the
    # next one only to turn it away unread: its userfaultfd was thrown away with the message,
    # and a client that does not read the answer (Firecracker) waited for its faults forever.
    # It now waits in the listen backlog until a slot is free (the idle ones time out).
    path, data = memory_file(tmp_path, 8)
    with PageServer(sock, memory_file=path, engine="c", handshake_timeout=1.0):
        idle = []
        for _ in range(16):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(sock)
            idle.append(c)
        try:
            res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [8 * PS], [0])
assert m.maps[0][:] == open(sys.argv[2], "rb").read()
print("OK")
"""), args=(sock, str(path)), prelude=False, timeout=60)
        finally:
            for c in idle:
                c.close()
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()


# ---- found by a review (session 18) ------------------------------------------------------------

MREMAP = """
import ctypes
from pylazymem import uffd as U
libc = ctypes.CDLL(None, use_errno=True)
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p)
libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
want = open(sys.argv[2], "rb").read()
# B: 8 pages from source page 16 (first in the handshake), A: 4 pages from source page 0
m = ServedMemory(sys.argv[1], [8 * PS, 4 * PS], [16 * PS, 0],
                 features=U.Feature.EVENT_REMOVE | U.Feature.EVENT_REMAP)
b, a = (U.address_of(x) for x in m.maps)
"""


@pytest.mark.parametrize("engine", _engines())
def test_partial_mremap_onto_another_range_is_poisoned_not_served_its_bytes(tmp_path, sock,
                                                                           engine, run_py):
    # Part of range A moved onto range B (MREMAP_MAYMOVE | MREMAP_FIXED): a fault there was
    # served with B's source bytes (only a whole move disabled what it landed on).
    path, data = memory_file(tmp_path, 32, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code(MREMAP + """
assert libc.mremap(a, 2 * PS, 2 * PS, 3, b) == b
assert ctypes.string_at(b + 2 * PS, PS) == want[18 * PS:19 * PS]   # still B's own page
assert ctypes.string_at(a + 2 * PS, PS) == want[2 * PS:3 * PS]     # what stayed of A
assert libc.madvise(b + PS, PS, 4) == 0   # MADV_DONTNEED of a moved page: zeros from now on,
assert ctypes.string_at(b + PS, PS) == bytes(PS)   # the kernel's semantics of a dropped page
print("touching", flush=True)
ctypes.string_at(b, PS)   # A's page 0 now, never served: poisoned, never B's bytes
print("READ")
"""), args=(sock, str(path)), prelude=False, timeout=60)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert "touching" in res.stdout and "READ" not in res.stdout, res.describe()
        st = srv.stats()
        assert st["events_remap"] == 1 and st["poisoned"] >= 1


@pytest.mark.parametrize("engine", _engines())
def test_whole_range_moved_over_part_of_another_serves_both(tmp_path, sock, engine, run_py):
    # A whole range moved onto the middle of another: the moved one is served where it lies,
    # and the other range's pages it did not cover are still that range's (they were
    # disabled with it, poisoned).
    path, data = memory_file(tmp_path, 32, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code(MREMAP + """
assert libc.mremap(a, 4 * PS, 4 * PS, 3, b + 2 * PS) == b + 2 * PS
for k in range(4):   # A's pages where B's 2..5 were
    assert ctypes.string_at(b + (2 + k) * PS, PS) == want[k * PS:(k + 1) * PS], k
for k in (0, 1, 6, 7):   # B's own
    assert ctypes.string_at(b + k * PS, PS) == want[(16 + k) * PS:(17 + k) * PS], k
print("OK")
"""), args=(sock, str(path)), prelude=False, timeout=60)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        st = srv.stats()
        assert st["events_remap"] == 1 and st["poisoned"] == 0 and st["errors"] == 0


@pytest.mark.uffd_fork
@pytest.mark.parametrize("engine", _engines())
def test_forked_child_of_a_client_fails_loudly_instead_of_reading_zeros(tmp_path, sock,
                                                                       engine, run_py):
    # A client that asks for fork events: the server closed the child's uffd unpoisoned, and
    # the child read zeros where the source has data.
    path, data = memory_file(tmp_path, 4, zero_every=1000)
    with PageServer(sock, memory_file=path, engine=engine) as srv:
        res = run_py(client_code("""
import os
from pylazymem import uffd as U
want = open(sys.argv[2], "rb").read()
m = ServedMemory(sys.argv[1], [4 * PS], [0],
                 features=U.Feature.EVENT_FORK | U.Feature.EVENT_REMOVE)
assert m.maps[0][:PS] == want[:PS]   # served before the fork: the child has it
pid = os.fork()
if pid == 0:
    try:
        ok = m.maps[0][:PS] == want[:PS]
        m.maps[0][PS]   # never served: poisoned in the child
        os._exit(0 if ok else 3)
    finally:
        os._exit(4)
_, st = os.waitpid(pid, 0)
print("child", os.WTERMSIG(st) if os.WIFSIGNALED(st) else "exit %d" % os.WEXITSTATUS(st))
assert m.maps[0][PS:] == want[PS:]   # the parent is still served
print("OK")
"""), args=(sock, str(path)), prelude=False, timeout=60)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        assert "child %d" % signal.SIGBUS in res.stdout, res.describe()
        assert srv.stats()["errors"] >= 1   # counted: forked children are not served


def test_out_of_fds_the_accept_loop_waits_instead_of_spinning(tmp_path, sock, run_py):
    # accept() failing with EMFILE: the socket stays readable and the loop spun a CPU,
    # logging each turn; the connection now waits in the backlog and is served once fds
    # are free again.
    path, data = memory_file(tmp_path, 4)
    res = run_py(client_code("""
import logging, os, resource, subprocess, time
from pylazymem.server import PageServer
logged = []
class H(logging.Handler):
    def emit(self, rec):
        logged.append(rec.getMessage())
lg = logging.getLogger("pylazymem.server")
lg.addHandler(H())
lg.propagate = False
go_r, go_w = os.pipe()
client = subprocess.Popen([sys.executable, "-c", '''
import os, sys
sys.path.insert(0, sys.argv[3])
from _server_client import ServedMemory, PS
os.read(int(sys.argv[4]), 1)
m = ServedMemory(sys.argv[1], [4 * PS], [0], timeout=60)
assert m.maps[0][:] == open(sys.argv[2], "rb").read()
print("SERVED", flush=True)
''', sys.argv[1], sys.argv[2], sys.path[0], str(go_r)], pass_fds=[go_r])
srv = PageServer(sys.argv[1], memory_file=sys.argv[2], engine="python").start()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
os.write(go_w, b"x")   # the client connects now
for _ in range(2000):
    if any(m.startswith("accept") for m in logged):
        break
    time.sleep(0.01)
time.sleep(1)   # a while out of fds
n = sum(m.startswith("accept") for m in logged)
for fd in hog:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print("accept lines", n, flush=True)
assert client.wait(60) == 0
srv.stop()
print("OK", srv.stats()["clients"])
"""), args=(sock, str(path)), prelude=False, timeout=120)
    assert res.returncode == 0 and "OK 1" in res.stdout, res.describe()
    n = int(res.stdout.split("accept lines")[1].split()[0])
    assert 1 <= n <= 2, res.describe()


def test_max_clients_is_fitted_to_the_file_descriptor_limit(tmp_path, sock, run_py):
    # Each client holds ~5 fds: under the common soft limit of 1024 about 200 clients were
    # served, and later ones hung at their first fault (their uffd dropped by the kernel).
    path, data = memory_file(tmp_path, 4)
    res = run_py(client_code("""
import logging, resource
from pylazymem.server import PageServer, FDS_PER_CLIENT
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
need = 300 * FDS_PER_CLIENT + 500
assert hard == resource.RLIM_INFINITY or hard >= need, "the hard limit is too low here"
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
with PageServer(sys.argv[1], memory_file=sys.argv[2], max_clients=256) as srv:
    print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0], "max_clients", srv.max_clients)
resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))
with PageServer(sys.argv[1], memory_file=sys.argv[2], max_clients=256) as srv:
    print("capped", srv.max_clients)
"""), args=(sock, str(path)), prelude=False)
    assert res.returncode == 0, res.describe()
    soft, max_clients = (int(x) for x in res.stdout.split("soft ")[1].split()[::2][:2])
    from pylazymem.server import FDS_PER_CLIENT
    assert max_clients == 256 and soft >= 256 * FDS_PER_CLIENT, res.describe()
    capped = int(res.stdout.split("capped ")[1].split()[0])
    assert 1 <= capped < 300 // FDS_PER_CLIENT, res.describe()
    assert "max_clients lowered from 256 to %d" % capped in res.stdout, res.describe()


def test_fds_lost_for_want_of_descriptors_are_named(run_py):
    # MSG_CTRUNC with room for more fds: the kernel could not install one (EMFILE), not a
    # client sending too many.
    res = run_py("""
import os, resource, socket, time
from pylazymem._protocol import receive_handshake, ProtocolError
a, b = socket.socketpair()
r, w = os.pipe()
socket.send_fds(a, [b'[{"size": 1}]'], [r])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    receive_handshake(b, time.monotonic() + 10)
except ProtocolError as e:
    print("EMFILE:", e)
for fd in hog:
    os.close(fd)
socket.send_fds(a, [b'[{"size": 1}]'], [r] * 5)
try:
    receive_handshake(b, time.monotonic() + 10)
except ProtocolError as e:
    print("FIVE:", e)
""", prelude=False)
    assert res.returncode == 0, res.describe()
    assert "EMFILE: handshake truncated: out of file descriptors" in res.stdout, res.describe()
    assert "FIVE: handshake truncated: more than 4 fds" in res.stdout, res.describe()


RAW_CLIENT = """
import json, mmap, socket, time
from pylazymem import uffd as U
u = U.open_userfaultfd()
u.api(U.Feature.EVENT_REMOVE)
m = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
u.register(U.address_of(m), 4 * PS)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
msg = json.dumps([{"base_host_virt_addr": U.address_of(m), "size": 4 * PS, "offset": 0,
                   "page_size": PS, "extra": 0}]).encode()
"""


def test_refused_for_want_of_a_pidfd_still_poisons(tmp_path, sock, monkeypatch, run_py):
    # peer_pidfd() failing at accept (EMFILE): the connection was refused unread, its
    # userfaultfd thrown away, and a client that does not read the answer hung at its first
    # fault. The handshake is now read, the ranges poisoned, the refusal says why.
    import pylazymem.server as server
    path, _ = memory_file(tmp_path, 4)

    def no_pidfd(conn):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(server, "peer_pidfd", no_pidfd)
    with PageServer(sock, memory_file=path) as srv:
        res = run_py(client_code(RAW_CLIENT + """
socket.send_fds(s, [msg], [u.fileno()])
s.settimeout(20)
print(s.makefile().readline().strip(), flush=True)
m[0]
print("READ")
"""), args=(sock,), prelude=False, timeout=60)
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert "out of file descriptors" in res.stdout and "READ" not in res.stdout
        assert srv.refused == 1


@pytest.mark.parametrize("extra, why", [
    (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
    (b"9" * 5000, "an integer of 5000 digits"),
], ids=["deep", "long-int"])
def test_hostile_json_is_refused_cleanly_and_poisoned(tmp_path, sock, extra, why, run_py):
    # An integer past Python's 4300-digit limit or JSON nested thousands deep raised from
    # the parser: the refusal said "maximum recursion depth..." or "Exceeds the limit", the
    # fd stayed open and the client, not poisoned, hung at its first fault.
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path) as srv:
        res = run_py(client_code(RAW_CLIENT + """
msg = msg.replace(b'"extra": 0', b'"extra": ' + sys.argv[2].encode())
socket.send_fds(s, [msg], [u.fileno()])
s.settimeout(20)
print(s.makefile().readline().strip(), flush=True)
m[0]
print("READ")
"""), args=(sock, extra.decode()), prelude=False, timeout=60)
        assert res.returncode == -signal.SIGBUS, res.describe()
        answer = json.loads(res.stdout.splitlines()[0])
        assert answer["ok"] is False and why in answer["error"], answer
        assert srv.refused == 1


def test_start_after_stop_raises(tmp_path, sock):
    # start() after stop() bound a new socket, but the accept thread ended at once (its stop
    # pipe was closed): clients waited forever. Started, stopped, started: silence.
    path, _ = memory_file(tmp_path, 4)
    from pylazymem.server import ServerStoppedError
    srv = PageServer(sock, memory_file=path)
    srv.stop()
    with pytest.raises(ServerStoppedError, match="was stopped.*make a new PageServer"):
        srv.start()
    assert not os.path.exists(sock)
    srv = PageServer(sock, memory_file=path)
    with srv:
        pass
    with pytest.raises(ServerStoppedError):
        srv.start()
    assert not os.path.exists(sock)
    assert isinstance(ServerStoppedError("x"), (plm.LazyMemError, RuntimeError))


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_serve_stops_cleanly_on_sighup_and_sigquit(tmp_path, sock, sig):
    # `pylazymem serve` handled only SIGTERM and SIGINT: SIGHUP (the terminal gone) killed
    # it with its socket file left and a Firecracker-style client hung at its next fault.
    import subprocess
    import sys
    path, data = memory_file(tmp_path, 4, zero_every=1000)
    p = start_server(sock, "--memory-file", str(path))
    client = subprocess.Popen([sys.executable, "-c", client_code("""
m = ServedMemory(sys.argv[1], [4 * PS], [0])
assert m.maps[0][:PS] == open(sys.argv[2], "rb").read()[:PS]
print("served", flush=True)
sys.stdin.readline()
m.maps[0][2 * PS]
print("READ", flush=True)
"""), sock, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "served"
        p.send_signal(sig)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("the server did not stop on %s" % sig.name)
        assert p.returncode == 0, stop_server(p)
        assert not os.path.exists(sock)
        client.stdin.write("\n")
        client.stdin.close()
        assert client.wait(30) == -signal.SIGBUS   # poisoned at stop(), never a hang
    finally:
        if client.poll() is None:
            client.kill()
        if p.poll() is None:
            p.kill()


def _uffds_held():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink("/proc/self/fd/" + fd) == "anon_inode:[userfaultfd]"
        except OSError:
            pass
    return n


def test_a_handshake_past_its_deadline_leaks_no_userfaultfd(tmp_path, sock):
    # The `except TimeoutError` clause came before the one that takes the fds received: each
    # timed-out handshake that had sent its uffd left it open in the server.
    from pylazymem import uffd as U
    path, _ = memory_file(tmp_path, 4)
    with PageServer(sock, memory_file=path, handshake_timeout=0.5) as srv:
        before = _uffds_held()
        for _ in range(3):
            with U.open_userfaultfd() as u:
                u.api()
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                socket.send_fds(s, [b'[{"base_host_virt_addr": 4096, "size": 4096'],
                                [u.fileno()])
                s.settimeout(30)
                answer = json.loads(s.makefile().readline())   # after the refusal's cleanup
                s.close()
            assert "not complete within" in answer["error"], answer
        assert _uffds_held() == before
        assert srv.refused == 3


def _fds():
    return len(os.listdir("/proc/self/fd"))


def test_failed_constructors_and_starts_leak_nothing(tmp_path, sock):
    # max_clients was converted after the source and the stop pipe were opened (3 fds per
    # failed constructor); `with PageServer(...)` whose start() failed was never stopped (3
    # fds each); and the probe of a live server's socket counted as a client it refused.
    path, _ = memory_file(tmp_path, 4)
    before = _fds()
    for kw in ({"max_clients": "many"}, {"max_clients": None}, {"handshake_timeout": "soon"}):
        with pytest.raises(plm.InvalidArgumentError):
            PageServer(sock, memory_file=path, **kw)
    assert _fds() == before
    import time
    with PageServer(sock, memory_file=path) as live:
        before = _fds()
        for _ in range(5):
            with pytest.raises(FileExistsError, match="already listening"):
                with PageServer(sock, memory_file=path):
                    pass
        for _ in range(1000):   # the live server's handshake threads end (the probes closed)
            if not live._handshake_threads:
                break
            time.sleep(0.01)
        assert _fds() == before
        assert live.refused == 0


def test_bytes_paths(tmp_path, run_py):
    # A memory file given as bytes went into the answer's JSON, which failed after the client
    # had been admitted: counted served and refused at once, and the client was refused.
    path, data = memory_file(tmp_path, 4)
    sock = os.fsencode(str(tmp_path / "srv.sock"))
    with PageServer(sock, memory_file=os.fsencode(str(path))) as srv:
        assert srv.path == os.fsdecode(sock)
        res = run_py(client_code("""
m = ServedMemory(sys.argv[1], [4 * PS], [0])
assert m.answer["source"]["path"] == sys.argv[2]
assert m.maps[0][:] == open(sys.argv[2], "rb").read()
print("OK")
"""), args=(os.fsdecode(sock), str(path)), prelude=False)
        assert res.returncode == 0 and "OK" in res.stdout, res.describe()
        assert srv.stats()["clients"] == 1 and srv.refused == 0


@pytest.mark.parametrize("kw, why", [
    ({"handshake_timeout": float("inf")}, "handshake_timeout"),
    ({"handshake_timeout": float("nan")}, "handshake_timeout"),
    ({"handshake_timeout": 0}, "handshake_timeout"),
    ({"handshake_timeout": 10 ** 6}, "handshake_timeout"),
    ({"max_clients": 0}, "max_clients"),
    ({"max_clients": -5}, "max_clients"),
    ({"max_clients": True}, "max_clients"),
    ({"max_clients": 2.5}, "max_clients"),
])
def test_constructor_refuses_unusable_limits(tmp_path, sock, kw, why):
    # handshake_timeout=inf was accepted (every client then refused with "timestamp out of
    # range"), max_clients=0 or negative too.
    path, _ = memory_file(tmp_path, 4)
    with pytest.raises(plm.InvalidArgumentError, match=why):
        PageServer(sock, memory_file=path, **kw)


def test_socket_path_too_long_is_named(tmp_path):
    # bind() of a path over 107 bytes: "[Errno None] cannot create the socket ...: None".
    from pylazymem._protocol import connect
    path, _ = memory_file(tmp_path, 4)
    long = str(tmp_path / ("d" * 120) / "srv.sock")
    n = len(os.fsencode(long))
    with pytest.raises(plm.InvalidArgumentError,
                       match=r"AF_UNIX path too long \(%d bytes, at most 107\)" % n):
        PageServer(long, memory_file=path)
    with pytest.raises(OSError, match=r"AF_UNIX path too long \(%d bytes" % n) as e:
        connect(long, 0, [(4096, 4096, 0)])
    assert e.value.errno == errno.ENAMETOOLONG


@pytest.mark.core(reason="the native engine's shared page table")
def test_stats_while_stop_frees_the_table(tmp_path, sock):
    # stats() read the native table (and pool) without a lock while stop() freed them: a
    # monitoring thread (serve --stats-every) could read freed memory. stop() now waits.
    import threading
    path, _ = memory_file(tmp_path, 8)
    snap = _snapshot_of_file(tmp_path, path, 8)
    srv = PageServer(sock, snapshot=snap, engine="c").start()
    from pylazymem.server import _SRV_STAT_FIELDS
    entered, go = threading.Event(), threading.Event()

    class Held:
        """A client whose stats() holds stats() up until the test lets it go."""
        alive, watches_server = True, False   # alive: the accept loop's reaping passes it

        def stats(self):
            entered.set()
            go.wait(30)
            return dict.fromkeys(_SRV_STAT_FIELDS, 0)
    srv._clients.append(Held())
    got = {}
    reader = threading.Thread(target=lambda: got.update(srv.stats()))
    reader.start()
    assert entered.wait(30)
    with srv._lock:
        srv._clients.clear()   # stop() has no client to end; stats() holds its own list
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    stopper.join(0.5)   # without the lock, stop() frees the table now
    go.set()
    reader.join(30)
    stopper.join(30)
    assert not stopper.is_alive() and not reader.is_alive()
    assert got.get("page_table_refs", 0) >= 1, got
