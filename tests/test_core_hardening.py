"""Defects found by the session-15 reviews of the core (canonical pages, checkpoint plan, errors,
plm.save of region memory), each fixed and kept fixed here.

- canonical() hashed the caller's buffer, then copied it again: a buffer changing meanwhile
  left stored bytes without their recorded signature (then lost pages after a restore).
- plm.save() of an array on a poisoned page of a live Region killed the interpreter (SIGBUS).
- checkpoint() classed a lazily restored page whose file signature is the zero page's as ZERO
  without reading it (its contents were lost in the new file).
- unclear errors: a verify mismatch as a bare UffdError(EBADMSG); "0 poisoned pages ()" when
  a defer_fill renewed the pages meanwhile; Region(huge) as "calloc(canonical index)";
  ndarray(shape=...) refusals as numpy's own ValueError/TypeError.
"""
import errno
import json

import numpy as np
import pytest
import xxhash

import pylazymem as plm
import _snapformat as F
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

PS = PAGE_SIZE


# ---- canonical(): the bytes stored are the bytes hashed ------------------------------------

def test_canonical_of_a_changing_buffer_keeps_its_signature(run_py_ok):
    # A thread rewrites the buffer while canonical() is called on it (the GIL is released in
    # the call): every Canonical's stored bytes must hash to its signature, and a region
    # deferred to one must report that signature and hold those bytes.
    out = run_py_ok("""
        import xxhash
        r = plm.Region(16 * PAGE_SIZE)
        buf = np.zeros(PAGE_SIZE, np.uint8)
        stop = False
        def writer():
            k = 0
            while not stop:
                k = (k + 1) % 251
                buf[:] = k
                buf[::7] = (k * 3) % 256
        t = threading.Thread(target=writer)
        t.start()
        calls = bad = 0
        first_bad = None
        t0 = time.monotonic()
        try:
            while time.monotonic() - t0 < 2.0:
                c = r.canonical(buf)
                calls += 1
                if xxhash.xxh3_64_intdigest(bytes(c)) != c.signature:
                    bad += 1
                    first_bad = first_bad or c
        finally:
            stop = True
            t.join()
        c = first_bad or c
        r.defer_fill(0, 16 * PAGE_SIZE, c)
        sig = int(r.signatures(0, PAGE_SIZE)[0])
        held = xxhash.xxh3_64_intdigest(bytes(r.ndarray(np.uint8)[:PAGE_SIZE]))
        print(json.dumps({"calls": calls, "bad": bad, "sig_ok": sig == held == c.signature}))
        r.close()
    """, timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["calls"] > 100, res
    assert res["bad"] == 0 and res["sig_ok"], res


# ---- plm.save() of memory on a poisoned page ------------------------------------------------

SAVE_POISONED = """
    path = sys.argv[1]
    r = plm.Region(64 * PAGE_SIZE, _test_broken_source=True)
    x = r.alloc("x", (64 * PAGE_SIZE,), np.uint8)
    c = r.canonical(b"\\x01" * PAGE_SIZE)
    r.defer_fill(0, 64 * PAGE_SIZE, c)
    r.prefetch([3])              # the fill fails: page 3 is poisoned
    r._test_fail_fills(0)
    assert r.poisoned_pages().tolist() == [3]
    plm.save(path, {"old": np.arange(10)})   # the file a failed save must leave alone
    before = open(path, "rb").read()
    res = {}
    for name, state in [
            ("whole", {"x": x}),
            ("nested view", {"d": {"v": x[3 * PAGE_SIZE + 5:3 * PAGE_SIZE + 9]}}),
            # not contiguous: save() would copy it (a read of page 3) before writing
            ("strided", {"s": x.reshape(64, PAGE_SIZE)[:, ::2]}),
            ("fortran", {"f": r.ndarray(np.uint8, (64, PAGE_SIZE)).T}),
    ]:
        try:
            plm.save(path, state)
            res[name] = "saved"
        except plm.PoisonedPageError as e:
            res[name] = [e.pages, "poisoned" in str(e), str(e)]
    res["file intact"] = open(path, "rb").read() == before
    # pages around the poisoned one are fine to save
    plm.save(path, {"ok": x[:3 * PAGE_SIZE], "ok2": x[4 * PAGE_SIZE:]})
    st = plm.load(path)
    res["others"] = bool((st["ok"] == 1).all() and (st["ok2"] == 1).all())
    st.close()
    print(json.dumps(res))
"""


def test_save_of_an_array_on_a_poisoned_page_raises(run_py, tmp_path):
    res = run_py(SAVE_POISONED, timeout=60, args=(str(tmp_path / "s.plm"),))
    assert res.returncode == 0, res.describe()   # SIGBUS before the fix
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in ("whole", "nested view", "strided", "fortran"):
        pages, says, msg = out[name]
        assert pages == [3] and says, (name, msg)
    assert "'x'" in out["whole"][2] and "'d/v'" in out["nested view"][2], out
    assert out["file intact"] and out["others"], out


# ---- checkpoint(): a lazy page "signed" zero is read before it is called zero ---------------

def _set_signature(path, entry, sig):
    """Rewrite store entry `entry`'s signature in a snapshot file (format 2 or 3), the
    checksums recomputed: a consistent file that lies about one page's signature."""
    data = bytearray(open(path, "rb").read())
    version = int.from_bytes(data[8:12], "little")
    hdr, fields, checked = ((F.HDR, F.HEADER_FIELDS, F.HEADER_CHECKED) if version == 2 else
                            (F.HDR3, ("magic", "version", "header_bytes", "page_size", "flags")
                             + F.HEADER3_FIELDS, F.HEADER3_CHECKED))
    h = dict(zip(fields, hdr.unpack_from(data)))
    sigs = np.frombuffer(bytes(data[h["sigs_offset"]:h["sigs_offset"] + h["sigs_bytes"]]),
                         "<u8").copy()
    sigs[entry] = sig
    data[h["sigs_offset"]:h["sigs_offset"] + h["sigs_bytes"]] = sigs.tobytes()
    h["sigs_xxh3"] = xxhash.xxh3_64_intdigest(sigs.tobytes())
    hdr.pack_into(data, 0, *(h[f] for f in fields))
    h["header_xxh3"] = xxhash.xxh3_64_intdigest(bytes(data[:checked]))
    hdr.pack_into(data, 0, *(h[f] for f in fields))
    open(path, "wb").write(bytes(data))


def test_checkpoint_reads_a_lazy_page_whose_signature_is_the_zero_pages(tmp_path):
    path, again = str(tmp_path / "s.plm"), str(tmp_path / "again.plm")
    n = 4
    with plm.Region(n * PS) as r:
        v = r.ndarray(np.uint8).reshape(n, PS)
        v[:] = 5
        v[:, 0] = np.arange(n)            # four distinct pages: store entries 0..3 in order
        expected = v.copy()
        plm.checkpoint(r, path, working_set="none")
    _set_signature(path, 2, xxhash.xxh3_64_intdigest(bytes(PS)))
    r = plm.restore(path, prefetch="none", background=False)
    try:
        plm.checkpoint(r, again)          # page 2 is still lazy: classified from the file
    finally:
        r.close()
    r = plm.restore(again, prefetch="all", background=False, verify=True)
    try:
        got = r.ndarray(np.uint8).reshape(n, PS).copy()
    finally:
        r.close()
    assert (got == expected).all(), [int(p) for p in np.nonzero((got != expected).any(1))[0]]


# ---- clear errors --------------------------------------------------------------------------

def test_verify_mismatch_is_a_snapshot_error(tmp_path):
    path = str(tmp_path / "v.plm")
    with plm.Region(4 * PS) as r:
        v = r.ndarray(np.uint8).reshape(4, PS)
        v[:] = 5
        v[:, 0] = np.arange(4)
        plm.checkpoint(r, path, working_set="none")
    data = bytearray(open(path, "rb").read())
    h = dict(zip(F.HEADER_FIELDS, F.HDR.unpack_from(data)))
    assert h["version"] == 2
    data[h["store_offset"] + PS + 100] ^= 0xFF   # page 1's stored bytes, not its signature
    open(path, "wb").write(bytes(data))
    r = plm.restore(path, verify=True, prefetch="none", background=False)
    try:
        with pytest.raises(plm.SnapshotError) as ei:
            r.materialize()
    finally:
        r.close()
    e = ei.value
    # still what it was before (UffdError, EBADMSG): except clauses written for that hold
    assert isinstance(e, plm.UffdError) and e.errno == errno.EBADMSG, repr(e)
    assert "differ" in str(e) and "changed or damaged" in str(e), str(e)


def test_status_error_classes():
    from pylazymem._errors import OutOfMemoryError, SnapshotDataError, status_error

    e = status_error(errno.EBADMSG, "store entry: unknown codec", "restore")
    assert isinstance(e, SnapshotDataError) and isinstance(e, plm.SnapshotError), repr(e)
    assert isinstance(e, plm.UffdError) and e.errno == errno.EBADMSG, repr(e)
    # a received memfd that is not a pool is no snapshot's fault
    e = status_error(errno.EBADMSG, "pool: the received memfd has the wrong size", "x")
    assert type(e) is plm.UffdError, repr(e)
    # an object store's corrupt chunk stays an ObjectStoreError
    e = status_error(errno.EBADMSG, "object store: an entry outside its chunk", "x")
    assert isinstance(e, plm.ObjectStoreError), repr(e)
    e = status_error(errno.ENOMEM, "calloc(timeline)", "Region")
    assert isinstance(e, OutOfMemoryError) and isinstance(e, MemoryError), repr(e)
    assert isinstance(e, plm.UffdError) and e.errno == errno.ENOMEM, repr(e)


def test_poisoned_error_when_the_pages_were_renewed_meanwhile(make_region):
    # The core met poisoned pages; by the time the records are read a defer_fill() on another
    # thread has renewed them all: the error says so instead of "0 poisoned pages ()".
    r = make_region(4 * PS)
    with pytest.raises(plm.PoisonedPageError) as ei:
        with r._poisoned_named(0, 4):
            raise plm.PoisonedPageError("materialize: poisoned pages in the range")
    msg = str(ei.value)
    assert "0 poisoned" not in msg and "new contents" in msg and "again" in msg, msg
    assert msg.split(":")[0].endswith("materialize"), msg
    # where the call says which pages it met, those are named
    with pytest.raises(plm.PoisonedPageError) as ei:
        with r._poisoned_named(0, 4, reported=lambda: np.array([2])):
            raise plm.PoisonedPageError("signatures: poisoned pages in the range")
    assert ei.value.pages == [2] and "1 poisoned page (2)" in str(ei.value), str(ei.value)


def test_signatures_names_the_pages_it_met_poisoned(run_py_ok):
    # signatures() racing with defer_fill() over poisoned pages: never an error naming none.
    out = run_py_ok("""
        N = 256
        r = plm.Region(N * PAGE_SIZE, _test_broken_source=True)
        X = r.canonical(b"\\xaa" * PAGE_SIZE)
        stop = time.monotonic() + 2.0
        def renew():
            while time.monotonic() < stop:
                r._test_fail_fills(1)
                r.defer_fill(0, N * PAGE_SIZE, X)
                r.prefetch(list(range(0, N, 3)))   # fails: poisons those pages
                r._test_fail_fills(0)
                r.defer_fill(0, N * PAGE_SIZE, X)   # renews them
        t = threading.Thread(target=renew)
        t.start()
        named = empty = 0
        try:
            while time.monotonic() < stop:
                try:
                    r.signatures()
                except plm.PoisonedPageError as e:
                    if e.pages:
                        named += 1
                    else:
                        empty += 1
                        assert "0 poisoned" not in str(e), str(e)
        finally:
            t.join()
        print(json.dumps({"named": named, "empty": empty}))
        r.close()
    """, timeout=60)
    res = json.loads(out.strip().splitlines()[-1])
    assert res["empty"] == 0, res


@pytest.mark.parametrize("nbytes", [1 << 44, 1 << 47, (1 << 62) - PS])
def test_region_too_large_is_a_memory_error(nbytes):
    try:
        r = plm.Region(nbytes)
    except MemoryError as e:
        assert isinstance(e, plm.UffdError) and e.errno == errno.ENOMEM, repr(e)
        assert "Region(%d bytes)" % nbytes in str(e) and "could not be" in str(e), str(e)
        assert "%d pages" % (nbytes // PS) in str(e) or "address space" in str(e), str(e)
    else:   # a machine with that much memory for the metadata
        r.close()
        assert nbytes < 1 << 47


@pytest.mark.parametrize("shape,cls", [
    ((-1, -1), plm.InvalidRangeError), ((-2, -2), plm.InvalidRangeError),
    ((1, -1), plm.InvalidRangeError), ((2.0,), plm.InvalidArgumentError),
    (2.0, plm.InvalidArgumentError), (((2,),), plm.InvalidArgumentError),
    ("ab", plm.InvalidArgumentError), ((True,), plm.InvalidArgumentError),
    ([[2, 3], [4]], plm.InvalidArgumentError)])
def test_ndarray_bad_shape(make_region, shape, cls):
    r = make_region(4 * PS)
    with pytest.raises(cls) as ei:
        r.ndarray(np.uint8, shape=shape)
    assert "shape" in str(ei.value), str(ei.value)


def test_ndarray_good_shapes(make_region):
    r = make_region(4 * PS)
    assert r.ndarray(np.uint8, shape=np.int64(5)).shape == (5,)
    assert r.ndarray(np.uint8, shape=[np.int32(2), 3]).shape == (2, 3)
    assert r.ndarray(np.uint8, shape=(0, 7)).shape == (0, 7)


def test_load_read_error_and_serve_cpus_type_are_clear_errors():
    # plm.load() of an unreadable file raised a bare OSError(EIO) naming nothing; a string or
    # floats as serve_cpus a bare TypeError
    with pytest.raises(plm.SnapshotError, match="/proc/self/mem: cannot read"):
        plm.load("/proc/self/mem")
    for bad in ("x", [1.5]):
        with pytest.raises(plm.InvalidArgumentError, match="serve_cpus"):
            plm.Region(4096, serve_cpus=bad)
