"""Snapshot files and chains (found by a review, session 15): a parent whose working set was
rewritten keeps its children (same_pages_as), a chain's tables bounded together and parents' maps dropped,
parent pages a class of their own in inspect_tables() and the plot, `inspect --json` of a
broken chain, escaped paths in `inspect`, read errors naming the file."""

import errno
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

import pylazymem as plm
from pylazymem import _chain, _snapfile
from pylazymem._snapfile import SnapshotError
from _helpers import PAGE_SIZE, REPO_DIR
from _snapformat import (FLAG_PARENT, HDR, HDR3, HEADER3_FIELDS, HEADER_FIELDS, MAGIC,
                         SECTIONS, SECTIONS3)

PS = PAGE_SIZE
x3 = xxhash.xxh3_64_intdigest


def cli(*args):
    p = subprocess.run([sys.executable, "-m", "pylazymem", *args], capture_output=True,
                       timeout=120, cwd=REPO_DIR)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


# ---- writing files by hand (docs/snapshot-format.md, independently of the writer) --------

def _layout(version):
    if version == 3:
        return HDR3, HEADER3_FIELDS, SECTIONS3, 176, "index"
    return HDR, HEADER_FIELDS[5:], SECTIONS, 152, "map"


def _pack(version, flags, h, sections):
    """A whole file: header (checksums computed) and sections, in order."""
    hs, fields, names, checked, first = _layout(version)
    off = 4096
    for s in names:
        h[s + "_offset"], h[s + "_bytes"] = off, len(sections[s])
        off += len(sections[s])
    h["file_bytes"] = off
    h["tables_xxh3"] = x3(b"".join(sections[s] for s in names[names.index(first):-1]))
    h["sigs_xxh3"] = x3(sections["sigs"])
    h.setdefault("parent_id", 0)
    h["header_xxh3"] = 0
    raw = bytearray(4096)
    hs.pack_into(raw, 0, MAGIC, version, 4096, PS, flags, *(h[f] for f in fields))
    h["header_xxh3"] = x3(bytes(raw[:checked]))
    hs.pack_into(raw, 0, MAGIC, version, 4096, PS, flags, *(h[f] for f in fields))
    return bytes(raw) + b"".join(sections[s] for s in names)


def edit_manifest(path, fn):
    """Rewrite the manifest of the file at path with fn(manifest dict), checksums recomputed."""
    data = open(path, "rb").read()
    version, hb = struct.unpack_from("<II", data, 8)
    assert hb == 4096
    hs, fields, names, _, _ = _layout(version)
    _, _, _, _, flags, *rest = hs.unpack_from(data)
    h = dict(zip(fields, rest))
    sections = {s: data[h[s + "_offset"]:h[s + "_offset"] + h[s + "_bytes"]] for s in names}
    man = json.loads(sections["manifest"])
    fn(man)
    sections["manifest"] = json.dumps(man).encode()
    with open(path, "wb") as f:
        f.write(_pack(version, flags, h, sections))


def write_sparse(path, npages, parent_id=0, parent_rel=None):
    """A file of `npages` untouched pages (its page map all zero: a hole on disk), with a
    parent named by content id and path if parent_id. Returns its content id."""
    version = 3 if parent_id else 2
    man = {"arrays": {}}
    if parent_id:
        man["parent"] = {"path": parent_rel}
    sections = {"store": b"", "index": b"", "map": bytes(4 * npages), "ws": b"",
                "manifest": json.dumps(man).encode(), "sigs": b""}
    h = {"npages": npages, "nstored": 0, "nws": 0, "parent_id": parent_id}
    data = _pack(version, FLAG_PARENT if parent_id else 0, h, sections)
    with open(path, "wb") as f:
        f.write(data)
    return h["header_xxh3"]


def sparse_chain(d, files, npages):
    """l0.plm (the leaf) .. l{files-1}.plm (the root), each of npages untouched pages."""
    pid = 0
    for k in reversed(range(files)):
        pid = write_sparse(os.path.join(d, "l%d.plm" % k), npages, pid, "l%d.plm" % (k + 1))
    return os.path.join(d, "l0.plm")


def chain_contents(path):
    with _chain.open_chain(path) as c:
        return c.read_pages(np.arange(c.leaf.header["npages"]))


# ---- 1. record_working_set() of a parent keeps its children --------------------------------

