"""The pure-Python userfaultfd binding (pylazymem.uffd), every operation exercised for real.

Python can never serve faults of memory it touches itself while holding the GIL, so:
  (a) "resolve before touch" tests fill registered pages with COPY/ZEROPAGE/CONTINUE/POISON/
      MOVE before anything touches them; they run in a subprocess all the same, so that a bug
      (a touch of a missing page) hangs a child that gets killed, not the test run;
  (b) "served" tests are page servers: a child process creates the userfaultfd, registers its
      memory and sends the fd (SCM_RIGHTS) and its addresses over a socketpair, then touches
      the memory; this test process reads the events and resolves them; the child checks the
      contents and reports.
Children load pylazymem.uffd without the package __init__ and with the compiled core blocked,
so every child also proves that the binding works without the cffi core.
Every child runs under a deadline: on expiry it gets SIGABRT (faulthandler dumps its stacks),
then its process group is killed and the test fails with its output.
"""

import ast
import ctypes
import errno
import fcntl
import inspect
import json
import mmap
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pylazymem import uffd as U

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_DIR = os.path.dirname(os.path.abspath(U.__file__))   # source tree or installed wheel


def _has_capability(bit):
    """Whether this process has capability `bit` in its effective set (root in a container
    usually lacks CAP_SYS_PTRACE, bit 19)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


HAS_CAP_SYS_PTRACE = _has_capability(19)
PS = U.PAGE_SIZE
PROBE = U.probe()

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(PROBE.mode == "unavailable",
                       reason="userfaultfd unavailable to the ctypes binding: %s" % PROBE.reason),
]


def needs(*features):
    missing = [f.name for f in features if not PROBE.features & f]
    return pytest.mark.skipif(bool(missing), reason="kernel lacks UFFD_FEATURE_%s"
                              % "|".join(missing))


def pattern(page, salt=""):
    """Deterministic, page-specific contents of one page (never all zero)."""
    seed = ("%s:%d|" % (salt, page)).encode()
    return (seed * (PS // len(seed) + 1))[:PS]


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------
CHILD_PRELUDE = r'''
import ctypes, errno, json, os, signal, socket, sys, threading, time, types

# Load pylazymem.uffd without the package __init__ (which imports the compiled core) and make
# any import of the core fail: the binding must not need it.
_pkg = types.ModuleType("pylazymem")
_pkg.__path__ = [sys.argv[1]]
sys.modules["pylazymem"] = _pkg
for _name in ("_binding", "_lazymem", "_buffer", "_errors", "_features", "region", "snapshot"):
    sys.modules["pylazymem." + _name] = None
from pylazymem import uffd as U

PS = U.PAGE_SIZE
PROT_NONE, PROT_RW = 0, 3
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MADV_DONTNEED, MADV_NOHUGEPAGE = 4, 15
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


def _check(rc, what):
    if rc is None or rc == MAP_FAILED or rc == -1:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return rc


def mmap_pages(n, prot=PROT_RW, flags=MAP_PRIVATE | MAP_ANONYMOUS, fd=-1):
    addr = _check(libc.mmap(None, n * PS, prot, flags, fd, 0), "mmap")
    if flags & MAP_ANONYMOUS and not flags & MAP_SHARED:
        _check(libc.madvise(addr, n * PS, MADV_NOHUGEPAGE), "madvise")
    return addr


def madvise(addr, length, advice):
    _check(libc.madvise(addr, length, advice), "madvise")


def munmap(addr, length):
    _check(libc.munmap(addr, length), "munmap")


def mremap(old, length, new):
    return _check(libc.mremap(old, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new), "mremap")


def peek(addr, n=PS):
    return ctypes.string_at(addr, n)


def poke(addr, data):
    ctypes.memmove(addr, data, len(data))


sock = socket.socket(fileno=int(sys.argv[2]))


def send(obj, fds=()):
    socket.send_fds(sock, [json.dumps(obj).encode()], list(fds))


def recv():
    return json.loads(sock.recv(65536).decode())


def report(obj):
    print("RESULT " + json.dumps(obj), flush=True)

'''


class Child:
    """A subprocess running CHILD_PRELUDE + script, connected by a SOCK_SEQPACKET socketpair."""

    def __init__(self, script, timeout=30.0):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = CHILD_PRELUDE + inspect.getsource(pattern) + textwrap.dedent(script)
        env = dict(os.environ, PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, PKG_DIR, str(theirs.fileno())],
            pass_fds=[theirs.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=REPO_DIR, start_new_session=True)
        theirs.close()
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.fds = []
        self.out = self.err = None

    def remaining(self):
        return self.deadline - time.monotonic()

    def _collect(self, kill):
        if self.out is not None:
            return
        if kill and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGABRT)   # faulthandler: dump its stacks
                self.proc.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # and forked grandchildren
            except ProcessLookupError:
                pass
        self.out, self.err = self.proc.communicate()

    def describe(self):
        return ("\nreturncode=%s\n--- child stdout ---\n%s\n--- child stderr ---\n%s"
                % (self.proc.returncode, self.out, self.err))

    def fail(self, why):
        self._collect(kill=True)
        pytest.fail("%s%s" % (why, self.describe()), pytrace=False)

    def recv(self):
        """(message, fds) from the child."""
        self.sock.settimeout(max(0.01, self.remaining()))
        try:
            msg, fds, _, _ = socket.recv_fds(self.sock, 65536, 8)
        except socket.timeout:
            self.fail("no message from the child within %ss" % self.timeout)
        self.fds.extend(fds)
        if not msg:
            self.fail("the child closed its socket")
        return json.loads(msg.decode()), fds

    def send(self, obj):
        self.sock.sendall(json.dumps(obj).encode())

    def quiet_for(self, seconds):
        """True when the child sends nothing for `seconds`."""
        return not select.select([self.sock], [], [], seconds)[0]

    def finish(self, expect_rc=0):
        """Wait for the child's exit; returns its RESULT object (or None)."""
        try:
            self.out, self.err = self.proc.communicate(timeout=max(0.01, self.remaining()))
        except subprocess.TimeoutExpired:
            self.fail("the child did not exit within %ss (hang?)" % self.timeout)
        if expect_rc is not None and self.proc.returncode != expect_rc:
            pytest.fail("child exited with %s, expected %s%s"
                        % (self.proc.returncode, expect_rc, self.describe()), pytrace=False)
        results = [line[7:] for line in self.out.splitlines() if line.startswith("RESULT ")]
        return json.loads(results[-1]) if results else None

    def close(self):
        self._collect(kill=True)
        self.sock.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(child, uffds, on_event, until=None):
    """Read events from `uffds` (a list on_event may extend) and hand each to on_event(u, ev),
    until the child exits or until() is true."""
    while True:
        if until is not None and until():
            return
        if child.proc.poll() is not None:
            return
        if child.remaining() <= 0:
            child.fail("timed out serving faults")
        by_fd = {u.fileno(): u for u in uffds}
        ready, _, _ = select.select(list(by_fd), [], [], 0.05)
        for fd in ready:
            u = by_fd[fd]
            for ev in u.read_events(max=16):
                on_event(u, ev)


