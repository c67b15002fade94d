"""Snapshots in an S3 object store (issue 13): push / pull, restore("s3://...") lazily through
the per-machine chunk cache, and the failures: refused credentials, a corrupt chunk, the
gateway going away, a full cache directory. Against the real gateway of
scripts/s3-server.sh (a Ceph RADOS Gateway); docs/object-store.md."""
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
import uuid

import numpy as np
import pytest

import pylazymem as plm
from pylazymem import objstore
from pylazymem._s3 import S3Client, S3Config
from pylazymem.bench._machines import Machines, Relay
from _helpers import PAGE_SIZE, pages

# core: the snapshots pushed here are made by checkpoint() (push and pull themselves are Python)
pytestmark = [pytest.mark.core, pytest.mark.s3, pytest.mark.timeout(300)]

SIGBUS_RC = -signal.SIGBUS


@pytest.fixture
def bucket():
    name = "plm-%s" % uuid.uuid4().hex[:20]
    yield name
    # the test gateway keeps its data in memory (a memstore OSD): a suite's buckets left
    # behind grew it by gigabytes. Best effort: a test may have stopped the gateway.
    try:
        S3Client().remove_bucket(name)
    except Exception:
        pass


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PYLAZYMEM_CACHE_DIR", str(d))
    return d


def _cached_files(cache):
    return sorted(p for p in cache.rglob("*") if p.is_file() and len(p.name) == 32)


def _state(r, rng, unique_pages):
    """unique random pages first, then zero pages, then copies of the first pages."""
    v = pages(r)
    v[:unique_pages] = rng.integers(0, 256, size=(unique_pages, PAGE_SIZE), dtype=np.uint8)
    v[unique_pages:unique_pages + 8] = 0
    rest = r.npages - unique_pages - 8
    v[unique_pages + 8:] = v[:rest]
    return v.copy()


@pytest.fixture
def snap(tmp_path, rng):
    """A 4 MiB snapshot with a working set (pages 100..199 touched), its contents."""
    path = tmp_path / "s.plm"
    with plm.Region(4 << 20) as r:
        data = _state(r, rng, 700)
        plm.checkpoint(r, path, working_set=np.arange(100, 200))
    return path, data


# ---- push / pull ---------------------------------------------------------------------------

def test_push_creates_the_bucket_and_pull_gives_the_same_file(snap, bucket, tmp_path):
    path, _ = snap
    info = objstore.push(path, "s3://%s/team/models" % bucket, chunk_bytes=64 << 10)
    assert info.url == "s3://%s/team/models/s.plm" % bucket
    assert info.new_entries == info.entries > 0
    assert info.chunks_uploaded >= info.entries * PAGE_SIZE // (64 << 10)
    out = tmp_path / "back.plm"
    objstore.pull(info.url, out)
    assert out.read_bytes() == path.read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_second_push_sends_only_what_the_bucket_lacks(snap, bucket, tmp_path, rng):
    path, data = snap
    first = objstore.push(path, "s3://%s/p" % bucket)
    again = objstore.push(path, "s3://%s/p" % bucket, name="again.plm")
    assert again.new_entries == 0 and again.chunks_uploaded == 0
    # a snapshot sharing all but 10 pages with the first: 10 entries sent
    with plm.Region(4 << 20) as r:
        pages(r)[:] = data
        pages(r)[300:310] = rng.integers(0, 256, size=(10, PAGE_SIZE), dtype=np.uint8)
        plm.checkpoint(r, tmp_path / "t.plm")
    second = objstore.push(tmp_path / "t.plm", "s3://%s/other-prefix" % bucket)
    assert second.new_entries == 10
    assert second.bytes_uploaded < 0.15 * first.bytes_uploaded
    objstore.pull(second.url, tmp_path / "t2.plm")
    assert (tmp_path / "t2.plm").read_bytes() == (tmp_path / "t.plm").read_bytes()


def test_compressed_snapshot_round_trip(tmp_path, bucket, rng):
    with plm.Region(2 << 20) as r:
        pages(r)[:] = np.repeat(rng.integers(0, 4, size=(r.npages, 64), dtype=np.uint8), 64, 1)
        plm.checkpoint(r, tmp_path / "z.plm", compress="zstd")
        want = pages(r).copy()
    info = objstore.push(tmp_path / "z.plm", "s3://%s" % bucket)
    assert info.url == "s3://%s/z.plm" % bucket
    objstore.pull(info.url, tmp_path / "z2.plm")
    assert (tmp_path / "z2.plm").read_bytes() == (tmp_path / "z.plm").read_bytes()
    with plm.restore(info.url, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), want)


def test_a_chain_is_refused_with_the_fix(tmp_path, bucket, rng):
    with plm.Region(1 << 20) as r:
        _state(r, rng, 100)
        first = plm.checkpoint(r, tmp_path / "a.plm")
        pages(r)[3] = 1
        plm.checkpoint(r, tmp_path / "b.plm", parent=first)
    with pytest.raises(plm.SnapshotError, match="compact"):
        objstore.push(tmp_path / "b.plm", "s3://%s" % bucket)


def test_bad_urls_and_names(snap):
    path, _ = snap
    for url in ("s3:/x", "http://x/y", "s3://A_B/x", "s3://ab", "s3://abc/../x"):
        with pytest.raises(ValueError):
            objstore.push(path, url)
    with pytest.raises(ValueError, match="chunk store"):
        objstore.push(path, "s3://abc/.plm")


