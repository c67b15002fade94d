"""The page server's wire protocol: what a client sends, what the server answers, and who is
at the other end of the socket (docs/page-server.md).

Both sides use it: the server (pylazymem.server) and the clients (pylazymem.region's
Region(server=...), tests/_server_client.py). It is a leaf: the standard library and
pylazymem._uffd_errors only, so that region, server and snapshot can all import it without a
cycle.

The handshake is Firecracker's: one sendmsg() of a JSON array of mappings with the userfaultfd
in SCM_RIGHTS,

    [{"base_host_virt_addr": 140234..., "size": 1073741824, "offset": 0, "page_size": 4096}]

and, from our server, one JSON line back: {"ok": true, ...} or {"ok": false, "error": ...}.
"""
import dataclasses
import errno
import fcntl
import json
import os
import re
import socket
import struct
import time

from ._uffd_errors import LazyMemError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MAX_MESSAGE = 64 * 1024     # the mappings JSON: Firecracker's handlers read into a few KiB
MAX_MAPPINGS = 64
MAX_FDS = 4                 # fds accepted in one handshake (one is expected)
MAX_SOCKET_PATH = 107       # sizeof(sun_path) - 1: an AF_UNIX path and its terminating NUL

# Our own clients add this key to each mapping: they keep their uffd and watch the server, so
# the server must not poison their missing pages when it stops (they take over or fail loudly
# themselves). Firecracker ignores unknown keys in what it sends, we ignore them in what we get.
WATCHES_KEY = "pylazymem_watches_server"

# A pylazymem client that wants to map the server's shared pool (restore(server=, share=...),
# docs/shared-pages.md 5.3) adds this key to each mapping. A sharing server's answer then holds
# "pool": {"id", "npages", "page_size"} and comes with an O_RDONLY fd of the pool (SCM_RIGHTS);
# any other server answers "pool": null (or, before sharing existed, nothing).
SHARE_KEY = "pylazymem_share"

# getsockopt(SOL_SOCKET, SO_PEERPIDFD) (Linux 6.5): a pidfd of the process that connected
# (or listened), taken by the kernel at connect() time, so it cannot name a later process that
# reused the pid. 77 on every architecture but alpha/mips/parisc/sparc, which pylazymem does
# not run on (uffd.syscall_number() lists the machines it does).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


class ProtocolError(LazyMemError, ValueError):
    """A client sent something that is not a valid handshake, or a server refused one (the
    message says what)."""


@dataclasses.dataclass(frozen=True)
class Mapping:
    """One registered range of a client, as Firecracker's GuestRegionUffdMapping describes it."""
    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int


class _LongInt:
    """A JSON integer with more digits than any 64-bit one has (a handshake's integers are all
    64-bit). Kept as a marker, never converted: int() of more than 4300 digits raises
    ValueError, which escaped the parser (the client was refused unclearly, not poisoned)."""

    def __init__(self, digits):
        self.digits = digits

    def __repr__(self):
        return "an integer of %d digits" % self.digits


def _parse_int(text):
    return int(text) if len(text) <= 21 else _LongInt(len(text.lstrip("-")))


# A string (possibly cut off at the end of the data) or a bracket, for _flatten.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.S)


def _flatten(text, keep):
    """`text` with every JSON array or object nested deeper than `keep` replaced by null: an
    iterative walk, since the json module's parser recurses (RecursionError on deep nesting,
    which a 64 KiB message of brackets reaches)."""
    out, depth, start = [], 0, 0
    for t in _TOKENS.finditer(text):
        c = t.group()[0]
        if c in "[{":
            depth += 1
            if depth == keep + 1:
                out.append(text[start:t.start()])
                out.append("null")
        elif c in "]}":
            if depth == keep + 1:
                start = t.end()
            depth = max(depth - 1, 0)
    if depth <= keep:
        out.append(text[start:])
    return "".join(out)