def run_child(script, timeout=30.0, expect_rc=0):
    """Run a child that needs no server; returns (RESULT, child)."""
    with Child(script, timeout) as c:
        return c.finish(expect_rc), c


# ---------------------------------------------------------------------------------------------
# Import, constants and layouts
# ---------------------------------------------------------------------------------------------
STDLIB_OK = {"__future__", "ctypes", "dataclasses", "enum", "errno", "fcntl", "os", "platform",
             "select", "struct", "time", "typing", "operator"}


@pytest.mark.parametrize("name", ["uffd.py", "_uffd_errors.py"])
def test_binding_imports_only_stdlib(name):
    tree = ast.parse(open(os.path.join(PKG_DIR, name)).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                assert a.name.split(".")[0] in STDLIB_OK, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert node.module == "_uffd_errors", "relative import of %s" % node.module
            else:
                assert node.module.split(".")[0] in STDLIB_OK, node.module


def test_binding_works_without_core():
    res, _ = run_child('''
        u = U.open_userfaultfd()
        info = u.api(0)
        report({"mods": sorted(m for m in sys.modules
                               if m.startswith("pylazymem") and sys.modules[m] is not None),
                "cffi": "_cffi_backend" in sys.modules, "mode": u.mode,
                "features": int(info.features)})
    ''')
    assert res["mods"] == ["pylazymem", "pylazymem._uffd_errors", "pylazymem.uffd"]
    assert not res["cffi"]
    assert res["mode"] == PROBE.mode
    assert res["features"] == int(PROBE.features)


# Constants that Linux 6.1's header (the one installed here) lacks, with the values and layouts
# of include/uapi/linux/userfaultfd.h in the kernel tree (Linux >= 6.8: POISON 6.6, WP_ASYNC
# 6.7, MOVE 6.8, WP_UNPOPULATED 6.4, CONTINUE_MODE_WP 6.5), read from the kernel source via
# the search tool (stored copies of include/uapi/linux/userfaultfd.h in linux-mm/linux-mm and
# roypat/linux agree on every value below). The running kernel cross-checks them too:
# test_kernel_offers_the_new_ioctls and the POISON/MOVE tests issue these very ioctls.
HEADER_FALLBACKS = r'''
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1<<13)
#define PLM_FB_UFFD_FEATURE_WP_UNPOPULATED
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1<<14)
#define PLM_FB_UFFD_FEATURE_POISON
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1<<15)
#define PLM_FB_UFFD_FEATURE_WP_ASYNC
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1<<16)
#define PLM_FB_UFFD_FEATURE_MOVE
#endif
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP ((__u64)1<<1)
#define PLM_FB_UFFDIO_CONTINUE_MODE_WP
#endif
#ifndef UFFDIO_POISON
struct uffdio_poison {
    struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE ((__u64)1<<0)
    __u64 mode;
    __s64 updated;
};
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#define PLM_FB_UFFDIO_POISON
#define PLM_FB__UFFDIO_POISON
#define PLM_FB_UFFDIO_POISON_MODE_DONTWAKE
#define PLM_FB_STRUCT_uffdio_poison
#endif
#ifndef UFFDIO_MOVE
struct uffdio_move {
    __u64 dst;
    __u64 src;
    __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE ((__u64)1<<0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES ((__u64)1<<1)
    __u64 mode;
    __s64 move;
};
#define _UFFDIO_MOVE (0x05)
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#define PLM_FB_UFFDIO_MOVE
#define PLM_FB__UFFDIO_MOVE
#define PLM_FB_UFFDIO_MOVE_MODE_DONTWAKE
#define PLM_FB_UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES
#define PLM_FB_STRUCT_uffdio_move
#endif
'''

CONST_RE = re.compile(r"^_?(UFFD|UFFDIO|USERFAULTFD)(_[A-Z0-9_]+)?$")


def binding_constants():
    return {k: v for k, v in vars(U).items() if CONST_RE.match(k) and isinstance(v, int)}


def leaf_fields(ctype, prefix="", base=0):
    """(C member path, offset, size, signed) of every scalar member of a ctypes layout."""
    out = []
    for name, ftype in ctype._fields_:
        desc = getattr(ctype, name)
        path, off = prefix + name, base + desc.offset
        if issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            out.append((path, off, ctypes.sizeof(ftype), None))
            out.extend(leaf_fields(ftype, path + ".", off))
        else:
            out.append((path, off, ctypes.sizeof(ftype), ftype(-1).value < 0))
    return out


def compile_and_run(tmp_path, source, name):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to check the binding against <linux/userfaultfd.h>")
    src = tmp_path / (name + ".c")
    exe = tmp_path / name
    src.write_text(source)
    cc = subprocess.run([gcc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                        capture_output=True, text=True, timeout=120)
    if cc.returncode != 0 and "userfaultfd.h" in cc.stderr and "No such file" in cc.stderr:
        pytest.skip("no <linux/userfaultfd.h> (linux kernel headers not installed)")
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_constants_and_layouts_match_c_header(tmp_path):
    consts = binding_constants()
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <string.h>",
             "#include <sys/ioctl.h>", "#include <sys/syscall.h>",
             "#include <linux/userfaultfd.h>", HEADER_FALLBACKS, "int main(void) {"]
    for name in sorted(consts):
        lines.append('    printf("const %s %%llu\\n", (unsigned long long)(%s));' % (name, name))
        lines.append('#ifdef PLM_FB_%s\n    puts("fallback %s");\n#endif' % (name, name))
    for cname, ctype in U.STRUCTS.items():
        lines.append('    printf("sizeof %s %%zu\\n", sizeof(struct %s));' % (cname, cname))
        lines.append('#ifdef PLM_FB_STRUCT_%s\n    puts("fallback struct %s");\n#endif'
                     % (cname, cname))
        for path, _, _, signed in leaf_fields(ctype):
            lines.append('    printf("offsetof %s.%s %%zu %%zu\\n", offsetof(struct %s, %s), '
                         'sizeof(((struct %s *)0)->%s));' % (cname, path, cname, path, cname, path))
            if signed is not None:
                lines.append('    { struct %s v; memset(&v, 0xff, sizeof v); '
                             'printf("signed %s.%s %%d\\n", v.%s < 0); }'
                             % (cname, cname, path, path))
    lines.append('    printf("sys %ld\\n", (long)SYS_userfaultfd);')
    lines.append("    return 0;\n}\n")
    out = compile_and_run(tmp_path, "\n".join(lines), "uffd_layout")

    c_consts, c_sizes, c_offsets, c_signed, fallbacks = {}, {}, {}, {}, []
    for line in out:
        kind, rest = line.split(" ", 1)
        if kind == "const":
            name, value = rest.split()
            c_consts[name] = int(value)
        elif kind == "sizeof":
            name, value = rest.split()
            c_sizes[name] = int(value)
        elif kind == "offsetof":
            path, off, size = rest.split()
            c_offsets[path] = (int(off), int(size))
        elif kind == "signed":
            path, value = rest.split()
            c_signed[path] = bool(int(value))
        elif kind == "fallback":
            fallbacks.append(rest)
        elif kind == "sys":
            c_sys = int(rest)
    # Every constant of the binding, the ioctl numbers included (the C side computes them with
    # its own _IOWR over its own structs, so the encoding and the sizes are both checked).
    assert {k: consts[k] for k in c_consts} == c_consts
    assert set(c_consts) == set(consts)
    for name in ("UFFDIO_API", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER", "UFFDIO_WAKE",
                 "UFFDIO_COPY", "UFFDIO_ZEROPAGE", "UFFDIO_WRITEPROTECT", "UFFDIO_CONTINUE",
                 "UFFDIO_POISON", "UFFDIO_MOVE", "USERFAULTFD_IOC_NEW", "UFFD_API",
                 "UFFD_FEATURE_MOVE", "UFFD_USER_MODE_ONLY"):
        assert name in c_consts, name
    for cname, ctype in U.STRUCTS.items():
        assert c_sizes[cname] == ctypes.sizeof(ctype), cname
        for path, off, size, signed in leaf_fields(ctype):
            key = "%s.%s" % (cname, path)
            assert c_offsets[key] == (off, size), key
            if signed is not None:
                assert c_signed[key] == signed, key
    assert c_sys == U.SYS_userfaultfd
    # Say which values the installed header could not confirm (they came from the fallbacks).
    print("checked against the documented kernel values, not the installed header:", fallbacks)


def test_syscall_numbers(tmp_path):
    assert U.syscall_number("x86_64") == 323
    assert U.syscall_number("aarch64") == 282
    assert U.syscall_number("sparc64") is None
    out = compile_and_run(tmp_path, textwrap.dedent("""\
        #include <stdio.h>
        #include <asm-generic/unistd.h>
        int main(void) { printf("%d\\n", __NR_userfaultfd); return 0; }
        """), "generic_nr")
    assert U.syscall_number("aarch64") == U.syscall_number("riscv64") == int(out[0])


def test_kernel_offers_the_new_ioctls():
    """The bit positions of POISON/MOVE/WP/CONTINUE as the running kernel reports them."""
    m = mmap.mmap(-1, 2 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with U.open_userfaultfd() as u:
        info = u.api(U.Feature.PAGEFAULT_FLAG_WP if PROBE.features & U.Feature.PAGEFAULT_FLAG_WP
                     else 0)
        assert info.ioctls & (U.Ioctl.API | U.Ioctl.REGISTER | U.Ioctl.UNREGISTER) == (
            U.Ioctl.API | U.Ioctl.REGISTER | U.Ioctl.UNREGISTER)
        mask = u.register(U.address_of(m), 2 * PS, missing=True,
                          wp=bool(info.features & U.Feature.PAGEFAULT_FLAG_WP))
        assert mask & (U.Ioctl.COPY | U.Ioctl.ZEROPAGE | U.Ioctl.WAKE) == (
            U.Ioctl.COPY | U.Ioctl.ZEROPAGE | U.Ioctl.WAKE)
        assert bool(mask & U.Ioctl.POISON) == bool(info.features & U.Feature.POISON)
        assert bool(mask & U.Ioctl.MOVE) == bool(info.features & U.Feature.MOVE)
        has_wp = bool(info.features & U.Feature.PAGEFAULT_FLAG_WP)
        assert bool(mask & U.Ioctl.WRITEPROTECT) == has_wp
        assert not mask & U.Ioctl.CONTINUE   # only for MINOR registrations
        u.unregister(U.address_of(m), 2 * PS)
    m.close()


def test_parse_message():
    def msg(event, **arg):
        m = U.UffdMsg(event=event)
        for path, value in arg.items():
            obj = m.arg
            parts = path.split("__")
            for p in parts[:-1]:
                obj = getattr(obj, p)
            setattr(obj, parts[-1], value)
        return bytes(m)

    assert U.MSG_SIZE == 32
    flags = U.UFFD_PAGEFAULT_FLAG_WRITE | U.UFFD_PAGEFAULT_FLAG_WP
    pf = U.parse_message(msg(U.UFFD_EVENT_PAGEFAULT, pagefault__address=0x7000,
                             pagefault__flags=flags, pagefault__feat__ptid=4242))
    assert pf == U.PageFault(address=0x7000, flags=3, write=True, wp=True, minor=False,
                             thread_id=4242)
    pf = U.parse_message(msg(U.UFFD_EVENT_PAGEFAULT, pagefault__address=0x9000,
                             pagefault__flags=U.UFFD_PAGEFAULT_FLAG_MINOR))
    assert (pf.write, pf.wp, pf.minor, pf.thread_id) == (False, False, True, 0)
    assert U.parse_message(msg(U.UFFD_EVENT_FORK, fork__ufd=17)) == U.Fork(ufd=17)
    assert U.parse_message(msg(U.UFFD_EVENT_REMAP, remap__from=0x1000, remap__to=0x5000,
                               remap__len=0x3000)) == U.Remap(from_=0x1000, to=0x5000, len=0x3000)
    assert U.parse_message(msg(U.UFFD_EVENT_REMOVE, remove__start=0x2000,
                               remove__end=0x4000)) == U.Remove(start=0x2000, end=0x4000)
    assert U.parse_message(msg(U.UFFD_EVENT_UNMAP, remove__start=0x2000,
                               remove__end=0x6000)) == U.Unmap(start=0x2000, end=0x6000)
    raw = msg(0x7F, reserved__reserved1=5)
    assert U.parse_message(raw) == U.UnknownEvent(event=0x7F, raw=raw)
    with pytest.raises(ValueError):
        U.parse_message(raw[:31])


# ---------------------------------------------------------------------------------------------
# Acquisition, handshake, errors (nothing here registers memory that anyone touches)
# ---------------------------------------------------------------------------------------------
def test_acquire_reports_mode_and_source():
    expected = {"dev": ("full", "/dev/userfaultfd"), "syscall": ("full", "syscall"),
                "user-mode-only": ("user-mode-only", "syscall")}
    for how, (mode, source) in expected.items():
        p = U.probe(how)
        if p.mode == "unavailable":
            assert p.reason and (p.dev_errno or p.syscall_errno or p.user_only_errno)
            with pytest.raises(U.UnavailableError) as ei:
                U.open_userfaultfd(acquire=how)
            assert ei.value.errno and "userfaultfd:" in str(ei.value)
            continue
        with U.open_userfaultfd(acquire=how) as u:
            assert (u.mode, u.source) == (mode, source) == (p.mode, p.source)
            assert u.attempts == ()
    with U.open_userfaultfd() as u:
        assert (u.mode, u.source) == (PROBE.mode, PROBE.source)


@pytest.mark.core(reason="compares with the compiled core's probe")
def test_probe_agrees_with_the_cffi_core(monkeypatch):
    plm = pytest.importorskip("pylazymem")
    f = plm.features()
    assert (PROBE.mode, PROBE.source, int(PROBE.features)) == (f.mode, f.source, f.api_features)
    if f.mode == "full":
        assert PROBE.reason == f.reason == ""
    monkeypatch.setenv("PYLAZYMEM_UFFD", "user-mode-only")
    p = U.probe()
    if p.mode != "unavailable":
        assert (p.mode, p.source) == ("user-mode-only", "syscall")
        assert "EFAULT" in p.reason
    monkeypatch.setenv("PYLAZYMEM_UFFD", "bogus")
    with pytest.raises(ValueError, match="PYLAZYMEM_UFFD"):
        U.open_userfaultfd()


def test_flags():
    with U.open_userfaultfd() as u:
        assert fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(u.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        u.api(0)
        assert u.read_events() == []                     # non-blocking: nothing pending
    with U.open_userfaultfd(flags=0) as u:
        assert not fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert not fcntl.fcntl(u.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        u.api(0)
        # The kernel answers poll() on a blocking userfaultfd with POLLERR: no timeouts there.
        p = select.poll()
        p.register(u.fileno(), select.POLLIN)
        assert p.poll(0) == [(u.fileno(), select.POLLERR)]
        with pytest.raises(ValueError, match="O_NONBLOCK"):
            u.read_events(timeout=0.05)
    with U.open_userfaultfd() as u:
        u.api(0)
        t0 = time.monotonic()
        assert u.read_events(timeout=0.05) == []
        assert time.monotonic() - t0 >= 0.04
        assert not u.wait(0)
    with pytest.raises(ValueError, match="O_CLOEXEC"):
        U.open_userfaultfd(flags=os.O_RDWR)
    with pytest.raises(ValueError, match="acquire"):
        U.open_userfaultfd(acquire="bogus")


def test_handshake_and_errors():
    m = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = U.address_of(m)
    u = U.open_userfaultfd()
    # Nothing works before the handshake, and the messages say so.
    with pytest.raises(U.UffdError) as ei:
        u.register(addr, PS)
    assert ei.value.errno == errno.EINVAL and "ioctl(UFFDIO_REGISTER)" in str(ei.value)
    assert "handshake" in str(ei.value)
    with pytest.raises(U.UffdError, match=r"read\(userfaultfd\).*handshake"):
        u.read_events()
    # A feature the kernel does not know is refused and named; the fd stays usable.
    with pytest.raises(U.UffdError, match="does not support: 0x4000000000000000") as ei:
        u.api(1 << 62)
    assert ei.value.errno == errno.EINVAL
    info = u.api(U.Feature.THREAD_ID)
    assert info.enabled == U.Feature.THREAD_ID and u.enabled == U.Feature.THREAD_ID
    assert info.features == PROBE.features == u.features
    with pytest.raises(U.UffdError, match="already done"):
        u.api(0)
    # Argument checks happen before any syscall.
    with pytest.raises(U.InvalidRangeError, match="page size"):
        u.register(addr + 1, PS)
    with pytest.raises(U.InvalidRangeError, match="length 100"):
        u.copy(addr, b"x" * 100, 100)
    with pytest.raises(U.InvalidRangeError, match="not positive"):
        u.zeropage(addr, 0)
    with pytest.raises(ValueError, match="at least one"):
        u.register(addr, PS, missing=False)
    with pytest.raises(ValueError, match="source buffer has"):
        u.copy(addr, b"x" * 10, PS)
    with pytest.raises(TypeError):
        u.copy(addr, "text", PS)
    # The kernel's refusals name the call and the likely cause.
    with pytest.raises(U.UffdError) as ei:
        u.copy(addr, bytes(PS), PS)                  # not registered
    assert ei.value.errno == errno.ENOENT and ei.value.done == 0
    assert "ioctl(UFFDIO_COPY)" in str(ei.value) and "not registered" in str(ei.value)
    with pytest.raises(U.UffdError, match="UFFDIO_UNREGISTER"):
        u.unregister(addr, 1 << 60)
    # Exceptions are both pylazymem errors and builtin ones.
    assert issubclass(U.UffdError, OSError) and issubclass(U.UffdError, U.LazyMemError)
    assert issubclass(U.UnavailableError, OSError)
    assert issubclass(U.InvalidRangeError, ValueError)
    # close is idempotent; a closed object refuses work; detach hands the fd over.
    fd = u.fileno()
    u.close()
    u.close()
    assert u.closed and "closed" in repr(u)
    with pytest.raises(ValueError, match="closed"):
        u.wake(addr, PS)
    with pytest.raises(OSError):
        os.fstat(fd)
    with U.open_userfaultfd() as u2:
        fd2 = u2.detach()
    os.fstat(fd2)      # still open: detached
    wrapped = U.Userfaultfd(fd2)
    assert (wrapped.mode, wrapped.source, wrapped.features) == (None, None, None)
    wrapped.close()
    m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges in a child")
def test_unprivileged_falls_back_to_user_mode_only():
    st = os.stat("/dev/userfaultfd") if os.path.exists("/dev/userfaultfd") else None
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        sysctl = int(f.read())
    if sysctl != 0 or (st is not None and st.st_mode & 0o006):
        pytest.skip("userfaultfd is open to unprivileged users here: no fallback to see")
    umo = U.probe("user-mode-only")
    if umo.mode == "unavailable":      # e.g. a seccomp filter refuses the system call
        pytest.skip("user-mode-only userfaultfd unavailable here: %s" % umo.reason)
    res, _ = run_child('''
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        res = {}
        for how in ("dev", "syscall"):
            try:
                U.open_userfaultfd(acquire=how).close()
                res[how] = "opened"
            except U.UnavailableError as e:
                res[how] = [e.errno, str(e)]
        u = U.open_userfaultfd(acquire="auto")
        res["auto"] = [u.mode, u.source, [list(a) for a in u.attempts]]
        res["probe"] = [U.probe("auto").mode, U.probe("auto").reason]
        u.api(0)
        a = mmap_pages(2)
        u.register(a, 2 * PS)
        res["copy"] = u.copy(a, pattern(0, "u"), PS)
        res["contents"] = peek(a) == pattern(0, "u")
        # A kernel access to a missing page fails with EFAULT instead of being reported.
        r, w = os.pipe()
        os.write(w, b"x" * 100)
        try:
            os.readv(r, [(ctypes.c_char * PS).from_address(a + PS)])
            res["kernel"] = "read"
        except OSError as e:
            res["kernel"] = e.errno
        report(res)
    ''')
    dev_err = errno.ENOENT if st is None else errno.EACCES
    assert res["dev"][0] == dev_err, res
    assert res["syscall"][0] == errno.EPERM, res
    assert "vm.unprivileged_userfaultfd" in res["syscall"][1]
    assert res["auto"] == ["user-mode-only", "syscall",
                           [["dev", dev_err], ["syscall", errno.EPERM]]]
    assert res["probe"][0] == "user-mode-only" and "EFAULT" in res["probe"][1]
    assert res["copy"] == PS and res["contents"]
    assert res["kernel"] == errno.EFAULT


# ---------------------------------------------------------------------------------------------
# (a) Resolve before touch
# ---------------------------------------------------------------------------------------------
def test_copy_zeropage_wake_unregister_before_touch():
    res, _ = run_child('''
        u = U.open_userfaultfd()
        u.api(0)
        n = 16
        a = mmap_pages(n)
        mask = u.register(a, n * PS)
        assert mask & (U.Ioctl.COPY | U.Ioctl.ZEROPAGE | U.Ioctl.WAKE), mask
        out = {}
        out["bytes"] = u.copy(a, pattern(0) + pattern(1), 2 * PS)          # from bytes
        src = bytearray(pattern(2) + pattern(3))
        out["addr"] = u.copy(a + 2 * PS, U.address_of(src), 2 * PS)        # from an address
        ro = memoryview(bytes(PS) + pattern(4))[PS:]
        out["memoryview"] = u.copy(a + 4 * PS, ro, PS)                     # read-only view
        out["all_present"] = u.copy(a, b"\\xff" * 2 * PS, 2 * PS)          # EEXIST: success, 0
        out["partly"] = u.copy(a + 3 * PS, pattern(99) * 4, 4 * PS)        # 3,4 present: 5,6 new
        out["zero"] = u.zeropage(a + 7 * PS, 2 * PS)
        out["zero_partly"] = u.zeropage(a + 6 * PS, 4 * PS)                # only 9 is new
        out["dontwake"] = u.copy(a + 10 * PS, pattern(10), PS, wake=False)
        u.wake(a + 10 * PS, PS)
        u.unregister(a + 11 * PS, 5 * PS)
        try:
            u.copy(a + 11 * PS, pattern(11), PS)
            out["unregistered"] = "copied"
        except U.UffdError as e:
            out["unregistered"] = [e.errno, str(e)]
        expect = [pattern(i) for i in range(5)] + [pattern(99)] * 2 + [bytes(PS)] * 3 + [
            pattern(10)] + [bytes(PS)] * 5
        out["contents"] = [i for i in range(n) if peek(a + i * PS) != expect[i]]
        report(out)
    ''')
    assert res["bytes"] == 2 * PS and res["addr"] == 2 * PS and res["memoryview"] == PS
    assert res["all_present"] == 0
    assert res["partly"] == 2 * PS
    assert res["zero"] == 2 * PS and res["zero_partly"] == PS
    assert res["dontwake"] == PS
    assert res["unregistered"][0] == errno.ENOENT and "UFFDIO_COPY" in res["unregistered"][1]
    assert res["contents"] == [], "pages with wrong contents: %s" % res["contents"]


@needs(U.Feature.MINOR_SHMEM)
def test_continue_before_touch():
    res, _ = run_child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.MINOR_SHMEM)
        n = 3
        mfd = os.memfd_create("plm-continue")
        os.ftruncate(mfd, n * PS)
        a = mmap_pages(n, flags=MAP_SHARED, fd=mfd)       # registered view
        b = mmap_pages(n, flags=MAP_SHARED, fd=mfd)       # second view, fills the page cache
        mask = u.register(a, n * PS, missing=False, minor=True)
        out = {"continue_offered": bool(mask & U.Ioctl.CONTINUE)}
        poke(b, pattern(0, "cache"))
        poke(b + PS, pattern(1, "cache"))
        out["mapped"] = u.continue_(a, 2 * PS)
        out["again"] = u.continue_(a, 2 * PS)             # EEXIST: already mapped
        try:
            u.continue_(a + 2 * PS, PS)                   # nothing in the page cache
            out["nocache"] = "mapped"
        except U.UffdError as e:
            out["nocache"] = [e.errno, str(e)]
        out["contents"] = [peek(a) == pattern(0, "cache"), peek(a + PS) == pattern(1, "cache")]
        report(out)
    ''')
    assert res["continue_offered"]
    assert res["mapped"] == 2 * PS and res["again"] == 0
    assert res["nocache"][0] == errno.EFAULT and "page cache" in res["nocache"][1]
    assert res["contents"] == [True, True]


@needs(U.Feature.POISON)
def test_poison_makes_access_raise_sigbus():
    res, c = run_child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.POISON)
        a = mmap_pages(3)
        mask = u.register(a, 3 * PS)
        assert mask & U.Ioctl.POISON, mask
        out = {"poison": u.poison(a + PS, PS), "again": u.poison(a + PS, PS),
               # The kernel lets COPY replace a poison marker (it treats markers as "none"):
               "copy_over": u.copy(a + PS, pattern(1), PS), "copy": u.copy(a, pattern(0), PS),
               "poison2": u.poison(a + 2 * PS, PS), "present": u.poison(a, 3 * PS)}
        out["contents"] = [peek(a) == pattern(0), peek(a + PS) == pattern(1)]
        report(out)
        peek(a + 2 * PS)              # SIGBUS
        print("NOT REACHED", flush=True)
    ''', expect_rc=-signal.SIGBUS)
    assert res == {"poison": PS, "again": 0, "copy_over": PS, "copy": PS, "poison2": PS,
                   "present": 0, "contents": [True, True]}
    assert "NOT REACHED" not in c.out


@needs(U.Feature.MOVE)
def test_move_before_touch():
    res, _ = run_child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.MOVE)
        n = 4
        src = mmap_pages(n)
        for i in range(n):
            poke(src + i * PS, pattern(i, "mv"))
        dst = mmap_pages(n)
        mask = u.register(dst, n * PS)
        out = {"offered": bool(mask & U.Ioctl.MOVE)}
        out["moved"] = u.move(dst, src, 2 * PS)
        out["dst"] = [peek(dst) == pattern(0, "mv"), peek(dst + PS) == pattern(1, "mv")]
        out["src_emptied"] = peek(src) == bytes(PS)      # src is not registered: a fresh page
        poke(src, pattern(0, "again"))
        out["onto_present"] = u.move(dst, src, PS)       # EEXIST: skipped, source kept
        out["src_kept"] = peek(src) == pattern(0, "again")
        madvise(src + 2 * PS, PS, MADV_DONTNEED)         # a hole at page 2
        try:
            u.move(dst + 2 * PS, src + 2 * PS, 2 * PS)
            out["hole"] = "moved"
        except U.UffdError as e:
            out["hole"] = [e.errno, e.done, str(e)]
        out["holes_allowed"] = u.move(dst + 2 * PS, src + 2 * PS, 2 * PS, allow_src_holes=True)
        out["dst3"] = peek(dst + 3 * PS) == pattern(3, "mv")
        u.unregister(dst + 2 * PS, PS)                   # page 2 is still missing
        out["dst2"] = peek(dst + 2 * PS) == bytes(PS)
        report(out)
    ''')
    assert res["offered"] and res["moved"] == 2 * PS and res["dst"] == [True, True]
    assert res["src_emptied"]
    assert res["onto_present"] == 0 and res["src_kept"]
    assert res["hole"][0] == errno.ENOENT and res["hole"][1] == 0
    assert "allow_src_holes" in res["hole"][2]
    assert res["holes_allowed"] == 2 * PS     # the kernel counts the hole as done
    assert res["dst3"] and res["dst2"]


# ---------------------------------------------------------------------------------------------
# (b) Served: the child faults, this process resolves
# ---------------------------------------------------------------------------------------------
def page_of(base, address):
    return (address - base) // PS


def test_serve_missing_faults_copy_zeropage_thread_id():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.THREAD_ID)
        n = 8
        a = mmap_pages(n)
        u.register(a, n * PS)
        send({"addr": a, "n": n, "pid": os.getpid()}, [u.fileno()])
        out = {"read": [peek(a + i * PS) == pattern(i, "srv") for i in range(4)]}
        poke(a + 4 * PS, b"child-wrote")                  # a write fault
        w = peek(a + 4 * PS)
        out["write"] = w[:11] == b"child-wrote" and w[11:] == pattern(4, "srv")[11:]
        out["zero"] = [peek(a + i * PS) == bytes(PS) for i in (5, 6)]
        def touch():
            out["tid"] = threading.get_native_id()
            out["thread"] = peek(a + 7 * PS) == pattern(7, "srv")
        t = threading.Thread(target=touch)
        t.start()
        t.join()
        report(out)
    ''') as c:
        info, fds = c.recv()
        base = info["addr"]
        faults = []
        with U.Userfaultfd(fds[0], owned=False) as u:
            def on_event(u, ev):
                assert isinstance(ev, U.PageFault), ev
                p = page_of(base, ev.address)
                faults.append((p, ev.write, ev.thread_id))
                if p in (5, 6):
                    assert u.zeropage(base + p * PS, PS) == PS
                else:
                    assert u.copy(base + p * PS, pattern(p, "srv"), PS) == PS
            serve(c, [u], on_event)
        res = c.finish()
    assert res["read"] == [True] * 4 and res["write"] and res["zero"] == [True, True]
    assert res["thread"]
    pid, tid = info["pid"], res["tid"]
    assert faults == [(0, False, pid), (1, False, pid), (2, False, pid), (3, False, pid),
                      (4, True, pid), (5, False, pid), (6, False, pid), (7, False, tid)]