def test_missing_snapshot_and_refused_credentials(snap, bucket, monkeypatch):
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket)
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        objstore.pull("s3://%s/nothing.plm" % bucket, "/tmp/never-written.plm")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(plm.ObjectStoreError, match="credentials refused") as e:
        objstore.pull(info.url, "/tmp/never-written.plm")
    assert e.value.status == 403
    assert not os.path.exists("/tmp/never-written.plm")


def test_no_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(plm.ObjectStoreError, match="no S3 credentials"):
        S3Config.from_environment()


def _manifest_bytes(url):
    bucket, key = objstore.parse_url(url)
    return S3Client().get(bucket, key)


def test_hostile_manifests_are_refused(snap, bucket, rng):
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket)
    data = _manifest_bytes(info.url)
    m = objstore.parse_manifest(data, info.url)
    assert m.file_bytes == os.path.getsize(path)
    # every byte flip is caught by a checksum or a check
    for at in rng.integers(0, len(data), size=200).tolist() + [0, 8, 20, 63, 64, len(data) - 1]:
        bad = bytearray(data)
        bad[at] ^= 0x5A
        with pytest.raises(plm.SnapshotError):
            objstore.parse_manifest(bytes(bad), info.url)
    for cut in (0, 10, 64, len(data) // 2, len(data) - 1):
        with pytest.raises(plm.SnapshotError):
            objstore.parse_manifest(data[:cut], info.url)


def _table_views(m):
    """(chunks_of, entries_of): writable views of the chunk and entry tables in a manifest
    body laid out as m's (for edits that _resealed seals again)."""
    skel, nchunks = len(m.skeleton), len(m.chunks)

    def chunks_of(body):
        return np.frombuffer(body, objstore.CHUNK_DTYPE, nchunks, skel)

    def entries_of(body):
        return np.frombuffer(body, objstore.ENTRY_DTYPE, len(m.entries),
                             skel + nchunks * objstore.CHUNK_DTYPE.itemsize)

    return chunks_of, entries_of


def _resealed(data, edit):
    """The manifest `data` with edit(body) applied and both checksums made right again: what
    a hostile writer sends (a byte flip alone stops at a checksum)."""
    import xxhash
    head = objstore._MANIFEST
    fields = list(head.unpack_from(data))
    body = bytearray(data[head.size:])
    edit(body, fields)
    fields[7] = xxhash.xxh3_64_intdigest(bytes(body))
    fields[8] = xxhash.xxh3_64_intdigest(head.pack(*fields)[:head.size - 8])
    return head.pack(*fields) + bytes(body)


def test_sealed_manifests_with_bad_tables_are_refused(snap, bucket):
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=32 << 10)
    data = _manifest_bytes(info.url)
    m = objstore.parse_manifest(data, info.url)
    nchunks = len(m.chunks)
    chunks_of, entries_of = _table_views(m)

    def last_entry_past_its_chunk(body, fields):   # one byte over
        e = entries_of(body)
        e["offset"][-1] = chunks_of(body)["length"][e["chunk"][-1]] - PAGE_SIZE + 1

    def entry_in_no_chunk(body, fields):
        entries_of(body)["chunk"][0] = nchunks

    def empty_chunk(body, fields):
        chunks_of(body)["length"][0] = 0

    def huge_offset(body, fields):   # wraps in 32 bits, not in the check
        entries_of(body)["offset"][1] = 0xFFFFFFFF

    for edit, says in ((last_entry_past_its_chunk, "outside its chunk"),
                       (entry_in_no_chunk, "not in its table"), (empty_chunk, "a chunk of 0"),
                       (huge_offset, "outside its chunk")):
        with pytest.raises(plm.SnapshotError, match=says):
            objstore.parse_manifest(_resealed(data, edit), info.url)
    # the edit machinery itself changes nothing when it edits nothing
    assert objstore.parse_manifest(_resealed(data, lambda b, f: None), info.url).file_bytes \
        == m.file_bytes


