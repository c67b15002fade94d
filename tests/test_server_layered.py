"""The page server serves compressed snapshots and chains of files (issue 12): every page read
from its file of the chain and decoded natively (server.c table_read) or by the Python
engine (through pylazymem._chain); a damaged entry is poisoned, never served."""
import os
import signal

import numpy as np
import pytest

import pylazymem as plm
from pylazymem._chain import open_chain
from pylazymem.server import PageServer

PS = os.sysconf("SC_PAGE_SIZE")
TESTS = os.path.dirname(os.path.abspath(__file__))

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

CLIENT = """
import sys
sys.path.insert(0, {tests!r})
from _server_client import ServedMemory, first_mismatch, PS
m = ServedMemory(sys.argv[1], [96 * PS], [0])
want = open(sys.argv[2], "rb").read()
"""


def _client(run_py, tmp_path, want, body):
    """Run `body` in a client process whose 96 pages the server at tmp_path/s.sock serves
    (`m`: its ServedMemory, `want`: the expected bytes)."""
    (tmp_path / "want.bin").write_bytes(want)
    return run_py(CLIENT.format(tests=TESTS) + body,
                  args=(str(tmp_path / "s.sock"), str(tmp_path / "want.bin")), prelude=False)


def _chain_files(tmp_path, codecs=("zstd", "lz4", None)):
    """A chain of len(codecs) files (root first), each written with its codec, of a region
    whose pages are text-like (compressible), random (stored raw even when compressed), zero
    and duplicate; each child changes some pages. Returns (leaf path, expected bytes)."""
    rng = np.random.default_rng(5)
    npages = 96
    with plm.Region(npages * PS) as r:
        a = r.ndarray(np.uint8).reshape(npages, PS)
        a[:] = rng.integers(97, 101, size=a.shape, dtype=np.uint8)   # compressible
        a[10:20] = rng.integers(0, 256, size=(10, PS), dtype=np.uint8)   # not
        a[30:40] = 0
        a[50:60] = 7
        prev = None
        for k, codec in enumerate(codecs):
            if k:
                a[k * 11:k * 11 + 5] = k + 1
                a[70 + k] = rng.integers(0, 256, PS, dtype=np.uint8)
            prev = plm.checkpoint(r, tmp_path / ("c%d.plm" % k), parent=prev, compress=codec)
        return prev.path, a.tobytes()


@pytest.mark.parametrize("engine", ["c", "python"])
def test_chain_of_compressed_files_served_to_another_process(tmp_path, engine, run_py):
    leaf, want = _chain_files(tmp_path)
    with PageServer(str(tmp_path / "s.sock"), snapshot=leaf, engine=engine) as srv:
        res = _client(run_py, tmp_path, want, """
for p in reversed(range(0, 96, 7)):   # scattered first: no readahead help
    assert m.maps[0][p * PS:(p + 1) * PS] == want[p * PS:(p + 1) * PS], p
bad = first_mismatch(m.maps[0][:], want)
assert bad is None, bad
print("OK")
""")
        assert res.returncode == 0, res.describe()
        st = srv.stats()
        assert st["errors"] == 0 and st["pages_copied"] > 0 and st["poisoned"] == 0


def test_restore_of_a_chain_with_a_page_server(tmp_path):
    """restore(leaf, server=) of a chain (refused before): served by the server, every byte."""
    leaf, want = _chain_files(tmp_path, ("zstd", None, "zstd"))
    sock = str(tmp_path / "s.sock")
    with PageServer(sock, snapshot=leaf, engine="c") as srv:
        with plm.restore(leaf, server=sock, prefetch="none") as r:
            assert r.ndarray(np.uint8).tobytes() == want
        assert srv.stats()["pages_copied"] > 0


