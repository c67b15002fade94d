"""The object store against hostile answers and failures (found by a review, session 15:
push/pull, restore("s3://"), the chunk cache, the native fetcher), each pinned. Hostile answers
come from a small fake S3 server run in a subprocess (_FAKE below: path style, no
authentication, its mode set by PUT /__mode__); the rest runs against the real gateway of
scripts/s3-server.sh. docs/object-store.md."""
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import pylazymem as plm
from pylazymem import objstore
from pylazymem._errors import ObjectStoreError
from pylazymem._s3 import S3Client, S3Config
from _helpers import PAGE_SIZE, pages

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(300)]   # (snapshots: a Region)

_FAKE = r'''
import sys, time, re, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
objs, buckets, MODE = {}, set(), ["normal"]

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def _send(self, status, body=b"", extra=None, length=None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (extra or {}).items(): self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD": self.wfile.write(body)
    def _path(self):
        return urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/")
    def do_PUT(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        p = self._path()
        if p == "__mode__":
            MODE[0] = body.decode(); return self._send(200)
        buckets.add(p.split("/")[0])
        if "/" in p: objs[p] = body
        self._send(200, extra={"ETag": '"%x"' % (hash(body) & 0xffffffff)})
    def do_HEAD(self):
        p = self._path()
        ok = p in buckets if "/" not in p else p in objs
        self._send(200 if ok else 404, length=len(objs[p]) if ok and "/" in p else 0)
    def do_DELETE(self):
        objs.pop(self._path(), None); self._send(204)
    def do_GET(self):
        p, mode = self._path(), MODE[0]
        q = self.path.split("?", 1)[1] if "?" in self.path else ""
        if "list-type" in q:
            if mode == "list-loop":
                return self._send(200, b"<ListBucketResult><IsTruncated>true</IsTruncated>"
                                  b"<NextContinuationToken>x</NextContinuationToken>"
                                  b"</ListBucketResult>")
            pre = urllib.parse.unquote(re.search(r"prefix=([^&]*)", q).group(1))
            b = p.rstrip("/")
            items = "".join("<Contents><Key>%s</Key><Size>%d</Size></Contents>"
                            % (k[len(b) + 1:], len(v)) for k, v in objs.items()
                            if k.startswith(b + "/" + pre))
            return self._send(200, ("<ListBucketResult>%s<IsTruncated>false</IsTruncated>"
                                    "</ListBucketResult>" % items).encode())
        if p not in objs:
            return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
        body = objs[p]
        chunk = "/.plm/chunks/" in "/" + p
        manifest = not chunk and "/.plm/" not in "/" + p
        if chunk and mode == "c-fail":
            return self._send(503, b"<Error><Code>SlowDown</Code></Error>")
        if chunk and mode == "c-stall":
            self._send(200, b"", length=len(body)); time.sleep(3600); return
        if manifest and mode == "m-badstatus":
            self.wfile.write(b"GARBAGE\r\n\r\n"); self.close_connection = True; return
        if manifest and mode == "m-hugelen":
            self._send(200, body, length=1 << 40); self.close_connection = True; return
        if manifest and mode == "m-shortlen":
            self._send(200, body[:len(body) // 2], length=len(body))
            self.close_connection = True; return
        if manifest and mode == "m-304":
            self.send_response(304); self.send_header("ETag", '"x"'); self.end_headers(); return
        if manifest and mode == "m-trickle":
            self._send(200, b"", length=len(body))
            for i in range(len(body)):
                self.wfile.write(body[i:i + 1]); self.wfile.flush(); time.sleep(0.005)
            return
        if manifest and mode == "h-trickle":   # the status line and headers, a byte at a time
            head = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 40)
                                                    for i in range(100)))
            try:
                for i in range(len(head)):
                    self.wfile.write(head[i:i + 1]); self.wfile.flush(); time.sleep(0.005)
            except Exception:
                pass
            self.close_connection = True; return
        if manifest and mode == "m-hugeheader":   # a sealed header saying 16 GiB, then zeros
            import struct, xxhash
            head = struct.pack("<8sII5QQ", b"PLMS3MF\x00", 1, 0, 1 << 34, 0, 0, 0, 0, 0)
            head = head[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:-8]))
            self.send_response(200); self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            blk = head + b"\0" * 65472
            try:
                while True:
                    self.wfile.write(b"%x\r\n" % len(blk) + blk + b"\r\n")
                    blk = b"\0" * 65536
            except Exception:
                return
        if manifest and mode == "m-infinite":
            self.send_response(200); self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            blk = b"\0" * 65536
            try:
                while True:
                    self.wfile.write(b"%x\r\n" % len(blk) + blk + b"\r\n")
            except Exception:
                return
        self._send(200, body, extra={"ETag": '"%x"' % (hash(body) & 0xffffffff)})

ThreadingHTTPServer.daemon_threads = True
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
'''


