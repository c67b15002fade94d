"""Other libraries' array files restored lazily: .npy, .npz (np.savez) and .safetensors
(docs/foreign-formats.md).

The whole file becomes the region's image: region page p holds the file's bytes
[p * PS, (p + 1) * PS), the bytes past its end read as zero. So an array's offset in the region
is its byte offset in the file: nothing is copied or moved, and alignment is the format's own.
The pages are served by the fault path from the file itself (csrc/store.c,
lm_source_attach_raw: a snapshot source whose store is the raw file, page i at offset i * PS),
so readahead, prefetch, the background fill, verify and poisoning work as for a snapshot.

Every field read from a file is checked where it enters, and anything malformed is a
SnapshotError naming the file and the problem (the hostile-file style of _snapfile.py): the
headers are parsed here without compiled code (read_header), the pages served by the core
(open_foreign). Nothing is ever unpickled or evaluated: a .npy header dict is read with
ast.literal_eval, after its length is checked, and object dtypes are refused.
"""
import ast
import errno
import json
import math
import os
import struct
import zipfile
import zlib

import numpy as np
import xxhash

from ._snapfile import MAP_DTYPE, MAX_EXTENT, STORED, SnapshotError, _fail
from ._snapfile import _open as _open_file
from ._snapfile import _pread as _pread_once   # os.pread; an OSError a SnapshotError naming the file

FORMATS = ("npy", "npz", "safetensors")
#: Bytes detect() needs to tell the formats apart (it copes with fewer: then None).
HEAD_BYTES = 16

NPY_MAGIC = b"\x93NUMPY"
# numpy's own bound on a .npy header (np.load's max_header_size default): the header is
# parsed by ast.literal_eval, whose time and memory grow with the text.
NPY_MAX_HEADER = 10000
NPY_MAX_DIMS = 64             # numpy's NPY_MAXDIMS (2.x; 1.x had 32)
# A zip's local file header: signature, versions, flags, method, time, date, crc, sizes,
# name length, extra length (PKWARE APPNOTE 4.3.7).
_ZIP_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_ZIP_LOCAL_MAGIC = b"PK\x03\x04"
_ZIP_EMPTY_MAGIC = b"PK\x05\x06"   # an end-of-central-directory record first: no members
ST_MAX_HEADER = 100 << 20     # safetensors' own limit on the JSON header (100 MB)
# safetensors dtype name -> little-endian numpy dtype; the ml_dtypes ones are below.
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "C64": "<c8",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
# Types numpy has no name for: ml_dtypes' where it is installed (what safetensors itself
# writes them from), else their bytes (unsigned integers of the same size); meta["dtype"]
# keeps the safetensors name either way.
_ST_EXTENSION = {"BF16": ("bfloat16", "<u2"), "F8_E4M3": ("float8_e4m3fn", "u1"),
                 "F8_E5M2": ("float8_e5m2", "u1")}


def detect(head):
    """The format of a file from its first HEAD_BYTES bytes: "npy", "npz", "safetensors", or
    None (not one of these). Only the magic is looked at: whether the file is well formed is
    for read_header / open_foreign to say (with the reason)."""
    head = bytes(head[:HEAD_BYTES])
    if head.startswith(NPY_MAGIC):
        return "npy"
    if head[:4] in (_ZIP_LOCAL_MAGIC, _ZIP_EMPTY_MAGIC):
        return "npz"
    # A u64 header size, then the JSON header, which the format requires to start with "{".
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return None


# ---- reading a file's header -------------------------------------------------------------

def _open(path):
    return _open_file(path, "array file")


def _pread(fd, n, offset, path, what):
    """Exactly n bytes at offset (n is bounded by the caller), or a SnapshotError."""
    out = b""
    while len(out) < n:
        got = _pread_once(fd, n - len(out), offset + len(out), path, what)
        if not got:
            _fail(path, "truncated: %s needs %d bytes at offset %d" % (what, n, offset))
        out += got
    return out


