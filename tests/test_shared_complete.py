"""A complete pool (issue 11, docs/shared-pages.md 2.5): the background fill that finds every
page of the snapshot in the pool makes it huge folios and seals it; a process that restores
from a sealed, complete pool with Region(shared_first_touch=False) is served by the kernel
(reads through PMDs, no fault reaches us, no working set), and its records, checkpoints and
deferrals stay true. Every process is a spawned worker (tests/test_shared_multiproc.py), every
reply awaited with a timeout, every byte read compared with the snapshot's contents."""

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE as PS
from test_shared_multiproc import assert_all_good, run_all, workers  # noqa: F401

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.shared_pages,
              pytest.mark.timeout(300)]

# 2 MiB blocks and a partial block at the end (registered: never kernel-served). Blocks 0, 1
# and 4..7 hold data (block 5 with a few zero pages), block 2 zero pages and data, block 3
# pages never touched: its pool block stays a hole (registered); the zero pages of the others
# are filled with zeros when the pool completes, so those 7 blocks are the kernel's.
NPAGES = 8 * 512 + 100
ZEROS = list(range(1024, 1100)) + list(range(2600, 2610))
UNTOUCHED = range(1536, 2048)
# Blocks 2 and 5 lose their holes (zero-filled, then collapsed) only where huge pages can be
# made; elsewhere they keep them and stay registered.
KERNEL = [0, 1, 2, 4, 5, 6, 7] if plm.features().huge_shared_pages else [0, 1, 4, 6, 7]
KERNEL_BLOCKS = len(KERNEL)

LAYOUT = """
ZEROS = list(range(1024, 1100)) + list(range(2600, 2610))
UNTOUCHED = range(1536, 2048)
def expected(seed, npages):
    e = np.random.default_rng(seed).integers(0, 256, (npages, PS), dtype=np.uint8)
    e[:, 0] |= 1
    e[ZEROS] = 0
    e[UNTOUCHED] = 0
    return e
"""


def make_snapshot(path, npages, seed):
    """The snapshot of the layout above (the workers' expected(seed, npages) after LAYOUT)."""
    e = np.random.default_rng(seed).integers(0, 256, (npages, PS), dtype=np.uint8)
    e[:, 0] |= 1
    e[ZEROS] = 0
    r = plm.Region(npages * PS, max_cluster_pages=1)   # no readahead: untouched stays so
    try:
        v = r.ndarray(np.uint8).reshape(npages, PS)
        keep = np.setdiff1d(np.arange(npages), np.array(UNTOUCHED))
        for lo, hi in ((0, UNTOUCHED[0]), (UNTOUCHED[-1] + 1, npages)):
            v[lo:hi] = e[lo:hi]
        info = plm.checkpoint(r, path, working_set="none")
    finally:
        r.close()
    assert keep.size == npages - len(UNTOUCHED)
    assert info.pages_by_class.get("zero") == len(ZEROS), info.pages_by_class
    assert info.pages_by_class.get("untouched") == len(UNTOUCHED), info.pages_by_class
    return path

WAIT_SEALED = """
import time
_t = time.monotonic()
while not r.pool["sealed"] and time.monotonic() - _t < 60:
    time.sleep(0.02)
out = dict(pool_of(r), background=r.stats()["background_pages"])
"""

PMD = "from _helpers import pmd_mapped\n"


def first_sealed(w, snap, seed):
    """Worker w restores `snap` shared with the background fill on and waits for the pool to
    be sealed (the fill found it complete); its every byte checked."""
    res = w.run(LAYOUT + "exp = expected(%d, %d); snap = %r\nr = restore_shared(snap, background=True)\n"
                % (seed, NPAGES, snap) + WAIT_SEALED)
    assert res["sealed"], "the background fill did not seal the complete pool: %s" % res
    assert_all_good([w.run("out = check(r, exp)")], "the filler after sealing")
    # the completion dropped its mappings of the pool's small pages (made huge): read again,
    # the same pages, not changes
    assert w.run("out = len(r.dirty_pages())") == 0
    return res