@pytest.mark.uffd_full
def test_resealed_manifests_never_serve_wrong_bytes(snap, bucket, cache, rng):
    """A manifest whose chunk and entry tables were changed and sealed again (checksums right,
    every entry still inside its chunk, so parse_manifest accepts it) points pages at other
    bytes, or at chunks that are not there: each page is then served right or poisoned (its
    signature, in the skeleton's own checksummed tables, decides), never served wrong."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    raw = _manifest_bytes(info.url)
    m = objstore.parse_manifest(raw, info.url)
    nchunks, nent = len(m.chunks), len(m.entries)
    chunks_of, entries_of = _table_views(m)

    def moved(body, fields):        # entries pointed at other pages of other chunks
        e = entries_of(body)
        for k in rng.choice(nent, size=5, replace=False).tolist():
            c = int(rng.integers(0, nchunks))
            e["chunk"][k] = c
            e["offset"][k] = PAGE_SIZE * int(rng.integers(0, chunks_of(body)["length"][c] // PAGE_SIZE))

    def swapped(body, fields):      # two entries' places exchanged
        e = entries_of(body)
        a, b = rng.choice(nent, size=2, replace=False).tolist()
        e[[a, b]] = e[[b, a]]

    def unknown_chunk(body, fields):   # a chunk id with no object behind it
        chunks_of(body)["id"][int(rng.integers(0, nchunks))] ^= np.uint64(0x5A5A)

    def longer_chunk(body, fields):   # a length its object does not have (entries fit)
        chunks_of(body)["length"][int(rng.integers(0, nchunks))] += PAGE_SIZE
    b, key = objstore.parse_url(info.url)
    client = S3Client()
    served = failed = 0
    for n, edit in enumerate([moved, swapped, unknown_chunk, longer_chunk] * 2):
        sealed = _resealed(raw, edit)
        try:
            objstore.parse_manifest(sealed, info.url)
        except plm.SnapshotError:
            continue   # refused where it is read: nothing to serve
        name = "%s.hostile%d" % (key, n)
        client.put(b, name, sealed)
        with plm.restore("s3://%s/%s" % (b, name), prefetch="none", background=False) as r:
            try:
                r.materialize()
            except (plm.ObjectStoreError, plm.PoisonedPageError):
                # a call that could not serve a page raises and leaves the pages it did not
                # reach lazy (touching one would fault, and raise SIGBUS if it cannot be
                # served): page by page, then
                for p in np.flatnonzero(r.meta["state"] != int(plm.PageState.PRESENT)).tolist():
                    try:
                        r.materialize(p * PAGE_SIZE, PAGE_SIZE)
                    except (plm.ObjectStoreError, plm.PoisonedPageError):
                        pass
            present = np.flatnonzero(r.meta["state"] == int(plm.PageState.PRESENT))
            v = pages(r)
            for p in present.tolist():   # only present pages are read: none can fault
                assert np.array_equal(v[p], data[p]), "page %d served wrong (%s)" % (
                    p, edit.__name__)
            served += present.size
            failed += r.npages - present.size
            st = r.stats()["object_store"]
            if edit is unknown_chunk:   # a chunk the bucket lacks is asked for once, not per page
                assert st["failures"] == 1 and st["requests"] == st["fetches"] + 1, st
    assert failed > 0 and served > 0   # the edits took effect, and did not fail every page


def test_hostile_tables_are_refused_by_the_core_too(snap, bucket):
    """An entry outside its chunk, handed to the core directly (as a buggy caller would)."""
    from pylazymem._binding import ffi, lib
    path, _ = snap
    m = objstore.read_manifest(objstore.push(path, "s3://%s" % bucket).url)
    entries = m.entries.copy()
    entries["offset"][3] = m.chunks["length"][entries["chunk"][3]]
    cfg = ffi.new("struct lm_objs_config *")
    keep = [ffi.new("char[]", s) for s in (b"http://127.0.0.1:1", b"us-east-1", b"bucket", b"k", b"s")]
    cfg.endpoint, cfg.region, cfg.bucket, cfg.access_key, cfg.secret_key = keep
    out = ffi.new("struct lm_objs **")
    rc = lib.lm_objs_new(cfg, ffi.from_buffer("struct lm_objs_chunk[]", m.chunks), len(m.chunks),
                         ffi.from_buffer("struct lm_objs_entry[]", entries), len(entries), out)
    assert rc < 0 and "outside its chunk" in ffi.string(lib.lm_last_op()).decode()
    # a header line smuggled in through a credential
    token = ffi.new("char[]", b"tok\r\nx-amz-acl: public-read")
    cfg.session_token = token
    rc = lib.lm_objs_new(cfg, ffi.from_buffer("struct lm_objs_chunk[]", m.chunks), len(m.chunks),
                         ffi.from_buffer("struct lm_objs_entry[]", m.entries), len(m.entries), out)
    assert rc < 0 and "credentials" in ffi.string(lib.lm_last_op()).decode()


# ---- restore ------------------------------------------------------------------------------------

@pytest.mark.uffd_full
@pytest.mark.parametrize("prefetch,background", [("none", False), ("working-set", False),
                                                 ("working-set", True), ("all", False)])
def test_restore_from_the_bucket(snap, bucket, cache, prefetch, background):
    path, data = snap
    info = objstore.push(path, "s3://%s/x" % bucket, chunk_bytes=32 << 10)
    with plm.restore(info.url, prefetch=prefetch, background=background) as r:
        assert np.array_equal(pages(r), data)
        st = r.stats()["object_store"]
        assert st["failures"] == 0 and st["corrupt"] == 0
        assert st["fetches"] > 0 and st["fetches"] == st["requests"]
        if prefetch == "working-set":
            assert r.working_set().tolist()[:100] == list(range(100, 200))
        # checkpointing it again works (signatures from the manifest, pages from the bucket)
        again = plm.checkpoint(r, cache.parent / "again.plm")
    with plm.restore(again.path, prefetch="none", background=False) as r2:
        assert np.array_equal(pages(r2), data)


@pytest.mark.uffd_full
def test_second_restore_is_served_by_the_cache(snap, bucket, cache):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
        first = r.stats()["object_store"]
    files = _cached_files(cache)
    assert first["cache_writes"] == first["fetches"] == len(files) > 0
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
        second = r.stats()["object_store"]
    assert second["requests"] == 0 and second["cache_hits"] > 0


@pytest.mark.uffd_full
@pytest.mark.parametrize("codec", [None, "zstd"])
def test_a_damaged_cache_file_is_never_used(snap, bucket, cache, codec, tmp_path):
    path, data = snap
    if codec:   # text-like pages that compress: entries of their own lengths
        data = np.repeat(data[:, :64] % 4, 64, axis=1)
        path = tmp_path / "c.plm"
        with plm.Region(data.nbytes) as r:
            pages(r)[:] = data
            plm.checkpoint(r, path, compress=codec)
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        pages(r).sum()
    files = _cached_files(cache)
    with open(files[0], "r+b") as f:          # a flipped byte
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with open(files[1], "r+b") as f:          # torn: half a chunk
        f.truncate(os.path.getsize(files[1]) // 2)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
        st = r.stats()["object_store"]
    assert st["cache_bad"] == 2 and st["fetches"] == 2


@pytest.mark.uffd_full
@pytest.mark.parametrize("prefetch", ["all", "none"])
def test_a_damaged_cache_file_costs_one_download(snap, bucket, cache, prefetch):
    """Every entry of a zero-filled cache file fails its check: the first one fetches the
    bucket's copy, the others read that copy (they fetched the chunk once each before: 16
    downloads of one chunk here, 128 for a 512 KiB chunk). prefetch="all": the prefetch
    pipeline (entries checked in batches); "none": the fault path."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        pages(r).sum()
    victim = _cached_files(cache)[0]
    size = os.path.getsize(victim)
    victim.write_bytes(bytes(size))                    # the right size, no right byte
    with plm.restore(info.url, prefetch=prefetch, background=False) as r:
        assert np.array_equal(pages(r), data)
        st = r.stats()["object_store"]
        assert r.poisoned_pages().size == 0
    assert st["fetches"] == 1 and st["cache_bad"] == 1, st
    assert os.path.getsize(victim) == size and any(victim.read_bytes())   # mended


