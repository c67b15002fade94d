"""Incremental checkpoints (checkpoint(parent=)), chains of them, compact() and inspect of a
chain (issue 12; docs/snapshot-format.md, "Parents and chains"). File-level checks here read
the chain through pylazymem._chain; restoring chains lazily is in test_chain_restore.py."""

import os

import numpy as np
import pytest

import pylazymem as plm
from pylazymem import _chain
from pylazymem.snapshot import _layout, _manifest_bytes, _write_tables
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(120)]

PS = PAGE_SIZE
NP = 96


def contents(path):
    with _chain.open_chain(path) as c:
        return c.read_pages(np.arange(c.leaf.header["npages"]))


def write_random(a, rng, n):
    """Change n random pages (a byte each, or a whole page zeroed): returns the pages."""
    pages = rng.choice(NP, n, replace=False)
    for p in pages:
        if rng.random() < 0.2:
            a[p * PS:(p + 1) * PS] = 0
        else:
            a[p * PS + int(rng.integers(PS))] ^= np.uint8(1 + rng.integers(255))
    return pages


@pytest.fixture
def region():
    rng = np.random.default_rng(7)
    with plm.Region(NP * PS) as r:
        a = r.ndarray(np.uint8)
        a[: (NP - 8) * PS] = rng.integers(0, 256, (NP - 8) * PS, dtype=np.uint8)
        a[10 * PS:11 * PS] = a[20 * PS:21 * PS]     # a duplicate page
        yield r, a, rng


def test_chain_of_five_then_compact(region, tmp_path):
    r, a, rng = region
    paths, states = [], []
    for k in range(5):
        path = str(tmp_path / ("s%d.plm" % k))
        info = plm.checkpoint(r, path, parent=paths[-1] if paths else None)
        paths.append(path)
        states.append(bytes(a))
        if k:
            assert info.version == 3 and info.parent["path"] == paths[-2]
            assert info.pages_by_class["parent"] > 0
        write_random(a, rng, 6)
    for path, state in zip(paths, states):
        assert contents(path) == state, path
    # every child stores at most the pages changed since its parent
    for path in paths[1:]:
        info = plm.inspect(path)
        assert info.pages_by_class["unique"] + info.pages_by_class["duplicate"] <= 6
    out = str(tmp_path / "flat.plm")
    info = plm.compact(paths[-1], out)
    assert info.version == 2 and info.parent is None
    assert contents(out) == states[-1]
    full = plm.checkpoint(r, str(tmp_path / "full.plm"))
    # the compacted file has the same contents as a full checkpoint would have of that state
    assert info.pages_by_class["unique"] <= full.pages_by_class["unique"] + 6


def test_unchanged_region_child_stores_nothing(region, tmp_path):
    r, a, rng = region
    plm.checkpoint(r, str(tmp_path / "p.plm"))
    info = plm.checkpoint(r, str(tmp_path / "c.plm"), parent=str(tmp_path / "p.plm"))
    assert info.pages_by_class["unique"] == 0 and info.stored_bytes == 0
    assert contents(str(tmp_path / "c.plm")) == bytes(a)


def test_parent_from_another_region(region, tmp_path):
    """Any snapshot of the same size can be a parent: pages are compared by contents."""
    r, a, rng = region
    with plm.Region(NP * PS) as other:
        b = other.ndarray(np.uint8)
        b[:] = a
        b[3 * PS] ^= 1
        plm.checkpoint(other, str(tmp_path / "other.plm"))
    info = plm.checkpoint(r, str(tmp_path / "c.plm"), parent=str(tmp_path / "other.plm"))
    assert info.pages_by_class["unique"] == 1
    assert contents(str(tmp_path / "c.plm")) == bytes(a)


def test_parent_replaced_or_deleted_is_named(region, tmp_path):
    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    write_random(a, rng, 3)
    plm.checkpoint(r, c, parent=p)
    a[0] ^= 1
    plm.checkpoint(r, p)      # another snapshot at the parent's path: a different content id
    with pytest.raises(plm.SnapshotError, match="p.plm.*content id.*replaced or changed"):
        contents(c)
    with pytest.raises(plm.SnapshotError, match="content id"):
        plm.compact(c, str(tmp_path / "x.plm"))
    os.unlink(p)
    with pytest.raises(plm.SnapshotError, match="p.plm.*cannot be opened.*no such"):
        contents(c)
    assert not os.path.exists(str(tmp_path / "x.plm"))


def test_parent_path_is_relative_to_the_child(region, tmp_path):
    """A directory of chain files can be moved as a whole."""
    r, a, rng = region
    d = tmp_path / "d"
    d.mkdir()
    plm.checkpoint(r, str(d / "p.plm"))
    write_random(a, rng, 2)
    plm.checkpoint(r, str(d / "c.plm"), parent=str(d / "p.plm"))
    os.rename(str(d), str(tmp_path / "moved"))
    assert contents(str(tmp_path / "moved" / "c.plm")) == bytes(a)