def test_complete_pool_is_sealed_and_served_by_the_kernel(workers, tmp_path):
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 21)
    a, b, c = workers(3)
    sealed = first_sealed(a, snap, 21)
    whole = NPAGES // 512 * 512
    written = [3, 700, 1050, 1800, 2605, whole + 5]   # data, zero, untouched, the tail
    # a joiner that asks for kernel-served pages: the blocks without a hole are the kernel's,
    # every byte right, no fault of those pages reaches us, stores stay private, and reading
    # zero and untouched pages plants nothing in the pool
    res = b.run(LAYOUT + PMD + """
exp = expected(21, %d)
r = restore_shared(%r, shared_first_touch=False, prefetch="working-set", background=None)
st0 = r.stats()
bytes0 = r.pool["bytes"]
c0 = check(r, exp)
st = r.stats()
bytes1 = r.pool["bytes"]
v = pages(r)
v[%r] = 7
exp2 = exp.copy(); exp2[%r] = 7
out = dict(check(r, exp2), first=c0, kernel=st0["pool_kernel_pages"], faults=st["faults"],
           bg=st["background_running"], pool=pool_of(r), counts=r.page_counts(),
           grew=bytes1 - bytes0)
""" % (NPAGES, snap, written, written))
    assert res["first"]["nbad"] == 0 and res["nbad"] == 0, res
    assert res["kernel"] == KERNEL_BLOCKS * 512
    # only the registered blocks (the untouched one, the partial tail) faulted
    assert res["faults"] <= NPAGES - KERNEL_BLOCKS * 512, res["faults"]
    assert not res["bg"] and res["pool"]["inode"] == sealed["inode"]
    assert res["counts"]["private"] == len(written)
    assert res["grew"] == 0
    # the others and the pool are unaffected by b's stores; a registered joiner (the default)
    # maps the same pool
    assert_all_good([a.run("out = check(r, exp)")], "the filler after b's stores")
    res = c.run(LAYOUT + "exp = expected(21, %d); r = restore_shared(%r)\nout = dict(check(r, exp), "
                "kernel=r.stats()['pool_kernel_pages'], pool=pool_of(r))" % (NPAGES, snap))
    assert res["nbad"] == 0 and res["kernel"] == 0 and res["pool"]["inode"] == sealed["inode"]


@pytest.mark.huge_shared
def test_complete_pool_is_read_through_huge_pages(workers, tmp_path):
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 22)
    a, b = workers(2)
    first_sealed(a, snap, 22)
    res = b.run(LAYOUT + PMD + """
exp = expected(22, %d)
r = restore_shared(%r, shared_first_touch=False)
c = check(r, exp)
from pylazymem._smaps import pool_mappings
out = dict(c, pmd=pmd_mapped(r), inspect=pool_mappings(os.getpid())["ShmemPmdMapped"])
""" % (NPAGES, snap))
    assert res["nbad"] == 0
    assert res["pmd"] == KERNEL_BLOCKS * (2 << 20), res   # every block with data: a huge page
    assert res["inspect"] == res["pmd"]                    # what `pylazymem inspect --pid` says


def test_checkpoint_of_a_kernel_served_restore_differs_exactly_at_the_written_pages(
        workers, tmp_path):
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 23)
    out_snap = str(tmp_path / "out.snap")
    a, b = workers(2)
    first_sealed(a, snap, 23)
    written = sorted(np.random.default_rng(9).choice(NPAGES, 40, replace=False).tolist())
    res = b.run(LAYOUT + """
exp = expected(23, %d)
r = restore_shared(%r, shared_first_touch=False)
assert r.stats()["pool_kernel_pages"] > 0
v = pages(r)
written = np.array(%r)
_ = [int(v[i].sum()) for i in written[::2]]     # half read first (mapped), then written
new = np.random.default_rng(10).integers(0, 256, (written.size, PS), dtype=np.uint8)
new[:, 0] |= 1
v[written] = new
exp_after = exp.copy(); exp_after[written] = new
m = r.meta
info = plm.checkpoint(r, %r)
x = plm.restore(%r, prefetch="none", background=False)
y = plm.restore(%r, prefetch="none", background=False)
kernel_written = [int(i) for i in written if i // 512 in %r]
out = dict(check(y, exp_after), changed=np.nonzero(x.signatures() != y.signatures())[0].tolist(),
           data=int((m["cls"][kernel_written] == plm.PageClass.DATA).sum()), nk=len(kernel_written))
x.close(); y.close()
""" % (NPAGES, snap, written, out_snap, snap, out_snap, KERNEL))
    assert res["nbad"] == 0, res
    assert res["changed"] == written
    assert res["nk"] > 0 and res["data"] == res["nk"]   # written pages the kernel served