def test_serve_copy_dontwake_then_wake():
    with Child('''
        u = U.open_userfaultfd()
        u.api(0)
        a = mmap_pages(1)
        u.register(a, PS)
        send({"addr": a}, [u.fileno()])
        ok = peek(a) == pattern(0, "late")
        send({"touched": ok})
    ''') as c:
        info, fds = c.recv()
        a = info["addr"]
        with U.Userfaultfd(fds[0], owned=False) as u:
            evs = u.read_events(timeout=c.remaining())
            assert evs == [U.PageFault(a, 0, False, False, False, 0)]
            assert u.copy(a, pattern(0, "late"), PS, wake=False) == PS
            assert c.quiet_for(0.3), "DONTWAKE: the faulting thread must still be asleep"
            u.wake(a, PS)
            assert c.recv()[0] == {"touched": True}
        c.finish()


def test_serve_eexist_eagain_and_remove():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.EVENT_REMOVE)
        n = 8
        a = mmap_pages(n)
        u.register(a, n * PS)
        send({"addr": a}, [u.fileno()])
        recv()                                   # go
        madvise(a + 5 * PS, 2 * PS, MADV_DONTNEED)   # waits until the REMOVE event is read
        send({"removed": True})
        recv()                                   # check
        out = {"filled": [peek(a + i * PS) == pattern(i, "p") for i in (0, 1, 2, 3, 7)],
               "balloon": peek(a + 5 * PS) == bytes(PS)}
        report(out)
    ''') as c:
        info, fds = c.recv()
        a = info["addr"]
        with U.Userfaultfd(fds[0], owned=False) as u:
            # EEXIST is success: a page that is already there is skipped, not an error.
            assert u.copy(a, pattern(0, "p"), PS) == PS
            assert u.copy(a, pattern(0, "other"), PS) == 0
            assert u.copy(a, b"".join(pattern(i, "p") for i in range(4)), 4 * PS) == 3 * PS
            # While the REMOVE event is unread the address space is "changing": EAGAIN.
            c.send("go")
            assert u.wait(c.remaining()), "no REMOVE event"
            u.eagain_timeout = 0
            with pytest.raises(U.UffdError, match="read_events") as ei:
                u.copy(a + 7 * PS, pattern(7, "p"), PS)
            assert ei.value.errno == errno.EAGAIN and ei.value.done == 0
            # ... and is retried until someone reads the event.
            u.eagain_timeout = 10.0
            got = []
            reader = threading.Timer(0.3, lambda: got.extend(u.read_events()))
            reader.start()
            try:
                assert u.copy(a + 7 * PS, pattern(7, "p"), PS) == PS
            finally:
                reader.join()
            assert u.eagain_retries > 0
            assert got == [U.Remove(start=a + 5 * PS, end=a + 7 * PS)]
            assert c.recv()[0] == {"removed": True}
            c.send("check")
            faults = []

            def on_event(u, ev):
                faults.append(ev)
                assert u.zeropage(ev.address, PS) == PS   # a removed page reads as zeros

            serve(c, [u], on_event)
        res = c.finish()
    assert res == {"filled": [True] * 5, "balloon": True}
    assert faults == [U.PageFault(a + 5 * PS, 0, False, False, False, 0)]


@needs(U.Feature.PAGEFAULT_FLAG_WP)
def test_serve_write_protect():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.PAGEFAULT_FLAG_WP)
        n = 4
        a = mmap_pages(n)
        for i in range(n):
            poke(a + i * PS, pattern(i, "c"))
        madvise(a + 3 * PS, PS, MADV_DONTNEED)           # page 3 is missing again
        mask = u.register(a, n * PS, missing=True, wp=True)
        send({"addr": a, "wp_offered": bool(mask & U.Ioctl.WRITEPROTECT)}, [u.fileno()])
        recv()                                           # go: pages 0..2 are write-protected
        out = {"read_protected": peek(a + PS) == pattern(1, "c")}      # no fault
        poke(a + PS, b"W1")                                             # WP fault
        out["p1"] = peek(a + PS) == b"W1" + pattern(1, "c")[2:]
        out["p3"] = peek(a + 3 * PS) == pattern(3, "s")                 # missing fault
        poke(a + 3 * PS, b"W3")                          # WP fault: copied write-protected
        out["p3w"] = peek(a + 3 * PS) == b"W3" + pattern(3, "s")[2:]
        poke(a + 2 * PS, b"W2")                          # WP fault, resolved without wake
        out["p2"] = peek(a + 2 * PS)[:2] == b"W2"
        report(out)
    ''') as c:
        info, fds = c.recv()
        a = info["addr"]
        assert info["wp_offered"]
        seen = []
        with U.Userfaultfd(fds[0], owned=False) as u:
            u.writeprotect(a, 3 * PS, wp=True)
            c.send("go")

            def on_event(u, ev):
                p = page_of(a, ev.address)
                seen.append((p, ev.wp, ev.write))
                if ev.wp and p == 2:
                    u.writeprotect(ev.address, PS, wp=False, wake=False)
                    u.wake(ev.address, PS)
                elif ev.wp:
                    u.writeprotect(ev.address, PS, wp=False)
                else:
                    assert u.copy(ev.address, pattern(p, "s"), PS, wp=True) == PS

            serve(c, [u], on_event)
        res = c.finish()
    assert res == {"read_protected": True, "p1": True, "p3": True, "p3w": True, "p2": True}
    assert seen == [(1, True, True), (3, False, False), (3, True, True), (2, True, True)]