def test_bad_parent_arguments(region, tmp_path):
    r, a, rng = region
    p = str(tmp_path / "p.plm")
    plm.checkpoint(r, p)
    with pytest.raises(plm.InvalidArgumentError, match="the parent is the file being written"):
        plm.checkpoint(r, p, parent=p)
    assert contents(p) == bytes(a)     # untouched
    with plm.Region(8 * PS) as small:
        with pytest.raises(plm.InvalidArgumentError, match="parent holds 96 pages"):
            plm.checkpoint(small, str(tmp_path / "s.plm"), parent=p)
    with pytest.raises(plm.SnapshotError, match="no such"):
        plm.checkpoint(r, str(tmp_path / "c.plm"), parent=str(tmp_path / "missing.plm"))
    # a SnapshotInfo is accepted as the parent too
    info = plm.checkpoint(r, str(tmp_path / "c.plm"), parent=plm.inspect(p))
    assert info.parent["path"] == p


def test_compact_refuses_to_overwrite_its_chain(region, tmp_path):
    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    plm.checkpoint(r, c, parent=p)
    for out in (p, c):
        with pytest.raises(plm.InvalidArgumentError, match="output is a file of the chain"):
            plm.compact(c, out)
    assert contents(c) == bytes(a)


def rewrite_manifest(path, change):
    """Rewrite a snapshot's manifest (checksums made valid again): a hostile or broken file
    that is well formed."""
    from pylazymem._snapfile import _open, _read, _read_signatures

    fd = _open(path)
    try:
        p = _read(fd, path)
        sigs = _read_signatures(fd, p.header, path)
        h = p.header
        store = os.pread(fd, h["store_bytes"], h["store_offset"])
    finally:
        os.close(fd)
    man = {k: v for k, v in p.manifest.items() if k not in ("arrays", "pylazymem")}
    change(man)
    manifest = _manifest_bytes(p.manifest["arrays"], man)
    out = _layout(h["npages"], h["page_size"], h["nstored"], h["nws"], len(manifest),
                  parent_id=h["parent_id"])
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.pwrite(fd, store, out["store_offset"])
        _write_tables(fd, out, out["store_offset"], h["page_size"], p.map, p.working_set,
                      manifest, sigs)
    finally:
        os.close(fd)


def test_cycle_and_missing_parent_name(region, tmp_path):
    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    a[5] ^= 1
    plm.checkpoint(r, c, parent=p)
    rewrite_manifest(c, lambda m: m["parent"].update(path="c.plm"))
    with pytest.raises(plm.SnapshotError, match="already in the chain .a cycle"):
        contents(c)
    rewrite_manifest(c, lambda m: m.pop("parent"))
    with pytest.raises(plm.SnapshotError, match="must name it"):
        plm.inspect(c)


def test_chain_deeper_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(_chain, "MAX_DEPTH", 4)
    with plm.Region(2 * PS) as r:
        a = r.ndarray(np.uint8)
        prev = None
        for k in range(5):
            a[0] = k + 1
            path = str(tmp_path / ("s%d.plm" % k))
            if k < 4:
                plm.checkpoint(r, path, parent=prev)
            else:
                with pytest.raises(plm.SnapshotError, match="deeper than 4 files.*compact"):
                    plm.checkpoint(r, path, parent=prev)
            prev = path
        plm.compact(str(tmp_path / "s3.plm"), str(tmp_path / "flat.plm"))
        assert contents(str(tmp_path / "flat.plm"))[:1] == b"\x04"


def test_signature_equal_but_different_page_is_stored(region, tmp_path, monkeypatch):
    """A page whose signature is its parent page's is compared byte by byte: a hash
    collision (forced here by lying about the parent's signatures) must not lose a change."""
    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    a[7 * PS + 1] ^= 0x55
    now = r.signatures()
    real = _chain.Chain.page_classes

    def colliding(self):
        cls, sig = real(self)
        sig[7] = now[7]   # the changed page "collides" with its parent page
        return cls, sig

    monkeypatch.setattr(_chain.Chain, "page_classes", colliding)
    info = plm.checkpoint(r, c, parent=p)
    monkeypatch.undo()
    assert info.pages_by_class["unique"] == 1
    assert contents(c) == bytes(a)


def test_cli_inspect_and_compact(region, tmp_path):
    from test_cli import cli

    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    a[0] ^= 1
    plm.checkpoint(r, c, parent=p)
    code, out, err = cli("inspect", c)
    assert code == 0, err
    assert "chain:         2 files, leaf first" in out and p in out
    code, out, err = cli("compact", c, str(tmp_path / "flat.plm"))
    assert code == 0 and "needs no parent" in out, err
    os.unlink(p)
    code, out, err = cli("inspect", c)
    assert code == 1 and "chain:         broken" in out


def test_rewriting_a_childs_working_set_keeps_its_parent(region, tmp_path):
    from pylazymem.snapshot import rewrite_working_set

    r, a, rng = region
    p, c = str(tmp_path / "p.plm"), str(tmp_path / "c.plm")
    plm.checkpoint(r, p)
    pages = write_random(a, rng, 4)
    plm.checkpoint(r, c, parent=p, working_set=[int(x) for x in pages[::-1]] + [50])
    info = rewrite_working_set(c, [50, int(pages[0])])
    assert info.parent["path"] == p and info.working_set.tolist() == [50, int(pages[0])]
    assert contents(c) == bytes(a)