@pytest.mark.shared_pages
def test_shared_pool_of_a_compressed_chain(tmp_path):
    """share=True: the server fills its pool from the chain (lm_srv_pool_fill through
    table_read) and a sharing client maps it."""
    leaf, want = _chain_files(tmp_path, ("lz4", "zstd"))
    sock = str(tmp_path / "s.sock")
    with PageServer(sock, snapshot=leaf, engine="c", share=True, prefetch_pool=True) as srv:
        assert srv.pool_complete()
        with plm.restore(leaf, server=sock, share=True, prefetch="none") as r:
            assert r.ndarray(np.uint8).tobytes() == want


def _damage_entry(path, page):
    """Flip bytes inside page `page`'s compressed store entry (its length kept)."""
    with open_chain(path, signatures=True) as chain:
        offsets, codes, layers, _ = chain.locations()
        assert layers[page] == 0 and (codes[page] >> 28) != 0, "not a compressed entry"
        off, n = int(offsets[page]), int(codes[page] & 0x0FFFFFFF)
    with open(path, "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(4)
        f.seek(off + n // 2)
        f.write(bytes(x ^ 0x5A for x in b))


@pytest.mark.parametrize("engine", ["c", "python"])
def test_damaged_compressed_entry_is_poisoned_not_served(tmp_path, engine, run_py):
    leaf, want = _chain_files(tmp_path, ("zstd",))
    _damage_entry(leaf, 3)
    # Opening reads the index and the signatures, not the entries: the server starts.
    with PageServer(str(tmp_path / "s.sock"), snapshot=leaf, engine=engine) as srv:
        res = _client(run_py, tmp_path, want, """
assert m.maps[0][5 * PS:6 * PS] == want[5 * PS:6 * PS]   # an intact page first
print("intact", flush=True)
m.maps[0][3 * PS]   # the damaged one: SIGBUS (poisoned), never other bytes
print("SERVED")
""")
        assert "intact" in res.stdout and "SERVED" not in res.stdout, res.describe()
        assert res.returncode == -signal.SIGBUS, res.describe()
        assert srv.stats()["poisoned"] >= 1


@pytest.mark.parametrize("engine", ["c", "python"])
def test_a_parent_written_over_in_place_is_refused_not_served(tmp_path, engine, run_py):
    # Only the leaf's identity was checked at each handshake: a chain's parent written over
    # in place (cp keeps the inode) was served with its new bytes under the old table.
    n = 16

    def snap(path, fill, parent=None):
        with plm.Region(n * PS) as r:
            a = r.ndarray(np.uint8)
            a[:] = fill
            if parent is not None:
                a[:PS] = 200
            return plm.checkpoint(r, path, parent=parent, working_set=[])
    base = snap(tmp_path / "base.plm", 7)
    leaf = snap(tmp_path / "leaf.plm", 7, parent=base)
    other = snap(tmp_path / "other.plm", 99)
    assert os.path.getsize(base.path) == os.path.getsize(other.path)
    sock = str(tmp_path / "s.sock")
    body = """
import sys
sys.path.insert(0, {tests!r})
from _server_client import ServedMemory, PS
try:
    m = ServedMemory(sys.argv[1], [16 * PS], [0])
except Exception as e:
    print("REFUSED", type(e).__name__, e)
    raise SystemExit
print("pages", m.maps[0][0], m.maps[0][5 * PS])
""".format(tests=TESTS)
    with PageServer(sock, snapshot=leaf.path, engine=engine) as srv:
        res = run_py(body, args=(sock,), prelude=False)
        assert res.stdout.split() == ["pages", "200", "7"], res.describe()
        ino = os.stat(base.path).st_ino
        with open(other.path, "rb") as src, open(base.path, "r+b") as dst:   # in place
            dst.write(src.read())
        assert os.stat(base.path).st_ino == ino
        res = run_py(body, args=(sock,), prelude=False)
        assert res.stdout.startswith("REFUSED ProtocolError"), res.describe()
        assert "base.plm (a parent of" in res.stdout and "written over" in res.stdout
        assert srv.refused == 1
