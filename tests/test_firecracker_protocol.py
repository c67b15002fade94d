"""`pylazymem serve` against a client that behaves exactly as Firecracker's VMM does.

tests/fc_client.c is a standalone C program (no pylazymem code) that creates guest memory, the
userfaultfd, the registration and the handshake message the way Firecracker's
guest_memory_from_uffd() does (docs/page-server.md, "Firecracker protocol"), then faults every
page from several threads and checks each byte against the memory file. So the server is
verified against the protocol, not only against pylazymem's own client.

Everything runs in subprocesses under timeouts: the client has its own alarm() deadline (exit
status 3 on a hang) and each subprocess a wall-clock limit besides.
"""
import contextlib
import fcntl
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, REPO_DIR, TESTS_DIR

# Firecracker's uffd is created without UFFD_USER_MODE_ONLY (KVM's accesses are kernel-mode):
# the client needs the full mode, as Firecracker does.
pytestmark = [pytest.mark.uffd_full, pytest.mark.timeout(300)]

# The native engine needs the compiled core: under the ctypes backend those cases are skipped
# as needing it (counted with the other core skips), the python engine runs under both.
ENGINES = [pytest.param("c", marks=pytest.mark.core(reason="engine c: native serving threads "
                                                           "of the compiled core")), "python"]

NPAGES = 2048              # an 8 MiB memory file
CLIENT_DEADLINE = 30       # fc_client --timeout: its own alarm() deadline, seconds
SUBPROCESS_TIMEOUT = 90    # the wall-clock limit of any one subprocess
READY_TIMEOUT = 30


# ------------------------------------------------------------------------------------------
# Fixtures: the client binary, a memory file, a running server
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fc_client(tmp_path_factory):
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to build tests/fc_client.c")
    exe = str(tmp_path_factory.mktemp("fc_client") / "fc_client")
    res = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-pthread", "-o", exe,
                          os.path.join(TESTS_DIR, "fc_client.c")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, "fc_client.c does not build:\n" + res.stderr
    return exe


@pytest.fixture(scope="module")
def memory_file(tmp_path_factory):
    """A Firecracker-style memory file: random pages, single zero pages, a zero run, and
    repeated pages (a server that mixes up offsets or serves zeros for data is caught)."""
    rng = np.random.default_rng(20261128)
    pages = rng.integers(0, 256, size=(NPAGES, PAGE_SIZE), dtype=np.uint8)
    pages[:, 0] |= 1                      # no random page is all zeros by chance
    pages[::7] = 0                        # scattered zero pages
    pages[300:364] = 0                    # a zero run
    pages[1500:1510] = pages[1400]        # the same bytes at several offsets
    path = str(tmp_path_factory.mktemp("fcmem") / "guest.mem")
    pages.tofile(path)
    return path