@needs(U.Feature.MINOR_SHMEM)
def test_serve_minor_faults_with_continue():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.MINOR_SHMEM)
        n = 4
        mfd = os.memfd_create("plm-minor")
        os.ftruncate(mfd, n * PS)
        a = mmap_pages(n, flags=MAP_SHARED, fd=mfd)
        u.register(a, n * PS, missing=False, minor=True)
        send({"addr": a, "n": n}, [u.fileno(), mfd])
        recv()                                           # go: the page cache is filled
        report({"contents": [peek(a + i * PS) == pattern(i, "m") for i in range(n)]})
    ''') as c:
        info, fds = c.recv()
        a, n = info["addr"], info["n"]
        uffd_fd, mfd = fds
        minor = []
        with U.Userfaultfd(uffd_fd, owned=False) as u, \
                mmap.mmap(mfd, n * PS, flags=mmap.MAP_SHARED) as second:
            for i in range(n):                           # populate via a second mapping
                second[i * PS:(i + 1) * PS] = pattern(i, "m")
            assert u.continue_(a, PS) == PS              # page 0 mapped before any touch
            assert u.continue_(a, PS) == 0
            c.send("go")

            def on_event(u, ev):
                minor.append((page_of(a, ev.address), ev.minor))
                assert u.continue_(ev.address, PS) == PS

            serve(c, [u], on_event)
        res = c.finish()
    assert res == {"contents": [True] * 4}
    assert minor == [(1, True), (2, True), (3, True)]


def test_serve_remove_and_unmap_events():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.EVENT_REMOVE | U.Feature.EVENT_UNMAP)
        n = 8
        a = mmap_pages(n)
        u.register(a, n * PS)
        send({"addr": a, "n": n}, [u.fileno()])
        recv()                                           # go: every page was filled
        out = {"filled": [peek(a + i * PS) == pattern(i, "r") for i in range(n)]}
        madvise(a + PS, 2 * PS, MADV_DONTNEED)
        out["removed_reads_zero"] = peek(a + PS) == bytes(PS)
        munmap(a + 4 * PS, 2 * PS)
        out["kept"] = peek(a + 7 * PS) == pattern(7, "r")
        report(out)
    ''') as c:
        info, fds = c.recv()
        a, n = info["addr"], info["n"]
        events = []
        with U.Userfaultfd(fds[0], owned=False) as u:
            assert u.copy(a, b"".join(pattern(i, "r") for i in range(n)), n * PS) == n * PS
            c.send("go")

            def on_event(u, ev):
                events.append(ev)
                if isinstance(ev, U.PageFault):
                    u.zeropage(ev.address, PS)

            serve(c, [u], on_event)
        res = c.finish()
    assert res == {"filled": [True] * 8, "removed_reads_zero": True, "kept": True}
    assert events == [U.Remove(a + PS, a + 3 * PS),
                      U.PageFault(a + PS, 0, False, False, False, 0),
                      U.Unmap(a + 4 * PS, a + 6 * PS)]