class Fake:
    def __init__(self, port):
        self.port = port
        self.endpoint = "http://127.0.0.1:%d" % port

    def mode(self, m):
        urllib.request.urlopen(urllib.request.Request(
            self.endpoint + "/__mode__", data=m.encode(), method="PUT"), timeout=10).read()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    src = tmp_path / "fakes3.py"
    src.write_text(_FAKE)
    proc = subprocess.Popen([sys.executable, str(src)], stdout=subprocess.PIPE)
    try:
        port = int(proc.stdout.readline())
        f = Fake(port)
        for k, v in (("AWS_ENDPOINT_URL", f.endpoint), ("AWS_ACCESS_KEY_ID", "k"),
                     ("AWS_SECRET_ACCESS_KEY", "s"), ("AWS_DEFAULT_REGION", "us-east-1")):
            monkeypatch.setenv(k, v)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", str(tmp_path / "cache"))
        yield f
    finally:
        proc.kill()
        proc.wait()


from test_objstore import bucket, cache  # noqa: E402,F401  (fixtures: a bucket, a chunk cache)
from test_objstore import _resealed  # noqa: E402  (a manifest edited, its checksums made right)


def _snap(path, rng, npages=256, compress=None):
    with plm.Region(npages * PAGE_SIZE) as r:
        data = rng.integers(0, 256, size=(npages, PAGE_SIZE), dtype=np.uint8)
        if compress:   # compressible pages, still all different
            data[:, 64:] = 0
        pages(r)[:] = data
        plm.checkpoint(r, path, working_set=np.arange(16), compress=compress)
    return data




# ---- 1: pull checks every entry against its signature -----------------------------------

@pytest.mark.s3
@pytest.mark.parametrize("compress", [None, "zstd"])
def test_pull_refuses_a_resealed_manifest_that_swaps_entries(tmp_path, bucket, cache, rng,
                                                             compress):
    """A manifest whose entry table swaps two entries and is resealed passes every checksum
    (the chunks are the bucket's own, checked against their ids): only the page signatures
    tell. pull() wrote such a file, which inspect() accepted and restore served wrong."""
    _snap(tmp_path / "s.plm", rng, compress=compress)
    info = objstore.push(tmp_path / "s.plm", "s3://%s" % bucket, chunk_bytes=64 << 10)
    c = S3Client()
    raw = c.get(*objstore.parse_url(info.url))
    m = objstore.parse_manifest(raw, info.url)
    at = len(m.skeleton) + len(m.chunks) * objstore.CHUNK_DTYPE.itemsize

    def swap(body, fields):
        e = np.frombuffer(body, objstore.ENTRY_DTYPE, len(m.entries), at)
        # two entries of one length (a compressed store's lengths differ)
        same = np.flatnonzero(np.asarray(m.lengths) == int(m.lengths[3]))
        j = int(same[same > 3][0])
        e[[3, j]] = e[[j, 3]]

    c.put(bucket, "evil.plm", _resealed(raw, swap))
    objstore.parse_manifest(c.get(bucket, "evil.plm"))   # it is well formed
    out = tmp_path / "out.plm"
    with pytest.raises(ObjectStoreError, match=r"store entry \d+ (differs from its page "
                                               r"signature|does not decode)"):
        objstore.pull("s3://%s/evil.plm" % bucket, out)
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    objstore.pull(info.url, out)   # the honest one still pulls
    assert out.read_bytes() == (tmp_path / "s.plm").read_bytes()


