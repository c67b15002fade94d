"""Workloads of the reliability suite (issue 5), run in subprocesses by tests/test_reliability_*.py.

Each public function here is meant to be the whole body of a fresh interpreter (run_py), prints
one JSON summary line last, and raises AssertionError (exit status 1) on wrong data. A crash or
hang is caught by the parent (return code / timeout).

Modes: the default run is bounded for CI; PYLAZYMEM_LONG=1 (scripts/reliability.sh --long)
selects the long run (10^7 faults, 10^6 fuzzed files, more kills). PYLAZYMEM_UNDER_ASAN=1
(scripts/sanitize.sh) marks a run against the ASan/UBSan build: the suite keeps its checks but
the tests may scale their volume down, because ASan makes every step several times slower.
"""

import json
import os
import re
import struct
import sys
import threading
import time
import traceback

import numpy as np

import pylazymem as plm
from _helpers import first_bad_pages, pages, random_page, status_kib

LONG = os.environ.get("PYLAZYMEM_LONG", "") not in ("", "0")
UNDER_ASAN = os.environ.get("PYLAZYMEM_UNDER_ASAN", "") not in ("", "0")


def emit(obj):
    print(json.dumps(obj), flush=True)


# ==== stress ===================================================================================

def _random_runs(rng, n, nkinds, maxrun=256):
    """Per-page kinds in runs of 1..maxrun pages, each run one kind out of 0..nkinds-1."""
    kinds = np.empty(n, np.int16)
    runs = []
    p = 0
    while p < n:
        run = min(int(rng.integers(1, maxrun + 1)), n - p)
        k = int(rng.integers(0, nkinds))
        kinds[p:p + run] = k
        runs.append((p, run, k))
        p += run
    return kinds, runs


def _write_plan(rng, base, nthreads, write_frac):
    """Which pages get written this round, by whom, and what they hold afterwards.

    Returns (after, owner, will): `after` is the model once every planned write is done;
    owner[p] is the only thread that may write page p; will[p] says whether it does. A write
    is a whole page (1/3) or a random slice of it, from a random byte pool."""
    n, ps = base.shape
    after = base.copy()
    owner = rng.integers(0, nthreads, n).astype(np.int16)
    will = rng.random(n) < write_frac
    pool = rng.integers(0, 256, 3 * ps, dtype=np.uint8)
    wp = np.nonzero(will)[0]
    whole = rng.random(wp.size) < 1 / 3
    lo = rng.integers(0, ps, wp.size)
    ln = rng.integers(1, ps + 1, wp.size)
    src = rng.integers(0, 2 * ps, wp.size)
    for i, p in enumerate(wp):
        if whole[i]:
            a, b = 0, ps
        else:
            a, b = int(lo[i]), min(ps, int(lo[i] + ln[i]))
        s = int(src[i])
        after[p, a:b] = pool[s:s + (b - a)]
    return after, owner, will


class _Round:
    """One round of 8 threads reading and writing a region against (base, after)."""

    def __init__(self, v, base, after, owner, will, nthreads, rng, extra_reads):
        self.v, self.base, self.after = v, base, after
        self.owner, self.will = owner, will
        self.nthreads = nthreads
        n = base.shape[0]
        perm = rng.permutation(n)
        self.plans = []
        for t in range(nthreads):
            touch = perm[t::nthreads]                           # every page read by someone
            extra = rng.integers(0, n, int(extra_reads * n / nthreads))   # and collisions
            writes = np.nonzero(will & (owner == t))[0]
            ops = np.concatenate([touch, extra, writes]).astype(np.int64)
            kind = np.concatenate([np.zeros(touch.size + extra.size, np.int8),
                                   np.ones(writes.size, np.int8)])
            order = rng.permutation(ops.size)
            self.plans.append((ops[order], kind[order]))
        self.errors = []
        self.mixed = [0] * nthreads     # reads that saw an owner's write half done
        self.ops = [0] * nthreads

    def worker(self, t, barrier):
        v, base, after, owner, will = self.v, self.base, self.after, self.owner, self.will
        ops, kind = self.plans[t]
        wrote = set()
        try:
            barrier.wait()
            for p, k in zip(ops.tolist(), kind.tolist()):
                if k:                                   # write (own page)
                    rowa = after[p]
                    d = np.nonzero(rowa != base[p])[0]
                    if d.size:
                        a, b = int(d[0]), int(d[-1]) + 1
                        v[p, a:b] = rowa[a:b]
                    else:                               # the write changes nothing: still store
                        v[p, 0:8] = rowa[0:8]
                    wrote.add(p)
                    if not np.array_equal(v[p], rowa):
                        raise AssertionError("thread %d: page %d reads wrong right after its "
                                             "own write" % (t, p))
                    continue
                got = v[p].copy()
                if owner[p] == t or not will[p]:        # nobody else writes it: exact
                    want = after[p] if p in wrote else base[p]
                    if not np.array_equal(got, want):
                        self.errors.append(("exact", t, p, int(np.count_nonzero(got != want))))
                        return
                elif not np.array_equal(got, base[p]) and not np.array_equal(got, after[p]):
                    # the owner is writing it right now: every byte is old or new, none other
                    if not ((got == base[p]) | (got == after[p])).all():
                        self.errors.append(("mixed", t, p, int(np.count_nonzero(
                            (got != base[p]) & (got != after[p])))))
                        return
                    self.mixed[t] += 1
                self.ops[t] += 1
        except BaseException as e:   # reported by the main thread
            self.errors.append(("exception", t, repr(e), traceback.format_exc()))

    def run(self, while_running=None):
        """Run the threads; `while_running()` is called by the main thread once they all
        passed the start barrier."""
        barrier = threading.Barrier(self.nthreads + 1)
        ts = [threading.Thread(target=self.worker, args=(t, barrier), daemon=True)
              for t in range(self.nthreads)]
        for th in ts:
            th.start()
        barrier.wait()
        if while_running is not None:
            while_running()
        for th in ts:
            th.join()
        return self.errors