class Server:
    def __init__(self, proc, sock, engine, log_path):
        self.proc, self.sock, self.engine, self.log_path = proc, sock, engine, log_path
        self.stopped_by_test = False   # the test sent SIGTERM itself

    def stop(self):
        """SIGTERM; the server must exit with status 0 within 20 s and remove its socket."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 20s of SIGTERM\n" + self.log(),
                        pytrace=False)
        assert rc == 0, "SIGTERM: exit status %d\n%s" % (rc, self.log())
        assert not os.path.exists(self.sock), "the server left its socket behind"

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def assert_alive(self):
        assert self.proc.poll() is None, (
            "the server exited (status %s)\n--- server output ---\n%s"
            % (self.proc.returncode, self.log()))


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@contextlib.contextmanager
def serve(engine, source_args):
    """`python -m pylazymem serve --socket S <source_args> --engine E` for the duration of the
    block: it must print its ready line, keep its socket 0600, survive every client and stop
    with status 0 on SIGTERM, removing its socket."""
    if engine == "c" and getattr(plm, "backend", "cffi") != "cffi":
        pytest.skip("engine c needs the C core (backend %r)" % plm.backend)
    d = tempfile.mkdtemp(prefix="fcsrv", dir="/tmp")   # short: sun_path holds 108 bytes
    sock = os.path.join(d, "uffd.sock")
    log_path = os.path.join(d, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pylazymem", "serve", "--socket", sock, *source_args,
             "--engine", engine],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR, start_new_session=True)
    srv = Server(proc, sock, engine, log_path)
    try:
        want = "pylazymem serve: listening on %s (pid %d)\n" % (sock, proc.pid)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            with open(log_path) as f:
                first = f.readline()
            if first.endswith("\n"):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the server did not print its ready line within %ds (status %s)\n"
                            "--- server output ---\n%s"
                            % (READY_TIMEOUT, proc.poll(), srv.log()), pytrace=False)
            time.sleep(0.02)
        assert first == want, "ready line %r, expected %r" % (first, want)
        mode = os.stat(sock).st_mode
        assert oct(mode & 0o777) == oct(0o600), "socket mode %o, expected 0600" % (mode & 0o777)
        yield srv
        if not srv.stopped_by_test:
            srv.assert_alive()
            srv.stop()
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=ENGINES)
def server(request, memory_file):
    """A server of the memory file, one per engine, shared by the tests of this module."""
    with serve(request.param, ["--memory-file", memory_file]) as srv:
        yield srv


# ------------------------------------------------------------------------------------------
# Running the client
# ------------------------------------------------------------------------------------------
SUMMARY = re.compile(r"^fc_client: OK (.*)$", re.M)


def _client_cmd(exe, server, memory_file, args):
    return [exe, "--socket", server.sock, "--memory-file", memory_file,
            "--timeout", str(CLIENT_DEADLINE), *args]


def _summary(res_code, out, err, server, args):
    what = ("fc_client %s: exit status %s (2: wrong contents, 3: hang)\n--- stdout ---\n%s"
            "--- stderr ---\n%s--- server output (engine %s) ---\n%s"
            % (" ".join(args), res_code, out, err, server.engine, server.log()))
    assert res_code == 0, what
    m = SUMMARY.search(out)
    assert m, what
    return {k: (float(v) if re.fullmatch(r"[0-9.]+", v) else v)
            for k, v in (kv.split("=", 1) for kv in m.group(1).split())}


def run_client(exe, server, memory_file, *args):
    try:
        res = subprocess.run(_client_cmd(exe, server, memory_file, args), capture_output=True,
                             text=True, timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail("fc_client %s outlived its own deadline\n%s" % (" ".join(args), e),
                    pytrace=False)
    return _summary(res.returncode, res.stdout, res.stderr, server, args)


def start_client(exe, server, memory_file, *args):
    return subprocess.Popen(_client_cmd(exe, server, memory_file, args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_client(proc, server, args):
    try:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("fc_client %s outlived its own deadline\n%s%s" % (" ".join(args), out, err),
                    pytrace=False)
    return _summary(proc.returncode, out, err, server, args)


# ------------------------------------------------------------------------------------------
# The client itself: does it send what Firecracker sends?
# ------------------------------------------------------------------------------------------
FC_MAPPING = (r'\{"base_host_virt_addr":(\d+),"size":(\d+),"offset":(\d+),'
              r'"page_size":(\d+),"page_size_kib":(\d+)\}')


def test_client_sends_what_firecracker_sends(fc_client, memory_file, tmp_path):
    """One message: serde_json's compact array, fields in GuestRegionUffdMapping's order, one
    SCM_RIGHTS fd that is a userfaultfd; then the connection stays open (Firecracker >= 1.12
    never closes it) and nothing more is sent. With no server answering its faults the client
    must give up at its deadline, with status 3."""
    d = tempfile.mkdtemp(prefix="fcl", dir="/tmp")
    path = os.path.join(d, "s")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    lst.settimeout(30)
    proc = subprocess.Popen([fc_client, "--socket", path, "--memory-file", memory_file,
                             "--regions", "3M,1M,2M", "--timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        conn, _ = lst.accept()
        conn.settimeout(30)
        msg, fds, flags, _ = socket.recv_fds(conn, 65536, 4)
        try:
            assert len(fds) == 1 and not flags & socket.MSG_CTRUNC
            assert os.readlink("/proc/self/fd/%d" % fds[0]) == "anon_inode:[userfaultfd]"
            # Firecracker's uffd is O_NONBLOCK, in the file description we now share.
            assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_NONBLOCK
        finally:
            for fd in fds:
                os.close(fd)
        text = msg.decode("ascii")
        assert re.fullmatch(r"\[%s(,%s)*\]" % (FC_MAPPING, FC_MAPPING), text), text
        maps = json.loads(text)
        assert [list(m) for m in maps] == [["base_host_virt_addr", "size", "offset", "page_size",
                                            "page_size_kib"]] * 3
        assert [m["size"] for m in maps] == [3 << 20, 1 << 20, 2 << 20]
        assert [m["offset"] for m in maps] == [0, 3 << 20, 4 << 20]   # concatenated in the file
        for m in maps:
            assert m["page_size"] == m["page_size_kib"] == PAGE_SIZE  # both in bytes
            assert m["base_host_virt_addr"] % (2 << 20) == 0           # 2 MiB-aligned regions
        readable, _, _ = select.select([conn], [], [], 0.3)
        assert not readable                        # still open, and nothing more was sent
        _, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 3, err
        assert "DEADLINE" in err and "fault storm" in err, err
        assert conn.recv(1) == b""                 # the connection closes when the VMM exits
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lst.close()
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# The server against the client
# ------------------------------------------------------------------------------------------
def test_fault_storm(fc_client, server, memory_file):
    """Two regions (as around the MMIO gap), four threads, random order; reads, write faults
    and kernel-mode accesses; every byte of every page checked."""
    s = run_client(fc_client, server, memory_file, "--threads", "4", "--order", "random")
    assert s["regions"] == 2 and s["verified_pages"] == NPAGES and s["touches"] == NPAGES
    assert s["kernel_touches"] > 0 and s["write_touches"] > 0
    server.assert_alive()


def test_two_clients_at_once(fc_client, server, memory_file):
    args = [("--threads", "3", "--order", "random", "--seed", "7"),
            ("--threads", "3", "--order", "reverse", "--regions", "2M,6M")]
    procs = [start_client(fc_client, server, memory_file, *a) for a in args]
    sums = [finish_client(p, server, a) for p, a in zip(procs, args)]
    assert all(s["verified_pages"] == NPAGES for s in sums)
    server.assert_alive()


@pytest.mark.parametrize("layout,order", [("3M,1M,2M,1M", "interleave"),
                                          ("1M,4M,512K", "same"),
                                          ("4K,8K,7M", "seq")])
def test_multi_region_layouts(fc_client, server, memory_file, layout, order):
    """Regions of different sizes (one page, two pages, ...), separate mappings with holes
    between them, host order unrelated to file order; a server that finds a fault's region
    or offset any other way than by base/size/offset serves the wrong bytes."""
    s = run_client(fc_client, server, memory_file, "--regions", layout, "--order", order,
                   "--threads", "4")
    assert s["regions"] == len(layout.split(","))
    server.assert_alive()


@pytest.mark.parametrize("fmt", ["v1.7", "v1.1"])
def test_older_firecracker_formats(fc_client, server, memory_file, fmt):
    """v1.7-v1.11 sent page_size_kib (in bytes) only; v1.1-v1.6 no page size at all."""
    s = run_client(fc_client, server, memory_file, "--format", fmt)
    assert s["format"] == fmt and s["verified_pages"] == NPAGES
    server.assert_alive()


def test_transparent_huge_pages(fc_client, server, memory_file):
    """huge_pages "Transparent" (Firecracker's main branch after 1.16): MADV_HUGEPAGE on each
    region, page_size still 4096 in the handshake; every byte and the balloon as before."""
    s = run_client(fc_client, server, memory_file, "--thp", "--regions", "6M,2M",
                   "--remove", "32")
    assert s["verified_pages"] == NPAGES and s["removed_pages"] == 2 * 2 * 32
    server.assert_alive()


def test_connection_closed_after_handshake(fc_client, server, memory_file):
    """Firecracker before 1.12 closed the connection right after sending: EOF on the socket
    does not mean the VMM is gone, its faults must still be served."""
    s = run_client(fc_client, server, memory_file, "--close-after-send", "--threads", "2")
    assert s["verified_pages"] == NPAGES
    server.assert_alive()


def test_balloon_remove(fc_client, server, memory_file):
    """madvise(MADV_DONTNEED) during the storm (UFFD_EVENT_REMOVE) of a served range and of a
    never-touched one in each region: both read back as zeros, also after a second cycle in
    which the guest wrote to them."""
    s = run_client(fc_client, server, memory_file, "--remove", "32", "--threads", "4")
    assert s["removed_pages"] == 2 * 2 * 32 and s["verified_pages"] == NPAGES
    server.assert_alive()


def test_balloon_remove_with_many_pending_faults(fc_client, server, memory_file):
    """REMOVEs arriving while more faults are queued than a handler may have room for: 128
    threads fault the same pages (each queues its own message) while the balloon removes its
    ranges over and over (up to 50 times, until the storm ends). The handler must go on
    reading events (the REMOVE) whatever its backlog of faults, or every fill returns EAGAIN
    forever and the client hangs (status 3)."""
    s = run_client(fc_client, server, memory_file, "--threads", "128", "--order", "same",
                   "--remove", "16", "--remove-cycles", "50", "--kernel-every", "0")
    # 4 ranges removed once per cycle while the storm lasts (at most 50), and once more after
    assert s["removed_pages"] == 2 * 2 * 16 and 4 + 4 <= s["remove_events"] <= 4 * 50 + 4
    server.assert_alive()


def test_client_killed_mid_storm(fc_client, server, memory_file):
    """A VMM killed (-9) at any point (before, during or after the handshake, in the storm)
    leaves the server serving the next one."""
    for delay in (0.0, 0.005, 0.02, 0.05):
        p = start_client(fc_client, server, memory_file, "--threads", "8", "--order", "same")
        time.sleep(delay)
        p.kill()
        p.communicate(timeout=SUBPROCESS_TIMEOUT)
        server.assert_alive()
    s = run_client(fc_client, server, memory_file)
    assert s["verified_pages"] == NPAGES
    server.assert_alive()


@pytest.mark.parametrize("engine", ENGINES)
def test_snapshot_source(fc_client, memory_file, tmp_path, engine):
    """`serve --snapshot`: the same bytes as the memory file, from a pylazymem snapshot (zero,
    duplicate and unique pages stored differently); Firecracker's client cannot tell."""
    snap = str(tmp_path / "guest.plm")
    code = ("import sys, numpy as np, pylazymem as plm\n"
            "r = plm.Region(%d)\n"
            "np.frombuffer(memoryview(r), np.uint8)[:] = np.fromfile(sys.argv[1], np.uint8)\n"
            "plm.checkpoint(r, sys.argv[2])\n"
            "r.close()\n" % (NPAGES * PAGE_SIZE))
    res = subprocess.run([sys.executable, "-c", code, memory_file, snap], capture_output=True,
                         text=True, timeout=SUBPROCESS_TIMEOUT, cwd=REPO_DIR,
                         env=dict(os.environ, PYLAZYMEM_BACKEND="cffi"))
    if res.returncode and "compiled core" in res.stderr:
        pytest.skip("writing a snapshot needs the compiled core, which is not built")
    assert res.returncode == 0, res.stderr
    with serve(engine, ["--snapshot", snap]) as srv:
        s = run_client(fc_client, srv, memory_file, "--threads", "4", "--remove", "16")
        assert s["verified_pages"] == NPAGES
        s = run_client(fc_client, srv, memory_file, "--regions", "1M,4M,512K", "--order",
                       "interleave")
        assert s["regions"] == 3
        srv.assert_alive()


@pytest.mark.parametrize("engine", ENGINES)
def test_memory_file_shorter_than_guest_memory(fc_client, memory_file, tmp_path, engine):
    """The VMM's memory is larger than the server's file (a truncated or wrong file): touching
    a page past the end must fail loudly (SIGBUS from a poisoned page), never read as zeros and
    never hang (the client's deadline would say status 3)."""
    short = str(tmp_path / "short.mem")
    with open(memory_file, "rb") as f, open(short, "wb") as g:
        g.write(f.read(NPAGES // 2 * PAGE_SIZE))
    with serve(engine, ["--memory-file", short]) as srv:
        args = ["--threads", "2", "--order", "seq", "--kernel-every", "0"]
        res = subprocess.run(_client_cmd(fc_client, srv, memory_file, args),
                             capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        assert res.returncode == -signal.SIGBUS, (
            "expected SIGBUS, got status %s\n%s%s\n--- server ---\n%s"
            % (res.returncode, res.stdout, res.stderr, srv.log()))
        srv.assert_alive()


def _holds_userfaultfd(pid):
    try:
        return any(os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[userfaultfd]"
                   for fd in os.listdir("/proc/%d/fd" % pid))
    except FileNotFoundError:   # an fd closed while we looked: look again
        return False


@pytest.mark.parametrize("engine", ENGINES)
def test_server_stopped_mid_storm(fc_client, memory_file, engine):
    """SIGTERM to the server while a Firecracker-style client is faulting (a slow guest: 3 ms
    between touches): the pages it never received must fail loudly in the client (SIGBUS from
    poisoned pages), not hang it and not read as zeros; the server exits 0."""
    with serve(engine, ["--memory-file", memory_file]) as srv:
        args = ["--threads", "4", "--delay-us", "3000", "--kernel-every", "0"]
        p = start_client(fc_client, srv, memory_file, *args)
        try:
            deadline = time.monotonic() + 20
            while not _holds_userfaultfd(srv.proc.pid):   # the server has the client's uffd
                assert p.poll() is None and time.monotonic() < deadline, (
                    "the server never received the client's uffd\n" + srv.log())
                time.sleep(0.01)
            time.sleep(0.2)   # some pages served, most of the ~1.5 s storm still to come
            srv.stopped_by_test = True
            srv.stop()
            out, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == -signal.SIGBUS, (
            "expected SIGBUS in the client, got status %s\n%s%s\n--- server ---\n%s"
            % (p.returncode, out, err, srv.log()))