# ---- 10: a push that fails before its upload says why -----------------------------------

@pytest.mark.s3
def test_push_failures_report_themselves(tmp_path, bucket, rng, monkeypatch):
    _snap(tmp_path / "s.plm", rng, npages=16)
    bad = S3Client(S3Config.from_environment()._replace(secret_key="wrong"))
    with pytest.raises(ObjectStoreError, match="credentials refused|access denied"):
        objstore.push(tmp_path / "s.plm", "s3://%s" % bucket, client=bad)
    down = S3Client(S3Config.from_environment()._replace(endpoint="http://127.0.0.1:1"))
    with pytest.raises(ObjectStoreError, match="cannot reach"):
        objstore.push(tmp_path / "s.plm", "s3://%s" % bucket, client=down)


# ---- 3: an outage during the background fill leaves pages lazy --------------------------

_BG_OUTAGE = """
from pylazymem import objstore
import urllib.request
def mode(m):
    urllib.request.urlopen(urllib.request.Request(os.environ["AWS_ENDPOINT_URL"] + "/__mode__",
                                                  data=m.encode(), method="PUT")).read()
data = np.fromfile(sys.argv[2], np.uint8).reshape(-1, PS)
mode("c-fail")                      # every chunk GET fails (503) ...
r = plm.restore(sys.argv[1], prefetch="none", background=True)
time.sleep(3)
mode("normal")                      # ... for 3 s, then the gateway is back
time.sleep(2.5)                     # past the 2 s hold
st = r.meta["state"]
print("POISONED", int((st == int(plm.PageState.POISONED)).sum()), flush=True)
r.materialize()
print("EQUAL", bool(np.array_equal(pages(r), data)), flush=True)
print("STATS", json.dumps(r.stats()["object_store"]), flush=True)
r.close()
"""


@pytest.mark.uffd_full
def test_an_outage_during_the_background_fill_leaves_pages_lazy(fake, tmp_path, rng,
                                                                   run_py):
    data = _snap(tmp_path / "s.plm", rng, npages=512)
    data.tofile(tmp_path / "data.bin")
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p", chunk_bytes=64 << 10)
    res = run_py(_BG_OUTAGE, timeout=120, args=(info.url, str(tmp_path / "data.bin")),
                 env={"PYLAZYMEM_S3_RETRIES": "1"})
    assert res.returncode == 0, res.describe()
    assert "POISONED 0" in res.stdout, res.describe()
    assert "EQUAL True" in res.stdout, res.describe()


_FAULT_IN_OUTAGE = """
from pylazymem import objstore
r = plm.restore(sys.argv[1], prefetch="none", background=False)
print("TOUCH", flush=True)
x = int(pages(r)[5].sum())
print("READ", x, flush=True)
"""


@pytest.mark.uffd_full
def test_a_demand_fault_in_an_outage_still_fails_loudly(fake, tmp_path, rng, run_py):
    _snap(tmp_path / "s.plm", rng, npages=64)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p", chunk_bytes=64 << 10)
    fake.mode("c-fail")
    res = run_py(_FAULT_IN_OUTAGE, timeout=120, args=(info.url,),
                 env={"PYLAZYMEM_S3_RETRIES": "0"})
    assert "TOUCH" in res.stdout and "READ" not in res.stdout, res.describe()
    assert res.returncode == -signal.SIGBUS, res.describe()


# ---- 9: close() does not wait out a stalled gateway -------------------------------------