def _check_extent(path, where, shape, dtype):
    """numpy must be able to make a view of this shape: with a zero dimension the data size is
    0 and passes every size check, but numpy still refuses (OverflowError, ValueError) a shape
    whose other dimensions multiply past its index range."""
    extent = dtype.itemsize
    for x in shape:
        extent *= max(x, 1)
    if extent > MAX_EXTENT:
        _fail(path, "%s: shape %.100r of %s is beyond what an array can index (%d bytes, "
              "ignoring zero dimensions)" % (where, tuple(shape), dtype, extent))


def read_header(path, fmt=None):
    """(fmt, entries, metadata, file_bytes) of a checked .npy / .npz / .safetensors file,
    without restoring it and without compiled code (for inspect-like tools). fmt None:
    detect it. entries as open_foreign returns them; metadata: safetensors' "__metadata__"
    ({} elsewhere)."""
    path = os.fsdecode(path)
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        if fmt is None:
            fmt = detect(_pread_once(fd, HEAD_BYTES, 0, path, "the magic number"))
            if fmt is None:
                _fail(path, "not a .npy, .npz or .safetensors file (no magic number of any)")
        entries, metadata = _parse(fd, path, fmt, size)
        if fmt == "npz":
            _check_crcs(fd, path, entries, verify=False)
    finally:
        os.close(fd)
    return fmt, entries, metadata, size


def _parse(fd, path, fmt, size):
    if fmt == "npy":
        entry, _ = _npy_entry(fd, path, 0, size, "")
        return {"array": entry}, {}
    if fmt == "npz":
        return _npz_entries(fd, path, size), {}
    if fmt == "safetensors":
        return _safetensors_entries(fd, path, size)
    from ._errors import InvalidArgumentError
    raise InvalidArgumentError("format must be one of %s, not %r" % (", ".join(FORMATS), fmt))


# ---- .npy (numpy's format, versions 1.0, 2.0, 3.0) ----------------------------------------

def _npy_entry(fd, path, base, limit, where):
    """The array of the .npy at file offset `base`, in `limit` bytes (the rest of the file, or
    an .npz member). Returns (entry, end offset of its data)."""
    at = where and where + ": "
    if limit < 10:
        _fail(path, "%struncated: %d bytes, a .npy header needs at least 10" % (at, limit))
    pre = _pread(fd, min(limit, 12), base, path, "the .npy preamble")
    if pre[:6] != NPY_MAGIC:
        _fail(path, "%snot a .npy array (bad magic %r)" % (at, pre[:6]))
    version = (pre[6], pre[7])
    if version == (1, 0):
        hlen, hstart, encoding = struct.unpack_from("<H", pre, 8)[0], 10, "latin1"
    elif version in ((2, 0), (3, 0)):
        if len(pre) < 12:
            _fail(path, "%struncated: a .npy %d.0 header needs 12 bytes" % (at, version[0]))
        hlen, hstart = struct.unpack_from("<I", pre, 8)[0], 12
        encoding = "utf8" if version == (3, 0) else "latin1"
    else:
        _fail(path, "%s.npy format version %d.%d is not supported (numpy writes 1.0, 2.0 and "
              "3.0)" % (at, version[0], version[1]))
    if hlen > NPY_MAX_HEADER:
        _fail(path, "%s.npy header of %d bytes is larger than numpy's limit (%d)"
              % (at, hlen, NPY_MAX_HEADER))
    if hstart + hlen > limit:
        _fail(path, "%struncated: the .npy header needs %d bytes, %d are there"
              % (at, hstart + hlen, limit))
    raw = _pread(fd, hlen, base + hstart, path, "the .npy header")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        _fail(path, "%s.npy header is not %s text: %s" % (at, encoding, e))
    try:
        # Only literals (no names, calls or attributes): the text is data, never code.
        d = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        _fail(path, "%s.npy header is not a Python literal: %s" % (at, e))
    if type(d) is not dict or set(d) != {"descr", "fortran_order", "shape"}:
        _fail(path, "%s.npy header must be a dict of exactly 'descr', 'fortran_order' and "
              "'shape', not %.200r" % (at, d))
    fortran, shape = d["fortran_order"], d["shape"]
    if type(fortran) is not bool:
        _fail(path, "%s.npy header: fortran_order must be True or False, not %.100r"
              % (at, fortran))
    if (type(shape) is not tuple or len(shape) > NPY_MAX_DIMS
            or any(type(x) is not int or x < 0 for x in shape)):
        _fail(path, "%s.npy header: shape must be a tuple of at most %d integers >= 0, not "
              "%.200r" % (at, NPY_MAX_DIMS, shape))
    try:
        dtype = np.lib.format.descr_to_dtype(d["descr"])
    except (TypeError, ValueError, KeyError, IndexError, SyntaxError, RecursionError,
            OverflowError, MemoryError, AttributeError) as e:
        # numpy parses some dtype strings with ast.literal_eval: SyntaxError
        _fail(path, "%s.npy header: descr %.200r is not a dtype: %s" % (at, d["descr"], e))
    if dtype.hasobject:
        _fail(path, "%s.npy array has an object dtype (Python objects, stored pickled): "
              "never loaded" % at)
    if dtype.subdtype is not None:
        _fail(path, "%s.npy header: sub-array dtype %s (numpy writes the sub-array's shape "
              "into 'shape')" % (at, dtype))
    if dtype.itemsize == 0:
        _fail(path, "%s.npy header: dtype %s has no size" % (at, dtype))
    _check_extent(path, "%s.npy" % at, shape, dtype)
    nbytes = math.prod(shape) * dtype.itemsize   # Python integers: no overflow
    data = hstart + hlen
    if nbytes > limit - data:
        _fail(path, "%struncated: the array (%s, shape %s) needs %d bytes of data, %d are "
              "there" % (at, dtype, shape, nbytes, limit - data))
    meta = {"npy_version": "%d.%d" % version}
    return ({"offset": base + data, "dtype": dtype, "shape": shape, "fortran": fortran,
             "meta": meta}, base + data + nbytes)


