"""plm.PageServer: serving other processes' userfaultfds over a Unix socket.

The server runs in this (pytest) process; clients are child processes (tests/_server_client.py)
that register private anonymous memory, send the uffd and read their memory, each under a
deadline. Both engines are exercised where they apply: "c" (native serving threads, file
sources) and "python" (a Python thread per client through the ctypes binding).
"""
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
