"""Restoring chains of incremental snapshots lazily (issue 12): every file of the chain is a
layer of the region's source; pages come from the file that last stored them, through faults,
prefetch and the background fill; compressed and plain files mixed; a broken chain refused
before anything is mapped; an incremental checkpoint of a restored chain."""

import os
import time

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

PS = PAGE_SIZE
NP = 128


def build_chain(tmp_path, compress_of=(None, "zstd", None, "lz4", "zstd")):
    rng = np.random.default_rng(12)
    states, paths = [], []
    with plm.Region(NP * PS) as r:
        a = r.ndarray(np.uint8)
        a[: 100 * PS] = rng.integers(0, 256, 100 * PS, dtype=np.uint8)
        a[100 * PS:110 * PS] = np.frombuffer(b"text-like " * (10 * PS // 10 + 1), np.uint8)[:10 * PS]
        for k, comp in enumerate(compress_of):
            path = str(tmp_path / ("s%d.plm" % k))
            plm.checkpoint(r, path, parent=paths[-1] if paths else None, compress=comp,
                           working_set=list(range(k, NP, 9)))
            paths.append(path)
            states.append(bytes(a))
            for p in rng.choice(NP, 7, replace=False):
                a[p * PS + int(rng.integers(PS))] ^= 0x5A
            a[(20 + k) * PS:(21 + k) * PS] = 0
    return paths, states


@pytest.mark.parametrize("prefetch", ["none", "working-set", "all"])
def test_restore_each_file_of_a_chain(tmp_path, prefetch):
    paths, states = build_chain(tmp_path)
    for path, state in zip(paths, states):
        with plm.restore(path, prefetch=prefetch, background=False) as r:
            assert bytes(r.ndarray(np.uint8)) == state, path
            assert r.stats()["errors"] == 0


def test_chain_background_fill_and_verify(tmp_path):
    paths, states = build_chain(tmp_path)
    with plm.restore(paths[-1], prefetch="none", background=True, verify=True) as r:
        deadline = time.monotonic() + 30
        while r.stats()["background_running"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert r.stats()["verify_failures"] == 0
        assert bytes(r.ndarray(np.uint8)) == states[-1]


def test_incremental_checkpoint_of_a_restored_chain(tmp_path):
    paths, states = build_chain(tmp_path)
    with plm.restore(paths[-1], prefetch="none", background=False) as r:
        a = r.ndarray(np.uint8)
        int(a[::PS].sum())          # read every page: reads are not changes
        a[3 * PS] ^= 1
        info = plm.checkpoint(r, str(tmp_path / "next.plm"), parent=paths[-1])
        assert info.pages_by_class["unique"] == 1 and info.pages_by_class["parent"] >= NP - 40
        want = bytes(a)
    with plm.restore(str(tmp_path / "next.plm")) as r:
        assert bytes(r.ndarray(np.uint8)) == want
    out = plm.compact(str(tmp_path / "next.plm"), str(tmp_path / "flat.plm"))
    assert out.parent is None
    with plm.restore(str(tmp_path / "flat.plm")) as r:
        assert bytes(r.ndarray(np.uint8)) == want


def test_broken_chain_is_refused_before_mapping(tmp_path):
    paths, states = build_chain(tmp_path, (None, None, None))
    os.unlink(paths[1])
    with pytest.raises(plm.SnapshotError, match="s1.plm.*cannot be opened"):
        plm.restore(paths[2])
    with plm.restore(paths[0]) as r:    # the root needs nobody
        assert bytes(r.ndarray(np.uint8)) == states[0]


def test_broken_chain_is_refused_before_a_page_server_is_asked(tmp_path):
    """A chain is served by a page server now (tests/test_server_layered.py); a broken one is
    still refused before any connection is tried."""
    paths, states = build_chain(tmp_path, (None, None))
    os.unlink(paths[0])
    with pytest.raises(plm.SnapshotError, match="cannot be opened"):
        plm.restore(paths[1], server=str(tmp_path / "none.sock"))


def test_a_leaf_replaced_while_restore_opens_its_chain_is_refused(tmp_path, monkeypatch):
    # restore() read the leaf's tables from its descriptor, then opened the chain by path: a
    # checkpoint renamed over the path in between made the region serve one file's pages
    # under the other's content id (and a later checkpoint(parent=...) of the first one
    # restored the wrong pages).
    import shutil
    from pylazymem import _chain
    d = str(tmp_path)
    for name, val in (("a", 1), ("b", 2)):
        with plm.Region(8 * PS) as r:
            r.ndarray(np.uint8)[:] = val
            plm.checkpoint(r, os.path.join(d, "base_%s.plm" % name))
            r.ndarray(np.uint8)[PS:2 * PS] = val + 10
            plm.checkpoint(r, os.path.join(d, "leaf_%s.plm" % name),
                           parent=os.path.join(d, "base_%s.plm" % name))
    path, other = os.path.join(d, "state.plm"), os.path.join(d, "leaf_b.plm")
    shutil.copy(os.path.join(d, "leaf_a.plm"), path)
    real = _chain.open_chain

    def racing(p, *args, **kw):
        if os.path.abspath(p) == path:
            os.replace(other, path)   # a concurrent checkpoint to the same path
        return real(p, *args, **kw)
    monkeypatch.setattr(_chain, "open_chain", racing)
    with pytest.raises(plm.SnapshotError, match="changed while it was being opened"):
        plm.restore(path, prefetch="none", background=False)