@pytest.mark.core
@pytest.mark.uffd_full
@pytest.mark.timeout(120)
def test_record_working_set_of_a_parent_keeps_its_child(tmp_path):
    base, child = str(tmp_path / "model.plm"), str(tmp_path / "finetuned.plm")
    w = np.arange(1 << 16, dtype=np.float32)
    plm.save(base, {"w": w})
    r = plm.restore(base, prefetch="all", background=False)
    r.arrays["w"][:1024] += 1
    plm.checkpoint(r, child, parent=base)
    want = bytes(r.ndarray(np.uint8))
    r.close()
    with _chain.open_chain(base) as c:
        first_id = c.content_id
    st = plm.load(base, background=False, prefetch="none")
    float(st["w"][5000])
    plm.record_working_set(base, st)
    del st
    with _chain.open_chain(base) as c:
        assert c.content_id != first_id            # the rewrite gave it a new id...
        assert c.content_ids == {c.content_id, first_id}   # ...and it answers to the old one
    # the child still restores, compacts and inspects as it did
    assert chain_contents(child) == want
    with plm.restore(child, prefetch="all", background=False) as r2:
        assert bytes(r2.ndarray(np.uint8)) == want
    flat = str(tmp_path / "flat.plm")
    plm.compact(child, flat)
    assert chain_contents(flat) == want
    with _chain.open_chain(child) as c:
        files = c.describe()
    assert files[1]["named_as"] == "%016x" % first_id != files[1]["id"]
    rc, out, err = cli("inspect", child)
    assert rc == 0, out + err
    assert "chain:         2 files, leaf first" in out and "rewritten since" in out
    rc, out, err = cli("inspect", "--json", child)
    assert rc == 0, out + err
    assert json.loads(out)["chain"]["broken"] is None


def test_same_pages_as_accepts_an_earlier_id_and_nothing_else(tmp_path):
    """The link by hand: a parent whose manifest lists the id the child names is accepted;
    one whose list does not is still refused."""
    d = str(tmp_path)
    leaf = sparse_chain(d, 2, 16)
    parent = os.path.join(d, "l1.plm")
    named = _chain.open_chain(leaf).layers[0].parsed.header["parent_id"]
    edit_manifest(parent, lambda m: m.update(same_pages_as=[7, named]))
    with _chain.open_chain(leaf) as c:
        assert len(c.layers) == 2 and c.layers[1].named_as == named
        assert c.content_ids == {c.content_id}
    with _chain.open_chain(parent) as c:
        assert c.content_ids == {c.content_id, 7, named}
    edit_manifest(parent, lambda m: m.update(same_pages_as=[7]))
    with pytest.raises(SnapshotError, match="replaced or changed"):
        _chain.open_chain(leaf)


@pytest.mark.parametrize("bad", ["x", [0], [1 << 64], [True], [1.0], ["1"], list(range(1, 66)),
                                 {"a": 1}])
def test_same_pages_as_is_checked(tmp_path, bad):
    path = str(tmp_path / "s.plm")
    write_sparse(path, 4)
    edit_manifest(path, lambda m: m.update(same_pages_as=bad))
    with pytest.raises(SnapshotError, match="s.plm: manifest 'same_pages_as' must be"):
        plm.inspect(path)
    for good in ([], [1, (1 << 64) - 1], list(range(1, 65))):
        edit_manifest(path, lambda m: m.update(same_pages_as=good))
        plm.inspect(path)


# ---- 2. a chain's tables bounded together; parents' maps not kept -----------------------------

def test_chain_tables_bounded_together(tmp_path, monkeypatch):
    npages = 1 << 16                           # 256 KiB page maps
    leaf = sparse_chain(str(tmp_path), 6, npages)
    with _chain.open_chain(leaf) as c:
        assert len(c.layers) == 6 and not c.map().any()
    # each file within its own bound (a page map of at most memory / 4), 6 of them not
    monkeypatch.setattr(_snapfile, "_memory_bytes", lambda: 4 * npages * 4)
    plm.inspect(leaf)
    with pytest.raises(SnapshotError, match=r"l0\.plm: the tables of its chain .* more than "
                                            r"this machine's memory"):
        _chain.open_chain(leaf)


def test_chain_keeps_no_parent_map_and_resolves(tmp_path):
    base, child, want = _built_chain(tmp_path)
    with _chain.open_chain(child) as c:
        assert c.layers[0].parsed.map is not None
        assert all(layer.parsed.map is None for layer in c.layers[1:])
        # what the reader says of each file, without its map
        files = c.describe()
        assert [f["parent_pages"] for f in files] == [2, 0]
        assert [f["stored_pages"] for f in files] == [2, 4]
        assert c.read_pages(np.arange(4)) == want


def _built_chain(tmp_path):
    """A 4-page chain by hand: base stores 4 distinct pages; child stores pages 2 and 3 anew
    and leaves 0 and 1 to base (no core needed)."""
    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 256, PS, dtype=np.uint8).tobytes() for _ in range(6)]

    def write(path, stored, pmap, parent_id=0):
        man = {"arrays": {}}
        if parent_id:
            man["parent"] = {"path": "base.plm"}
        sections = {"store": b"".join(stored), "index": b"",
                    "map": np.array(pmap, "<u4").tobytes(), "ws": b"",
                    "manifest": json.dumps(man).encode(),
                    "sigs": np.array([x3(p) for p in stored], "<u8").tobytes()}
        h = {"npages": 4, "nstored": len(stored), "nws": 0, "parent_id": parent_id}
        with open(path, "wb") as f:
            f.write(_pack(3 if parent_id else 2, FLAG_PARENT if parent_id else 0, h, sections))
        return h["header_xxh3"]
    base, child = str(tmp_path / "base.plm"), str(tmp_path / "child.plm")
    pid = write(base, pages[:4], [2, 3, 4, 5])
    write(child, pages[4:], [0xFFFFFFFF, 0xFFFFFFFF, 2, 3], pid)
    return base, child, b"".join(pages[:2] + pages[4:])


