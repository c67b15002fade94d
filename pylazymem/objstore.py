"""Snapshots in an S3 object store (issue 13): `push` and `pull`, and the manifest that
`restore("s3://...")` reads. docs/object-store.md describes the layout and formats.

A pushed snapshot is a **manifest** object at `s3://bucket/prefix/NAME` plus the store
entries it needs, packed into content-addressed **chunk** objects shared by every snapshot of
the bucket (`s3://bucket/.plm/chunks/<XXH3-128 of the chunk, 32 hex digits>`). An entry
(one page's stored bytes, compressed or raw) already in the bucket is not uploaded again: each
push writes an **index** object (`s3://bucket/.plm/index/<id>`) naming the entries its new
chunks hold, and the next push reads them all. Chunks and indexes go up first, the manifest
last: a visible manifest's chunks are all there.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import stat
import struct
import tempfile
import threading
import warnings
from typing import NamedTuple

import numpy as np
import xxhash

from . import _snapfile as S
from ._atomic import _abandon, _commit, _temporary
from ._errors import ObjectStoreError
from ._s3 import S3Client, parse_url

MANIFEST_MAGIC = b"PLMS3MF\x00"
INDEX_MAGIC = b"PLMS3IX\x00"
FORMAT = 1
CHUNKS = ".plm/chunks/"
INDEXES = ".plm/index/"
DEFAULT_CHUNK_BYTES = 512 << 10      # AWS Lambda's chunk size for container images
MAX_CHUNK_BYTES = 64 << 20
MAX_MANIFEST_BYTES = 1 << 34
MAX_INDEX_BYTES = 1 << 32     # an index of 89 million new entries (a push of 340 GiB)

# header: magic, format, flags, skeleton bytes, chunks, entries, the original file's size,
# body checksum (XXH3-64 of everything after the header), header checksum (of the bytes before)
_MANIFEST = struct.Struct("<8sII5QQ")
CHUNK_DTYPE = np.dtype([("id", "<u8", 2), ("length", "<u4"), ("reserved", "<u4")])
ENTRY_DTYPE = np.dtype([("chunk", "<u4"), ("offset", "<u4")])
INDEX_DTYPE = np.dtype([("key", "<u8", 2), ("chunk", "<u8", 2), ("offset", "<u4"),
                        ("length", "<u4"), ("chunk_length", "<u4"), ("reserved", "<u4")])
_INDEX = struct.Struct("<8sIIQQ")   # magic, format, flags, entries, XXH3-64 of the entries

PARALLEL = 8   # requests in flight during push and pull


class PushInfo(NamedTuple):
    url: str                 # s3://bucket/prefix/NAME: what restore() and pull take
    entries: int             # store entries of the snapshot
    new_entries: int         # of those, uploaded by this push (the others were in the bucket)
    chunks_uploaded: int
    bytes_uploaded: int      # chunk, index and manifest bytes sent
    snapshot_bytes: int      # the file's size


class Manifest(NamedTuple):
    url: str
    skeleton: memoryview     # the snapshot file without its store section (a view of the
                             # manifest's bytes)
    header: dict             # the skeleton's snapshot header (_snapfile fields)
    chunks: np.ndarray       # CHUNK_DTYPE (read-only: a view of the manifest)
    entries: np.ndarray      # ENTRY_DTYPE, one per store entry (read-only, likewise)
    lengths: np.ndarray      # int64, each entry's stored length (read-only)
    file_bytes: int

    def chunk_key(self, i):
        return CHUNKS + chunk_name(self.chunks["id"][i])


def chunk_name(id128) -> str:
    lo, hi = int(id128[0]), int(id128[1])
    return "%016x%016x" % (hi, lo)


def _id128(data) -> tuple:
    d = xxhash.xxh3_128_intdigest(data)
    return d & ((1 << 64) - 1), d >> 64


def _entry_key(data, word) -> tuple:
    # the codec is part of an entry's identity (the same bytes under another codec differ)
    h = xxhash.xxh3_128()
    h.update(struct.pack("<I", word >> 28))
    h.update(data)
    d = h.intdigest()
    return d & ((1 << 64) - 1), d >> 64


def _split_url(url, what):
    try:
        return parse_url(url)
    except ValueError as e:
        raise ValueError("%s: %s" % (what, e)) from None


# ---- push --------------------------------------------------------------------------------

def _bucket_entries(client, bucket):
    """{entry key: (chunk id, offset, length, chunk length)} from every index object of the
    bucket."""
    known = {}
    for key, size in client.list(bucket, INDEXES):
        try:
            if not _INDEX.size <= size <= MAX_INDEX_BYTES:
                raise ValueError("listed with %d bytes" % size)
            try:
                data = client.get(bucket, key, max_bytes=size)
            except ObjectStoreError as e:   # longer than listed: not the index it was
                if e.code != "ResponseTooLarge":
                    raise
                raise ValueError(str(e)) from None
            rows = _parse_index(data)
        except ValueError as e:   # never trusted: a bad index only costs dedup
            warnings.warn("s3://%s/%s: ignored (%s)" % (bucket, key, e), stacklevel=3)
            continue
        ok = (rows["offset"].astype(np.int64) + rows["length"] <= rows["chunk_length"]) & \
            (rows["chunk_length"] <= MAX_CHUNK_BYTES) & (rows["length"] > 0)
        for k0, k1, c0, c1, off, ln, cl in zip(
                rows["key"][ok, 0].tolist(), rows["key"][ok, 1].tolist(),
                rows["chunk"][ok, 0].tolist(), rows["chunk"][ok, 1].tolist(),
                rows["offset"][ok].tolist(), rows["length"][ok].tolist(),
                rows["chunk_length"][ok].tolist()):
            known.setdefault((k0, k1), ((c0, c1), off, ln, cl))
    return known


def _check_reused(client, bucket, known, keys, lens, words):
    """Entries of this push that the bucket's indexes say it holds already: each chunk that
    holds some is read once (checked against its id) and every such entry's bytes against
    its key. An index is not trusted: an entry that is not where its row says is dropped from
    `known` (this push uploads it anew; a warning names the chunk). A chunk that is gone (404)
    fails the push, naming the stale indexes to remove. Returns the ids of the chunks whose
    bytes do not match their id (to be written over)."""
    by_chunk = {}   # (chunk id, chunk length) -> {entry key: (offset, length, word)}
    for i, k in enumerate(keys):
        row = known.get(k)
        if row is not None:
            by_chunk.setdefault((row[0], row[3]), {})[k] = (row[1], row[2], i)

    def check(item):
        (cid, clen), ents = item
        try:
            data = client.get(bucket, CHUNKS + chunk_name(cid), max_bytes=clen)
        except ObjectStoreError as e:
            if e.status == 404:
                return cid, None, False
            if e.code != "ResponseTooLarge":
                raise
            data = b""
        if len(data) != clen or _id128(data) != cid:
            # the object itself is not what its name says (or the rows' length is wrong)
            return cid, list(ents), True
        mv = memoryview(data)
        return cid, [k for k, (off, ln, i) in ents.items()
                     if ln != int(lens[i]) or _entry_key(mv[off:off + ln], int(words[i])) != k
                     ], False

    gone, bad, damaged = [], {}, set()
    with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
        for cid, wrong, whole in ex.map(check, by_chunk.items()):
            if wrong is None:
                gone.append(cid)
            elif wrong:
                bad[cid] = wrong
                if whole:
                    damaged.add(cid)
    if gone:
        raise ObjectStoreError(
            "push: %d chunk(s) named by the bucket's indexes are missing (e.g. %s%s): "
            "remove the stale index objects under s3://%s/%s and push again"
            % (len(gone), CHUNKS, chunk_name(gone[0]), bucket, INDEXES), what="push")
    for cid, wrong in bad.items():
        warnings.warn("s3://%s/%s%s: %d entr%s the bucket's indexes place in it %s not there "
                      "(a wrong index): uploaded anew"
                      % (bucket, CHUNKS, chunk_name(cid), len(wrong),
                         "y" if len(wrong) == 1 else "ies", "is" if len(wrong) == 1 else "are"),
                      stacklevel=3)
        for k in wrong:
            known.pop(k, None)
    # A chunk whose bytes are not its id's: the entries go up again, possibly in a chunk of
    # the same id, which must then be written over, not taken as there (content-addressed).
    return damaged


def _parse_index(data):
    if len(data) < _INDEX.size:
        raise ValueError("too short for an index")
    magic, fmt, flags, n, xx = _INDEX.unpack_from(data)
    if magic != INDEX_MAGIC or fmt != FORMAT or flags:
        raise ValueError("not a pylazymem index of format %d" % FORMAT)
    body = memoryview(data)[_INDEX.size:]
    if len(body) != n * INDEX_DTYPE.itemsize or xxhash.xxh3_64_intdigest(body) != xx:
        raise ValueError("size or checksum mismatch")
    return np.frombuffer(body, INDEX_DTYPE, n)


class _StoreFile:
    """The snapshot file being pushed, read with pread rather than mapped: a file truncated
    while it is pushed (overwritten in place) must fail the push, not kill it with SIGBUS.
    What was read is checked against the file's size and times before the push's index and
    manifest go up (a file rewritten meanwhile would mix two versions)."""

    SPAN = 8 << 20   # bytes per read of consecutive entries

    def __init__(self, fd, path):
        self.fd, self.path = fd, path
        st = os.fstat(fd)
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _changed(self, what):
        return S.SnapshotError("%s: changed while it was being pushed (%s): nothing of this "
                               "push names what was sent; push it again" % (self.path, what))

    def read(self, off, n):
        data = os.pread(self.fd, n, off)
        if len(data) != n:
            raise self._changed("it is shorter now")
        return data

    def entries(self, idx, offs, lens):
        """(i, bytes of entry i) for i in idx, in that order; consecutive entries that lie
        one after the other in the file are read together."""
        idx = list(idx)
        k = 0
        while k < len(idx):
            first = idx[k]
            start, end, m = int(offs[first]), int(offs[first]) + int(lens[first]), k + 1
            while (m < len(idx) and int(offs[idx[m]]) == end
                   and end + int(lens[idx[m]]) - start <= self.SPAN):
                end += int(lens[idx[m]])
                m += 1
            span = memoryview(self.read(start, end - start))
            for i in idx[k:m]:
                o = int(offs[i]) - start
                yield i, span[o:o + int(lens[i])]
            k = m

    def check_unchanged(self):
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != self._stamp:
            raise self._changed("its size or modification time differs")

    def close(self):
        os.close(self.fd)


def _store_view(path):
    """(parsed snapshot, the file (_StoreFile), per-entry (offset, length, word))."""
    fd = S._open(path)
    try:
        f = _StoreFile(fd, path)   # stamped before anything is read
        parsed = S._read(fd, path, signatures=True)
        h = parsed.header
        if h["flags"] & S.FLAG_PARENT:
            raise S.SnapshotError(
                "%s: has a parent (an incremental snapshot); push a whole one: "
                "plm.compact(%r, OUT) folds its chain into one file" % (path, path))
    except BaseException:
        os.close(fd)
        raise
    ps, n = h["page_size"], h["nstored"]
    if parsed.index is not None:
        offs = parsed.index["offsets"].astype(np.int64)
        lens = parsed.index["lengths"].astype(np.int64)
        words = parsed.index["raw"].astype(np.int64)
    else:
        offs = np.arange(n, dtype=np.int64) * ps
        lens = np.full(n, ps, np.int64)
        words = np.full(n, ps, np.int64)   # raw codec (0), one page
    return parsed, f, offs + h["store_offset"], lens, words


def push(snapshot, url, *, chunk_bytes=DEFAULT_CHUNK_BYTES, name=None, client=None) -> PushInfo:
    """Store snapshot file `snapshot` at `url` (s3://bucket/prefix: the manifest becomes
    s3://bucket/prefix/NAME, NAME the file's name unless given), creating the bucket where it
    is missing. Entries already in the bucket (from any snapshot pushed there) are not sent
    again."""
    snapshot = os.fsdecode(snapshot)
    bucket, prefix = _split_url(url, "push")
    name = name or os.path.basename(snapshot)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError("push: bad snapshot name %r" % name)
    if not 4096 <= int(chunk_bytes) <= MAX_CHUNK_BYTES:
        raise ValueError("push: chunk_bytes must be 4096 to %d" % MAX_CHUNK_BYTES)
    key = (prefix + "/" if prefix else "") + name
    if key.startswith(".plm/"):
        raise ValueError("push: %s is inside the chunk store's own prefix" % url)
    client = client or S3Client()
    parsed, f, offs, lens, words = _store_view(snapshot)
    try:
        client.ensure_bucket(bucket)
        known = _bucket_entries(client, bucket)
        n = len(offs)
        # each entry: where it is in the bucket already, or in a new chunk of this push
        keys = [None] * n
        for i, data in f.entries(range(n), offs, lens):
            keys[i] = _entry_key(data, int(words[i]))
        damaged = _check_reused(client, bucket, known, keys, lens, words)
        where = {}                 # entry key -> (ordinal of a new chunk, offset, length)
        new_chunks, cur, cur_len = [], [], 0
        for i, k in enumerate(keys):
            if k in known or k in where:
                continue
            ln = int(lens[i])
            if cur and cur_len + ln > chunk_bytes:
                new_chunks.append(cur)
                cur, cur_len = [], 0
            where[k] = (len(new_chunks), cur_len, ln)
            cur.append(i)
            cur_len += ln
        if cur:
            new_chunks.append(cur)
        # build and upload the new chunks (content-addressed: one already there is skipped)
        # (ids hashed as the file is read, bodies read again by the upload that sends them: a
        # push holds PARALLEL chunks in memory, not every new one)
        chunk_ids, chunk_lens, uploaded, sent = [], [], 0, 0
        for members in new_chunks:
            h128, clen = xxhash.xxh3_128(), 0
            for _, data in f.entries(members, offs, lens):
                h128.update(data)
                clen += len(data)
            d = h128.intdigest()
            chunk_ids.append((d & ((1 << 64) - 1), d >> 64))
            chunk_lens.append(clen)

        def upload(j):
            ck = CHUNKS + chunk_name(chunk_ids[j])
            # there already, and of its length (a damaged one of the same name: written over)
            if chunk_ids[j] not in damaged and client.size(bucket, ck) == chunk_lens[j]:
                return 0
            body = b"".join(data for _, data in f.entries(new_chunks[j], offs, lens))
            if _id128(body) != chunk_ids[j]:   # read twice, different: never under that name
                raise f._changed("an entry's bytes differ between two reads")
            client.put(bucket, ck, body)
            return len(body)

        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
            for got in ex.map(upload, range(len(new_chunks))):
                sent += got
                uploaded += got > 0
        # the index of this push's new entries, then the manifest
        rows = np.zeros(len(where), INDEX_DTYPE)
        for r, (k, (j, off, ln)) in enumerate(where.items()):
            rows[r] = (k, chunk_ids[j], off, ln, chunk_lens[j], 0)
        # the manifest's tables: the chunks this snapshot uses, each entry's place in one
        # (a reused chunk's length from the rows this push checked, never from another row
        # of the indexes: a lying row about an entry nobody uses must not set it)
        order, chunk_of, chunk_len = [], {}, {}
        entries = np.zeros(n, ENTRY_DTYPE)
        for i, k in enumerate(keys):
            if k in where:
                j, off, _ = where[k]
                cid, clen = chunk_ids[j], chunk_lens[j]
            else:
                cid, off, _, clen = known[k]
            c = chunk_of.get(cid)
            if c is None:
                c = chunk_of[cid] = len(order)
                order.append(cid)
                chunk_len[cid] = clen
            entries[i] = (c, off)
        chunks = np.zeros(len(order), CHUNK_DTYPE)
        for c, cid in enumerate(order):
            chunks[c]["id"] = cid
            chunks[c]["length"] = chunk_len[cid]
        h = parsed.header
        skeleton = (f.read(0, h["store_offset"])
                    + f.read(h["store_offset"] + h["store_bytes"],
                             f.size - h["store_offset"] - h["store_bytes"]))
        f.check_unchanged()   # what was sent is one version of the file
        if len(rows):
            idx = _INDEX.pack(INDEX_MAGIC, FORMAT, 0, len(rows),
                              xxhash.xxh3_64_intdigest(rows.tobytes())) + rows.tobytes()
            client.put(bucket, INDEXES + "%016x%016x" % _id128(idx)[::-1], idx)
            sent += len(idx)
        body = skeleton + chunks.tobytes() + entries.tobytes()
        head = _MANIFEST.pack(MANIFEST_MAGIC, FORMAT, 0, len(skeleton), len(chunks), n,
                              f.size, xxhash.xxh3_64_intdigest(body), 0)
        head = head[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:-8]))
        client.put(bucket, key, head + body)
        sent += len(head) + len(body)
        return PushInfo("s3://%s/%s" % (bucket, key), n, len(where), uploaded, sent, f.size)
    finally:
        f.close()


# ---- manifests -----------------------------------------------------------------------------

def parse_manifest(data, url="manifest") -> Manifest:
    """Check a manifest object and everything in it (it comes from the network: nothing is
    trusted): its checksums, the embedded snapshot's header and tables (as restore() checks a
    file), every entry's place inside its chunk. Raises SnapshotError. `data`: any buffer,
    not copied: the Manifest's skeleton and tables are read-only views of it (the caller
    does not change it afterwards; bytes cannot be)."""
    data = memoryview(data).cast("B")
    if len(data) < _MANIFEST.size:
        S._fail(url, "not a pylazymem manifest (%d bytes)" % len(data))
    magic, fmt, flags, skel, nchunks, nentries, file_bytes, body_xx, head_xx = \
        _MANIFEST.unpack_from(data)
    if magic != MANIFEST_MAGIC:
        S._fail(url, "not a pylazymem manifest (bad magic %r)" % bytes(magic))
    if xxhash.xxh3_64_intdigest(data[:_MANIFEST.size - 8]) != head_xx:
        S._fail(url, "manifest header checksum mismatch")
    if fmt != FORMAT or flags:
        S._fail(url, "manifest format %d flags 0x%x: this pylazymem reads format %d"
                % (fmt, flags, FORMAT))
    want = _MANIFEST.size + skel + nchunks * CHUNK_DTYPE.itemsize + nentries * ENTRY_DTYPE.itemsize
    if skel > MAX_MANIFEST_BYTES or nchunks > (1 << 32) or nentries > S.MAX_STORED_V3 \
            or want != len(data):
        S._fail(url, "manifest sizes do not add up (%d bytes, its header says %d)"
                % (len(data), want))
    body = data[_MANIFEST.size:]
    if xxhash.xxh3_64_intdigest(body) != body_xx:
        S._fail(url, "manifest checksum mismatch (corrupt manifest)")
    skeleton = body[:skel].toreadonly()
    header, lengths = _check_skeleton(skeleton, file_bytes, nentries, url)
    chunks = np.frombuffer(body, CHUNK_DTYPE, nchunks, skel)
    entries = np.frombuffer(body, ENTRY_DTYPE, nentries, skel + nchunks * CHUNK_DTYPE.itemsize)
    chunks.flags.writeable = entries.flags.writeable = False
    if nchunks and (chunks["length"].max() > MAX_CHUNK_BYTES or chunks["length"].min() == 0
                    or chunks["reserved"].any()):
        S._fail(url, "manifest: a chunk of 0 or more than %d bytes" % MAX_CHUNK_BYTES)
    if nentries:
        which = entries["chunk"]
        if int(which.max()) >= nchunks:
            S._fail(url, "manifest: an entry names a chunk that is not in its table")
        # every entry inside its chunk: offset <= chunk length - entry length (in int64)
        room = chunks["length"].astype(np.int64)[which]
        room -= lengths
        if (entries["offset"] > room).any():
            S._fail(url, "manifest: an entry lies outside its chunk")
    return Manifest(url, skeleton, header, chunks, entries, lengths, file_bytes)


def _check_skeleton(skeleton, file_bytes, nentries, url):
    """The snapshot header and tables inside a manifest, checked as a file's are: (header,
    per-entry stored lengths)."""
    if len(skeleton) < 4096:
        S._fail(url, "manifest: the snapshot header is missing")
    h = S._parse_header(skeleton[:max(4096, min(len(skeleton), 1 << 21))], url, file_bytes)
    if h["flags"] & S.FLAG_PARENT:
        S._fail(url, "manifest: a snapshot with a parent (push stores whole snapshots only)")
    if len(skeleton) != file_bytes - h["store_bytes"] or h["nstored"] != nentries:
        S._fail(url, "manifest: the snapshot's sections do not match its tables")
    first = h["index_offset"] if h["version"] == S.VERSION_3 else h["map_offset"]
    tail_at = first - h["store_bytes"]        # in the skeleton, the store is cut out
    tail = skeleton[tail_at:h["sigs_offset"] - h["store_bytes"]]
    if S._xxh3(tail) != h["tables_xxh3"]:
        S._fail(url, "manifest: the snapshot's tables checksum mismatch")
    if h["index_bytes"]:
        idx = S._check_index(np.frombuffer(tail, "<u4", h["nstored"]), h, url)
        lengths = idx["lengths"]
    else:   # one length for all: a read-only broadcast, nothing allocated
        lengths = np.broadcast_to(np.int64(h["page_size"]), (h["nstored"],))
    return h, lengths


_MAX_MANIFEST_OBJECT = (_MANIFEST.size + MAX_MANIFEST_BYTES + (1 << 32) * CHUNK_DTYPE.itemsize
                        + S.MAX_STORED_V3 * ENTRY_DTYPE.itemsize)


def _manifest_size(head):
    """A manifest object's size as its first 64 bytes say (a bound on the body to read:
    parse_manifest checks it exactly), or 4096 bytes (not a manifest: the
    parse refuses it once read: what is read of it is bounded small, an endless body of
    anything else must not fill the memory)."""
    magic, _, _, skel, nchunks, nentries, _, _, head_xx = _MANIFEST.unpack_from(head)
    if magic != MANIFEST_MAGIC or xxhash.xxh3_64_intdigest(head[:_MANIFEST.size - 8]) != head_xx:
        return 4096
    want = _MANIFEST.size + skel + nchunks * CHUNK_DTYPE.itemsize + nentries * ENTRY_DTYPE.itemsize
    # A header may say anything (its checksum is anyone's to compute): what it asks to be
    # buffered is bounded as a snapshot's page map is (_snapfile._parse_header).
    limit = S._memory_bytes() // 4
    if want > limit:
        raise ObjectStoreError("manifest of %d bytes, as its header says: more than this "
                               "machine reads into memory (%d)" % (want, limit),
                               code="ManifestTooLarge")
    return want


def _etag_ok(etag):
    """An ETag fit to keep and to send back: printable ASCII, no spaces (an HTTP header
    value that no client refuses to send)."""
    return bool(etag) and len(etag) <= 256 and re.fullmatch(r"[!-~]+", etag) is not None


def _read_regular(path, limit):
    """The bytes of regular file `path`, or None: a FIFO, device, socket or symlink in its
    place (opened without blocking and without following links, then fstat) counts as
    nothing there, as does a file larger than `limit` (a FIFO opened for reading would block
    until a writer came, and a device could be endless)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with open(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _kept(path):
    """(etag, body) of a manifest kept in the cache directory, or (None, None). Read, not
    mapped: a mapping would turn the file cut short under us (by anything but pylazymem,
    which replaces it whole) into SIGBUS in the interpreter. Anything but a regular file
    there is as if nothing were kept (the bucket's copy replaces it)."""
    data = _read_regular(path, 1024 + _MANIFEST.size + MAX_MANIFEST_BYTES)
    if data is None:
        return None, None
    nl = data.find(b"\n", 0, 1024)
    etag = data[:nl].decode("ascii", "replace") if nl > 0 else None
    if not _etag_ok(etag):   # damaged: as if nothing were kept (the bucket's copy replaces it)
        return None, None
    return etag, memoryview(data)[nl + 1:]


def _in_background(fn, *args):
    """A Future of fn(*args) run on a daemon thread: an interrupted or failed caller that
    never waits for it does not hold the interpreter's exit for the request's timeout (a
    ThreadPoolExecutor's thread would)."""
    fut = concurrent.futures.Future()

    def run():
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn(*args))
        except BaseException as e:   # handed to whoever asks for the result
            fut.set_exception(e)

    threading.Thread(target=run, name="pylazymem-manifest", daemon=True).start()
    return fut