def _relay():
    """A relay to the gateway, which the test can cut as a gateway that went away."""
    u = urllib.parse.urlsplit(os.environ["AWS_ENDPOINT_URL"])
    proxy = Relay(("127.0.0.1", 0), (u.hostname, u.port))
    return proxy, "http://127.0.0.1:%d" % proxy.address[1]


def _run_then_cut(run_py, code, proxy, endpoint, tmp_path, args, env, timeout=120):
    """run_py(code) against `endpoint` (the relay); the snippet's last argument is a file it
    creates when the relay is to be cut, then waits for it to be gone."""
    stop_file = tmp_path / "stop-now"
    done = threading.Event()

    def stopper():
        while not stop_file.exists() and not done.is_set():
            done.wait(0.01)
        proxy.cut()
        stop_file.unlink(missing_ok=True)
    threading.Thread(target=stopper, daemon=True).start()
    try:
        return run_py(code, timeout=timeout, env=dict(env, AWS_ENDPOINT_URL=endpoint),
                      args=tuple(args) + (str(stop_file),))
    finally:
        done.set()


_FILL_CACHE = r"""
with plm.restore(sys.argv[1], prefetch="none", background=False) as r:
    pages(r).sum()
"""


_CACHE_BAD_NETWORK_GONE = r"""
url, stop_file = sys.argv[1], sys.argv[2]
r = plm.restore(url, prefetch="none", background=False)   # manifest and set-up: gateway up
open(stop_file, "w").close()                               # the test cuts the relay now
while os.path.exists(stop_file):
    time.sleep(0.01)
try:
    r.prefetch(np.arange(r.npages))
    print("NO_RAISE", flush=True)
except plm.ObjectStoreError as e:
    print("RAISED", str(e)[:100], flush=True)
print("STATS", json.dumps(r.stats()["object_store"]), flush=True)
print("POISONED", r.poisoned_pages().size, flush=True)
present = int((r.meta["state"] == int(plm.PageState.PRESENT)).sum())
print("PRESENT", present, "OF", r.npages, flush=True)
"""


@pytest.mark.uffd_full
def test_a_damaged_cache_file_with_the_gateway_gone_leaves_pages_lazy(snap, bucket, cache,
                                                                      run_py, tmp_path):
    """A cache entry fails its check and the bucket cannot be asked again (the network, not
    the chunk): the prefetch raises and leaves those pages lazy, for a later access to get
    from the bucket; it does not poison pages the bucket holds intact."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    proxy, endpoint = _relay()
    # The cache is per endpoint: filled through the relay, as the restore below reads it; in
    # a process of its own (the relay's threads need this one's GIL, which a fault holds).
    filled = run_py(_FILL_CACHE, timeout=120, env={"AWS_ENDPOINT_URL": endpoint},
                    args=(info.url,))
    assert filled.returncode == 0, filled.describe()
    victim = _cached_files(cache)[0]
    with open(victim, "r+b") as f:          # one flipped byte: one entry fails its check
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    res = _run_then_cut(run_py, _CACHE_BAD_NETWORK_GONE, proxy, endpoint, tmp_path,
                        (info.url,),
                        {"PYLAZYMEM_S3_RETRIES": "1", "PYLAZYMEM_S3_TIMEOUT_MS": "2000"})
    assert res.returncode == 0, res.describe()
    raised = [l for l in res.stdout.splitlines() if l.startswith("RAISED")]
    assert raised and "object store" in raised[0], res.describe()
    assert "POISONED 0\n" in res.stdout, res.describe()
    n = int(res.stdout.split("PRESENT ", 1)[1].split()[0])
    assert n < data.shape[0], res.describe()   # the failed batch's pages: lazy
    st = json.loads(res.stdout.split("STATS ", 1)[1].splitlines()[0])
    assert st["cache_bad"] == 1 and st["fetches"] == 0 and st["failures"] == 1, st


_FDS = r"""
def fds(prefix):
    out = 0
    for f in os.listdir("/proc/self/fd"):
        try:
            out += os.readlink("/proc/self/fd/" + f).startswith(prefix)
        except OSError:
            pass
    return out
"""

_NO_SOCKET_KEPT = _FDS + r"""
url = sys.argv[1]
def cycle():
    with plm.restore(url, prefetch="none", background=False) as r:
        r.prefetch(np.arange(8))           # one batch: fetched on this (the caller's) thread
        assert pages(r)[:8].any()
cycle()
base = fds("socket:")
for _ in range(5):
    cycle()
