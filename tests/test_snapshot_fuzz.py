"""Generated corruptions of a small valid snapshot (hypothesis): bit flips, truncations, random
overwrites, header/page-map/working-set/manifest/signature fields rewritten with recomputed
checksums. inspect(), page_sources() and restore() either accept the file or raise
SnapshotError: anything else fails.
Files that are accepted are read back afterwards in a subprocess, page by page, against what
the file says (an independent reading of docs/snapshot-format.md)."""

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page
from test_snapshot_format import (FIELD_SIZE, HEADER_CHECKED, HEADER_FIELDS, STORED, SnapFile,
                                  patch_header_field, xxh3)

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(240)]

PS = PAGE_SIZE
NPAGES = 6
ACCEPTED = {}      # file bytes -> how it was made, for test_accepted_corruptions_read_back


def make_valid(path):
    """0: array page, 1: random, 2: zero, 3 = 1, 4: random, 5: untouched; ws [4, 2, 1]."""
    rng = np.random.default_rng(99)
    with plm.Region(NPAGES * PS, max_cluster_pages=1) as r:
        a = r.alloc("a", (4, 4), np.int32)
        a[:] = np.arange(16).reshape(4, 4)
        b = r.alloc("b", 2, [("x", "<u2"), ("y", "<f4")])
        b["x"] = [1, 2]
        v = pages(r)
        v[1] = random_page(rng)
        v[2] = 0
        v[3] = v[1]
        v[4] = random_page(rng)
        plm.checkpoint(r, path, working_set=[4, 2, 1])
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    data = make_valid(str(d / "valid.snap"))
    return dict(data=data, base=SnapFile.parse(data), dir=d)


# ---- strategies --------------------------------------------------------------------------

INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 100, 4095, 4096, 4097, 8192, 1 << 20,
               (1 << 21) + 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, (1 << 40) + 1,
               1 << 52, 1 << 63, (1 << 64) - 1]


def _field_value(field, data):
    bits = 8 * FIELD_SIZE[field]
    return st.one_of(st.sampled_from([x for x in INTERESTING if x < (1 << bits)]),
                     st.integers(0, (1 << bits) - 1))


@st.composite
def corruption(draw, data, base):
    kind = draw(st.sampled_from(["flip", "truncate", "overwrite", "header", "map", "ws",
                                 "manifest", "array", "sigs"]))
    h = base.header
    if kind == "flip":
        raw = bytearray(data)
        flips = draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)),
                              min_size=1, max_size=4))
        for off, bit in flips:
            raw[off] ^= 1 << bit
        return kind, bytes(raw)
    if kind == "truncate":
        return kind, data[:draw(st.integers(0, len(data) - 1))]
    if kind == "overwrite":
        raw = bytearray(data)
        region = draw(st.sampled_from(["header", "map", "ws", "manifest", "sigs", "any"]))
        lo, hi = {"header": (0, HEADER_CHECKED + 8), "map": (h["map_offset"], h["ws_offset"]),
                  "ws": (h["ws_offset"], h["manifest_offset"]),
                  "manifest": (h["manifest_offset"], h["sigs_offset"]),
                  "sigs": (h["sigs_offset"], len(data)), "any": (0, len(data))}[region]
        off = draw(st.integers(lo, hi - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        raw[off:off + len(junk)] = junk
        raw = raw[:len(data)] if draw(st.booleans()) else raw
        if draw(st.booleans()):       # make the checksums agree with the damage
            hx = dict(zip(HEADER_FIELDS, struct.unpack_from("<8sIIII17Q", raw)))
            for field, lo, hi in (("tables_xxh3", h["map_offset"], h["sigs_offset"]),
                                  ("sigs_xxh3", h["sigs_offset"], len(raw))):
                hx[field] = xxh3(raw[lo:hi])
            struct.pack_into("<8sIIII17Q", raw, 0, *(hx[f] for f in HEADER_FIELDS))
            struct.pack_into("<Q", raw, HEADER_CHECKED, xxh3(raw[:HEADER_CHECKED]))
        return kind, bytes(raw)
    if kind == "header":
        out = data
        for field in draw(st.lists(st.sampled_from(HEADER_FIELDS[1:-1]), min_size=1,
                                   max_size=3)):
            out = patch_header_field(out, field, draw(_field_value(field, data)))
        return kind, out
    sf = base.copy()
    if kind == "map":
        for _ in range(draw(st.integers(1, 3))):
            p = draw(st.integers(0, NPAGES - 1))
            sf.map[p] = draw(st.one_of(st.integers(0, 6), st.integers(0, (1 << 32) - 1)))
        return kind, sf.build()
    if kind == "ws":
        ws = draw(st.lists(st.one_of(st.integers(0, NPAGES + 1),
                                     st.integers(0, (1 << 64) - 1)), max_size=8))
        sf.ws = np.array(ws, np.uint64)
        return kind, sf.build()
    if kind == "sigs":   # the signature section: changed, shortened or lengthened
        new = draw(st.lists(st.integers(0, (1 << 64) - 1), min_size=0, max_size=5))
        if draw(st.booleans()):
            sf.sigs = np.array(new, np.uint64)
        elif len(sf.sigs):
            sf.sigs[draw(st.integers(0, len(sf.sigs) - 1))] = new[0] if new else 0
        return kind, sf.build(fix_tables=draw(st.booleans()))
    if kind == "manifest":
        js = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c,
                                                                               max_size=4),
                          max_leaves=12)
        obj = draw(st.one_of(js, st.dictionaries(st.sampled_from(["arrays", "pylazymem"]), js)))
        sf.manifest = json.dumps(obj).encode()
        return kind, sf.build()
    # kind == "array": one array entry with hostile values
    entry = {}
    entry["offset"] = draw(st.one_of(st.integers(-2 * PS, NPAGES * PS + 8), st.integers(),
                                     st.floats(), st.text(max_size=3), st.none()))
    entry["dtype"] = draw(st.one_of(
        st.sampled_from(["<f4", "|O", "O", "<f8", "V8", "S3", "<U2", "(2,)i4", ">c16", "b1",
                         "M8[s]", "m8", "<f2", "V0", "S0", "i", "float64", "", "?"]),
        st.sampled_from([[["a", "<i4"]], [["a", "|O"]], [["a", "<i4"], ["a", "<i4"]],
                         [["", "<f4"]], [["a", "<u2", [2]]], [["a", [["b", "<f8"]]]], [],
                         [[1, "<f4"]], [["a"]]]),
        st.integers(), st.none()))
    entry["shape"] = draw(st.one_of(
        st.lists(st.one_of(st.integers(-3, 70), st.integers()), max_size=4),
        st.integers(), st.none(), st.text(max_size=2)))
    if draw(st.booleans()):
        del entry[draw(st.sampled_from(["offset", "dtype", "shape"]))]
    name = draw(st.sampled_from(["a", "", "x" * 300, "\u00e9\u00e8", "b"]))
    sf.manifest = json.dumps({"pylazymem": "0.1.0", "arrays": {name: entry}},
                             allow_nan=True).encode()
    return kind, sf.build()