def test_out_of_memory_reading_a_chain_is_a_snapshot_error(tmp_path, monkeypatch):
    base, child, _ = _built_chain(tmp_path)

    def no_memory(*a):
        raise MemoryError()
    monkeypatch.setattr(_chain, "_resolve", no_memory, raising=False)
    monkeypatch.setattr(_chain.Chain, "map", no_memory)   # where the old reader allocated
    with pytest.raises(SnapshotError, match=r"child\.plm: not enough memory"):
        with _chain.open_chain(child) as c:
            c.map()


# ---- 3. parent pages in inspect_tables() and the plot -------------------------------------

def test_inspect_tables_parent_class(tmp_path):
    base, child, _ = _built_chain(tmp_path)
    info, table = _snapfile.inspect_tables(child)
    assert table["cls"].tolist() == [_snapfile.TABLE_PARENT] * 2 + [_snapfile.STORED] * 2
    assert table["store"].tolist() == [0, 0, 0, 1]
    assert info.pages_by_class["parent"] == 2


def test_inspect_plot_of_a_child(tmp_path):
    pytest.importorskip("matplotlib")
    base, child, _ = _built_chain(tmp_path)
    png = str(tmp_path / "m.png")
    rc, out, err = cli("inspect", child, "--plot", png)
    assert rc == 0, err
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# ---- 4. inspect --json of a broken chain -------------------------------------------------

def test_inspect_json_reports_the_chain(tmp_path):
    base, child, _ = _built_chain(tmp_path)
    rc, out, err = cli("inspect", "--json", child)
    assert rc == 0, err
    chain = json.loads(out)["chain"]
    assert chain["broken"] is None and [f["path"] for f in chain["files"]] == [child, base]
    rc, out, err = cli("inspect", "--json", base)
    assert rc == 0 and json.loads(out)["chain"] is None
    os.unlink(base)
    for args in (["--json"], []):
        rc, out, err = cli("inspect", *args, child)
        assert rc == 1, (args, out, err)
    rc, out, err = cli("inspect", "--json", child)
    broken = json.loads(out)["chain"]["broken"]
    assert "base.plm" in broken and "cannot be opened" in broken


# ---- 5. paths from a file escaped --------------------------------------------------------

def test_inspect_escapes_paths_from_the_file(tmp_path):
    base, child, _ = _built_chain(tmp_path)
    forged = "base.plm\nchain:         1 files, leaf first (all fine)\x1b[2K"
    edit_manifest(child, lambda m: m["parent"].update(path=forged))
    rc, out, err = cli("inspect", child)
    assert rc == 1
    assert "\x1b" not in out + err
    assert not any(line.startswith("chain:         1 files") for line in out.splitlines())
    assert "\\x1b[2K" in out and "broken" in out
    # a parent found under such a name is listed escaped too
    odd = str(tmp_path / "odd\x1b[2K.plm")
    os.rename(base, odd)
    edit_manifest(child, lambda m: m["parent"].update(path=os.path.basename(odd)))
    rc, out, err = cli("inspect", child)
    assert rc == 0, err
    assert "\x1b" not in out and "odd\\x1b[2K.plm" in out


# ---- 6. read errors name the file ---------------------------------------------------------

def test_read_error_names_the_file(tmp_path, monkeypatch):
    # /proc/self/mem: a regular file whose pread at offset 0 fails with EIO
    with pytest.raises(SnapshotError, match=r"^/proc/self/mem: cannot read: ") as e:
        plm.inspect("/proc/self/mem")
    assert e.value.__cause__.errno == errno.EIO
    rc, out, err = cli("inspect", "/proc/self/mem")
    assert rc == 1 and "SnapshotError: /proc/self/mem: cannot read" in err, err
    # the tables (_pread_exact) and the store of a chain
    base, child, _ = _built_chain(tmp_path)

    def eio(*a):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "preadv", eio)
    with pytest.raises(SnapshotError, match=r"child\.plm: cannot read: Input/output error") as e:
        plm.inspect(child)
    assert e.value.__cause__.errno == errno.EIO
    monkeypatch.undo()
    with _chain.open_chain(child) as c:
        monkeypatch.setattr(os, "preadv", eio)
        with pytest.raises(SnapshotError, match=r"base\.plm: cannot read: .*store entries"):
            c.read_pages([0])


@pytest.mark.core
@pytest.mark.uffd_full
@pytest.mark.timeout(60)
def test_restore_read_error_names_the_file():
    with pytest.raises(SnapshotError, match=r"^/proc/self/mem: cannot read: "):
        plm.restore("/proc/self/mem")