_STALL = """
from pylazymem import objstore
import urllib.request
urllib.request.urlopen(urllib.request.Request(os.environ["AWS_ENDPOINT_URL"] + "/__mode__",
                                              data=b"c-stall", method="PUT")).read()
r = plm.restore(sys.argv[1], prefetch="none", background=True)
time.sleep(1)
t = time.monotonic()
r.close()
print("CLOSE %.2f" % (time.monotonic() - t), flush=True)
"""


@pytest.mark.uffd_full
def test_close_does_not_wait_for_a_stalled_gateway(fake, tmp_path, rng, run_py):
    _snap(tmp_path / "s.plm", rng, npages=512)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p", chunk_bytes=64 << 10)
    res = run_py(_STALL, timeout=200, args=(info.url,),
                 env={"PYLAZYMEM_S3_TIMEOUT_MS": "30000"})
    assert res.returncode == 0, res.describe()
    took = float(res.stdout.split("CLOSE ", 1)[1].split()[0])
    assert took < 20, res.describe()   # a hang bound (one stalled request alone is 30 s): was minutes


# ---- 4, 6, 12: hostile answers to the Python client -------------------------------------

def test_a_listing_that_never_ends_is_refused(fake, tmp_path, rng):
    _snap(tmp_path / "s.plm", rng, npages=16)
    objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode("list-loop")
    t = time.monotonic()
    with pytest.raises(ObjectStoreError, match="repeats itself"):
        objstore.push(tmp_path / "s.plm", "s3://bkt/q")
    assert time.monotonic() - t < 30   # a hang bound: it looped forever


@pytest.mark.parametrize("mode,match", [
    ("m-badstatus", "broken answer"), ("m-shortlen", "broken answer"),
    ("m-hugelen", "more than"), ("m-304", "HTTP 304")])
def test_broken_answers_are_object_store_errors(fake, tmp_path, rng, mode, match,
                                                monkeypatch):
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", "none")   # no kept copy: an unconditional GET
    _snap(tmp_path / "s.plm", rng, npages=16)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode(mode)
    for attempt in (lambda: objstore.pull(info.url, tmp_path / "out.plm"),
                    lambda: objstore.read_manifest(info.url)):
        t = time.monotonic()
        with pytest.raises(ObjectStoreError, match=match):
            attempt()
        assert time.monotonic() - t < 20
    fake.mode("normal")   # and the client still works after
    objstore.pull(info.url, tmp_path / "out.plm")


_ENDLESS = """
import resource
# an unbounded read would take the machine's memory (it did: the OOM killer): not here.
# 4 GiB beyond what is mapped now (under ASan, its shadow is mapped already: terabytes)
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 30), vm + (4 << 30)))
from pylazymem import objstore
try:
    objstore.read_manifest(sys.argv[1])
except Exception as e:
    print("RAISED", type(e).__name__, str(e)[:200], flush=True)
"""


def test_an_endless_body_is_refused(fake, tmp_path, rng, run_py, monkeypatch):
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", "none")
    _snap(tmp_path / "s.plm", rng, npages=16)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode("m-infinite")   # a chunked body of zeros that never ends
    res = run_py(_ENDLESS, timeout=60, args=(info.url,))
    assert "RAISED ObjectStoreError" in res.stdout and "longer than" in res.stdout, \
        res.describe()


# ---- 7: PYLAZYMEM_S3_TIMEOUT_MS bounds a whole Python-side request ----------------------

def test_a_trickled_manifest_times_out(fake, tmp_path, rng, monkeypatch):
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", "none")
    _snap(tmp_path / "s.plm", rng, npages=64)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode("m-trickle")   # a byte every 5 ms: each read in time, the whole not
    monkeypatch.setenv("PYLAZYMEM_S3_TIMEOUT_MS", "1000")
    t = time.monotonic()
    with pytest.raises(ObjectStoreError, match="PYLAZYMEM_S3_TIMEOUT_MS"):
        plm.restore(info.url, prefetch="none", background=False)
    assert time.monotonic() - t < 20   # (a hang bound: the trickle alone takes ~50 s)