def loads(data, keep=None, longs=None):
    """A client's JSON bytes, parsed with the limits a handshake needs: integers too long for
    64 bits are _LongInt markers (never a ValueError from int()), appended to the list
    `longs` too if one is given. keep: nesting deeper than this is replaced by null first
    (never a RecursionError; the ranges a refused client described are at depth 2). Raises
    UnicodeDecodeError, ValueError or RecursionError."""
    text = bytes(data).decode("utf-8")
    if keep is not None:
        text = _flatten(text, keep)
    if longs is None:
        return json.loads(text, parse_int=_parse_int)

    def parse_int(t):
        v = _parse_int(t)
        if isinstance(v, _LongInt):
            longs.append(v)
        return v
    return json.loads(text, parse_int=parse_int)


def _int_field(obj, key, i):
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 64:
        raise ProtocolError("mapping %d: %r must be an unsigned 64-bit integer, got %r"
                            % (i, key, v))
    return v


def parse_mappings(data: bytes, page_size: int = PAGE_SIZE):
    """The mappings of a handshake message; raises ProtocolError with the reason.

    Returns (mappings, watches_server). Accepts every layout Firecracker has sent: `page_size`
    (bytes), the older `page_size_kib` (also bytes), or neither (base pages); unknown keys are
    ignored. Every range must be page aligned, non-empty and not overlap another, and its
    source offset + size must fit in 64 bits."""
    longs = []
    try:
        doc = loads(data, longs=longs)
    except RecursionError:
        raise ProtocolError("the handshake's JSON is nested too deeply (the mappings are an "
                            "array of flat objects)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("the handshake is not UTF-8 JSON: %s" % e) from None
    if longs:   # wherever it is: no handshake (Firecracker's or ours) has one
        raise ProtocolError("the handshake holds %r: its numbers are 64-bit integers"
                            % longs[0])
    if not isinstance(doc, list) or not doc:
        raise ProtocolError("the handshake must be a non-empty JSON array of mappings "
                            "(base_host_virt_addr, size, offset, page_size)")
    if len(doc) > MAX_MAPPINGS:
        raise ProtocolError("%d mappings: at most %d are accepted" % (len(doc), MAX_MAPPINGS))
    maps, watches = [], False
    for i, m in enumerate(doc):
        if not isinstance(m, dict):
            raise ProtocolError("mapping %d is not a JSON object" % i)
        if "page_size" in m:
            ps = _int_field(m, "page_size", i)
        elif "page_size_kib" in m:
            # Despite its name, Firecracker has always sent bytes here (docs/page-server.md).
            ps = _int_field(m, "page_size_kib", i)
        else:
            ps = page_size   # Firecracker 1.1 to 1.6 sent no page size: base pages
        if ps != page_size:
            raise ProtocolError("mapping %d: page size %d, this server serves %d-byte pages "
                                "(huge pages are not supported)" % (i, ps, page_size))
        mp = Mapping(_int_field(m, "base_host_virt_addr", i), _int_field(m, "size", i),
                     _int_field(m, "offset", i), ps)
        if not mp.size or (mp.base_host_virt_addr | mp.size | mp.offset) % ps:
            raise ProtocolError("mapping %d: address, size and offset must be multiples of "
                                "the page size and size > 0" % i)
        if mp.base_host_virt_addr + mp.size >= 1 << 64:   # as the C engine: its end too
            raise ProtocolError("mapping %d wraps around the address space" % i)
        if mp.offset + mp.size > 1 << 64:
            raise ProtocolError("mapping %d: offset + size is past 2**64" % i)
        for j, o in enumerate(maps):
            if (mp.base_host_virt_addr < o.base_host_virt_addr + o.size
                    and o.base_host_virt_addr < mp.base_host_virt_addr + mp.size):
                raise ProtocolError("mappings %d and %d overlap" % (j, i))
        watches |= m.get(WATCHES_KEY) is True
        maps.append(mp)
    return maps, watches


def asks_share(data) -> bool:
    """Whether a handshake message (already accepted by parse_mappings) asks for the
    server's shared pool: SHARE_KEY true in its mappings."""
    try:
        doc = loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(doc, list) and any(isinstance(m, dict) and m.get(SHARE_KEY) is True
                                         for m in doc)


def complete_json(data):
    """False only for a prefix of a JSON document (more bytes may come); True for a whole
    document and for anything malformed before its end (the parser then says what)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(data) - 3   # a multi-byte character may be cut at the end
    try:
        json.loads(text, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        return e.pos < len(text.rstrip())
    except (ValueError, RecursionError):
        return True   # nested too deeply: no more bytes mend that (parse_mappings says so)
    return True


def receive_handshake(conn, deadline):
    """The server's side of the handshake: read the client's message and fds until the JSON
    is complete, all of it before `deadline` (time.monotonic()). One deadline for the whole
    message: a timeout per recv() would let a client that trickles a byte now and then hold a
    handshake slot forever. Returns (message, fds); the fds are the caller's (also when this
    raises ProtocolError after receiving them: they are in the exception's `fds`)."""
    def remaining():
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("the handshake was not complete within its deadline")
        return left

    conn.settimeout(remaining())
    msg, fds, flags, _ = socket.recv_fds(conn, MAX_MESSAGE, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    try:
        if flags & socket.MSG_CTRUNC:
            # Truncated with room for more: the kernel could not install an fd here (EMFILE
            # or ENFILE), and dropped it. With every slot used: the client sent too many.
            raise ProtocolError("handshake truncated: %s" % (
                "more than %d fds" % MAX_FDS if len(fds) >= MAX_FDS else
                "out of file descriptors in the server (the fds sent were lost)"))
        # One recvmsg returns Firecracker's whole message in practice, but a stream socket
        # promises no boundaries: read on until the JSON is complete (never until EOF: the
        # VMM keeps the connection open).
        while msg and not complete_json(msg):
            if len(msg) >= MAX_MESSAGE:
                raise ProtocolError("handshake longer than %d bytes" % MAX_MESSAGE)
            conn.settimeout(remaining())
            more = conn.recv(MAX_MESSAGE - len(msg))
            if not more:
                break
            msg += more
    except BaseException as e:
        e.fds = fds
        raise
    return msg, fds


def send_answer(conn, obj, fds=()):
    """Answer a handshake: one JSON line, with `fds` (SCM_RIGHTS) on its first bytes.
    Firecracker does not read it; our client does. Returns False if it could not be sent."""
    data = (json.dumps(obj) + "\n").encode()
    try:
        conn.settimeout(1.0)
        if fds:
            sent = socket.send_fds(conn, [data], list(fds))
            data = data[sent:]
        conn.sendall(data)
    except OSError:
        return False
    return True


def peer_credentials(sock):
    """(pid, uid, gid) of the process at the other end of a connected Unix socket, as the
    kernel recorded them at connect() (SO_PEERCRED; pid 0 if not visible in our pid
    namespace)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


def peer_pid(sock):
    """The pid of the process at the other end of a connected Unix socket."""
    return peer_credentials(sock)[0]


def peer_pidfd(sock):
    """A pidfd (close-on-exec) of the process at the other end of a connected Unix socket.

    SO_PEERPIDFD where the kernel has it (6.5+): the kernel's own reference to the peer taken
    at connect(), so it names that process even if it has exited and its pid been reused
    since. Elsewhere pidfd_open() of the SO_PEERCRED pid: call it as soon as the connection
    exists (at accept or connect), while the peer still holds the connection, to keep the
    window for pid reuse as small as it can be. Raises ProcessLookupError when the peer has
    gone (on old kernels), OSError otherwise."""
    try:
        fd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        pid = peer_pid(sock)
        if pid <= 0:
            raise ProcessLookupError(errno.ESRCH, "the peer's pid is not visible in this pid "
                                     "namespace") from None
        return os.pidfd_open(pid)
    # The kernel makes it close-on-exec today; say so ourselves rather than rely on it.
    fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.fcntl(fd, fcntl.F_GETFD) | fcntl.FD_CLOEXEC)
    return fd


def connect(socket_path, uffd_fd, mappings, *, watches_server=False, share=False,
            timeout=5.0):
    """Send a userfaultfd and its ranges to a PageServer, the way Firecracker does, and read
    the server's answer. `mappings`: (base_address, size, offset) tuples or Mapping objects.
    Returns (socket, answer dict); keep the socket open for as long as the memory is served
    (the server's pid is its SO_PEERCRED, peer_pidfd() gives a pidfd of it). Raises
    ProtocolError when the server refuses.

    share: ask for the server's shared pool (SHARE_KEY). The answer's "pool" is then a dict
    {"id", "npages", "page_size"} or None, and answer["pool_fd"] is the pool's O_RDONLY fd
    received with it (close-on-exec, the caller's to close) or None. The server starts
    serving the uffd at once: the caller maps the pool over its ranges (lm_region_share)
    before anything touches them."""
    doc = []
    for m in mappings:
        if isinstance(m, Mapping):
            m = (m.base_host_virt_addr, m.size, m.offset)
        base, size, offset = (int(x) for x in m)
        d = {"base_host_virt_addr": base, "size": size, "offset": offset, "page_size": PAGE_SIZE}
        if watches_server:
            d[WATCHES_KEY] = True
        if share:
            d[SHARE_KEY] = True
        doc.append(d)
    path = os.fsdecode(os.fspath(socket_path))
    n = len(os.fsencode(path))
    if n > MAX_SOCKET_PATH:   # socket's own error has no errno: "[Errno None] ..."
        raise OSError(errno.ENAMETOOLONG, "the page server at %s: AF_UNIX path too long (%d "
                      "bytes, at most %d)" % (path, n, MAX_SOCKET_PATH))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.settimeout(timeout)
        s.connect(path)
        try:
            socket.send_fds(s, [json.dumps(doc).encode()], [uffd_fd])
        except (BrokenPipeError, ConnectionResetError):
            pass   # the server refused before reading: its answer says why
        buf, got_fds = b"", []
        try:
            while not buf.endswith(b"\n"):
                # The pool's fd comes with the answer's first bytes: receive fds on every
                # read (a stream has no boundaries), closing any we did not ask for.
                chunk, fds, flags, _ = socket.recv_fds(s, 4096, MAX_FDS,
                                                       socket.MSG_CMSG_CLOEXEC)
                got_fds += fds
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError("the page server's answer came with too many fds")
                if not chunk:
                    raise ProtocolError("the page server at %s closed the connection "
                                        "without an answer" % path)
                buf += chunk
                if len(buf) > MAX_MESSAGE:
                    raise ProtocolError("the page server's answer is too long")
            answer = json.loads(buf.decode())
            if share:
                if answer.get("ok") and answer.get("pool") and len(got_fds) == 1:
                    answer["pool_fd"] = got_fds.pop()
                elif answer.get("ok") and answer.get("pool"):
                    raise ProtocolError("the page server at %s offered a pool with %d fds "
                                        "(one expected)" % (path, len(got_fds)))
                else:
                    answer["pool"], answer["pool_fd"] = None, None
        finally:
            for fd in got_fds:
                os.close(fd)
        if not answer.get("ok"):
            raise ProtocolError("the page server at %s refused: %s"
                                % (path, answer.get("error", "no reason")))
        if answer.get("server_pid") == os.getpid() and answer.get("engine") == "python":
            # A server of an older version that did not refuse us itself: its Python serving
            # thread needs our GIL, which our faulting thread holds.
            raise ProtocolError("the page server at %s runs in this process with its python "
                                "engine, which would deadlock on the GIL at the first fault; "
                                "use engine='c' or a server in another process" % path)
        s.settimeout(None)
        return s, answer
    except OSError as e:   # socket.timeout is one: the same type, saying which server
        s.close()
        why = ("no answer within %g s (a stopped or overloaded server?)" % timeout
               if isinstance(e, socket.timeout) else
               "not running (no such socket)" if isinstance(e, FileNotFoundError) else
               "not running (nobody listens on the socket)"
               if isinstance(e, ConnectionRefusedError) else e.strerror or str(e))
        try:
            named = type(e)(e.errno, "the page server at %s: %s" % (path, why))
        except TypeError:
            raise e from None
        raise named from e
    except ValueError as e:   # an answer that is not JSON (ProtocolError is a ValueError)
        s.close()
        if isinstance(e, ProtocolError):
            raise
        raise ProtocolError("the page server at %s answered something that is not JSON: %s"
                            % (path, e)) from e
    except BaseException:
        s.close()
        raise