def test_serve_remap_event():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.EVENT_REMAP)
        n = 4
        a = mmap_pages(n)
        u.register(a, n * PS)
        b = mmap_pages(n, prot=PROT_NONE)                # where it will move to
        send({"addr": a, "to": b, "n": n}, [u.fileno()])
        recv()                                           # go: pages 0, 1 filled
        moved = mremap(a, n * PS, b)
        report({"moved": moved == b,
                "contents": [peek(b) == pattern(0, "old"), peek(b + PS) == pattern(1, "old"),
                             peek(b + 2 * PS) == pattern(2, "new")]})
    ''') as c:
        info, fds = c.recv()
        a, b, n = info["addr"], info["to"], info["n"]
        events = []
        with U.Userfaultfd(fds[0], owned=False) as u:
            assert u.copy(a, pattern(0, "old") + pattern(1, "old"), 2 * PS) == 2 * PS
            c.send("go")

            def on_event(u, ev):
                events.append(ev)
                if isinstance(ev, U.PageFault):
                    assert u.copy(ev.address, pattern(page_of(b, ev.address), "new"), PS) == PS

            serve(c, [u], on_event)
        res = c.finish()
    assert res == {"moved": True, "contents": [True] * 3}
    assert events == [U.Remap(from_=a, to=b, len=n * PS),
                      U.PageFault(b + 2 * PS, 0, False, False, False, 0)]


@pytest.mark.skipif(not HAS_CAP_SYS_PTRACE, reason="UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE")
def test_serve_fork_event():
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.EVENT_FORK)
        n = 2
        a = mmap_pages(n)
        u.register(a, n * PS)
        send({"addr": a}, [u.fileno()])
        recv()                                           # go: page 0 filled
        pid = os.fork()                                  # waits until FORK is read
        if pid == 0:
            ok = peek(a) == pattern(0, "f") and peek(a + PS) == pattern(1, "grandchild")
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        report({"grandchild": os.waitstatus_to_exitcode(status), "gcpid": pid,
                "child": peek(a + PS) == pattern(1, "child")})
    ''') as c:
        info, fds = c.recv()
        a = info["addr"]
        seen = []
        u = U.Userfaultfd(fds[0], owned=False)
        uffds = [u]
        try:
            assert u.copy(a, pattern(0, "f"), PS) == PS
            c.send("go")

            def on_event(src, ev):
                if isinstance(ev, U.Fork):
                    seen.append("fork")
                    uffds.append(U.Userfaultfd(ev.ufd))   # the grandchild's userfaultfd
                    return
                who = "child" if src is u else "grandchild"
                seen.append((who, page_of(a, ev.address)))
                assert src.copy(ev.address, pattern(1, who), PS) == PS

            serve(c, uffds, on_event)
            res = c.finish()
        finally:
            for x in uffds:
                x.close()
    assert res["grandchild"] == 0 and res["child"]
    assert seen == ["fork", ("grandchild", 1), ("child", 1)]


