"""Several "machines" on this one: network namespaces, each with its own address and network
stack, reaching the S3 gateway (which listens on the host's loopback) through a TCP relay on
the host side of its veth pair. Used by the object-store tests and benchmark (issue 13) to
run restorers that share nothing but the gateway. Needs root and iproute2 (`ip netns`).

Each machine k gets namespace plm-<tag>-k, a veth pair (host end 10.<net>.k.1/24, machine end
10.<net>.k.2/24) and a relay at 10.<net>.k.1:<gateway port>. `env(k)` is the environment a
process there needs (AWS_ENDPOINT_URL rewritten), `popen(k, argv)` starts one there.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import urllib.parse


def unavailable() -> str | None:
    """Why machines cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need iproute2 (the ip command)"
    return None


class Relay:
    """A TCP relay: connections accepted at `listen` (host, port) are piped to `target`.
    `cut()` stops it as a gateway that went away would: new connections are refused and the
    open ones reset."""

    def __init__(self, listen, target):
        self.target = target
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(listen)
        self.sock.listen(128)
        self.address = self.sock.getsockname()
        self._conns = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=10)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                if self._cut:
                    c.close()
                    u.close()
                    continue
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                d = a.recv(1 << 16)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, []
        try:
            self.sock.close()
        except OSError:
            pass
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _ip(*args, ns=None):
    cmd = ["ip"] + (["netns", "exec", ns, "ip"] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class Machines:
    def __init__(self, n, endpoint, net=231):
        why = unavailable()
        if why:
            raise OSError(why)
        u = urllib.parse.urlsplit(endpoint)
        self.port = u.port or 80
        self.target = (u.hostname, self.port)
        self.tag = "%d" % os.getpid()
        self.names, self.relays, self.hosts = [], [], []
        try:
            for k in range(n):
                ns, host_if, ns_if = "plm-%s-%d" % (self.tag, k), "vp%s%d" % (self.tag, k), \
                    "vq%s%d" % (self.tag, k)
                host, mine = "10.%d.%d.1" % (net, k + 1), "10.%d.%d.2" % (net, k + 1)
                _ip("netns", "add", ns)
                self.names.append(ns)
                _ip("link", "add", host_if[:15], "type", "veth", "peer", "name", ns_if[:15])
                _ip("link", "set", ns_if[:15], "netns", ns)
                _ip("addr", "add", host + "/24", "dev", host_if[:15])
                _ip("link", "set", host_if[:15], "up")
                _ip("addr", "add", mine + "/24", "dev", ns_if[:15], ns=ns)
                _ip("link", "set", ns_if[:15], "up", ns=ns)
                _ip("link", "set", "lo", "up", ns=ns)
                self.hosts.append(host)
                self.relays.append(Relay((host, 0), self.target))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def endpoint(self, k):
        return "http://%s:%d" % self.relays[k].address

    def env(self, k, base=None):
        env = dict(os.environ if base is None else base)
        env["AWS_ENDPOINT_URL"] = self.endpoint(k)
        return env

    def popen(self, k, argv, env=None, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.names[k]] + list(argv),
                                env=self.env(k, env), **kw)

    def close(self):
        for r in self.relays:
            r.cut()
        for ns in self.names:   # the veth pair goes with its namespace
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.names, self.relays = [], []