def read_manifest(url, client=None, cache=None) -> Manifest:
    """The manifest at url, checked (parse_manifest). With `cache` (a directory), the last
    copy read is kept there with its ETag and asked for conditionally: unchanged, the gateway
    sends no body (a warm restore saves the transfer); it is checked again all the same."""
    m, confirm = read_manifest_pending(url, client, cache)
    fresh = confirm() if confirm else None
    return fresh if fresh is not None else m


def read_manifest_pending(url, client=None, cache=None):
    """(manifest, confirm): read_manifest in two steps, so that a warm restore does its own
    set-up during the round trip that asks the bucket whether the kept copy is current
    (a conditional GET on a thread, while the kept copy is checked here). confirm() waits for
    the answer: None if the manifest is current, else the bucket's new one, checked (and kept,
    where the cache directory takes it); it raises what the request raised
    (FileNotFoundError, ObjectStoreError). confirm is None when the manifest came from the
    bucket already (no usable kept copy)."""
    bucket, key = _split_url(url, "restore")
    if not key:
        raise ValueError("%s: names a bucket, not a snapshot (s3://bucket/prefix/NAME)" % url)
    client = client or S3Client()
    kept = etag = body = None
    if cache:
        kept = os.path.join(cache, "m-%016x" % xxhash.xxh3_64_intdigest(key.encode()))
        etag, body = _kept(kept)

    def ask(tag):
        try:
            return client.get_unless(bucket, key, tag, max_bytes=_MAX_MANIFEST_OBJECT,
                                     size_of=_manifest_size)
        except ObjectStoreError as e:
            if e.status == 404:
                raise FileNotFoundError(2, "no snapshot at %s (%s)"
                                        % (url, e.code or "404")) from None
            if e.code == "ManifestTooLarge":
                raise ObjectStoreError("%s: %s" % (url, e), code=e.code, what=e.what) from None
            raise

    def fetched(new_etag, data):   # the bucket's copy: checked, then kept
        m = parse_manifest(data, url)
        if kept and _etag_ok(new_etag):
            _keep(kept, new_etag, data)
        return m

    if etag is None:
        return fetched(*ask(None)), None
    answer = _in_background(ask, etag)
    try:
        m = parse_manifest(body, url)
    except S.SnapshotError:   # the kept copy is damaged: the bucket's, whole
        new_etag, data = answer.result()
        return fetched(*(ask(None) if data is None else (new_etag, data))), None
    del body

    def confirm():
        new_etag, data = answer.result()
        return None if data is None else fetched(new_etag, data)

    return m, confirm