# ---- .npz (a zip of .npy members, np.savez) -----------------------------------------------

class _PreadFile:
    """A read-only file object over an fd by pread (the fd's own position is left alone),
    for zipfile: reads never ask for more than the file has, so a hostile size field in the
    zip cannot make it allocate more than the file's size."""

    def __init__(self, fd, size):
        self._fd, self._size, self._pos = fd, size, 0

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def tell(self):
        return self._pos

    def read(self, n=-1):
        left = max(0, self._size - self._pos)
        n = left if n is None or n < 0 else min(n, left)
        data = os.pread(self._fd, n, self._pos) if n else b""
        self._pos += len(data)
        return data

    def close(self):
        pass


# What zipfile raises on a malformed archive (beside BadZipFile: fields it unpacks or decodes).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError,
               struct.error, OverflowError, EOFError, KeyError, IndexError, OSError)


def _npz_entries(fd, path, size):
    try:
        with zipfile.ZipFile(_PreadFile(fd, size)) as zf:
            infos = zf.infolist()
            start_dir = getattr(zf, "start_dir", size)
    except _ZIP_ERRORS as e:
        _fail(path, "not a readable .npz (zip) file: %s" % e)
    entries, spans = {}, []
    for info in infos:
        name = info.filename
        where = "member %r" % name
        if name.endswith("/"):
            _fail(path, "%s is a directory: an .npz holds only .npy members" % where)
        if not name.endswith(".npy"):
            _fail(path, "%s is not a .npy array: an .npz (np.savez) holds only .npy members "
                  "(other zips, such as torch.save's, are not .npz files)" % where)
        key = name[:-4]
        if key in entries:
            _fail(path, "%s appears twice" % where)
        if info.flag_bits & 1:
            _fail(path, "%s is encrypted" % where)
        if info.compress_type != zipfile.ZIP_STORED:
            _fail(path, "%s is compressed (zip method %d, as np.savez_compressed writes): "
                  "arrays are read lazily straight from the file, so they must be stored "
                  "uncompressed; save with np.savez or plm.save instead"
                  % (where, info.compress_type))
        if info.compress_size != info.file_size:
            _fail(path, "%s: stored member whose sizes disagree (%d, %d)"
                  % (where, info.compress_size, info.file_size))
        # The data starts after the LOCAL header, whose name and extra field lengths may
        # differ from the central directory's (zip64 extras are written in both, differently).
        off = info.header_offset
        if off < 0 or off + _ZIP_LOCAL.size > size:
            _fail(path, "%s: local header at offset %d is outside the file" % (where, off))
        (magic, _, flags, method, _, _, _, _, _, nlen,
         elen) = _ZIP_LOCAL.unpack(_pread(fd, _ZIP_LOCAL.size, off, path, "a zip local header"))
        if magic != _ZIP_LOCAL_MAGIC:
            _fail(path, "%s: no local header at offset %d (bad magic %r)" % (where, off, magic))
        if method != zipfile.ZIP_STORED:
            _fail(path, "%s: the local header says compressed (method %d), the central "
                  "directory stored" % (where, method))
        lname = _pread(fd, nlen, off + _ZIP_LOCAL.size, path, "a zip member name")
        try:
            lname = lname.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            lname = None
        if lname != info.orig_filename:
            _fail(path, "%s: the local header names %r (the central directory and the local "
                  "header disagree)" % (where, lname))
        data = off + _ZIP_LOCAL.size + nlen + elen
        end = data + info.file_size
        if end > start_dir:
            _fail(path, "%s: its data (%d bytes at offset %d) runs past the members' area "
                  "(the central directory starts at %d)" % (where, info.file_size, data,
                                                            start_dir))
        entry, _ = _npy_entry(fd, path, data, info.file_size, where)
        entry["meta"]["member"] = name
        entry["meta"]["crc32"] = (data, info.file_size, info.CRC)   # checked by verify=True
        entries[key] = entry
        spans.append((off, end, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            _fail(path, "members %r and %r overlap" % (a, b))
    return entries


def _check_crcs(fd, path, entries, verify=True):
    """verify=True of an .npz: each member's CRC-32, as np.load checks it (one read of the
    member; without verify nothing is read at open, and a damaged member is not noticed)."""
    for key, e in entries.items():
        start, n, want = e["meta"].pop("crc32")
        if not verify:
            continue
        crc, done = 0, 0
        while done < n:
            chunk = _pread_once(fd, min(1 << 20, n - done), start + done, path,
                                "member %r" % e["meta"]["member"])
            if not chunk:
                _fail(path, "member %r: the file ends inside it" % e["meta"]["member"])
            crc = zlib.crc32(chunk, crc)
            done += len(chunk)
        if crc != want:
            _fail(path, "member %r: CRC-32 mismatch (the member is damaged)"
                  % e["meta"]["member"])


# ---- .safetensors --------------------------------------------------------------------------

def _st_dtype(name):
    if name in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[name])
    ext, fallback = _ST_EXTENSION[name]
    try:
        import ml_dtypes
    except ImportError:
        return np.dtype(fallback)
    return np.dtype(getattr(ml_dtypes, ext))


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate key %r" % k)
        d[k] = v
    return d


def _safetensors_entries(fd, path, size):
    if size < 8:
        _fail(path, "truncated: %d bytes, a safetensors file starts with an 8-byte header "
              "size" % size)
    n = struct.unpack("<Q", _pread(fd, 8, 0, path, "the header size"))[0]
    if n > ST_MAX_HEADER:
        _fail(path, "safetensors header of %d bytes is larger than allowed (%d)"
              % (n, ST_MAX_HEADER))
    if 8 + n > size:
        _fail(path, "truncated: the safetensors header needs %d bytes, the file has %d"
              % (8 + n, size))
    raw = _pread(fd, n, 8, path, "the safetensors header")
    if raw[:1] != b"{":
        _fail(path, "safetensors header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        _fail(path, "safetensors header is not valid JSON: %s" % e)
    if not isinstance(header, dict):
        _fail(path, "safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(isinstance(v, str)
                                                   for v in metadata.values()):
        _fail(path, "safetensors __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries, spans = {}, []
    for name, t in header.items():
        where = "tensor %r" % name
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            _fail(path, "%s must be an object of exactly dtype, shape and data_offsets"
                  % where)
        st_dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(st_dtype, str) or (st_dtype not in _ST_DTYPES
                                             and st_dtype not in _ST_EXTENSION):
            _fail(path, "%s has dtype %.50r, which is not one read here (%s)"
                  % (where, st_dtype, ", ".join(list(_ST_DTYPES) + list(_ST_EXTENSION))))
        if (not isinstance(shape, list) or len(shape) > NPY_MAX_DIMS
                or any(type(x) is not int or x < 0 for x in shape)):
            _fail(path, "%s: shape must be a list of at most %d integers >= 0, not %.100r"
                  % (where, NPY_MAX_DIMS, shape))
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(type(x) is not int for x in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            _fail(path, "%s: data_offsets must be [begin, end] within the %d bytes of data, "
                  "not %.100r" % (where, data_len, offsets))
        dtype = _st_dtype(st_dtype)
        _check_extent(path, where, shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes != offsets[1] - offsets[0]:
            _fail(path, "%s: %s of shape %s is %d bytes, its data_offsets span %d"
                  % (where, st_dtype, tuple(shape), nbytes, offsets[1] - offsets[0]))
        entries[name] = {"offset": data_start + offsets[0], "dtype": dtype,
                         "shape": tuple(shape), "fortran": False,
                         "meta": {"dtype": st_dtype}}
        spans.append((offsets[0], offsets[1], name))
    # As the format requires: the tensors tile the data section, no overlap and no gap.
    at, last = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            _fail(path, "tensors %r and %r overlap" % (last, name))
        if begin > at:
            _fail(path, "bytes %d..%d of the data belong to no tensor (before %r)"
                  % (at, begin, name))
        at, last = end, name
    if at != data_len:
        _fail(path, "the data section has %d bytes, the tensors cover %d" % (data_len, at))
    return entries, metadata


# ---- restoring ---------------------------------------------------------------------------

def content_id(st):
    """The id a shared pool of this file is found by: the file's identity and its last change
    (device, inode, size, mtime and ctime in nanoseconds), hashed. Any write to the file
    changes mtime and ctime (ctime cannot be set by a user), so a changed file gets a new pool;
    a copy of the file (another inode) gets another one too (no content hashing: that would
    read the whole file before the first page is served)."""
    return xxhash.xxh3_64_intdigest(struct.pack(
        "<8sQQQqq", b"plmfrgn1", st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
        st.st_ctime_ns))


def _prefetch_pages(prefetch, npages):
    """The pages to prefetch, in order, or None for none (a foreign file records no working
    set: "working-set" prefetches nothing unless pages are given)."""
    from ._errors import InvalidArgumentError
    if isinstance(prefetch, str):
        if prefetch in ("none", "working-set"):
            return None
        if prefetch == "all":
            return np.arange(npages, dtype=np.uint64)
        raise InvalidArgumentError("prefetch must be 'none', 'all', 'working-set' or page "
                                   "indices, not %r" % prefetch)
    try:
        pages = np.asarray(prefetch, dtype=np.int64).ravel()
    except (TypeError, ValueError):
        raise InvalidArgumentError("prefetch must be 'none', 'all', 'working-set' or page "
                                   "indices") from None
    if pages.size and (pages.min() < 0 or pages.max() >= npages):
        raise InvalidArgumentError("prefetch has page indices outside 0..%d" % (npages - 1))
    return pages.astype(np.uint64) if pages.size else None


def open_foreign(path, fmt, *, prefetch="none", share=False, background=None, verify=False,
                 **region_kw):
    """Restore `path` (format `fmt` from detect()) lazily into a new Region; returns
    (region, entries).

    entries maps each array's name (an .npz member's name without .npy, a safetensors
    tensor's name, "array" for an .npy) to {"offset": byte offset in the region (= in the
    file), "dtype", "shape", "fortran", "meta": format-specific extras}. region.foreign_metadata
    is the file-level metadata (safetensors' "__metadata__", else {}); region.foreign says
    what was opened.

    prefetch: "none" (default), "all", "working-set" (a foreign file records none: nothing), or
    page indices to load first, in order. background: fill the remaining pages on a
    low-priority thread (default on). verify: hash every page of the file now (one read of the
    whole file) and check every page served against that (a mismatch poisons the page). share:
    True maps the pages from a pool shared by this user's processes opening the same file
    (same device, inode, size, mtime and ctime), or raises SharingUnavailableError; "auto"
    shares where it can. Other keyword arguments go to Region() (not server=: a page server
    serves pylazymem snapshots only). Raises SnapshotError for a malformed file.
    """
    from ._binding import PAGE_SIZE, check, ffi, lib
    from ._errors import InvalidArgumentError, SharingUnavailableError
    from .region import Region
    from .snapshot import _share_pool

    if fmt not in FORMATS:
        raise InvalidArgumentError("format must be one of %s, not %r" % (", ".join(FORMATS),
                                                                          fmt))
    if "server" in region_kw:
        raise InvalidArgumentError("server=: a page server serves pylazymem snapshots only, "
                                   "not %s files" % fmt)
    path = os.fsdecode(path)
    fd = _open(path)
    try:
        st = os.fstat(fd)
        size = st.st_size
        if size == 0:
            _fail(path, "empty file")
        entries, metadata = _parse(fd, path, fmt, size)
        if fmt == "npz":
            _check_crcs(fd, path, entries, verify)
        npages = -(-size // PAGE_SIZE)
        pages = _prefetch_pages(prefetch, npages)
        cid = content_id(st)
        pool, why = _share_pool({"header_xxh3": cid, "npages": npages,
                                 "page_size": PAGE_SIZE}, share, None)
        if pool is None and share is True:
            raise SharingUnavailableError("%s: share=True: %s" % (path, why))
        try:
            region = Region(npages * PAGE_SIZE, _pool=pool, **region_kw)
        except BaseException:
            if pool is not None:
                pool.release()
            raise
        region.share_reason = "" if pool is not None else why
        try:
            table = np.arange(STORED, STORED + npages, dtype=MAP_DTYPE)
            with region._use() as lm:
                # The file is its own content: a shared region publishes its pages unverified
                # (every process of the pool reads the same inode, unchanged since, by the id).
                rc = lib.lm_source_attach_raw(lm, fd, size, bool(verify))
                if rc == -errno.ESTALE:
                    _fail(path, "changed while it was being opened (size now differs)")
                if rc == -errno.ENODATA:
                    _fail(path, "truncated while it was being opened")
                check(rc, "open %s" % path)
                check(lib.lm_restore_table(lm, ffi.from_buffer("struct lm_snap_page[]", table),
                                           npages, npages), "open %s" % path)
            region._base_table = table   # read by the C core until every record is filled
            # The header was parsed from what the file held before the source was attached;
            # from the attach on, the core watches the file. A change in between: loud too.
            now = os.fstat(fd)
            if (now.st_size, now.st_mtime_ns, now.st_ctime_ns) != (size, st.st_mtime_ns,
                                                                    st.st_ctime_ns):
                _fail(path, "changed while it was being opened")
            region._alloc_next = region.nbytes   # the region is the file's image: no room
            region.foreign_metadata = metadata
            region.foreign = {"path": path, "format": fmt, "bytes": size,
                              "content_id": "%016x" % cid}
            if pages is not None and pages.size == npages and region.shared:
                region.materialize()   # published in clusters, mapped from the pool
            elif pages is not None:
                region.prefetch(pages)
            region.reset_dirty()   # the file's contents, prefetched or lazy: a clean epoch
            region.mark_working_set(inherit=pages)
            if background is None or background:
                region.background_start()
        except BaseException:
            region.close()
            raise
    finally:
        os.close(fd)
    return region, entries