def test_trickled_headers_time_out(fake, tmp_path, rng, monkeypatch):
    """The deadline covers the status line and headers too: a server that sends them a byte
    every 5 ms (each read in time, ~25 s in all) does not keep the request alive past it."""
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", "none")
    _snap(tmp_path / "s.plm", rng, npages=64)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode("h-trickle")
    monkeypatch.setenv("PYLAZYMEM_S3_TIMEOUT_MS", "1000")
    t = time.monotonic()
    with pytest.raises(ObjectStoreError, match="PYLAZYMEM_S3_TIMEOUT_MS"):
        plm.restore(info.url, prefetch="none", background=False)
    assert time.monotonic() - t < 10


# ---- 5: a FIFO in the cache is a miss, never a hang -------------------------------------

_FIFO = """
from pylazymem import objstore
r = plm.restore(sys.argv[1], prefetch="none", background=False)
print("RESTORED", flush=True)
r.materialize()
data = np.fromfile(sys.argv[2], np.uint8).reshape(-1, PS)
print("EQUAL", bool(np.array_equal(pages(r), data)), flush=True)
r.close()
"""


@pytest.mark.s3
@pytest.mark.uffd_full
def test_a_fifo_in_the_cache_is_a_miss(tmp_path, bucket, cache, rng, run_py):
    data = _snap(tmp_path / "s.plm", rng, npages=64)
    data.tofile(tmp_path / "data.bin")
    info = objstore.push(tmp_path / "s.plm", "s3://%s" % bucket, chunk_bytes=64 << 10)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        r.materialize()   # fills the cache, keeps the manifest
    files = [p for p in cache.rglob("*") if p.is_file()]
    chunks = [p for p in files if len(p.name) == 32]
    kept = [p for p in files if p.name.startswith("m-") and len(p.name) == 18]
    assert chunks and kept
    for p in chunks[:2] + kept:
        p.unlink()
        os.mkfifo(p)
    res = run_py(_FIFO, timeout=60, args=(info.url, str(tmp_path / "data.bin")))
    assert res.returncode == 0, res.describe()
    assert "EQUAL True" in res.stdout, res.describe()
    for p in chunks[:2] + kept:   # replaced by the real thing
        assert p.is_file() and not p.is_fifo()


# ---- 8: a cache directory that cannot be written costs only the caching -----------------

@pytest.mark.s3
@pytest.mark.uffd_full
def test_an_unusable_cache_directory_restores_without_a_cache(tmp_path, bucket, rng,
                                                              monkeypatch):
    data = _snap(tmp_path / "s.plm", rng, npages=64)
    info = objstore.push(tmp_path / "s.plm", "s3://%s" % bucket)
    (tmp_path / "afile").write_bytes(b"x")
    # under a regular file: no directory can be made there (root or not)
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    with pytest.warns(RuntimeWarning, match="without a cache"):
        r = plm.restore(info.url, prefetch="none", background=False)
    with r:
        assert np.array_equal(pages(r), data)
        assert r.stats()["object_store"]["cache_writes"] == 0


# ---- 10: settings and credentials that cannot work are clear errors ---------------------

@pytest.mark.s3
def test_cache_max_bytes_zero_is_refused(tmp_path, bucket, cache, rng, monkeypatch):
    _snap(tmp_path / "s.plm", rng, npages=16)
    info = objstore.push(tmp_path / "s.plm", "s3://%s" % bucket)
    monkeypatch.setenv("PYLAZYMEM_CACHE_MAX_BYTES", "0")
    with pytest.raises(ValueError, match="PYLAZYMEM_CACHE_MAX_BYTES"):
        plm.restore(info.url, prefetch="none", background=False)


@pytest.mark.s3
@pytest.mark.uffd_full
def test_an_upper_case_endpoint_scheme_restores(tmp_path, bucket, cache, rng, monkeypatch):
    data = _snap(tmp_path / "s.plm", rng, npages=16)
    info = objstore.push(tmp_path / "s.plm", "s3://%s" % bucket)
    ep = S3Config.from_environment().endpoint
    monkeypatch.setenv("AWS_ENDPOINT_URL", ep.replace("http://", "HTTP://"))
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)