def _verify_model(r, v, model, what, kinds=None):
    if np.array_equal(v, model):
        return
    bad, nbad = first_bad_pages(v, model)
    m = r.meta
    detail = [(p, None if kinds is None else int(kinds[p]), int(m["state"][p]),
               int(m["cls"][p]), int(m["flags"][p])) for p in bad]
    raise AssertionError("%s: %d pages differ from the model; first (page, kind, state, cls, "
                         "flags): %s" % (what, nbad, detail))


def stress_deferred(seed, nbytes=64 << 20, nthreads=8, min_faults=1_000_000, ncanon=6,
                    write_frac=0.25, extra_reads=0.25, background_every=3, max_seconds=600,
                    max_rounds=100_000, **region_kw):
    """Deferred canonical and zero pages, re-deferred over the whole region every round.

    Round: defer_fill the whole region in random runs (ZERO or one of `ncanon` canonical pages,
    two of them nearly zero), optionally restart the background fill, then `nthreads` threads
    read every page (and random extra pages) and write their own pages; afterwards every
    byte is compared with the model. max_cluster_pages=1 (no readahead): each round is up to
    npages faults. Rounds continue until stats()["faults"] >= min_faults."""
    rng = np.random.default_rng(seed)
    region_kw.setdefault("max_cluster_pages", 1)
    t0 = time.monotonic()
    with plm.Region(nbytes, **region_kw) as r:
        n, ps = r.npages, r.page_size
        templates = np.zeros((ncanon + 1, ps), np.uint8)          # 0: the zero page
        templates[1:] = rng.integers(0, 256, (ncanon, ps), dtype=np.uint8)
        templates[1, :] = 0
        templates[1, ps - 1] = 7                                  # almost zero
        templates[2, :ps // 2] = 0                                # half zero
        cans = [plm.ZERO] + [r.canonical(templates[i].tobytes()) for i in range(1, ncanon + 1)]
        assert len({c.id for c in cans[1:]}) == ncanon
        v = pages(r)
        rounds = mixed = ops = bg_rounds = 0
        round_secs = []
        model = np.zeros((n, ps), np.uint8)
        while r.stats()["faults"] < min_faults and rounds < max_rounds:
            t_round = time.monotonic()
            if time.monotonic() - t0 > max_seconds:
                raise AssertionError("only %d faults after %.0fs (%d rounds)"
                                     % (r.stats()["faults"], time.monotonic() - t0, rounds))
            rounds += 1
            kinds, runs = _random_runs(rng, n, ncanon + 1)
            for p, run, k in runs:
                r.defer_fill(p * ps, run * ps, cans[k])
            base = templates[kinds]
            after, owner, will = _write_plan(rng, base, nthreads, write_frac)
            if background_every and rounds % background_every == 0:
                r.background_stop()          # a finished fill must be stopped to run again
                r.background_start()
                bg_rounds += 1
            rnd = _Round(v, base, after, owner, will, nthreads, rng, extra_reads)
            errors = rnd.run()
            if errors:
                raise AssertionError("round %d: %s" % (rounds, errors[:5]))
            r.background_stop()
            _verify_model(r, v, after, "round %d" % rounds, kinds)
            mixed += sum(rnd.mixed)
            ops += sum(rnd.ops)
            model = after
            st = r.stats()
            assert st["errors"] == 0, st
            round_secs.append(time.monotonic() - t_round)
        _verify_model(r, v, model, "end")
        st = r.stats()
        assert st["errors"] == 0, st
        emit(dict(rounds=rounds, faults=st["faults"], spurious=st["faults_spurious"],
                  write_faults=st["faults_write"], by_class=st["faults_by_class"],
                  background_pages=st["background_pages"], background_rounds=bg_rounds,
                  readahead=st["readahead_pages"], reads_mixed=mixed, ops=ops,
                  npages=n, seconds=round(time.monotonic() - t0, 2),
                  round_seconds=dict(first10=round(float(np.mean(round_secs[:10])), 3),
                                     last10=round(float(np.mean(round_secs[-10:])), 3),
                                     max=round(max(round_secs), 3)),
                  service_ns=st["fault_service_ns"]))


def _snapshot_contents(rng, n, ps):
    """Contents for a snapshot: runs of unique random pages, duplicates of a few templates,
    zeros (written or read) and untouched pages. Returns (model, how) with how per page:
    0 untouched, 1 read-only zero, 2 written zero, 3 duplicate, 4 unique."""
    how, _ = _random_runs(rng, n, 5, maxrun=128)
    how = how.astype(np.int8)
    model = np.zeros((n, ps), np.uint8)
    uniq = np.nonzero(how == 4)[0]
    model[uniq] = rng.integers(0, 256, (uniq.size, ps), dtype=np.uint8)
    dups = np.nonzero(how == 3)[0]
    tpl = np.stack([random_page(rng, ps) for _ in range(4)])
    model[dups] = tpl[rng.integers(0, 4, dups.size)]
    return model, how


def stress_restore(seed, workdir, nbytes=64 << 20, nthreads=8, rounds=6, write_frac=0.25,
                   extra_reads=0.25, **region_kw):
    """Lazily restored snapshots (prefetch="none") read and written by `nthreads` threads.
    Round k restores snapshot k, runs the threads, checks every byte against the model, and
    checkpoints the region (lazy pages and all) as snapshot k+1. The background fill is started
    by restore() (k % 3 == 0), by the main thread once the threads run (k % 3 == 1), or not at
    all (k % 3 == 2: every snapshot page is a demand fault)."""
    rng = np.random.default_rng(seed)
    region_kw.setdefault("max_cluster_pages", 1)
    t0 = time.monotonic()
    ps = plm.Region(1).page_size
    n = nbytes // ps
    model, how = _snapshot_contents(rng, n, ps)
    path = os.path.join(workdir, "stress-0.snap")
    with plm.Region(nbytes, max_cluster_pages=1) as r:
        v = pages(r)
        for p in np.nonzero(how == 1)[0]:
            assert not v[p].any()                   # a read: the zero page
        w = np.nonzero(how >= 2)[0]
        v[w] = model[w]
        plm.checkpoint(r, path, working_set="none", durable=False)
    totals = dict(faults=0, spurious=0, background_pages=0, reads_mixed=0, ops=0,
                  bg_running_during_threads=0, snapshot_faults=0)
    for k in range(rounds):
        variant = k % 3
        r = plm.restore(path, prefetch="none", background=variant == 0, **region_kw)
        try:
            v = pages(r)
            after, owner, will = _write_plan(rng, model, nthreads, write_frac)
            rnd = _Round(v, model, after, owner, will, nthreads, rng, extra_reads)
            running = []

            def while_running():
                if variant == 1:
                    r.background_start()
                running.append(r.stats()["background_running"])

            errors = rnd.run(while_running)
            if errors:
                raise AssertionError("restore round %d: %s" % (k, errors[:5]))
            totals["bg_running_during_threads"] += int(bool(running and running[0]))
            _verify_model(r, v, after, "restore round %d" % k)
            deadline = time.monotonic() + 60
            while r.stats()["background_running"]:
                assert time.monotonic() < deadline, "background fill did not finish in 60 s"
                time.sleep(0.005)
            st = r.stats()
            assert st["errors"] == 0 and st["verify_failures"] == 0, st
            if variant == 2:
                assert st["background_pages"] == 0, st
            totals["faults"] += st["faults"]
            totals["spurious"] += st["faults_spurious"]
            totals["snapshot_faults"] += st["faults_by_class"]["snapshot"]
            totals["background_pages"] += st["background_pages"]
            totals["reads_mixed"] += sum(rnd.mixed)
            totals["ops"] += sum(rnd.ops)
            model = after
            nxt = os.path.join(workdir, "stress-%d.snap" % (k + 1))
            plm.checkpoint(r, nxt, working_set="auto" if k % 2 else "none", durable=False)
        finally:
            r.close()
        os.unlink(path)
        path = nxt
    with plm.restore(path, prefetch="all", background=False) as r:
        _verify_model(r, pages(r), model, "final restore")
    os.unlink(path)
    totals.update(rounds=rounds, npages=n, seconds=round(time.monotonic() - t0, 2))
    emit(totals)


# ==== fuzzing ==================================================================================

# The header layout, shared with the format tests (short names for the fuzzer's many uses).
from _snapformat import FIELD_OFFSET as OFFSET  # noqa: E402
from _snapformat import FIELD_SIZE as SIZE  # noqa: E402
from _snapformat import HDR, SECTIONS  # noqa: E402
from _snapformat import HEADER_CHECKED as CHECKED  # noqa: E402
from _snapformat import HEADER_FIELDS as FIELDS  # noqa: E402


def _xxh3(b):
    import xxhash
    return xxhash.xxh3_64_intdigest(bytes(b))


def fuzz_bases(workdir):
    """A few valid snapshots of different shapes; returns {name: bytes}."""
    rng = np.random.default_rng(4242)
    out = {}
    ps = plm.Region(1).page_size

    def save(name, r, ws):
        path = os.path.join(workdir, "base-%s.snap" % name)
        plm.checkpoint(r, path, working_set=ws, durable=False)
        with open(path, "rb") as f:
            out[name] = f.read()

    # working set, random / zero / duplicate / untouched pages, one array
    with plm.Region(40 * ps, max_cluster_pages=1) as r:
        a = r.alloc("w", (8, 8), np.float32)
        a[:] = rng.standard_normal((8, 8)).astype(np.float32)
        v = pages(r)
        tpl = random_page(rng, ps)
        for p in range(1, 30):
            k = p % 5
            if k == 0:
                v[p] = random_page(rng, ps)
            elif k == 1:
                v[p] = tpl
            elif k == 2:
                v[p] = 0
            elif k == 3:
                v[p].sum()
            # k == 4: untouched
        save("ws", r, [7, 3, 0, 1, 5, 20, 11, 2, 6])
    # several arrays, structured and sub-array dtypes, no working set
    with plm.Region(24 * ps, max_cluster_pages=1) as r:
        b = r.alloc("i16", 3000, np.int16)
        b[:] = rng.integers(-1000, 1000, b.shape)
        c = r.alloc("rec", (20, 3), [("id", "<i4"), ("pos", "<f8", (3,)), ("tag", "S4")])
        c["id"] = np.arange(60).reshape(20, 3)
        d = r.alloc("c", (2, 5), np.complex64)
        d[:] = 1 + 2j
        e = r.alloc("scalar", (), np.uint64)
        e[()] = 12345
        r.alloc("empty", (0, 3), np.float64)
        save("arrays", r, "none")
    # mostly duplicates of three templates, zeros, auto working set
    with plm.Region(64 * ps, max_cluster_pages=1) as r:
        v = pages(r)
        tpls = [random_page(rng, ps) for _ in range(3)]
        r.mark_working_set()
        for p in rng.permutation(64)[:56]:
            p = int(p)
            if p % 7 == 0:
                v[p] = 0
            elif p % 7 == 1:
                v[p].sum()
            else:
                v[p] = tpls[p % 3]
        save("dups", r, "auto")
    # a single page
    with plm.Region(ps, max_cluster_pages=1) as r:
        pages(r)[0] = random_page(rng, ps)
        save("one", r, "auto")
    return out


def _hdr(data):
    if len(data) < HDR.size:
        return None
    return dict(zip(FIELDS, HDR.unpack_from(data, 0)))


def _fix_checksums(raw, base_hdr, header=True, tables=True):
    """Recompute tables_xxh3 and sigs_xxh3 (over the sections the header now names, where they
    are inside the file, else the base file's) and header_xxh3, as a careful attacker would."""
    if len(raw) < HDR.size:
        return raw
    if tables:
        hh = _hdr(raw)
        mo, so = hh["map_offset"], hh["sigs_offset"]
        if not mo <= so <= len(raw):
            mo, so = base_hdr["map_offset"], base_hdr["sigs_offset"]
        if mo <= so <= len(raw):
            struct.pack_into("<Q", raw, OFFSET["tables_xxh3"], _xxh3(raw[mo:so]))
            struct.pack_into("<Q", raw, OFFSET["sigs_xxh3"], _xxh3(raw[so:]))
    if header:
        struct.pack_into("<Q", raw, CHECKED, _xxh3(raw[:CHECKED]))
    return raw


_INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 127, 128, 255, 256, 4095, 4096, 4097,
                8191, 8192, 65535, 65536, 1 << 20, (1 << 21) - 1, 1 << 21, (1 << 21) + 1,
                (1 << 26), (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 32) + 1,
                1 << 40, (1 << 40) + 1, 1 << 48, 1 << 62, (1 << 63) - 1, 1 << 63,
                (1 << 64) - 16, (1 << 64) - 1]


