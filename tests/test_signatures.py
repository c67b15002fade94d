"""Page signatures are XXH3-64, identical to the xxhash package's xxh3_64_intdigest; canonical
pages are identified by contents."""

import numpy as np
import pytest
import xxhash

import pylazymem as plm
from _helpers import PAGE_SIZE, pages, random_page

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(60)]

S = plm.PageState


def xxh3(b):
    return xxhash.xxh3_64_intdigest(bytes(b))


def test_signatures_of_every_kind_of_page(make_region, rng):
    r = make_region(16 * PAGE_SIZE, max_cluster_pages=1)
    v = pages(r)
    data = rng.integers(0, 256, size=(4, PAGE_SIZE), dtype=np.uint8)
    v[0:4] = data                                       # 0-3 present program data
    p1, p2 = random_page(rng), random_page(rng)
    c1, c2 = r.canonical(p1.tobytes()), r.canonical(p2.tobytes())
    r.defer_fill(4 * PAGE_SIZE, 4 * PAGE_SIZE, c1)      # 4-7 deferred canonical 1
    r.defer_fill(8 * PAGE_SIZE, 2 * PAGE_SIZE, c2)      # 8-9 deferred canonical 2
    r.defer_fill(10 * PAGE_SIZE, 2 * PAGE_SIZE, plm.ZERO)  # 10-11 deferred zero, 12-15 EMPTY
    assert np.array_equal(v[5], p1)                     # 5: present canonical
    assert not v[10].any() and not v[14].any()          # 10: present zero, 14: present EMPTY
    v[15, 3] = 9                                        # 15: written EMPTY page
    faults = r.stats()["faults"]
    want = [xxh3(data[i]) for i in range(4)] + [xxh3(p1)] * 4 + [xxh3(p2)] * 2
    want += [xxh3(bytes(PAGE_SIZE))] * 5 + [xxh3(v[15].tobytes())]
    sig = r.signatures()
    assert isinstance(sig, np.ndarray) and sig.dtype == np.uint64 and sig.shape == (16,)
    assert [int(s) for s in sig] == want
    stored = [int(s) for s in r.meta["signature"]]
    empty = [12, 13]                                    # all-zero records may stay so
    assert [x for i, x in enumerate(stored) if i not in empty] == [
        x for i, x in enumerate(want) if i not in empty], "signatures are stored in meta"
    assert all(stored[i] in (0, want[i]) for i in empty), stored
    assert r.stats()["faults"] == faults, "lazy pages are not touched by signatures()"
    assert (r.meta["state"][[4, 6, 7, 8, 9, 11]] == int(S.DEFERRED)).all()
    assert (r.meta["state"][[12, 13]] == int(S.EMPTY)).all()
    # a range
    part = r.signatures(2 * PAGE_SIZE, 9 * PAGE_SIZE)
    assert [int(s) for s in part] == want[2:11]
    # a change is seen by the next call
    v[1, 100] ^= 0xFF
    assert int(r.signatures(PAGE_SIZE, PAGE_SIZE)[0]) == xxh3(v[1].tobytes()) != want[1]
    assert int(r.meta["signature"][1]) == xxh3(v[1].tobytes())


def test_canonical_object(make_region, rng):
    r = make_region(4 * PAGE_SIZE)
    p = random_page(rng)
    c = r.canonical(p.tobytes())
    assert isinstance(c, plm.Canonical)
    assert isinstance(c.id, int) and c.id >= 1
    assert c.signature == xxh3(p)
    assert bytes(c) == p.tobytes()


def test_canonical_identity(make_region, rng):
    r = make_region(4 * PAGE_SIZE)
    p = random_page(rng)
    c = r.canonical(p.tobytes())
    same = [r.canonical(bytearray(p.tobytes())), r.canonical(memoryview(p.tobytes())),
            r.canonical(p.copy()), r.canonical(p)]
    assert all(s.id == c.id for s in same), [s.id for s in same]
    q = p.copy()
    q[-1] ^= 1                                          # one bit differs
    d = r.canonical(q.tobytes())
    assert d.id != c.id and d.id >= 1
    assert r.canonical(bytes(PAGE_SIZE)).id not in (c.id, d.id)
    assert bytes(r.canonical(q)) == q.tobytes()
    # many distinct pages: distinct ids, stable on repeat
    pages_ = [random_page(rng) for _ in range(50)]
    ids = [r.canonical(x.tobytes()).id for x in pages_]
    assert len(set(ids)) == 50
    assert [r.canonical(x.tobytes()).id for x in pages_] == ids


def test_signatures_race_defer_fill(run_py_ok):
    """Issue 10, case 7: signatures() wrote the hash of a present page into its record without
    claiming it, so a defer_fill() in between could be overwritten: the record then said
    "deferred, canonical B" with A's signature. With signatures() and defer_fill() racing on
    the same pages, every deferred record must carry its canonical page's signature."""
    out = run_py_ok("""
        import xxhash
        N = 64
        r = plm.Region(N * PS, max_cluster_pages=1)
        rng = np.random.default_rng(5)
        A, B = random_page(rng), random_page(rng)
        ca, cb = r.canonical(A.tobytes()), r.canonical(B.tobytes())
        sig = {ca.id: xxhash.xxh3_64_intdigest(A.tobytes()),
               cb.id: xxhash.xxh3_64_intdigest(B.tobytes())}
        stop = threading.Event()
        errors = []

        def hasher():
            while not stop.is_set():
                try:
                    r.signatures()
                except Exception as e:
                    errors.append(repr(e))

        t = threading.Thread(target=hasher)
        t.start()
        bad = []
        for i in range(400):
            c = (ca, cb)[i % 2]
            r.materialize()                     # everything present: signatures() hashes
            r.defer_fill(0, N * PS, c)          # ... while this makes the pages deferred
            m = r.meta
            deferred = m["state"] == int(plm.PageState.DEFERRED)
            wrong = np.nonzero(deferred & (m["signature"] != np.uint64(sig[c.id])))[0]
            if wrong.size:
                bad.append((i, wrong[:5].tolist()))
        stop.set()
        t.join(30)
        assert not errors, errors[:3]
        assert not bad, bad[:5]
        print("OK")
    """, timeout=120)
    assert out.strip().endswith("OK")