def _keep(kept, etag, data):
    """Keep a manifest (a temporary of this thread's own, then rename: a reader finds the
    old copy or the new one whole, never one's ETag with the other's body)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(kept) + ".", suffix=".tmp",
                                   dir=os.path.dirname(kept))
    except OSError:   # a full or unwritable cache directory costs only this saving
        return
    try:
        with open(fd, "wb") as f:
            f.write(etag.encode("ascii") + b"\n")
            f.write(data)
        os.replace(tmp, kept)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


# ---- pull ----------------------------------------------------------------------------------

def fetch_chunk(client, bucket, m: Manifest, i) -> bytes:
    """Chunk i of the manifest, checked against its content id (a torn or altered chunk is
    fetched once more, then refused)."""
    want = (int(m.chunks["id"][i][0]), int(m.chunks["id"][i][1]))
    for attempt in (0, 1):
        try:
            data = client.get(bucket, m.chunk_key(i), max_bytes=int(m.chunks["length"][i]))
        except ObjectStoreError as e:
            if e.code != "ResponseTooLarge":
                raise
            continue   # longer than the chunk: not it
        if len(data) == int(m.chunks["length"][i]) and _id128(data) == want:
            return data
    raise ObjectStoreError("s3://%s/%s: content differs from its id (corrupt chunk)"
                           % (bucket, m.chunk_key(i)), what="chunk")


def _entry_checker(m: Manifest, url):
    """check(e, data): raise ObjectStoreError unless store entry e's bytes (decoded, for a
    compressed entry) hash to the page signature the manifest's skeleton holds for it. A
    chunk is checked against its id, but the manifest's entry table says which bytes of it
    are which entry: a resealed table that swaps two entries passes every checksum, and only
    the signatures tell (restore() checks them the same way)."""
    h = m.header
    sb = h["store_bytes"]
    raw_sigs = m.skeleton[h["sigs_offset"] - sb:h["sigs_offset"] - sb + h["sigs_bytes"]]
    if len(raw_sigs) != h["sigs_bytes"] or h["sigs_bytes"] != 8 * h["nstored"] or \
            S._xxh3(raw_sigs) != h["sigs_xxh3"]:
        S._fail(url, "manifest: signatures checksum mismatch (corrupt signature section)")
    sigs = np.frombuffer(raw_sigs, "<u8")
    ps = h["page_size"]
    words = None
    if h["index_bytes"]:
        first = h["index_offset"] if h["version"] == S.VERSION_3 else h["map_offset"]
        words = np.frombuffer(m.skeleton, "<u4", h["nstored"], first - sb)
    ffi = lib = None

    def check(e, data):
        nonlocal ffi, lib
        word = int(words[e]) if words is not None else ps
        if word >> 28:   # a compressed entry: its page, decoded by the core's codecs
            if lib is None:
                from ._binding import ffi, lib
            page = bytearray(ps)
            if lib.lm_unpack_entry(ffi.from_buffer(data), len(data), word, ps,
                                   ffi.from_buffer(page)) < 0:
                raise ObjectStoreError("%s: store entry %d does not decode (%s): the manifest "
                                       "and its chunks disagree; nothing written"
                                       % (url, e, ffi.string(lib.lm_last_op()).decode()),
                                       what="pull")
            data = page
        if S._xxh3(data) != int(sigs[e]):
            raise ObjectStoreError("%s: store entry %d differs from its page signature (the "
                                   "manifest's entry table names the wrong bytes); nothing "
                                   "written" % (url, e), what="pull")
    return check


def pull(url, out, *, client=None) -> str:
    """Make snapshot file `out` again from `url` (byte for byte the file that was pushed),
    written to a temporary beside it and renamed into place. Every entry is checked against
    its page signature before it is written: a mismatch raises ObjectStoreError naming the
    entry, and `out` is left as it was."""
    client = client or S3Client()
    m = read_manifest(url, client)
    bucket, _ = parse_url(url)
    out = os.fsdecode(out)
    h = m.header
    check = _entry_checker(m, url)
    # a snapshot temporary as checkpoint() makes one: locked until the rename, so that the
    # next writer's sweep removes it only once this process is gone
    fd, tmp = _temporary(out)
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(m.skeleton[:h["store_offset"]])
            store_at = f.tell()
            f.truncate(store_at + h["store_bytes"])
            # entries land in store order: offsets from their lengths
            offs = np.zeros(len(m.entries) + 1, np.int64)
            np.cumsum(m.lengths, out=offs[1:])
            by_chunk = {}
            for e, c in enumerate(m.entries["chunk"].tolist()):
                by_chunk.setdefault(c, []).append(e)

            def one(c):
                data = fetch_chunk(client, bucket, m, c)
                for e in by_chunk[c]:
                    o, ln = int(m.entries["offset"][e]), int(m.lengths[e])
                    piece = memoryview(data)[o:o + ln]
                    check(e, piece)
                    os.pwrite(fd, piece, store_at + int(offs[e]))
                return len(data)

            with concurrent.futures.ThreadPoolExecutor(PARALLEL) as ex:
                for _ in ex.map(one, sorted(by_chunk)):
                    pass
            f.seek(store_at + h["store_bytes"])
            f.write(m.skeleton[h["store_offset"]:])
            f.flush()
        S.inspect(tmp)   # the whole file checked as any snapshot is
    except BaseException:
        _abandon(fd, tmp)
        raise
    _commit(fd, tmp, out, durable=True)
    return out


# ---- restore: the native reader ------------------------------------------------------------

def _tunable(name, default, lo, hi):
    value = os.environ.get(name, "")
    try:
        v = int(value) if value else default
    except ValueError:
        v = None
    if v is None or not lo <= v <= hi:
        raise ValueError("%s=%r: expected an integer from %d to %d" % (name, value, lo, hi))
    return v


def cache_dir(config, bucket):
    """The per-machine chunk cache of one endpoint and bucket: PYLAZYMEM_CACHE_DIR (`none`: no
    cache), else $XDG_CACHE_HOME/pylazymem/chunks, else ~/.cache/pylazymem/chunks; one subdirectory per
    endpoint and bucket (chunk ids are content hashes, but a bucket is not trusted with
    another's cache)."""
    root = os.environ.get("PYLAZYMEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pylazymem", "chunks")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return os.path.join(root, "%016x" % xxhash.xxh3_64_intdigest(
        ("%s\0%s" % (config.endpoint, bucket)).encode()))


_warned_caches = set()


def usable_cache(config, bucket):
    """cache_dir(config, bucket), made, or None: no cache where PYLAZYMEM_CACHE_DIR is `none`
    or the directory cannot be made or written (a read-only $HOME, a full disk): that costs
    only the caching (every read fetches its chunk), with a warning once per directory."""
    if os.environ.get("PYLAZYMEM_CACHE_DIR") == "none":
        return None
    path = None
    try:
        path = cache_dir(config, bucket)
        os.makedirs(path, mode=0o700, exist_ok=True)
        if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "not a writable directory", path)
        return path
    except OSError as e:
        key = path or os.environ.get("PYLAZYMEM_CACHE_DIR") or "~/.cache/pylazymem/chunks"
        if key not in _warned_caches:
            _warned_caches.add(key)
            warnings.warn("object store: the chunk cache %s cannot be used (%s); restoring "
                          "without a cache (every read fetches its chunk)"
                          % (key, e.strerror or e), RuntimeWarning, stacklevel=3)
        return None


