"""Compressed snapshots (format version 3, docs/snapshot-format.md "Entry index"; issue 12):
round trips with each codec over pages of several kinds, through every restore path (lazy
faults, prefetch, background fill, verify), plm.save/plm.load, and hostile compressed files:
an index that lies is refused when the file is opened, an entry that does not decode to exactly
one page of the right contents is never served (its page is poisoned: SIGBUS in a subprocess),
never read as zeros or wrong bytes.

Hostile files are built here from the document (struct layouts written out below, zstd and LZ4
from the system libraries through ctypes), not with pylazymem's writer."""

import ctypes
import ctypes.util
import json
import os
import signal
import struct
import sys

import numpy as np
import pytest
import xxhash

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(180)]

PS = PAGE_SIZE
CODECS = ("zstd", "lz4")
SIGBUS_RC = -signal.SIGBUS
from _snapformat import (CODEC_LZ4 as LZ4, CODEC_RAW as RAW, CODEC_ZSTD as ZSTD,  # noqa: E402
                         FLAG_COMPRESSED as COMPRESSED, FLAG_PARENT as PARENT, HDR3, MAGIC)
from _snapformat import HEADER3_FIELDS as FIELDS3  # noqa: E402
xxh3 = xxhash.xxh3_64_intdigest

# ---- the system codecs, independently of pylazymem ---------------------------------------

_zstd = ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1")
_zstd.ZSTD_compress.restype = ctypes.c_size_t
_zstd.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                ctypes.c_size_t, ctypes.c_int]
_zstd.ZSTD_isError.argtypes = [ctypes.c_size_t]
_lz4 = ctypes.CDLL(ctypes.util.find_library("lz4") or "liblz4.so.1")
_lz4.LZ4_compress_default.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                      ctypes.c_int]


def zstd(data, level=3):
    out = ctypes.create_string_buffer(len(data) + 1024)
    n = _zstd.ZSTD_compress(out, len(out), data, len(data), level)
    assert not _zstd.ZSTD_isError(n)
    return out.raw[:n]


def lz4(data):
    out = ctypes.create_string_buffer(len(data) + 1024)
    n = _lz4.LZ4_compress_default(data, out, len(data), len(out))
    assert n > 0
    return out.raw[:n]


# ---- page contents -------------------------------------------------------------------------