class Mutator:
    """Mutations of valid snapshot files. Each returns (name, bytes)."""

    def __init__(self, rng, bases):
        self.rng = rng
        self.bases = bases
        self.names = sorted(bases)
        self.hdrs = {k: _hdr(v) for k, v in bases.items()}
        self.ops = [
            (self.truncate, 3), (self.extend, 1), (self.flip, 3), (self.flip_fixed, 4),
            (self.overwrite, 2), (self.overwrite_fixed, 4), (self.header_field, 6),
            (self.header_relayout, 3), (self.map_entries, 5), (self.ws_entries, 3),
            (self.manifest, 3), (self.splice, 2), (self.store_bytes, 2), (self.sigs, 2),
        ]
        w = np.array([x[1] for x in self.ops], float)
        self.weights = w / w.sum()

    def pick_base(self):
        name = self.names[int(self.rng.integers(0, len(self.names)))]
        return name, self.bases[name], self.hdrs[name]

    def mutate(self):
        bname, data, h = self.pick_base()
        nops = 1 if self.rng.random() < 0.75 else int(self.rng.integers(2, 4))
        names = []
        raw = bytes(data)
        for _ in range(nops):
            i = int(self.rng.choice(len(self.ops), p=self.weights))
            fn = self.ops[i][0]
            raw = fn(raw, h)
            names.append(fn.__name__)
        return bname + ":" + "+".join(names), raw

    # -- helpers --
    def pick(self, seq):
        """One element of a Python sequence (numpy's choice would convert it to an array)."""
        return seq[int(self.rng.integers(0, len(seq)))]

    def _value(self, current, file_size, ps):
        r = self.rng.random()
        if r < 0.45:
            return _INTERESTING[int(self.rng.integers(0, len(_INTERESTING)))]
        if r < 0.75:
            delta = int(self.pick([1, 2, 8, 16, ps, ps * 2, 1 << 20]))
            return current + delta if self.rng.random() < 0.5 else current - delta
        if r < 0.85:
            return file_size + int(self.rng.integers(-2, 3))
        return int(self.rng.integers(0, 1 << 63)) * int(self.rng.integers(1, 3))

    def _section(self, raw, h):
        """A random [lo, hi) inside one section of the (base) layout."""
        secs = [(0, HDR.size), (HDR.size, h["header_bytes"]), (0, len(raw))] + [
            (h[n + "_offset"], h[n + "_offset"] + h[n + "_bytes"]) for n in SECTIONS]
        lo, hi = secs[int(self.rng.integers(0, len(secs)))]
        hi = min(hi, len(raw))
        if hi <= lo:
            lo, hi = 0, len(raw)
        return lo, hi

    # -- operators --
    def truncate(self, raw, h):
        if not raw:
            return raw
        if self.rng.random() < 0.5:
            edges = [HDR.size, CHECKED, len(raw)] + [h[n + "_offset"] for n in SECTIONS]
            cut = int(self.pick(edges)) + int(self.rng.integers(-16, 2))
        else:
            cut = int(self.rng.integers(0, len(raw)))
        return raw[:max(0, min(cut, len(raw) - 1))]

    def extend(self, raw, h):
        k = int(self.pick([1, 7, 16, 4096, int(self.rng.integers(1, 10000))]))
        return raw + self.rng.integers(0, 256, k, dtype=np.uint8).tobytes()

    def flip(self, raw, h, fix=False):
        if not raw:
            return raw
        b = bytearray(raw)
        lo, hi = self._section(b, h)
        for _ in range(int(self.rng.integers(1, 9))):
            off = int(self.rng.integers(lo, hi))
            b[off] ^= 1 << int(self.rng.integers(0, 8))
        return bytes(_fix_checksums(b, h) if fix else b)

    def flip_fixed(self, raw, h):
        return self.flip(raw, h, fix=True)

    def overwrite(self, raw, h, fix=False):
        if not raw:
            return raw
        b = bytearray(raw)
        lo, hi = self._section(b, h)
        off = int(self.rng.integers(lo, hi))
        k = int(self.rng.integers(1, 17))
        choice = self.rng.random()
        if choice < 0.3:
            junk = bytes([int(self.pick([0, 0xFF, 0x7F, 0x80]))]) * k
        else:
            junk = self.rng.integers(0, 256, k, dtype=np.uint8).tobytes()
        b[off:off + k] = junk
        del b[len(raw):]
        return bytes(_fix_checksums(b, h) if fix else b)

    def overwrite_fixed(self, raw, h):
        return self.overwrite(raw, h, fix=True)

    def store_bytes(self, raw, h):
        """Damage page contents only (not covered by the checksums): accepted, different data."""
        if h["store_bytes"] == 0 or len(raw) < h["map_offset"]:
            return self.flip(raw, h)
        b = bytearray(raw)
        for _ in range(int(self.rng.integers(1, 64))):
            off = int(self.rng.integers(h["store_offset"], h["map_offset"]))
            b[off] = int(self.rng.integers(0, 256))
        return bytes(b)

    def header_field(self, raw, h):
        """One to three header fields set to hostile values; checksums recomputed (mostly)."""
        if len(raw) < HDR.size:
            return raw
        b = bytearray(raw)
        ps = h["page_size"]
        for _ in range(int(self.rng.integers(1, 4))):
            f = FIELDS[int(self.rng.integers(1, len(FIELDS)))]
            cur = struct.unpack_from("<I" if SIZE[f] == 4 else "<Q", b, OFFSET[f])[0]
            val = self._value(cur, len(b), ps) % (1 << (8 * SIZE[f]))
            struct.pack_into("<I" if SIZE[f] == 4 else "<Q", b, OFFSET[f], val)
        if self.rng.random() < 0.85:
            _fix_checksums(b, h, tables=self.rng.random() < 0.5)
        return bytes(b)

    def header_relayout(self, raw, h):
        """Hostile counts with every offset recomputed to agree with them (a consistent
        layout that lies about the sections), checksums recomputed."""
        b = bytearray(raw)
        if len(b) < HDR.size:
            return raw
        hh = _hdr(b)
        ps = hh["page_size"] or 4096
        f = str(self.pick(["npages", "nstored", "nws", "manifest_bytes", "header_bytes"]))
        hh[f] = self._value(hh[f], len(b), ps) % (1 << (8 * SIZE[f]))
        if f == "header_bytes":
            hh["store_offset"] = hh["header_bytes"]
        M = (1 << 64) - 1
        hh["store_bytes"] = (hh["nstored"] * ps) & M
        hh["map_bytes"] = (hh["npages"] * 4) & M
        hh["ws_bytes"] = (hh["nws"] * 8) & M
        hh["sigs_bytes"] = (hh["nstored"] * 8) & M
        off = hh["store_offset"]
        for name in SECTIONS:
            hh[name + "_offset"] = off
            off = (off + hh[name + "_bytes"]) & M
        hh["file_bytes"] = off
        if self.rng.random() < 0.5:   # make the file as long as it claims, when that is small
            if HDR.size <= hh["file_bytes"] <= len(b) + (1 << 20):
                b = b[:hh["file_bytes"]] + bytes(max(0, hh["file_bytes"] - len(b)))
        HDR.pack_into(b, 0, *[hh[k] for k in FIELDS])
        return bytes(_fix_checksums(b, h))

    def _parse(self, raw, h):
        """(store, map, ws, manifest, sigs) per the base layout, or None if too short."""
        if len(raw) < h["file_bytes"]:
            return None
        store = raw[h["store_offset"]:h["map_offset"]]
        pmap = np.frombuffer(raw, "<u4", h["npages"], h["map_offset"]).copy()
        ws = np.frombuffer(raw, "<u8", h["nws"], h["ws_offset"]).copy()
        man = raw[h["manifest_offset"]:h["sigs_offset"]]
        sigs = np.frombuffer(raw, "<u8", h["nstored"], h["sigs_offset"]).copy()
        return store, pmap, ws, man, sigs

    def _build(self, h, store, pmap, ws, manifest, sigs):
        """A file with a consistent layout around the given sections (checksums computed)."""
        ps = h["page_size"]
        hb = h["header_bytes"]
        hh = dict(h)
        sigs = np.asarray(sigs, "<u8").tobytes()
        hh.update(npages=len(pmap), nstored=len(store) // ps, nws=len(ws), store_bytes=len(store),
                  map_bytes=4 * len(pmap), ws_bytes=8 * len(ws), manifest_bytes=len(manifest),
                  sigs_bytes=len(sigs))
        off = hb
        for name in SECTIONS:
            hh[name + "_offset"] = off
            off += hh[name + "_bytes"]
        hh["file_bytes"] = off
        tail = np.asarray(pmap, "<u4").tobytes() + np.asarray(ws, "<u8").tobytes() + manifest
        hh["tables_xxh3"] = _xxh3(tail)
        hh["sigs_xxh3"] = _xxh3(sigs)
        hh["header_xxh3"] = 0
        raw = bytearray(HDR.pack(*[hh[k] for k in FIELDS])) + bytes(hb - HDR.size)
        hh["header_xxh3"] = _xxh3(raw[:CHECKED])
        HDR.pack_into(raw, 0, *[hh[k] for k in FIELDS])
        return bytes(raw) + store + tail + sigs

    def map_entries(self, raw, h):
        """Page-map entries rewritten, pages added or removed, store entries dropped or
        duplicated (with or without their signatures): consistent layout, checksums."""
        parts = self._parse(raw, h)
        if parts is None:
            return self.flip(raw, h)
        store, pmap, ws, man, sigs = parts
        ps = h["page_size"]
        nstored = len(store) // ps
        r = self.rng.random()
        if r < 0.6 and len(pmap):
            for _ in range(int(self.rng.integers(1, 4))):
                p = int(self.rng.integers(0, len(pmap)))
                val = (int(self.rng.integers(0, 5)) if self.rng.random() < 0.4 else
                       2 + nstored + int(self.rng.integers(-2, 2)) if self.rng.random() < 0.5
                       else int(self.rng.integers(0, 1 << 32)))
                pmap[p] = val % (1 << 32)
        elif r < 0.75:
            k = int(self.rng.integers(1, 4))
            if self.rng.random() < 0.5 and len(pmap) > k:
                pmap = pmap[:-k]
            else:
                pmap = np.concatenate([pmap, pmap[:k]])
        elif r < 0.9 and len(store) >= ps:
            if self.rng.random() < 0.5:
                store = store[:-ps]          # the last entry is gone, the map still uses it
                sigs = sigs[:-1] if self.rng.random() < 0.8 else sigs
            else:
                store = store + store[:ps]   # an entry nobody uses
                sigs = np.append(sigs, sigs[:1]) if self.rng.random() < 0.8 else sigs
        else:
            pmap = pmap[self.rng.permutation(len(pmap))]
        return self._build(h, store, pmap, ws, man, sigs)

    def sigs(self, raw, h):
        """The signature section changed (checksum recomputed or not): restore() does not read
        it, inspect() rejects the damage."""
        parts = self._parse(raw, h)
        if parts is None:
            return self.flip(raw, h)
        store, pmap, ws, man, sigs = parts
        if len(sigs) and self.rng.random() < 0.7:
            sigs[int(self.rng.integers(0, len(sigs)))] ^= np.uint64(1 << int(self.rng.integers(0, 64)))
        else:
            sigs = np.append(sigs, np.uint64(7))
        out = self._build(h, store, pmap, ws, man, sigs)
        if self.rng.random() < 0.5:   # stale checksum
            b = bytearray(out)
            struct.pack_into("<Q", b, OFFSET["sigs_xxh3"], _hdr(raw)["sigs_xxh3"])
            out = bytes(_fix_checksums(b, h, tables=False))
        return out

    def ws_entries(self, raw, h):
        parts = self._parse(raw, h)
        if parts is None:
            return self.flip(raw, h)
        store, pmap, ws, man, sigs = parts
        n = len(pmap)
        r = self.rng.random()
        ws = ws.astype(np.uint64)
        if r < 0.3 and len(ws):
            ws[int(self.rng.integers(0, len(ws)))] = np.uint64(
                int(self.pick([n, n + 1, (1 << 64) - 1, 1 << 32, 0])))
        elif r < 0.5 and len(ws):
            ws = np.concatenate([ws, ws[:1]])              # duplicate
        elif r < 0.7:
            p = int(self.rng.integers(0, n))
            ws = np.concatenate([ws, np.array([p], np.uint64)])
        elif len(ws):
            ws = ws[self.rng.permutation(len(ws))]
        else:
            ws = np.array([n - 1, 0][:int(self.rng.integers(1, 3))], np.uint64)
        return self._build(h, store, pmap, ws, man, sigs)

    _DTYPES = ["<f4", "|O", "O", "V8", "S3", "<U2", ">c16", "b1", "M8[s]", "m8", "<f2", "V0",
               "", "?", "<i8", "u1", 5, None, [["a", "<i4"], ["a", "<i4"]], [["a", "|O"]],
               [["a", "<u2", [2]]], [["a", [["b", "<f8"]]]], [], [["a"]], {"x": 1},
               [["a", "<i4", [-1]]], [["a", "<i4", [1 << 40]]], "(1073741824,)i8",
               ",f4", "(,)f4", "4f4", "(2,)i4", "(2,3)<f8", "i4,f8", "f4,", "2i4,(3,)f8", "0f4",
               "(0,)f4", "(-1,)f4"]

    def manifest(self, raw, h):
        parts = self._parse(raw, h)
        if parts is None:
            return self.flip(raw, h)
        store, pmap, ws, man, sigs = parts
        ps = h["page_size"]
        n = len(pmap)
        r = self.rng.random()
        try:
            obj = json.loads(man)
        except ValueError:
            obj = {}
        if r < 0.15:
            m = bytearray(man)
            if m:
                m[int(self.rng.integers(0, len(m)))] = int(self.rng.integers(0, 256))
            new = bytes(m)
        elif r < 0.25:
            new = self.pick([b"", b"{", b"[]", b"null", b"1", b'"x"', b"\xff\xfe",
                                   b'{"arrays": []}', b'{"arrays": {"a": 1}}',
                                   b'{"pylazymem": "0.1.0"}', b'{"arrays": {}, "x": NaN}',
                                   b"{" * 5000 + b"}" * 5000, b'{"arrays": {}}\x00'])
        else:
            arrays = obj.get("arrays") if isinstance(obj, dict) else None
            if not isinstance(arrays, dict):
                arrays = {}
            name = str(self.pick(["w", "new", "", "x" * 300, "\u00e9"]))
            entry = dict(arrays.get(name) or next(iter(arrays.values()), None)
                         or {"offset": 0, "dtype": "<f4", "shape": [4]})
            f = str(self.pick(["offset", "dtype", "shape", "drop"]))
            if f == "offset":
                entry["offset"] = self.pick([
                    -1, -ps, 0, 1, 3, ps - 1, n * ps - 4, n * ps, n * ps + 1, 1 << 62, 1 << 64,
                    -(1 << 63), 1.5, "0", None, True, [0]])
            elif f == "dtype":
                entry["dtype"] = self._DTYPES[int(self.rng.integers(0, len(self._DTYPES)))]
            elif f == "shape":
                entry["shape"] = self.pick([
                    [], [0], [-1], [n * ps], [n * ps + 1], [1 << 31, 1 << 31], [1 << 62, 4],
                    [3, -3], [1.0], ["2"], None, 7, [[1]], [True], list(range(40))])
                entry["shape"] = (list(entry["shape"]) if isinstance(entry["shape"], list)
                                  else entry["shape"])
            else:
                entry.pop(str(self.pick(["offset", "dtype", "shape"])), None)
            arrays[name] = entry
            obj = {"pylazymem": "0.1.0", "arrays": arrays}
            new = json.dumps(obj, default=str).encode()
        return self._build(h, store, pmap, ws, new, sigs)

    def splice(self, raw, h):
        """A section of another base file put in place of this one's (layout recomputed)."""
        parts = self._parse(raw, h)
        oname = self.names[int(self.rng.integers(0, len(self.names)))]
        oh = self.hdrs[oname]
        other = self._parse(self.bases[oname], oh)
        if parts is None or other is None:
            return self.truncate(raw, h)
        parts = list(parts)
        i = int(self.rng.integers(0, len(parts)))
        parts[i] = other[i]
        return self._build(h, *parts)