print("GROWTH", fds("socket:") - base, flush=True)
"""


@pytest.mark.uffd_full
def test_closed_restores_keep_no_connection(snap, bucket, run_py):
    """A request's easy handle (and its kept-alive connection) belongs to the object store
    reader, not to the thread that made the request: restoring and closing again and again
    on one thread leaves no socket behind (one per cycle before)."""
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=16 << 10)
    res = run_py(_NO_SOCKET_KEPT, timeout=120, env={"PYLAZYMEM_CACHE_DIR": "none"},
                 args=(info.url,))
    assert res.returncode == 0, res.describe()
    assert "GROWTH 0\n" in res.stdout, res.describe()


_FD_BUDGET = r"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
""" + _FDS + r"""
url, cache = sys.argv[1], sys.argv[2]
a = plm.restore(url, prefetch="all", background=False)
b = plm.restore(url, prefetch="all", background=False)
print("KEPT", fds(cache), flush=True)
assert np.array_equal(pages(a), pages(b))
a.close(); b.close()
print("AFTER", fds(cache), flush=True)
"""


@pytest.mark.uffd_full
def test_cache_files_kept_open_within_one_budget_per_process(snap, bucket, cache, run_py):
    """Cache files stay open for later reads up to a quarter of the descriptor limit for the
    whole process, however many restores it has (each had its own quarter before: four
    restores took every descriptor)."""
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=16 << 10)
    with plm.restore(info.url, prefetch="all", background=False):
        pass                                   # the cache filled: ~180 chunk files
    assert len(_cached_files(cache)) > 40
    res = run_py(_FD_BUDGET, timeout=120, args=(info.url, str(cache)))
    assert res.returncode == 0, res.describe()
    kept = int(res.stdout.split("KEPT ", 1)[1].split()[0])
    assert 0 < kept <= 16, res.describe()
    assert "AFTER 0\n" in res.stdout, res.describe()


_OUTAGE = r"""
url, stop_file = sys.argv[1], sys.argv[2]
r = plm.restore(url, prefetch="none", background=False)   # set up while the gateway is up
open(stop_file, "w").close()                               # the test cuts the relay now
while os.path.exists(stop_file):
    time.sleep(0.01)
t0 = time.monotonic()
r.background_start()                                       # every chunk: a failed fetch
while r.stats()["background_running"]:
    assert time.monotonic() - t0 < 100, r.stats()["object_store"]
    time.sleep(0.01)
print("STATS", json.dumps(r.stats()["object_store"]), flush=True)
try:
    r.meta
except plm.ObjectStoreError:   # the failures no call reported: raised once
    print("RAISED_ONCE", flush=True)
print("POISONED", r.poisoned_pages().size, flush=True)
"""


@pytest.mark.uffd_full
def test_an_outage_costs_each_chunk_one_retry_cycle(snap, bucket, cache, run_py, tmp_path):
    """The gateway gone: a fill that fails a run of pages tries each page alone, and each of
    those asked the bucket again with all its retries (a run of 64 pages: 64 retry cycles,
    up to retries x timeout each: minutes of a fault that does not end). A chunk whose fetch
    failed is not asked for again for a moment: about one retry cycle per chunk."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=256 << 10)
    nchunks = len(objstore.read_manifest(info.url).chunks)
    proxy, endpoint = _relay()
    res = _run_then_cut(run_py, _OUTAGE, proxy, endpoint, tmp_path, (info.url,),
                        {"PYLAZYMEM_S3_RETRIES": "1", "PYLAZYMEM_S3_TIMEOUT_MS": "2000"},
                        timeout=150)
    assert res.returncode == 0, res.describe()
    st = json.loads(res.stdout.split("STATS ", 1)[1].splitlines()[0])
    # the background fill leaves pages lazy in an outage (review 15): nothing lost, nothing
    # to report; it backs off and gives up (docs/object-store.md, "The background fill")
    assert st["fetches"] == 0 and st["failures"] == 0, st
    # two attempts (retries=1) per chunk, twice over for a chunk asked again after the hold
    assert st["requests"] <= 4 * nchunks, (st, nchunks)
    assert "RAISED_ONCE" not in res.stdout, res.describe()
    poisoned = int(res.stdout.split("POISONED ", 1)[1].split()[0])
    assert poisoned == 0, res.describe()   # lazy: a fault after the outage fetches them


@pytest.mark.uffd_full
def test_cache_stays_under_its_bound(snap, bucket, cache, monkeypatch):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=32 << 10)
    monkeypatch.setenv("PYLAZYMEM_CACHE_MAX_BYTES", str(256 << 10))
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
        st = r.stats()["object_store"]
    assert st["evicted"] > 0
    total = sum(os.path.getsize(p) for p in _cached_files(cache))
    assert total <= (256 << 10)


@pytest.mark.uffd_full
def test_a_small_restore_keeps_the_cache_under_its_bound(snap, bucket, cache, monkeypatch):
    """Eviction also runs at a reader's first write: a restore that writes less than a
    sixteenth of the bound still brings an over-full directory back under it (before, many
    such restores never evicted). The scan clears temporaries a dead writer left (older than
    10 minutes), keeps a live writer's, and counts kept manifests."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=32 << 10)
    with plm.restore(info.url, prefetch="none", background=False) as r:
        pages(r)[:1].sum()                    # the cache directory made, a chunk in it
    d = _cached_files(cache)[0].parent
    for f in _cached_files(cache):
        f.unlink()
    old = 1_000_000_000                       # 2001: long ago
    for i in range(12):                       # 12 MiB of other chunks, sparse, long unused
        with open(d / ("%032x" % (i + 1)), "wb") as f:
            f.truncate(1 << 20)
        os.utime(d / ("%032x" % (i + 1)), (old, old))
    (d / ("m-%016x" % 7)).write_bytes(b"etag\n" + bytes(1000))
    os.utime(d / ("m-%016x" % 7), (old - 1000, old - 1000))   # the oldest of all
    (d / ".tmp.dead.1.2").write_bytes(b"x")
    os.utime(d / ".tmp.dead.1.2", (old, old))
    (d / ".tmp.live.1.3").write_bytes(b"x")   # a writer at work right now
    monkeypatch.setenv("PYLAZYMEM_CACHE_MAX_BYTES", str(8 << 20))
    with plm.restore(info.url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r)[:8], data[:8])   # writes one or two chunks: < 512 KiB
        st = r.stats()["object_store"]
    assert 0 < st["cache_writes"] * (32 << 10) < (8 << 20) // 16
    assert st["evicted"] >= 5, st
    names = {p.name for p in d.iterdir()}
    assert ".tmp.dead.1.2" not in names and ".tmp.live.1.3" in names
    assert "m-%016x" % 7 not in names          # the oldest go first, kept manifests too
    total = sum(p.stat().st_size for p in d.iterdir()
                if len(p.name) == 32 or (len(p.name) == 18 and p.name.startswith("m-")))
    assert total <= 8 << 20