def test_a_checkpoint_of_a_restored_region_does_not_inherit_its_files_old_ids(region, tmp_path):
    # A file whose working set was rewritten lists the content ids of its earlier versions
    # (same_pages_as). A region restored from it carried the list into its next checkpoint,
    # whose pages differ: a child of the old version then restored silently from the new file.
    from pylazymem.snapshot import rewrite_working_set

    r, a, rng = region
    base, child = str(tmp_path / "base.plm"), str(tmp_path / "child.plm")
    plm.checkpoint(r, base)
    write_random(a, rng, 3)
    plm.checkpoint(r, child, parent=base)
    want_child = bytes(a)
    rewrite_working_set(base, [1, 2])   # same pages, new content id
    with plm.restore(base) as r2:
        r2.ndarray(np.uint8)[5 * PS:6 * PS] ^= 0xff   # other pages than the child's parent's
        plm.checkpoint(r2, base)
    with _chain.open_chain(base) as c:
        assert "same_pages_as" not in c.leaf.manifest
    with pytest.raises(plm.SnapshotError, match="replaced or changed"):
        contents(child)
    # rewriting the working set of what the child was taken from keeps it its parent
    os.unlink(child)
    with plm.restore(base) as r3:
        b = r3.ndarray(np.uint8)
        b[7] ^= 1
        plm.checkpoint(r3, child, parent=base)
        want_child = bytes(b)
    rewrite_working_set(base, [3])
    assert contents(child) == want_child


def test_compact_checks_signatures_and_stays_linear_where_they_collide(tmp_path):
    # compact() took an uncompressed store's signatures on trust (a file whose entries all
    # claimed one signature was compared entry against entry: minutes for a few MiB, hours
    # for 80 MiB) and copied lying signatures into its output.
    from test_snapshot_format import SnapFile
    from pylazymem.snapshot import _merge_entry
    path = str(tmp_path / "s.plm")
    n = 64
    with plm.Region(n * PS) as r:
        r.ndarray(np.uint64).reshape(n, -1)[:, 0] = np.arange(1, n + 1)
        plm.checkpoint(r, path, working_set="none")
    f = SnapFile.parse(open(path, "rb").read())
    f.sigs[:] = 0x1234
    open(path, "wb").write(f.build())
    plm.inspect(path)   # checksums fine: only the contents tell
    out = str(tmp_path / "out.plm")
    with open(out, "wb") as o:
        o.write(b"keep")
    with pytest.raises(plm.SnapshotError, match="differs from its signature"):
        plm.compact(path, out)
    assert open(out, "rb").read() == b"keep"

    # where a signature stands for many contents (collisions), merging is by a digest
    pages_ = [bytes([i % 7]) * PS for i in range(3000)]

    class Chain:
        reads = 0

        def read_entries(self, ids):
            Chain.reads += 1
            return pages_[ids[0]]
    keep, first_of, digests = [], {}, {}
    for i, p in enumerate(pages_):
        k = _merge_entry(p, 42, keep, first_of, digests, Chain())
        if k == len(keep):
            keep.append(i)
    # 7 contents kept; one entry read again (not one per pair of entries sharing a signature)
    assert keep == list(range(7)) and Chain.reads == 1


@pytest.mark.background_checkpoint
def test_paths_as_bytes_are_taken_everywhere(region, tmp_path):
    # checkpoint(r, b"..."), parent=b"...", compact(b"...", ...) and plm.save(b"...") failed
    # with "Can't mix strings and bytes in path components"; restore(b"...") worked
    r, a, rng = region
    p, c, flat = (os.fsencode(tmp_path / n) for n in ("p.plm", "c.plm", "flat.plm"))
    plm.checkpoint(r, p)
    a[3] ^= 1
    assert plm.checkpoint(r, c, parent=p).parent["path"] == os.fsdecode(p)
    a[4] ^= 1
    plm.checkpoint(r, os.fsencode(tmp_path / "b.plm"), background=True).wait(60)
    plm.compact(c, flat)
    a[4] ^= 1
    assert contents(flat) == bytes(a)
    plm.save(os.fsencode(tmp_path / "s.plm"), {"x": np.arange(3)})
    with plm.load(os.fsencode(tmp_path / "s.plm")) as st:
        assert st["x"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("ws", [[2 ** 64], [1.7, 2.2], ["3"], [NP]])
def test_a_working_set_that_is_not_page_indices_is_refused(region, tmp_path, ws):
    # (1.7 was truncated to page 1, "3" taken as page 3, 2**64 a bare OverflowError)
    r, a, rng = region
    with pytest.raises(plm.InvalidArgumentError, match="working_set"):
        plm.checkpoint(r, tmp_path / "w.plm", working_set=ws)
    assert not os.path.exists(tmp_path / "w.plm")