# ---- the property ------------------------------------------------------------------------

def _check(path, kind):
    inspect_error = None
    try:
        info = plm.inspect(path)
    except plm.SnapshotError as e:
        assert str(e)
        inspect_error = str(e)
    try:
        info, _ = plm.snapshot.page_sources(path)   # restore's checks, without restoring
    except plm.SnapshotError as e:
        assert str(e)
        info = None
    try:
        r = plm.restore(path, prefetch="working-set", background=False)
    except plm.SnapshotError as e:
        assert str(e)
        assert inspect_error, "inspect accepted a file that restore rejected"
        return False
    with r:
        assert info is not None, "restore accepted a file that page_sources rejected"
        assert r.npages == info.npages and r.page_size == info.page_size
        arrays = r.arrays            # views only: must not raise for an accepted manifest
        assert sorted(arrays) == sorted(info.arrays)
        m = r.meta
        assert not (m["flags"] & int(plm.PageFlag.POISONED)).any()
        if inspect_error is None:
            r.signatures()           # reads lazy pages from the file without faulting
        else:
            # restore() leaves the signature section to whoever needs it (not inspect())
            assert "signature" in inspect_error, inspect_error
            with pytest.raises(plm.LazyMemError, match="signature"):
                r.signatures()
            return False
    return True


def test_corruptions_raise_snapshot_error_or_restore(valid):
    data, base = valid["data"], valid["base"]
    path = str(valid["dir"] / "fuzzed.snap")
    seen = {"accepted": 0, "rejected": 0}

    @settings(max_examples=200, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(corruption(data, base))
    def prop(case):
        kind, blob = case
        with open(path, "wb") as f:
            f.write(blob)
        if _check(path, kind):
            seen["accepted"] += 1
            if len(ACCEPTED) < 40:
                ACCEPTED.setdefault(blob, kind)
        else:
            seen["rejected"] += 1

    prop()
    assert seen["rejected"] > 50, seen


READ_BACK = """
import glob
bad = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.snap"))):
    exp = np.load(path + ".npy")
    for prefetch in ("none", "working-set"):
        with plm.restore(path, prefetch=prefetch, background=False) as r:
            got = pages(r).copy()
            for name, a in r.arrays.items():
                a.tobytes()
        if not np.array_equal(got, exp):
            bad.append([os.path.basename(path), prefetch,
                        np.nonzero((got != exp).any(axis=1))[0].tolist()])
print(json.dumps(bad))
"""


def expected_pages(blob):
    """What a file says its region holds, read straight from the document's layout."""
    sf = SnapFile.parse(blob)
    ps = sf.page_size
    out = np.zeros((sf.header["npages"], ps), np.uint8)
    for p in range(sf.header["npages"]):
        if sf.cls[p] == STORED:
            e = int(sf.entry[p])
            out[p] = np.frombuffer(sf.store[e * ps:(e + 1) * ps], np.uint8)
    return out


def test_accepted_corruptions_read_back(run_py_ok, tmp_path, valid):
    """Files the fuzz test let through restore to exactly what they say, without a crash."""
    blobs = dict(ACCEPTED) or {valid["data"]: "valid"}
    for i, (blob, kind) in enumerate(blobs.items()):
        path = tmp_path / ("%03d-%s.snap" % (i, kind))
        path.write_bytes(blob)
        np.save(str(path) + ".npy", expected_pages(blob))
    out = run_py_ok(READ_BACK, timeout=120, args=(str(tmp_path),))
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_every_single_byte_truncation(valid):
    """Every prefix of the file (a cheap exhaustive complement to the generated cases)."""
    data = valid["data"]
    path = str(valid["dir"] / "prefix.snap")
    for n in list(range(0, 300)) + list(range(300, len(data), 97)):
        with open(path, "wb") as f:
            f.write(data[:n])
        for fn in (plm.inspect, plm.restore):
            with pytest.raises(plm.SnapshotError):
                fn(path)