def test_a_session_token_with_a_newline_is_a_clear_error():
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_SESSION_TOKEN": "abc\ndef", "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    with pytest.raises(ObjectStoreError, match="AWS_SESSION_TOKEN"):
        S3Config.from_environment(env)


@pytest.mark.parametrize("region", ["us:east", "eu/west", "%41"])
def test_a_region_the_signature_cannot_carry_is_a_clear_error(region):
    # (push and pull worked with it; restore then failed naming no region)
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": region,
           "AWS_ENDPOINT_URL": "http://127.0.0.1:1",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    with pytest.raises(ObjectStoreError, match="S3 region"):
        S3Config.from_environment(env)


# ---- 2: push checks the entries an index says the bucket holds --------------------------

@pytest.mark.s3
@pytest.mark.uffd_full
def test_push_does_not_trust_a_lying_index(tmp_path, bucket, cache, rng):
    """A well-formed index that maps B's entries to bytes of A's chunk: push(B) reused them
    all (nothing of B uploaded) and B could not be restored. Each reused entry is checked
    against its key in the chunk it is said to be in; a wrong one is uploaded anew."""
    import xxhash
    _snap(tmp_path / "a.plm", rng, npages=32)
    data_b = _snap(tmp_path / "b.plm", rng, npages=32)
    c = S3Client()
    ia = objstore.push(tmp_path / "a.plm", "s3://%s" % bucket)
    ma = objstore.parse_manifest(c.get(*objstore.parse_url(ia.url)))
    cid = (int(ma.chunks["id"][0][0]), int(ma.chunks["id"][0][1]))
    clen = int(ma.chunks["length"][0])
    _, f, offs, lens, words = objstore._store_view(tmp_path / "b.plm")
    keys = [objstore._entry_key(data, int(words[i]))
            for i, data in f.entries(range(len(offs)), offs, lens)]
    f.close()
    rows = np.zeros(len(keys), objstore.INDEX_DTYPE)
    for i, k in enumerate(keys):
        rows[i] = (k, cid, 0, PAGE_SIZE, clen, 0)
    idx = objstore._INDEX.pack(objstore.INDEX_MAGIC, 1, 0, len(rows),
                               xxhash.xxh3_64_intdigest(rows.tobytes())) + rows.tobytes()
    c.put(bucket, objstore.INDEXES + "0" * 32, idx)
    with pytest.warns(UserWarning, match="uploaded anew"):
        ib = objstore.push(tmp_path / "b.plm", "s3://%s" % bucket)
    assert ib.new_entries == ib.entries == 32 and ib.chunks_uploaded >= 1
    with plm.restore(ib.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data_b)


# ---- session 18's review -------------------------------------------------------------------

def test_a_manifest_header_asking_for_more_memory_than_the_machine_has_is_refused(
        fake, tmp_path, rng, monkeypatch):
    """A header (its checksum anyone's to compute) said how much to buffer, and the client
    buffered an endless body toward it: 16 GiB claimed, MemoryError or the OOM killer."""
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", "none")
    _snap(tmp_path / "s.plm", rng, npages=16)
    info = objstore.push(tmp_path / "s.plm", "s3://bkt/p")
    fake.mode("m-hugeheader")
    with pytest.raises(ObjectStoreError, match="more than this machine reads into memory"):
        objstore.read_manifest(info.url)


_OVERWRITE_MID_PUSH = r"""
import sys
from pylazymem import objstore
from pylazymem._s3 import S3Client
path, other = sys.argv[1], sys.argv[2]
put, done = S3Client.put, []

def put_then_overwrite(self, bucket, key, data):
    put(self, bucket, key, data)
    if not done and key.startswith(objstore.CHUNKS):
        done.append(key)
        with open(path, "r+b") as f:   # in place, as cp does
            f.write(open(other, "rb").read())
            f.truncate()
S3Client.put = put_then_overwrite
try:
    objstore.push(path, "s3://bkt/p", chunk_bytes=64 << 10)
except plm.SnapshotError as e:
    print("RAISED", e, flush=True)
print("MANIFEST", S3Client().exists("bkt", "p/s.plm"), bool(done), flush=True)
"""