def test_deferral_and_materialize_over_a_kernel_served_pool(workers, tmp_path):
    """defer_fill, materialize and prefetch need the region registered: it is taken over whole
    (records made true from the page tables), and the new contents are served, never the
    pool's pages; written pages keep the program's bytes."""
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 24)
    a, b = workers(2)
    first_sealed(a, snap, 24)
    res = b.run(LAYOUT + """
exp = expected(24, %d)
r = restore_shared(%r, shared_first_touch=False)
v = pages(r)
_ = int(v[10].sum()) + int(v[2000].sum())       # mapped by the kernel
v[11] = 5                                        # written
exp[11] = 5
k0 = r.stats()["pool_kernel_pages"]
r.defer_fill(600 * PS, 1000 * PS, plm.ZERO)      # zero over blocks 1..3 (partly)
exp[600:1600] = 0
k1 = r.stats()["pool_kernel_pages"]
c1 = check(r, exp)
r.materialize()
c2 = check(r, exp)
m = r.meta
out = dict(c2, first=c1, k0=k0, k1=k1, cls11=int(m["cls"][11]), st10=int(m["state"][10]),
           present=r.stats()["pages_present"])
""" % (NPAGES, snap))
    assert res["first"]["nbad"] == 0 and res["nbad"] == 0, res
    assert res["k0"] > 0 and res["k1"] == 0
    import pylazymem as plm
    assert res["cls11"] == plm.PageClass.DATA
    assert res["st10"] == plm.PageState.PRESENT
    assert res["present"] == NPAGES


def test_pool_sealed_by_another_before_it_was_complete_is_not_kernel_served(workers, tmp_path):
    """Only a pool this process finds complete is left to the kernel: one sealed early (by a
    foreign tool) keeps its holes registered, so they are read from the store, never as the
    zeros the kernel would plant in the pool."""
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 25)
    a, b = workers(2)
    res = a.run(LAYOUT + """
import fcntl, os
exp = expected(25, %d)
r = restore_shared(%r)
_ = [int(pages(r)[i].sum()) for i in range(0, %d, 3)]    # a third of the pool published
# sealed through the pool's memfd (a stand-in for a foreign tool of this uid)
fcntl.fcntl(r._pool.fd, 1033, 0x10)   # F_ADD_SEALS, F_SEAL_FUTURE_WRITE
out = pool_of(r)
""" % (NPAGES, snap, NPAGES))
    assert res["sealed"]
    res = b.run(LAYOUT + """
exp = expected(25, %d)
r = restore_shared(%r, shared_first_touch=False)
out = dict(check(r, exp), kernel=r.stats()["pool_kernel_pages"], sealed=r.pool["sealed"])
""" % (NPAGES, snap))
    assert res["sealed"] and res["kernel"] == 0 and res["nbad"] == 0, res


def test_processes_served_by_the_kernel_concurrently(workers, tmp_path):
    """Four processes restore a complete pool at once, kernel-served, each reads every byte in
    its own order and writes its own pages: each sees its writes and the snapshot elsewhere,
    and the filler still reads the snapshot."""
    snap = make_snapshot(str(tmp_path / "s.snap"), NPAGES, 26)
    first, *ws = workers(5)
    first_sealed(first, snap, 26)
    code = LAYOUT + """
exp = expected(26, %d)
r = restore_shared(%r, shared_first_touch=False)
order = np.random.default_rng(%d).permutation(%d)
c0 = check(r, exp, order)
mine = np.arange(%d, %d, 4)
pages(r)[mine] = %d
exp[mine] = %d
out = dict(check(r, exp), first=c0, kernel=r.stats()["pool_kernel_pages"])
"""
    res = run_all(ws, [code % (NPAGES, snap, k, NPAGES, k, NPAGES, 10 + k, 10 + k)
                       for k in range(4)])
    assert all(x["kernel"] == KERNEL_BLOCKS * 512 for x in res), res
    assert_all_good([x["first"] for x in res], "kernel-served readers")
    assert_all_good(res, "kernel-served writers")
    assert_all_good([first.run("out = check(r, exp)")], "the filler after the others wrote")