_FULL_CACHE = r"""
import resource, signal
want = np.load(sys.argv[2])
with plm.restore(sys.argv[1], prefetch="none", background=False) as r:
    # from here on no chunk fits in the cache: a full directory (write() fails, EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
    ok = bool(np.array_equal(pages(r), want))
    print(json.dumps(dict(ok=ok, **r.stats()["object_store"])))
"""


@pytest.mark.uffd_full
def test_a_full_cache_directory_costs_only_the_caching(snap, bucket, cache, run_py, tmp_path):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    np.save(tmp_path / "want.npy", data)
    res = run_py(_FULL_CACHE, timeout=120, args=(info.url, str(tmp_path / "want.npy")))
    assert res.returncode == 0, res.describe()
    st = json.loads(res.stdout.strip().splitlines()[-1])
    assert st["ok"] and st["cache_write_errors"] > 0 and st["cache_writes"] == 0
    assert not _cached_files(cache)
    assert not [p for p in cache.rglob(".tmp.*")], "temporaries left behind"


def test_restore_with_refused_credentials_fails_before_any_fault(snap, bucket, monkeypatch):
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY0000000000")
    with pytest.raises(plm.ObjectStoreError, match="credentials refused"):
        plm.restore(info.url)
    with pytest.raises(FileNotFoundError):
        monkeypatch.undo()
        plm.restore("s3://%s/missing.plm" % bucket)


@pytest.mark.uffd_full
def test_a_kept_manifest_does_not_outlive_its_snapshot_or_credentials(snap, bucket, cache,
                                                                      monkeypatch):
    """A warm restore sets up from the kept manifest while it asks the bucket: what the bucket
    answers still decides, before restore() returns anything."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket)
    with plm.restore(info.url, background=False) as r:   # keeps the manifest
        assert np.array_equal(pages(r), data)
    assert list(cache.rglob("m-*"))
    with monkeypatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(plm.ObjectStoreError, match="credentials refused") as e:
            plm.restore(info.url, background=False)
        assert e.value.status == 403
    b, key = objstore.parse_url(info.url)
    S3Client().delete(b, key)
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        plm.restore(info.url, background=False)


# ---- the gateway misbehaving ----------------------------------------------------------------

_GATEWAY_GONE = r"""
url, want_path, stop_file = sys.argv[1], sys.argv[2], sys.argv[3]
want = np.load(want_path)
r = plm.restore(url, prefetch="none", background=False, max_cluster_pages=1)
v = pages(r)
half = r.npages // 2
assert np.array_equal(v[:half], want[:half])        # served while the gateway is up
open(stop_file, "w").close()                        # the test stops the gateway now
while os.path.exists(stop_file):
    pass
st = r.stats()["object_store"]
print("BEFORE", json.dumps(st), flush=True)
try:
    x = int(v[650].sum())                # a unique page whose chunk was never fetched: SIGBUS
    print("READ", x, flush=True)
except Exception as e:
    print("EXC", type(e).__name__, flush=True)
"""


@pytest.mark.uffd_full
def test_gateway_stopped_mid_restore_fails_loudly(snap, bucket, cache, run_py, tmp_path):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=32 << 10)
    np.save(tmp_path / "want.npy", data)
    proxy, endpoint = _relay()   # the gateway, as far as the restore knows
    res = _run_then_cut(run_py, _GATEWAY_GONE, proxy, endpoint, tmp_path,
                        (info.url, str(tmp_path / "want.npy")),
                        {"PYLAZYMEM_S3_RETRIES": "2", "PYLAZYMEM_S3_TIMEOUT_MS": "2000"})
    assert "BEFORE" in res.stdout, res.describe()
    assert "READ" not in res.stdout, "a page was read as something: " + res.describe()
    assert res.returncode == SIGBUS_RC, res.describe()


_AFTER_FAILURE = r"""
url, page = sys.argv[1], int(sys.argv[2])
# the background fill meets the bad chunk (no access raised SIGBUS: nobody touched the page)
r = plm.restore(url, prefetch="none", background=True)
deadline = time.monotonic() + 60
while r.stats()["background_running"]:
    assert time.monotonic() < deadline
    time.sleep(0.01)
print("STATS", json.dumps(r.stats()["object_store"]), flush=True)
try:
    r.meta
    print("NO_EXCEPTION", flush=True)