@needs(U.Feature.MOVE)
def test_serve_move_is_refused_across_processes():
    """The kernel refuses UFFDIO_MOVE from any process but the one that owns the memory
    (userfaultfd_move: "Do not allow cross-mm moves"): a server must copy instead, and the
    error says so."""
    with Child('''
        u = U.open_userfaultfd()
        u.api(U.Feature.MOVE)
        n = 2
        stage = mmap_pages(n)                            # pages staged by the child
        for i in range(n):
            poke(stage + i * PS, pattern(i, "staged"))
        a = mmap_pages(n)
        u.register(a, n * PS)
        send({"addr": a, "stage": stage, "n": n}, [u.fileno()])
        out = {"served": [peek(a + i * PS) == pattern(i, "copied") for i in range(n)],
               "stage_kept": [peek(stage + i * PS) == pattern(i, "staged") for i in range(n)]}
        report(out)
    ''') as c:
        info, fds = c.recv()
        a, stage, n = info["addr"], info["stage"], info["n"]
        refused = []
        with U.Userfaultfd(fds[0], owned=False) as u:
            def on_event(u, ev):
                p = page_of(a, ev.address)
                with pytest.raises(U.UffdError, match="cross-process") as ei:
                    u.move(ev.address, stage + p * PS, PS)
                refused.append(ei.value.errno)
                assert u.copy(ev.address, pattern(p, "copied"), PS) == PS

            serve(c, [u], on_event)
        res = c.finish()
    assert refused == [errno.EINVAL] * 2
    assert res == {"served": [True] * 2, "stage_kept": [True] * 2}