def _expected_pages(data):
    """What an accepted file says the region holds (read with the document's layout)."""
    h = _hdr(data)
    ps, n = h["page_size"], h["npages"]
    pmap = np.frombuffer(data, "<u4", n, h["map_offset"])
    out = np.zeros((n, ps), np.uint8)
    stored = np.nonzero(pmap >= 2)[0]   # 0 untouched, 1 zero, 2 + i store entry i
    if stored.size:
        store = np.frombuffer(data, np.uint8, h["store_bytes"], h["store_offset"])
        store = store.reshape(-1, ps)
        out[stored] = store[pmap[stored].astype(np.int64) - 2]
    return out


def _reason(e):
    msg = str(e)
    msg = msg.split(": ", 1)[1] if ": " in msg else msg
    msg = re.sub(r"b?'(?:[^'\\]|\\.)*'", "'…'", msg)     # names, magic bytes
    msg = re.sub(r"0x[0-9a-fA-F]+|\d+", "N", msg)
    return msg[:60]


def fuzz_batch(workdir, seed, count, max_seconds=None, slow_file_seconds=5.0, worker=0):
    """Mutate the base snapshots `count` times; inspect() and restore(prefetch="none",
    background=False) each result. Every outcome must be success or SnapshotError; an accepted
    file is read page by page and must hold what the file says. Failures are saved as
    workdir/fail-*.snap. The file under test is always workdir/current.snap (the reproducer
    when the process crashes or hangs)."""
    bases = fuzz_bases(workdir)
    rng = np.random.default_rng(seed)
    mut = Mutator(rng, bases)
    cur = os.path.join(workdir, "current.snap")
    counts = dict(files=0, accepted=0, rejected=0, inspect_only=0, prefetch_all=0,
                  read_pages=0)
    reasons = {}
    failures = []
    kinds = {}
    t0 = time.monotonic()
    slowest = (0.0, None)

    def fail(what, name, blob, detail):
        keep = os.path.join(workdir, "fail-%d-%d.snap" % (worker, len(failures)))
        if len(failures) < 20:
            with open(keep, "wb") as f:
                f.write(blob)
        failures.append(dict(what=what, mutation=name, file=keep, detail=detail[-2000:]))

    for i in range(count):
        if max_seconds is not None and time.monotonic() - t0 > max_seconds:
            break
        name, blob = mut.mutate()
        with open(cur, "wb") as f:
            f.write(blob)
        counts["files"] += 1
        t1 = time.monotonic()
        info = inspect_error = sources = None
        try:
            info = plm.inspect(cur)
        except plm.SnapshotError as e:
            inspect_error = str(e)
            if not str(e):
                fail("empty SnapshotError message", name, blob, "inspect")
        except BaseException:
            fail("inspect raised something other than SnapshotError", name, blob,
                 traceback.format_exc())
        try:   # restore's checks without restoring: must agree with restore()
            sources = plm.snapshot.page_sources(cur)[0]
        except plm.SnapshotError as e:
            if not str(e):
                fail("empty SnapshotError message", name, blob, "page_sources")
        except BaseException:
            fail("page_sources raised something other than SnapshotError", name, blob,
                 traceback.format_exc())
        prefetch = "all" if i % 16 == 15 else "none"
        try:
            r = plm.restore(cur, prefetch=prefetch, background=False)
        except plm.SnapshotError as e:
            counts["rejected"] += 1
            key = _reason(e)
            reasons[key] = reasons.get(key, 0) + 1
            if info is not None:
                counts["inspect_only"] += 1
            if sources is not None:
                fail("page_sources accepted a file restore rejected", name, blob, str(e))
        except BaseException:
            fail("restore raised something other than SnapshotError", name, blob,
                 traceback.format_exc())
        else:
            counts["accepted"] += 1
            counts["prefetch_all"] += prefetch == "all"
            kind = name.split(":")[1]
            kinds[kind] = kinds.get(kind, 0) + 1
            try:
                with r:
                    if sources is None:
                        raise AssertionError("restore accepted a file page_sources() rejected")
                    if info is None and "signature" not in (inspect_error or ""):
                        # restore() leaves the signature section to whoever needs it
                        raise AssertionError("restore accepted a file inspect() rejected: %s"
                                             % inspect_error)
                    if r.npages != sources.npages:
                        raise AssertionError("npages %d != page_sources' %d"
                                             % (r.npages, sources.npages))
                    got = pages(r).copy()              # every page, faulted in
                    for a in r.arrays.values():
                        a.tobytes()
                    st = r.stats()
                    if st["errors"]:
                        raise AssertionError("stats errors after reading: %s" % st)
                counts["read_pages"] += got.shape[0]
                want = _expected_pages(blob)
                if not np.array_equal(got, want):
                    bad, nbad = first_bad_pages(got, want)
                    raise AssertionError("%d pages differ from what the file says: %s"
                                         % (nbad, bad))
            except BaseException:
                fail("accepted file misbehaves", name, blob, traceback.format_exc())
        dt = time.monotonic() - t1
        if dt > slowest[0]:
            slowest = (dt, name)
        if dt > slow_file_seconds:
            fail("slow file (%.1fs)" % dt, name, blob, "")
    counts["seconds"] = round(time.monotonic() - t0, 2)
    counts["slowest"] = [round(slowest[0], 4), slowest[1]]
    emit(dict(counts=counts, reasons=reasons, accepted_by_mutation=kinds, failures=failures))