except plm.ObjectStoreError as e:
    print("NEXT_CALL_RAISED", str(e)[:80], flush=True)
want = [int(p) for p in sys.argv[3].split(",")]
print("POISONED" if r.poisoned_pages().tolist() == want else "NOT_POISONED", flush=True)
r.close()
# a call that meets it itself raises, and the next one does not again
r = plm.restore(url, prefetch="none", background=False, max_cluster_pages=1)
try:
    r.materialize(page * PAGE_SIZE, PAGE_SIZE)
    print("READ_OK", flush=True)
except plm.ObjectStoreError as e:
    print("RAISED", str(e)[:100], flush=True)
# a call that fails leaves its pages lazy (as prefetch does): a later access fails loudly
print("THEN_OK" if r.poisoned_pages().size == 0 and
      r.meta["state"][page] != int(plm.PageState.PRESENT) else "THEN_BAD", flush=True)
try:   # every page of the refused chunk fails again, without fetching it again
    r.materialize()
except plm.ObjectStoreError:
    print("ALL_LOST", flush=True)
st = r.stats()["object_store"]
print("REFUSED_ONCE" if st["corrupt"] == 2 and st["failures"] == 1 else "AGAIN %r" % st,
      flush=True)
"""


@pytest.mark.uffd_full
def test_corrupt_chunk_is_fetched_again_then_poisoned(snap, bucket, cache, run_py):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=32 << 10)
    m = objstore.read_manifest(info.url)
    # damage the chunk of some page's entry in the bucket itself
    page = 250
    fd = os.open(path, os.O_RDONLY)
    try:
        from pylazymem import _snapfile as S
        pmap = S._read(fd, str(path)).map.astype(np.int64)
    finally:
        os.close(fd)
    entry = int(pmap[page]) - 2
    c = int(m.entries["chunk"][entry])
    in_chunk = np.flatnonzero(m.entries["chunk"] == c)   # the whole chunk is refused
    lost = np.flatnonzero(np.isin(pmap - 2, in_chunk))
    body = bytearray(S3Client().get(bucket, m.chunk_key(c)))
    body[int(m.entries["offset"][entry]) + 7] ^= 0xFF
    S3Client().put(bucket, m.chunk_key(c), bytes(body))
    res = run_py(_AFTER_FAILURE, timeout=120,
                 args=(info.url, str(page), ",".join(map(str, lost.tolist()))))
    assert res.returncode == 0, res.describe()
    st = json.loads(res.stdout.split("STATS ", 1)[1].splitlines()[0])
    assert st["corrupt"] == 2 and st["failures"] == 1, st     # fetched once more, then refused
    for want in ("NEXT_CALL_RAISED", "\nPOISONED", "RAISED materialize", "THEN_OK",
                 "ALL_LOST", "REFUSED_ONCE"):
        assert want in res.stdout, res.describe()


_CONCURRENT = r"""
want = np.load(sys.argv[2])
with plm.restore(sys.argv[1], prefetch="working-set", background=True) as r:
    assert np.array_equal(pages(r), want)
print("OK", flush=True)
"""


@pytest.mark.uffd_full
def test_processes_share_one_cache_safely(snap, bucket, cache, tmp_path):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=16 << 10)
    np.save(tmp_path / "want.npy", data)
    from conftest import PRELUDE, TESTS_DIR, REPO_DIR
    env = dict(os.environ, PYTHONPATH=TESTS_DIR)
    procs = [subprocess.Popen([sys.executable, "-c", PRELUDE + _CONCURRENT, info.url,
                               str(tmp_path / "want.npy")], env=env, cwd=REPO_DIR,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and "OK" in out, err
    m = objstore.read_manifest(info.url)
    files = _cached_files(cache)
    assert len(files) == len(m.chunks)
    assert not [p for p in cache.rglob(".tmp.*")]


_MACHINE = r"""
url, want_path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
want = np.load(want_path)
pages_read = np.random.default_rng(seed).choice(want.shape[0], 200, replace=False)
with plm.restore(url, prefetch="working-set", background=False) as r:
    v = pages(r)
    ok = all(np.array_equal(v[p], want[p]) for p in pages_read.tolist())
    print(json.dumps(dict(ok=ok, **r.stats()["object_store"])), flush=True)