def test_addresses_and_fds_that_ctypes_would_truncate_are_refused():
    # ctypes keeps the low 64 bits: copy(addr + 2**64) installed the page at addr, a length
    # of 2**64 + PS was done as PS and reported whole, Userfaultfd(2**40) used fd 0.
    m = mmap.mmap(-1, 4 * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = U.address_of(m)
    with U.open_userfaultfd() as u:
        u.api(0)
        u.register(addr, 4 * PS)
        with pytest.raises(U.InvalidRangeError, match="address space"):
            u.copy(addr + 2 ** 64, b"\xab" * PS, PS)
        with pytest.raises(U.InvalidRangeError, match="address space"):
            u.zeropage(addr + PS, 2 ** 64 + PS)
        with pytest.raises(U.InvalidRangeError, match="address space"):
            u.copy(addr, 2 ** 64 + 4096, PS)   # a source address
        with pytest.raises(U.InvalidRangeError):
            u.wake(addr, 2 ** 64)
        assert u.copy(addr, b"\xcd" * PS, PS) == PS   # nothing else was installed meanwhile
        assert m[0] == 0xCD
    for fd in (2 ** 40, 2 ** 31, -1, True):
        with pytest.raises(ValueError, match="file descriptor"):
            U.Userfaultfd(fd)


def test_arguments_numpy_gives_and_bounds_are_taken_or_refused_clearly():
    # numpy integers were refused as addresses and lengths (TypeError), read_events(max=10**12)
    # raised MemoryError, wait(float("inf")) OverflowError (review)
    import numpy as np
    r, w = os.pipe()
    os.set_blocking(r, False)
    u = U.Userfaultfd(r, owned=False)
    try:
        u._check_range("UFFDIO_WAKE", "address", np.uint64(1 << 30), np.int64(U.PAGE_SIZE))
        with pytest.raises(TypeError, match="must be ints"):
            u._check_range("UFFDIO_WAKE", "address", 1.0 * (1 << 30), U.PAGE_SIZE)
        with pytest.raises(ValueError, match="max must be from 1"):
            u.read_events(max=10 ** 12)
        os.write(w, b"x")
        assert u.wait(float("inf")) and u.wait(1e300)
        with pytest.raises(ValueError, match="NaN"):
            u.wait(float("nan"))
    finally:
        os.close(r)
        os.close(w)