def text_page(rng):
    words = [b"lazy", b"memory", b"page", b"fault", b"snapshot", b"the", b"of", b"zstd",
             b"def", b"return", b"self", b"import"]
    out = b" ".join(words[i] for i in rng.integers(0, len(words), PS // 3))
    return np.frombuffer(out[:PS], np.uint8)


def zero_heavy_page(rng):
    p = np.zeros(PS, np.uint8)
    p[rng.integers(0, PS, 40)] = rng.integers(1, 255, 40)
    return p


def make_state(kind, n, seed=5):
    """n pages of one kind, or "mixed": random, text, zero-heavy, zero and duplicate pages."""
    rng = np.random.default_rng(seed)
    gen = {"random": random_page, "text": text_page, "zero-heavy": zero_heavy_page}
    out = np.zeros((n, PS), np.uint8)
    for p in range(n):
        k = kind if kind != "mixed" else ("random", "text", "zero-heavy", "zero", "dup")[p % 5]
        if k == "zero":
            continue
        if k == "dup":
            out[p] = out[p - 4]   # a random page again
            continue
        out[p] = gen[k](rng)
    return out


def checkpointed(tmp_path, expected, codec, ws=None):
    path = str(tmp_path / ("%s.plm" % codec))
    with plm.Region(len(expected) * PS) as r:
        v = pages(r)
        v[:] = expected
        info = plm.checkpoint(r, path, working_set="none" if ws is None else ws, compress=codec)
    return path, info


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("kind", ["random", "text", "zero-heavy", "mixed"])
@pytest.mark.parametrize("how", ["faults", "prefetch-all", "background", "verify"])
def test_round_trip(tmp_path, codec, kind, how):
    expected = make_state(kind, 96)
    ws = list(range(60, 30, -3))
    path, info = checkpointed(tmp_path, expected, codec, ws=ws)
    assert info.version == 3 and info.compressed
    again = plm.inspect(path)
    assert again.codecs == info.codecs and again.stored_bytes == info.stored_bytes
    assert sum(again.codecs.values()) == again.pages_by_class["unique"]
    if kind == "random":     # nothing to gain: every page is stored raw, whole
        assert again.codecs == {"raw": 96} and again.stored_bytes == again.raw_bytes
    elif kind in ("text", "zero-heavy"):
        assert again.codecs.get(codec, 0) == 96 and again.stored_bytes < again.raw_bytes / 2
    kw = {"faults": dict(prefetch="none", background=False),
          "prefetch-all": dict(prefetch="all", background=False),
          "background": dict(prefetch="none", background=True),
          "verify": dict(prefetch="working-set", background=True, verify=True)}[how]
    with plm.restore(path, **kw) as r:
        if how == "background":
            import time
            deadline = time.monotonic() + 60
            while r.stats()["background_running"]:
                assert time.monotonic() < deadline
                time.sleep(0.005)
        v = pages(r)
        assert np.array_equal(v, expected)
        s = r.stats()
        assert s["verify_failures"] == 0 and s["errors"] == 0
        assert s["pages_poisoned"] == 0
        if kind == "text" and how == "prefetch-all":   # each entry read once: compressed bytes
            assert s["source_bytes_read"] <= again.stored_bytes
        sigs = r.signatures()
        assert all(int(sigs[p]) == xxh3(expected[p].tobytes()) for p in range(96))


@pytest.mark.parametrize("codec", CODECS)
def test_working_set_first_and_rewrite_keeps_compression(tmp_path, codec):
    from pylazymem.snapshot import rewrite_working_set
    expected = make_state("text", 64)
    ws = [50, 3, 40, 7]
    path, info = checkpointed(tmp_path, expected, codec, ws=ws)
    f = SnapV3.parse(open(path, "rb").read())
    assert [int(f.map[p]) - 2 for p in ws] == [0, 1, 2, 3]   # the working set's entries first
    rewrite_working_set(path, [9, 60, 2])
    info2 = plm.inspect(path)
    assert info2.compressed and info2.codecs == info.codecs
    assert list(info2.working_set) == [9, 60, 2]
    f = SnapV3.parse(open(path, "rb").read())
    assert [int(f.map[p]) - 2 for p in (9, 60, 2)] == [0, 1, 2]
    f.check_entries()
    with plm.restore(path, background=False) as r:
        assert np.array_equal(pages(r), expected)


@pytest.mark.parametrize("codec", CODECS)
def test_save_and_load(tmp_path, codec):
    rng = np.random.default_rng(3)
    state = {"w": rng.standard_normal((300, 200)).astype(np.float32),
             "sparse": np.where(rng.random(100_000) < 0.02, 1.5, 0.0),
             "text": np.frombuffer(b"the quick brown fox " * 20000, np.uint8),
             "nested": {"i": np.arange(5000, dtype=np.int64), "empty": np.zeros(0)}}
    path = str(tmp_path / "s.plm")
    info = plm.save(path, state, compress=codec)
    assert info.version == 3 and info.compressed and info.stored_bytes < info.raw_bytes
    plain = plm.save(str(tmp_path / "p.plm"), state)
    assert plain.version == 2 and not plain.compressed and plain.codecs == {"raw": plain.raw_bytes // PS}
    assert info.pages_by_class == plain.pages_by_class
    for prefetch in ("none", "all"):
        st = plm.load(path, prefetch=prefetch)
        assert np.array_equal(st["w"], state["w"]) and np.array_equal(st["sparse"], state["sparse"])
        assert np.array_equal(st["text"], state["text"])
        assert np.array_equal(st["nested"]["i"], state["nested"]["i"])
        assert st["nested"]["empty"].size == 0
    SnapV3.parse(open(path, "rb").read()).check_entries()


def test_unknown_codec_is_an_invalid_argument(tmp_path):
    with plm.Region(PS) as r:
        for bad in ("gzip", "raw", 1, ""):
            with pytest.raises(plm.InvalidArgumentError, match="compress"):
                plm.checkpoint(r, str(tmp_path / "x.plm"), compress=bad)
    with pytest.raises(plm.InvalidArgumentError, match="compress"):
        plm.save(str(tmp_path / "y.plm"), {"a": np.zeros(3)}, compress="brotli")
    assert not os.path.exists(tmp_path / "x.plm") and not os.path.exists(tmp_path / "y.plm")
    assert set(plm.features().codecs) == {"zstd", "lz4"}


def test_without_compress_the_file_is_version_2(tmp_path):
    expected = make_state("text", 8)
    path, info = checkpointed(tmp_path, expected, None)
    data = open(path, "rb").read()
    assert struct.unpack_from("<I", data, 8)[0] == 2 and info.version == 2
    assert not info.compressed and info.stored_bytes == info.raw_bytes == 8 * PS


def test_page_sources_lists_whole_pages_only(tmp_path):
    """page_sources() is file offsets of whole pages; a compressed store says where to look
    instead (the page server reads it through the chain: tests/test_server_layered.py)."""
    path, _ = checkpointed(tmp_path, make_state("text", 8), "zstd")
    with pytest.raises(plm.SnapshotError, match="compressed.*locations"):
        plm.snapshot.page_sources(path)


# ---- the C entry points check what they are given -----------------------------------------

def test_pack_and_unpack_entry_points():
    from pylazymem._binding import ffi, lib
    rng = np.random.default_rng(9)
    src = np.concatenate([text_page(rng), random_page(rng), np.zeros(PS, np.uint8)])
    out = np.zeros_like(src)
    idx = np.zeros(3, np.uint32)
    nb = ffi.new("uint64_t *")
    for codec in (ZSTD, LZ4):
        assert lib.lm_pack_pages(ffi.from_buffer(src), 3, PS, codec, 0, 2, ffi.from_buffer(out),
                                 ffi.from_buffer("uint32_t[]", idx), nb) == 0
        lens, codecs = idx & ((1 << 28) - 1), idx >> 28
        assert list(codecs) == [codec, RAW, codec] and lens[1] == PS and lens.sum() == nb[0]
        page = np.zeros(PS, np.uint8)
        at = 0
        for i in range(3):
            entry = out[at:at + lens[i]]
            assert lib.lm_unpack_entry(ffi.from_buffer(entry), int(lens[i]), int(idx[i]), PS,
                                       ffi.from_buffer(page)) == 0
            assert np.array_equal(page, src[i * PS:(i + 1) * PS])
            at += int(lens[i])
    # wrong codec, wrong lengths, a frame of two pages, a short frame: refused, dst untouched
    guard = np.full(2 * PS, 7, np.uint8)
    two = zstd(bytes(2 * PS))
    half = zstd(bytes(PS // 2))
    cases = [(two, ZSTD), (half, ZSTD), (lz4(bytes(2 * PS)), LZ4), (lz4(bytes(PS // 2)), LZ4),
             (b"\x00" * 10, ZSTD), (b"\xff" * 10, LZ4), (zstd(bytes(PS)) * 2, ZSTD)]
    for data, codec in cases:
        rc = lib.lm_unpack_entry(data, len(data), len(data) | (codec << 28), PS,
                                 ffi.from_buffer(guard))
        assert rc < 0, (codec, len(data))
        assert (guard[PS:] == 7).all()   # nothing past the page
    for word in ((5 << 28) | 10, (RAW << 28) | 10, (ZSTD << 28) | PS, ZSTD << 28):
        assert lib.lm_unpack_entry(bytes(PS), PS, word, PS, ffi.from_buffer(guard)) < 0
    assert lib.lm_unpack_entry(bytes(9), 9, (ZSTD << 28) | 10, PS, ffi.from_buffer(guard)) < 0
    assert lib.lm_pack_pages(ffi.from_buffer(src), 3, PS, 7, 0, 1, ffi.from_buffer(out),
                             ffi.from_buffer("uint32_t[]", idx), nb) < 0


def test_attach_layers_checks_the_index(tmp_path):
    """lm_source_attach_layers refuses an index Python did not check (a caller in C)."""
    from pylazymem._binding import ffi, lib
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(bytes(16 * PS))
    fd = os.open(path, os.O_RDONLY)
    try:
        cases = {"sum": [(ZSTD << 28) | 100, (ZSTD << 28) | 100],   # store_bytes 300
                 "codec": [(9 << 28) | 150, (ZSTD << 28) | 150],
                 "raw_len": [(RAW << 28) | 150, (ZSTD << 28) | 150],
                 "zero_len": [ZSTD << 28, (ZSTD << 28) | 300]}
        for name, words in cases.items():
            with plm.Region(4 * PS) as r, r._use() as lm:
                idx = np.array(words, np.uint32)
                layer = ffi.new("struct lm_src_layer *", {
                    "fd": fd, "store_offset": PS, "store_bytes": 300, "nstored": 2,
                    "index": ffi.from_buffer("uint32_t[]", idx), "sigs_offset": 8 * PS,
                    "sigs_xxh3": 0})
                assert lib.lm_source_attach_layers(lm, layer, 1, 0) < 0, name
        with plm.Region(4 * PS) as r, r._use() as lm:
            assert lib.lm_source_attach_layers(lm, ffi.NULL, 0, 0) < 0
            layer = ffi.new("struct lm_src_layer[65]")
            assert lib.lm_source_attach_layers(lm, layer, 65, 0) < 0
    finally:
        os.close(fd)


# ---- hostile compressed files --------------------------------------------------------------

class SnapV3:
    """A version 3 file, parsed and rebuilt from the document's layout."""

    @classmethod
    def parse(cls, data):
        f = cls()
        vals = HDR3.unpack_from(data)
        assert vals[0] == MAGIC and vals[1] == 3
        f.header_bytes, f.ps, f.flags = vals[2], vals[3], vals[4]
        f.h = dict(zip(FIELDS3, vals[5:]))
        h = f.h
        f.index = list(np.frombuffer(data, "<u4", h["nstored"], h["index_offset"]))
        store = data[h["store_offset"]:h["store_offset"] + h["store_bytes"]]
        f.entries, at = [], 0
        for w in f.index:
            n = int(w) & ((1 << 28) - 1)
            f.entries.append(bytes(store[at:at + n]))
            at += n
        f.map = np.frombuffer(data, "<u4", h["npages"], h["map_offset"]).copy()
        f.ws = np.frombuffer(data, "<u8", h["nws"], h["ws_offset"]).copy()
        f.manifest = bytes(data[h["manifest_offset"]:h["sigs_offset"]])
        f.sigs = np.frombuffer(data, "<u8", h["nstored"], h["sigs_offset"]).copy()
        f.parent_id = h["parent_id"]
        # the layout is the document's: sections in order, no gaps, sums and checksums agree
        expect = f.header_bytes
        for name in ("store", "index", "map", "ws", "manifest", "sigs"):
            assert h[name + "_offset"] == expect, name
            expect += h[name + "_bytes"]
        assert expect == h["file_bytes"] == len(data)
        assert sum(int(w) & ((1 << 28) - 1) for w in f.index) == h["store_bytes"]
        assert xxh3(bytes(data[h["index_offset"]:h["sigs_offset"]])) == h["tables_xxh3"]
        assert xxh3(bytes(data[:176])) == h["header_xxh3"]
        return f

    def check_entries(self):
        """Every entry decodes (with the system libraries' own decoders' rules) to a page whose
        XXH3 is its signature."""
        from pylazymem._binding import ffi, lib
        page = np.zeros(self.ps, np.uint8)
        for e, w, sig in zip(self.entries, self.index, self.sigs):
            assert lib.lm_unpack_entry(e, len(e), int(w), self.ps, ffi.from_buffer(page)) == 0
            assert xxh3(page.tobytes()) == int(sig)

    def build(self, index=None, store_bytes=None, flags=None, parent_id=None):
        """The file's bytes, every checksum recomputed (so the reader's deeper checks are
        what rejects a case). index/store_bytes default to what the entries say."""
        ps, hb = self.ps, self.header_bytes
        index = [len(e) | (int(w) >> 28 << 28) for e, w in zip(self.entries, self.index)] \
            if index is None else index
        store = b"".join(self.entries)
        idx = np.array(index, "<u4").tobytes()
        tail = idx + self.map.astype("<u4").tobytes() + self.ws.astype("<u8").tobytes() + \
            self.manifest
        sigs = self.sigs.astype("<u8").tobytes()
        h = dict(self.h)
        h["store_bytes"] = len(store) if store_bytes is None else store_bytes
        h["store_offset"] = hb
        h["index_offset"] = hb + len(store)
        h["index_bytes"] = len(idx)
        h["map_offset"] = h["index_offset"] + len(idx)
        h["ws_offset"] = h["map_offset"] + h["map_bytes"]
        h["manifest_offset"] = h["ws_offset"] + h["ws_bytes"]
        h["manifest_bytes"] = len(self.manifest)
        h["sigs_offset"] = h["manifest_offset"] + len(self.manifest)
        h["file_bytes"] = h["sigs_offset"] + len(sigs)
        h["parent_id"] = self.parent_id if parent_id is None else parent_id
        h["tables_xxh3"], h["sigs_xxh3"], h["header_xxh3"] = xxh3(tail), xxh3(sigs), 0
        flags = self.flags if flags is None else flags
        raw = bytearray(hb)
        HDR3.pack_into(raw, 0, MAGIC, 3, hb, ps, flags, *(h[k] for k in FIELDS3))
        h["header_xxh3"] = xxh3(bytes(raw[:176]))
        HDR3.pack_into(raw, 0, MAGIC, 3, hb, ps, flags, *(h[k] for k in FIELDS3))
        return bytes(raw) + store + tail + sigs


N = 24
BAD = 9      # the page (and store entry) a serve-time case damages


@pytest.fixture(params=CODECS)
def base(request, tmp_path):
    """A compressed snapshot of N text pages (each its own entry, entry i = page i), the
    expected contents beside it."""
    expected = make_state("text", N, seed=11)
    path, info = checkpointed(tmp_path, expected, request.param)
    assert info.codecs == {request.param: N}
    np.save(str(tmp_path / "expected.npy"), expected)
    f = SnapV3.parse(open(path, "rb").read())
    assert [int(x) for x in f.map] == [2 + i for i in range(N)]
    return f, request.param, str(tmp_path / "expected.npy"), tmp_path


def _open_time_cases(f, codec):
    """name -> file bytes that a reader must refuse when it opens the file."""
    c = ZSTD if codec == "zstd" else LZ4
    lens = [len(e) for e in f.entries]
    idx = [ln | (c << 28) for ln in lens]
    out = {}
    lie = list(idx)
    lie[3] += 1                                  # one entry says one byte more
    out["index_length_lies"] = f.build(index=lie)
    out["index_sum_mismatch"] = f.build(store_bytes=sum(lens) - 1)
    bad_codec = list(idx)
    bad_codec[4] = lens[4] | (3 << 28)          # codec 3 does not exist
    out["unknown_codec_nibble"] = f.build(index=bad_codec)
    raw_short = list(idx)
    raw_short[5] = lens[5] | (RAW << 28)        # raw, but shorter than a page
    out["raw_entry_not_a_page"] = f.build(index=raw_short)
    zero = list(idx)
    zero[6], zero[7] = c << 28, (lens[6] + lens[7]) | (c << 28)
    out["zero_length_entry"] = f.build(index=zero)
    out["unknown_flag"] = f.build(flags=COMPRESSED | 4)
    out["parent_flag_without_id"] = f.build(flags=COMPRESSED | PARENT, parent_id=0)
    out["parent_id_without_flag"] = f.build(parent_id=0x1234)
    g = SnapV3.parse(f.build())
    g.map[0] = 0xFFFFFFFF                        # a PARENT page in a file without a parent
    out["parent_entry_without_flag"] = g.build()
    g = SnapV3.parse(f.build())
    g.manifest = json.dumps({"arrays": {}, "parent": {"path": "x.plm"}}).encode()
    out["manifest_parent_without_flag"] = g.build()
    g = SnapV3.parse(f.build())                  # one page too long: not in 1..page_size - 1
    g.entries[2] = g.entries[2] + bytes(PS - len(g.entries[2]))
    out["compressed_entry_of_page_size"] = g.build()
    return out


def test_hostile_index_is_refused_at_open(base):
    f, codec, _, tmp = base
    f.check_entries()
    for name, data in _open_time_cases(f, codec).items():
        path = str(tmp / (name + ".plm"))
        with open(path, "wb") as out:
            out.write(data)
        for fn in (plm.inspect, lambda p: plm.restore(p, prefetch="none", background=False)):
            with pytest.raises(plm.SnapshotError):
                fn(path)


def test_parent_fields_are_parsed(base):
    """A file with the PARENT flag, an id and a manifest path: the reader reports the parent
    (resolved against the file's directory) and counts PARENT pages apart; restoring it
    needs the chain reader."""
    f, codec, _, tmp = base
    g = SnapV3.parse(f.build())
    g.map[N - 1] = 0xFFFFFFFF
    g.entries = g.entries[:N - 1]
    g.index = g.index[:N - 1]
    g.sigs = g.sigs[:N - 1]
    g.h["nstored"], g.h["sigs_bytes"] = N - 1, (N - 1) * 8
    g.manifest = json.dumps({"arrays": {}, "parent": {"path": "../base.plm"}}).encode()
    path = str(tmp / "sub" / "child.plm")
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as out:
        out.write(g.build(flags=COMPRESSED | PARENT, parent_id=0xABCDEF))
    info = plm.inspect(path)
    assert info.parent == {"path": str(tmp / "base.plm"), "id": "%016x" % 0xABCDEF, "pages": 1}
    assert info.pages_by_class["parent"] == 1 and info.pages_by_class["untouched"] == 0
    with pytest.raises(plm.SnapshotError, match="parent"):
        plm.restore(path, prefetch="none")


def _serve_time_cases(f, codec):
    """name -> file bytes that open fine but whose entry BAD must never be served."""
    good = bytes(f.entries[BAD])
    comp = zstd if codec == "zstd" else lz4
    cases = {
        "flipped_byte": good[:len(good) // 2] + bytes([good[len(good) // 2] ^ 0x5A])
        + good[len(good) // 2 + 1:],
        "frame_of_two_pages": comp(bytes(2 * PS - 1) + b"x"),
        "frame_of_half_a_page": comp(b"y" * (PS // 2)),
        # a frame of 64 MiB (zstd) or 512 KiB (LZ4's ratio is at most ~255) in under a page
        "bomb": comp(bytes(64 << 20 if codec == "zstd" else 512 << 10)),
        "garbage": bytes(range(256))[:min(200, PS - 1)],
        "other_codec": (lz4 if codec == "zstd" else zstd)(bytes(PS)),
        "right_size_wrong_contents": comp(b"z" * PS),
    }
    out = {}
    for name, entry in cases.items():
        assert 1 <= len(entry) < PS, (name, len(entry))
        g = SnapV3.parse(f.build())
        g.entries[BAD] = entry
        out[name] = g.build()
    return out


SERVE_BAD = """
    path, exp_path, bad, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    expected = np.load(exp_path)
    kw = {"demand": dict(prefetch="none", background=False),
          "prefetch": dict(prefetch="all", background=False),
          "background": dict(prefetch="none", background=True),
          "verify": dict(prefetch="none", background=False, verify=True)}[how]
    r = plm.restore(path, **kw)
    if how == "background":
        deadline = time.monotonic() + 30
        while r.stats()["background_running"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    v = pages(r)
    for p in range(r.npages):
        if p != bad:
            assert np.array_equal(v[p], expected[p]), p
    s = r.stats()
    print("OTHERS_OK", s["pages_poisoned"], s["errors"], flush=True)
    x = int(v[bad].sum())            # must raise SIGBUS
    print("READ_BAD_PAGE", x, flush=True)
"""


@pytest.mark.uffd_full
@pytest.mark.parametrize("how", ["demand", "prefetch", "background", "verify"])
def test_entry_that_does_not_decode_is_poisoned(base, run_py, features, how):
    if not features.has_poison:
        pytest.skip("needs UFFDIO_POISON to fail an access loudly")
    f, codec, exp_path, tmp = base
    for name, data in _serve_time_cases(f, codec).items():
        path = str(tmp / (name + ".plm"))
        with open(path, "wb") as out:
            out.write(data)
        plm.inspect(path)   # the open-time checks pass: only decoding can tell
        res = run_py(SERVE_BAD, timeout=60, args=(path, exp_path, str(BAD), how))
        assert "OTHERS_OK" in res.stdout, (name, res.describe())
        assert "READ_BAD_PAGE" not in res.stdout, (name, res.describe())
        assert res.returncode == SIGBUS_RC, (name, res.describe())


def test_entry_that_does_not_decode_fails_readers_loudly(base):
    """Paths that read contents without mapping them (page_read, a checkpoint of the restored
    region) fail with an error instead of reading garbage."""
    f, codec, _, tmp = base
    data = _serve_time_cases(f, codec)["flipped_byte"]
    path = str(tmp / "flip.plm")
    with open(path, "wb") as out:
        out.write(data)
    with plm.restore(path, prefetch="none", background=False) as r:
        for again in (None, codec):
            with pytest.raises(plm.LazyMemError):
                plm.checkpoint(r, str(tmp / "again.plm"), compress=again)
            assert not os.path.exists(tmp / "again.plm")
        assert r.stats()["pages_present"] == 0   # nothing was mapped meanwhile


# ---- generated corruptions of a compressed file (hypothesis) ------------------------------

_zstd.ZSTD_decompress.restype = ctypes.c_size_t
_zstd.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                  ctypes.c_size_t]
_zstd.ZSTD_findFrameCompressedSize.restype = ctypes.c_size_t
_zstd.ZSTD_findFrameCompressedSize.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_lz4.LZ4_decompress_safe.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.c_int]


def decode(entry, word, ps):
    """The document's rule for one entry, with the system decoders: the page, or None."""
    codec, n = int(word) >> 28, int(word) & ((1 << 28) - 1)
    if n != len(entry):
        return None
    if codec == RAW:
        return entry if n == ps else None
    if not 1 <= n < ps:
        return None
    out = ctypes.create_string_buffer(ps)
    if codec == ZSTD:
        if _zstd.ZSTD_findFrameCompressedSize(entry, n) != n:
            return None
        got = _zstd.ZSTD_decompress(out, ps, entry, n)
        return out.raw if got == ps else None
    if codec == LZ4:
        return out.raw if _lz4.LZ4_decompress_safe(entry, out, n, ps) == ps else None
    return None


@pytest.mark.uffd_full
@pytest.mark.parametrize("codec", CODECS)
def test_generated_corruptions(tmp_path, codec, features):
    """Every generated corruption either is refused with SnapshotError, or restores so that
    each page holds exactly what the document says it holds (its entry decodes to one page
    whose XXH3 is its signature) or is poisoned, never anything else."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    if not features.has_poison:
        pytest.skip("needs UFFDIO_POISON to poison pages")
    expected = make_state("mixed", 12, seed=2)
    expected[3] = text_page(np.random.default_rng(1))
    path, _ = checkpointed(tmp_path, expected, codec, ws=[5, 1])
    data = open(path, "rb").read()
    base = SnapV3.parse(data)
    fuzzed = str(tmp_path / "fuzzed.plm")
    seen = {"refused": 0, "restored": 0, "poisoned": 0}

    @st.composite
    def corruption(draw):
        kind = draw(st.sampled_from(["flip", "truncate", "index", "entry", "header"]))
        if kind == "flip":
            raw = bytearray(data)
            for off, bit in draw(st.lists(st.tuples(st.integers(0, len(data) - 1),
                                                    st.integers(0, 7)), min_size=1, max_size=3)):
                raw[off] ^= 1 << bit
            return bytes(raw)
        if kind == "truncate":
            return data[:draw(st.integers(0, len(data) - 1))]
        g = SnapV3.parse(data)
        e = draw(st.integers(0, len(g.entries) - 1))
        if kind == "index":       # index words rewritten, checksums made to agree
            idx = [int(w) for w in g.index]
            idx[e] = draw(st.one_of(st.integers(0, (1 << 32) - 1),
                                    st.integers(0, 15).map(lambda c: (c << 28) | len(g.entries[e]))))
            return g.build(index=idx, store_bytes=draw(st.sampled_from(
                [None, sum(w & ((1 << 28) - 1) for w in idx)])))
        if kind == "entry":       # an entry's bytes changed, its length kept or not
            b = bytearray(g.entries[e])
            for off in draw(st.lists(st.integers(0, max(0, len(b) - 1)), min_size=1,
                                     max_size=3)):
                if b:
                    b[off] = draw(st.integers(0, 255))
            if draw(st.booleans()):
                b = b[:draw(st.integers(1, max(1, len(b))))] + draw(st.binary(max_size=8))
            g.entries[e] = bytes(b)
            return g.build()
        return g.build(flags=draw(st.integers(0, 7)), parent_id=draw(st.sampled_from([0, 1])))

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(corruption())
    def prop(blob):
        with open(fuzzed, "wb") as f:
            f.write(blob)
        try:
            r = plm.restore(fuzzed, prefetch="all", background=False)
        except plm.SnapshotError as e:
            assert str(e)
            seen["refused"] += 1
            return
        g = SnapV3.parse(blob)
        with r:
            m = r.meta
            v = pages(r)
            for p in range(r.npages):
                entry = int(g.map[p])
                if entry < 2:
                    assert m["state"][p] != plm.PageState.POISONED
                    assert not v[p].any()
                    continue
                e = entry - 2
                page = decode(g.entries[e], g.index[e], PS)
                ok = page is not None and xxh3(page) == int(g.sigs[e])
                poisoned = m["state"][p] == plm.PageState.POISONED
                assert poisoned == (not ok), (p, e)
                if ok:
                    assert v[p].tobytes() == page
                seen["poisoned"] += poisoned
        seen["restored"] += 1

    prop()
    assert seen["refused"] > 20 and seen["restored"] > 5 and seen["poisoned"] > 0, seen


@pytest.mark.parametrize("codec", CODECS)
def test_compressed_chain_compacts(tmp_path, codec):
    """A compressed parent and a compressed incremental child (flags COMPRESSED | PARENT):
    compact() reads both stores through the codecs (each entry decoded and checked against its
    signature) into one file that restores to the child's state."""
    expected = make_state("mixed", 40, seed=8)
    base, child, out = (str(tmp_path / n) for n in ("base.plm", "child.plm", "out.plm"))
    with plm.Region(40 * PS) as r:
        v = pages(r)
        v[:] = expected
        plm.checkpoint(r, base, working_set="none", compress=codec)
        expected[7] = text_page(np.random.default_rng(77))
        v[7] = expected[7]
        info = plm.checkpoint(r, child, working_set="none", compress=codec, parent=base)
    assert info.compressed and info.parent is not None and info.flags == COMPRESSED | PARENT
    assert plm.inspect(child).codecs == info.codecs
    plm.snapshot.compact(child, out)
    with plm.restore(out, prefetch="all", background=False) as r:
        assert np.array_equal(pages(r), expected)


def test_source_of_several_layers(tmp_path):
    """lm_source_attach_layers with three files (a compressed one, an uncompressed one, a
    compressed one): global entry ids run through the layers in order, a run of entries that
    crosses a layer boundary is read from both, signatures are the layers' concatenated (each
    section checked on its own), and prefetch, faults and the background fill serve them all."""
    from pylazymem._binding import ffi, lib
    from pylazymem._snapfile import _read

    files, layers, keep = [], [], []
    rng = np.random.default_rng(21)
    contents = []
    for i, codec in enumerate(("zstd", None, "lz4")):
        pages_ = np.stack([text_page(rng) if k % 2 else random_page(rng) for k in range(6)])
        contents.append(pages_)
        d = tmp_path / ("layer%d" % i)
        d.mkdir()
        path, _ = checkpointed(d, pages_, codec)
        fd = os.open(path, os.O_RDONLY)
        files.append(fd)
        p = _read(fd, path)
        h = p.header
        assert [int(x) for x in p.map] == [2 + k for k in range(6)]
        idx = ffi.NULL
        if p.index is not None:
            keep.append(np.ascontiguousarray(p.index["raw"]))
            idx = ffi.from_buffer("uint32_t[]", keep[-1])
        layers.append({"fd": fd, "store_offset": h["store_offset"],
                       "store_bytes": h["store_bytes"], "nstored": h["nstored"], "index": idx,
                       "sigs_offset": h["sigs_offset"], "sigs_xxh3": h["sigs_xxh3"]})
    allpages = np.concatenate(contents)            # global entry g holds allpages[g]
    # the region's page p holds entry order[p]: runs across layer boundaries (5, 6, 7 and
    # 11, 12) and backwards
    order = np.array([4, 5, 6, 7, 17, 16, 0, 11, 12, 13, 1, 2, 3, 8, 9, 10, 14, 15], np.uint32)
    pmap = (order + 2).astype("<u4")
    try:
        for how in ("faults", "prefetch", "background"):
            r = plm.Region(len(order) * PS)
            try:
                with r._use() as lm:
                    c_layers = ffi.new("struct lm_src_layer[]", layers)
                    assert lib.lm_source_attach_layers(lm, c_layers, 3, 0) == 0
                    assert lib.lm_restore_table(lm, ffi.from_buffer("struct lm_snap_page[]", pmap),
                                                len(order), 18) == 0
                r._base_table = pmap
                if how == "prefetch":
                    r.prefetch(np.arange(len(order), dtype=np.uint64))
                elif how == "background":
                    r.background_start()
                    import time
                    deadline = time.monotonic() + 30
                    while r.stats()["background_running"]:
                        assert time.monotonic() < deadline
                        time.sleep(0.005)
                got = pages(r)
                for p, g in enumerate(order):
                    assert np.array_equal(got[p], allpages[g]), (how, p, g)
                sigs = r.signatures()
                assert [int(x) for x in sigs] == [xxh3(allpages[g].tobytes()) for g in order]
                assert r.stats()["errors"] == 0
            finally:
                r.close()
    finally:
        for fd in files:
            os.close(fd)