@pytest.mark.parametrize("rewrite", ["shorter", "same size"])
def test_a_file_overwritten_while_it_is_pushed_fails_the_push(fake, tmp_path, rng, run_py,
                                                              rewrite):
    """push() mapped the file: overwritten in place by a shorter file mid-push, it died of
    SIGBUS; by one of the same size, it wrote a manifest mixing the two versions."""
    path, other = tmp_path / "s.plm", tmp_path / "o.plm"
    _snap(path, rng, npages=256)
    _snap(other, rng, npages=64 if rewrite == "shorter" else 256)
    res = run_py(_OVERWRITE_MID_PUSH, timeout=60, args=(str(path), str(other)))
    assert res.returncode == 0, res.describe()
    assert "RAISED" in res.stdout and "changed while it was being pushed" in res.stdout, \
        res.describe()
    assert "MANIFEST False True" in res.stdout, res.describe()


@pytest.mark.s3
@pytest.mark.uffd_full
def test_a_push_writes_over_a_damaged_chunk_it_needs(tmp_path, bucket, cache, rng):
    """A chunk damaged in the bucket (same length): the next push found it, warned that its
    entries went up anew, but packed them into a chunk of the same id, saw the name there,
    and skipped it: the new manifest named the damaged chunk."""
    data = _snap(tmp_path / "s.plm", rng, npages=64)
    c = S3Client()
    info = objstore.push(tmp_path / "s.plm", "s3://%s/p" % bucket, chunk_bytes=64 << 10)
    m = objstore.parse_manifest(c.get(*objstore.parse_url(info.url)))
    k0 = m.chunk_key(0)
    c.put(bucket, k0, bytes(len(c.get(bucket, k0))))
    with pytest.warns(UserWarning, match="uploaded anew"):
        again = objstore.push(tmp_path / "s.plm", "s3://%s/p" % bucket, name="again.plm",
                              chunk_bytes=64 << 10)
    assert again.chunks_uploaded >= 1
    objstore.pull(again.url, tmp_path / "out.plm")
    with plm.restore(again.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)


@pytest.mark.s3
def test_a_lying_index_row_about_an_unused_entry_costs_nothing(tmp_path, bucket, cache, rng):
    """The chunk lengths of a push's manifest were taken from every row of every index, the
    last one winning: one row naming an existing chunk with a wrong length, for an entry no
    snapshot has, made every later manifest using that chunk unreadable."""
    import xxhash
    _snap(tmp_path / "s.plm", rng, npages=32)
    c = S3Client()
    info = objstore.push(tmp_path / "s.plm", "s3://%s/p" % bucket)
    m = objstore.parse_manifest(c.get(*objstore.parse_url(info.url)))
    cid = (int(m.chunks["id"][0][0]), int(m.chunks["id"][0][1]))
    clen = int(m.chunks["length"][0])
    rows = np.zeros(1, objstore.INDEX_DTYPE)
    rows[0] = ((12345, 67890), cid, 0, PAGE_SIZE, clen + PAGE_SIZE, 0)
    idx = objstore._INDEX.pack(objstore.INDEX_MAGIC, 1, 0, 1,
                               xxhash.xxh3_64_intdigest(rows.tobytes())) + rows.tobytes()
    c.put(bucket, objstore.INDEXES + "f" * 32, idx)   # listed after the honest index
    again = objstore.push(tmp_path / "s.plm", "s3://%s/p" % bucket, name="again.plm")
    m2 = objstore.parse_manifest(c.get(*objstore.parse_url(again.url)))
    assert int(m2.chunks["length"][0]) == clen
    objstore.pull(again.url, tmp_path / "out.plm")