"""


@pytest.mark.uffd_full
@pytest.mark.netns
def test_machines_restore_concurrently_through_their_own_caches(snap, bucket, tmp_path):
    """Three machines (network namespaces, each with its own cache) restore one snapshot at
    once against the one gateway: every page they read is right, each machine fetches a chunk
    at most once."""
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=16 << 10)
    np.save(tmp_path / "want.npy", data)
    from conftest import PRELUDE, TESTS_DIR, REPO_DIR
    with Machines(3, os.environ["AWS_ENDPOINT_URL"]) as ms:
        procs = []
        for k in range(3):
            env = dict(os.environ, PYTHONPATH=TESTS_DIR,
                       PYLAZYMEM_CACHE_DIR=str(tmp_path / ("cache-%d" % k)))
            procs.append(ms.popen(k, [sys.executable, "-c", PRELUDE + _MACHINE, info.url,
                                      str(tmp_path / "want.npy"), str(k)], env=env,
                                  cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    for k, st in enumerate(results):
        assert st["ok"], (k, st)
        assert st["fetches"] == st["requests"] == st["cache_writes"] > 0, (k, st)
        cached = [p for p in (tmp_path / ("cache-%d" % k)).rglob("*") if len(p.name) == 32]
        assert len(cached) == st["fetches"]


@pytest.mark.uffd_full
@pytest.mark.shared_pages
def test_shared_restore_from_the_bucket(snap, bucket, cache):
    path, data = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=64 << 10)
    with plm.restore(info.url, share=True) as r1, plm.restore(info.url, share=True) as r2:
        assert r1.shared and r2.shared
        assert np.array_equal(pages(r1), data)
        pages(r2)[5] = 9                       # private to r2
        assert np.array_equal(pages(r1), data)
        assert np.all(pages(r2)[5] == 9)


@pytest.mark.uffd_full
def test_a_replaced_snapshot_is_never_served_from_the_kept_manifest(snap, bucket, cache,
                                                                     tmp_path, rng, monkeypatch):
    """The manifest is kept in the cache and asked for conditionally (ETag): a snapshot pushed
    again under the same name is the one restored next."""
    path, data = snap
    url = objstore.push(path, "s3://%s" % bucket, name="same.plm").url
    with plm.restore(url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
    assert [p for p in cache.rglob("m-*")], "the manifest was not kept"
    other = _state_file(tmp_path / "o.plm", rng)
    objstore.push(tmp_path / "o.plm", "s3://%s" % bucket, name="same.plm")
    started = []   # the restore set up from the kept (old) manifest, then began again
    real = objstore.open_source
    monkeypatch.setattr(objstore, "open_source", lambda u, *a: started.append(u) or real(u, *a))
    for prefetch in ("working-set", "none"):
        with plm.restore(url, prefetch=prefetch, background=False) as r:
            assert np.array_equal(pages(r), other)
    assert len(started) == 3, started   # twice for the first restore, once for the second
    # a damaged kept copy is not trusted either
    for p in cache.rglob("m-*"):
        b = bytearray(p.read_bytes())
        b[-3] ^= 1
        p.write_bytes(bytes(b))
    with plm.restore(url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), other)
    # nor an empty one, one without its ETag line, or one whose ETag no request can carry:
    # the bucket's copy, kept again
    good = _manifest_bytes(url)
    for damage in (b"", b"no etag line at all" * 100, b'"e\rtag"\n' + good,
                   '"\u20actag"\n'.encode() + good):
        for p in cache.rglob("m-*"):
            p.write_bytes(damage)
        with plm.restore(url, prefetch="none", background=False) as r:
            assert np.array_equal(pages(r), other)
        assert all(p.stat().st_size > 4096 for p in cache.rglob("m-*"))


@pytest.mark.uffd_full
def test_a_replaced_snapshot_is_restored_where_its_manifest_cannot_be_kept(snap, bucket, cache,
                                                                          tmp_path, rng,
                                                                          monkeypatch):
    """The restart after a re-push takes the bucket's new manifest as read, not from the cache
    (a full or read-only cache directory keeps the old copy there)."""
    path, data = snap
    url = objstore.push(path, "s3://%s" % bucket, name="same.plm").url
    with plm.restore(url, prefetch="none", background=False) as r:
        assert np.array_equal(pages(r), data)
    other = _state_file(tmp_path / "o.plm", rng)
    objstore.push(tmp_path / "o.plm", "s3://%s" % bucket, name="same.plm")
    monkeypatch.setattr(objstore, "_keep", lambda *a: None)   # the cache takes nothing more
    for _ in range(2):
        with plm.restore(url, prefetch="working-set", background=False) as r:
            assert np.array_equal(pages(r), other)


def test_parse_manifest_reads_in_place(snap, bucket):
    """A manifest is parsed where it lies (a warm restore parses the kept copy as read): the
    skeleton and tables are read-only views of the buffer, not copies."""
    path, _ = snap
    url = objstore.push(path, "s3://%s" % bucket, name="inplace.plm").url
    b, key = objstore.parse_url(url)
    raw = bytearray(objstore.S3Client().get(b, key))
    m = objstore.parse_manifest(raw, url)
    assert m.skeleton.readonly and bytes(m.skeleton[:8]) == b"PLMSNAP\0"
    assert not m.chunks.flags.writeable and not m.entries.flags.writeable
    assert np.shares_memory(m.entries, np.frombuffer(raw, np.uint8))
    with pytest.raises(ValueError):
        m.entries["offset"][0] = 1


def _state_file(path, rng):
    with plm.Region(4 << 20) as r:
        data = _state(r, rng, 300)
        plm.checkpoint(r, path)
    return data


_FORK_AFTER_RESTORE = r"""
import os, sys, time
url = sys.argv[1]
r = plm.restore(url, prefetch="none", background=True)
while r.stats()["background_pages"] == 0:   # the fill has hinted chunks: fetchers run
    time.sleep(0.01)
pid = os.fork()
if pid == 0:
    code = 3
    try:
        r.stats()
    except plm.RegionClosedError:
        code = 0
    os._exit(code)
_, status = os.waitpid(pid, 0)
print("CHILD", os.waitstatus_to_exitcode(status), flush=True)
r.close()
"""


def test_fork_after_a_restore_from_the_bucket(snap, bucket, cache, run_py):
    """The fork child dropped the parent's regions by freeing them, which joined the object
    store's fetcher threads, which exist only in the parent: the child died with SIGSEGV
    inside os.fork() (multiprocessing's workers too)."""
    path, _ = snap
    info = objstore.push(path, "s3://%s" % bucket, chunk_bytes=16 << 10)
    res = run_py(_FORK_AFTER_RESTORE, timeout=120, args=(info.url,))
    assert res.returncode == 0, res.describe()
    assert "CHILD 0\n" in res.stdout, res.describe()