def test_take_over_while_faults_and_readers_of_registered_blocks_run(workers, tmp_path):
    """The take-over of kernel-served blocks (materialize here) holds only those blocks' pages:
    holding a page of a registered block too deadlocked (second review of session 16) with a
    serving thread waiting for that page while a reader held another page whose copy faulted
    behind it. Block 0 is the kernel's; the other blocks are half zero pages (holes: registered).
    A trial that hangs fails the test through the worker's timeout."""
    nb = 64
    npages = nb * 512
    path = str(tmp_path / "s.snap")
    e = np.random.default_rng(5).integers(0, 256, (npages, PS), dtype=np.uint8)
    e[:, 0] |= 1
    e[512::2] = 0
    with plm.Region(npages * PS) as r:
        r.ndarray(np.uint8).reshape(npages, PS)[:] = e
        plm.checkpoint(r, path, working_set="none")
    filler, w = workers(2)
    assert filler.run("r = restore_shared(%r, background=True)\n" % path + WAIT_SEALED)["sealed"]
    res = w.run("""
import ctypes, threading
from pylazymem._binding import ffi, lib
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
N = %d
hung = 0
for trial in range(20):
    r = plm.restore(%r, share=True, shared_first_touch=False, prefetch="none", background=False)
    assert r.stats()["pool_kernel_pages"] == 512
    v = pages(r)
    ys = [N - 1 - 2 * i for i in range(8)]        # data pages of the last, registered block
    for y in ys:
        int(v[y, 0])                               # mapped from the pool: PRESENT SHARED
    stop, go, done = threading.Event(), threading.Event(), threading.Event()
    buf = ctypes.create_string_buffer(8)
    def reader():
        out = ffi.new("char[]", PS)
        with r._use() as lm:
            go.wait()
            while not stop.is_set():
                for y in ys:
                    libc.madvise(r.address + y * PS, PS, 4)   # MADV_DONTNEED: dropped
                    lib.lm_page_read(lm, y, out)              # held; its copy faults
    def prog():
        go.wait()
        for z in range(512 + 1, N - 512, 2):       # first touches of registered data pages
            if stop.is_set():
                break
            ctypes.memmove(buf, r.address + z * PS, 1)
    def take():
        go.wait()
        time.sleep(0.0005)
        with r._use() as lm:
            lib.lm_materialize(lm, 0, 1)           # takes the kernel's blocks over
        done.set()
    ts = [threading.Thread(target=f, daemon=True) for f in (reader, prog, take)]
    for t in ts:
        t.start()
    go.set()
    if not done.wait(20):
        hung += 1
        break
    stop.set()
    for t in ts:
        t.join(20)
    del v
    r.close()
out = hung
""" % (npages, path), timeout=240)
    assert res == 0


@pytest.mark.huge_shared
@pytest.mark.parametrize("deferred", ["zero pages only", "data pages too"])
def test_a_deferral_in_a_huge_mapped_pool_block_leaves_its_zero_pages_mapped(run_py_ok,
                                                                            tmp_path, deferred):
    """The pool's zero pages, which a take-over records without SHARED, are mapped by the
    same huge page as the rest of the block: a deferral of part of it left them recorded
    PRESENT and unmapped (session 18's review of the first fix, which knew SHARED only)."""
    out = run_py_ok("""
        import sys
        from _helpers import pmd_mapped
        path, deferred = sys.argv[1], sys.argv[2]
        P, N = PS, 1024
        e = np.random.default_rng(1).integers(0, 256, (N, P), dtype=np.uint8)
        e[:, 0] |= 1
        e[500:512] = 0
        with plm.Region(N * P) as r:
            r.ndarray(np.uint8).reshape(N, P)[:] = e
            plm.checkpoint(r, path, working_set="none")
        a = plm.restore(path, share=True, prefetch="none", background=True)
        t = time.monotonic()
        while not a.pool["sealed"] and time.monotonic() - t < 60:
            time.sleep(0.02)
        assert a.pool["sealed"]
        b = plm.restore(path, share=True, shared_first_touch=False, prefetch="none",
                        background=False)
        v = b.ndarray(np.uint8).reshape(N, P)
        assert int(v[10, 5]) == e[10, 5]
        huge = pmd_mapped(b) > 0
        first = 505 if deferred == "zero pages only" else 498
        b.defer_fill(first * P, 4 * P, plm.ZERO)
        pm = os.open("/proc/self/pagemap", os.O_RDONLY)
        x = np.frombuffer(os.pread(pm, 512 * 8, (b.address // P) * 8), np.uint64)
        mapped = ((x >> np.uint64(62)) & np.uint64(3)) != 0
        present = b.meta["state"][:512] == int(plm.PageState.PRESENT)
        assert not np.flatnonzero(present & ~mapped).size, np.flatnonzero(present & ~mapped)
        e[first:first + 4] = 0
        assert np.array_equal(v, e)
        del v
        b.close(); a.close()
        print("OK huge" if huge else "OK")
    """, args=(str(tmp_path / "s.plm"), deferred), timeout=120)
    assert out.strip().startswith("OK"), out