def _tunables():
    """(cache bound, retries, timeout ms) from the environment, checked (ValueError)."""
    return (_tunable("PYLAZYMEM_CACHE_MAX_BYTES", 8 << 30, 1, 1 << 62),
            _tunable("PYLAZYMEM_S3_RETRIES", 3, 0, 10),
            _tunable("PYLAZYMEM_S3_TIMEOUT_MS", 30000, 1, (1 << 31) - 1))


def skeleton_fd(m: Manifest):
    """A memfd laid out as the pushed file, its store section a hole: the core reads the
    header, tables and signatures from it as from the file; the store comes from the bucket."""
    h = m.header
    fd = os.memfd_create("pylazymem-s3-snapshot", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, m.file_bytes)
        os.pwrite(fd, m.skeleton[:h["store_offset"]], 0)
        os.pwrite(fd, m.skeleton[h["store_offset"]:], h["store_offset"] + h["store_bytes"])
    except BaseException:
        os.close(fd)
        raise
    return fd


def native_store(m: Manifest, config, bucket):
    """The core's reader of m's entries (struct lm_objs *): the caller hands it to
    lm_source_attach_remote (which then owns it) or frees it (lm_objs_free)."""
    from ._binding import check, ffi, lib

    keep = []

    def cstr(s):
        keep.append(ffi.new("char[]", s.encode()))
        return keep[-1]

    cfg = ffi.new("struct lm_objs_config *")
    cfg.endpoint, cfg.region, cfg.bucket = cstr(config.endpoint), cstr(config.region), cstr(bucket)
    cfg.access_key, cfg.secret_key = cstr(config.access_key), cstr(config.secret_key)
    cfg.session_token = cstr(config.session_token or "")
    cache = usable_cache(config, bucket)
    cfg.cache_dir = ffi.NULL if cache is None else cstr(cache)
    cfg.cache_max_bytes, cfg.retries, cfg.timeout_ms = _tunables()
    out = ffi.new("struct lm_objs **")
    # the manifest's tables are views at any offset of its bytes (the kept copy's ETag line
    # shifts them): lm_objs_new copies them before it reads them as aligned arrays
    check(lib.lm_objs_new(cfg, ffi.from_buffer("struct lm_objs_chunk[]", m.chunks), len(m.chunks),
                          ffi.from_buffer("struct lm_objs_entry[]", m.entries), len(m.entries), out),
          "restore from an object store")
    return out[0]


def open_source(url, manifest=None):
    """(manifest, skeleton fd, S3Config, bucket, confirm) for restore(url): the manifest read
    and checked with the caller's credentials, so that refused credentials fail here, before
    any fault. confirm: None, or read_manifest_pending's (the caller calls it before anything
    is read from the store, and starts again with the manifest it returns, if any, passed as
    `manifest`: then nothing is asked again)."""
    _tunables()   # a bad setting fails here, before anything is asked of the bucket
    client = S3Client()
    bucket, _ = _split_url(url, "restore")
    if manifest is not None:
        m, confirm = manifest, None
    else:
        m, confirm = read_manifest_pending(url, client, usable_cache(client.config, bucket))
    return m, skeleton_fd(m), client.config, bucket, confirm


class ManifestChanged(Exception):
    """Internal: the snapshot was pushed again while restore() set up from the kept manifest;
    `manifest` is the new one (checked), which restore() starts again with."""

    def __init__(self, manifest):
        super().__init__("the snapshot was pushed again")
        self.manifest = manifest