# ==== crash safety =============================================================================

MIX = np.uint64(0x9E3779B97F4A7C15)


def gen_pattern(first, count, words):
    """Words 2.. of pages [first, first+count): distinct per page, the same in every generation."""
    p = np.arange(first, first + count, dtype=np.uint64)[:, None]
    k = np.arange(words, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        return p * MIX + k * np.uint64(0x100000001B3)


def crash_child(path, gen0, mode, nbytes, once=False):
    """Checkpoint a region to `path` in a loop, one generation after another.

    Page p holds words [gen, p, pattern...]. mode "fresh": a new region, every page written
    with each generation. mode "restored": restore `path` lazily (prefetch none, no background)
    and write each generation into page 0 only; the other pages stay lazy and are checkpointed
    from the file being replaced. Prints "ready" and then "done G" after each checkpoint."""
    ps = plm.Region(1).page_size
    words = ps // 8
    if mode == "fresh":
        r = plm.Region(nbytes)
        n = r.npages
        v = r.ndarray(np.uint64).reshape(n, words)
        step = 4096
        for a in range(0, n, step):
            c = min(step, n - a)
            v[a:a + c, 2:] = gen_pattern(a, c, words)[:, 2:]
            v[a:a + c, 1] = np.arange(a, a + c, dtype=np.uint64)
    else:
        r = plm.restore(path, prefetch="none", background=False)
        n = r.npages
        v = r.ndarray(np.uint64).reshape(n, words)
    print("ready", os.getpid(), flush=True)
    g = gen0
    while True:
        if mode == "fresh":
            v[:, 0] = g
        else:
            v[0, 0] = g
        plm.checkpoint(r, path, working_set="none")
        print("done", g, flush=True)
        if once:
            break
        g += 1
    r.close()


def crash_verify(path):
    """Restore `path` and report the generation of page 0 and the set of generations of the
    other pages; every page's structure (index, pattern) must be intact."""
    info = plm.inspect(path)
    ps = info.page_size
    words = ps // 8
    out = {}
    with plm.restore(path, prefetch="none", background=False) as r:
        n = r.npages
        v = r.ndarray(np.uint64).reshape(n, words)
        gens = set()
        bad = 0
        step = 4096
        for a in range(0, n, step):
            c = min(step, n - a)
            blk = v[a:a + c]
            if not (np.array_equal(blk[:, 1], np.arange(a, a + c, dtype=np.uint64)) and
                    np.array_equal(blk[:, 2:], gen_pattern(a, c, words)[:, 2:])):
                bad += int(np.count_nonzero(
                    (blk[:, 1] != np.arange(a, a + c, dtype=np.uint64)) |
                    (blk[:, 2:] != gen_pattern(a, c, words)[:, 2:]).any(axis=1)))
            gens.update(int(x) for x in np.unique(blk[:, 0] if a else blk[1:, 0]))
        out.update(page0=int(v[0, 0]), others=sorted(gens)[:10], ngens=len(gens),
                   bad_pages=bad, npages=n, errors=r.stats()["errors"])
    emit(out)


# ==== leaks ====================================================================================

def process_counts():
    return dict(fds=len(os.listdir("/proc/self/fd")), threads=threading.active_count(),
                tasks=len(os.listdir("/proc/self/task")),
                maps=sum(1 for _ in open("/proc/self/maps")),
                rss_kib=status_kib("VmRSS"))


def _one_region(i, rng, ps):
    n = 16 + i % 48
    kw = [{}, {"max_cluster_pages": 1}, {"serve_cpus": [], "serve_threads": 2}][i % 3]
    r = plm.Region(n * ps, **kw)
    v = pages(r)
    v[1, :8] = i & 0xFF                       # write fault
    int(v[2].sum())                           # read fault (zero page)
    c = r.canonical(bytes([i & 0xFF or 1]) * ps)
    r.defer_fill(4 * ps, 8 * ps, c)
    assert v[5, 0] == (i & 0xFF or 1)         # canonical fault
    r.defer_fill(12 * ps, 4 * ps, plm.ZERO)
    assert v[13].sum() == 0
    if i % 4 == 0:
        r.materialize(4 * ps, 8 * ps)
    if i % 5 == 0:
        r.meta                                # maps the metadata read-only
        r.signatures(0, 4 * ps)
    if i % 7 == 0:
        r.background_start()
    r.stats()
    return r, v


def leaks(workdir, nregions=2000, nrestores=200, ndropped=200):
    """Create and close regions and restores; open fds, threads, mappings and RSS return to
    where they started. Prints the counts at the start, at checkpoints and at the end."""
    import gc
    ps = plm.Region(1).page_size
    rng = np.random.default_rng(1)
    path = os.path.join(workdir, "leak.snap")
    with plm.Region(256 * ps) as r:
        v = pages(r)
        v[:128] = rng.integers(0, 256, (128, ps), dtype=np.uint8)
        v[128:160] = v[0]
        int(v[160:200].sum())
        plm.checkpoint(r, path, working_set=list(range(0, 256, 3)), durable=False)

    def restore_once(j):
        pf = ("none", "working-set", "all")[j % 3]
        r = plm.restore(path, prefetch=pf, background=j % 2 == 0)
        v = pages(r)
        int(v[::17].sum())
        v[3, 0] = 1
        r.close()

    # warm up: lazily created caches, thread-local buffers, imports
    for i in range(30):
        r, v = _one_region(i, rng, ps)
        r.close()
        del r, v
    for j in range(6):
        restore_once(j)
    gc.collect()
    start = process_counts()
    trace = [("start", start)]
    t0 = time.monotonic()
    for i in range(nregions):
        r, v = _one_region(i, rng, ps)
        r.close()                              # every 10th: its view `v` outlives close()
        if i % 10:
            del v
        del r
        v = None
        if (i + 1) % 500 == 0:
            gc.collect()
            trace.append(("regions %d" % (i + 1), process_counts()))
    t_regions = time.monotonic() - t0
    for j in range(nrestores):
        restore_once(j)
        if (j + 1) % 100 == 0:
            gc.collect()
            trace.append(("restores %d" % (j + 1), process_counts()))
    t_restores = time.monotonic() - t0 - t_regions
    for i in range(ndropped):                  # never closed: garbage collection closes them
        r, v = _one_region(i, rng, ps)
        del r, v
    gc.collect()
    trace.append(("dropped %d" % ndropped, process_counts()))
    end = process_counts()
    trace.append(("end", end))
    emit(dict(start=start, end=end, trace=trace, seconds_regions=round(t_regions, 2),
              seconds_restores=round(t_restores, 2), nregions=nregions, nrestores=nrestores,
              ndropped=ndropped))


# ==== parent side: reports, processes ==========================================================

def record(name, summary):
    """Append a test's numbers to $PYLAZYMEM_RELIABILITY_REPORT (scripts/reliability.sh prints
    them) and to stdout (pytest -s)."""
    line = json.dumps({"test": name, "long": LONG, "under_asan": UNDER_ASAN, **summary})
    print(line)
    path = os.environ.get("PYLAZYMEM_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def last_json(stdout):
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    assert lines, "no JSON summary in the output:\n" + stdout[-3000:]
    return json.loads(lines[-1])


def python_env(extra=None):
    """The environment run_py gives its children (tests/ on PYTHONPATH, faulthandler on)."""
    from _helpers import TESTS_DIR
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    env["PYTHONFAULTHANDLER"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def start_py(code, args=(), env=None, **popen_kw):
    """Popen of `python -c code args...` in its own session (killpg kills its whole tree)."""
    import subprocess
    from _helpers import REPO_DIR
    popen_kw.setdefault("stdout", subprocess.PIPE)
    popen_kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            env=python_env(env), cwd=REPO_DIR, start_new_session=True,
                            **popen_kw)


def kill_tree(proc, sig=9):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def finish_all(procs, timeout):
    """Wait for every Popen in `procs` (started with start_py, stdout/stderr pipes) within
    `timeout` seconds in all. Returns [(returncode, stdout, stderr, timed_out)]. A process that
    overruns gets SIGABRT (faulthandler dumps its threads' stacks), then its group SIGKILL."""
    import subprocess
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            out.append((p.returncode, o, e, False))
        except subprocess.TimeoutExpired:
            try:
                os.kill(p.pid, 6)
                p.wait(timeout=3)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
            kill_tree(p)
            o, e = p.communicate()
            out.append((p.returncode, o, e, True))
    return out
