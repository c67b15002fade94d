"""Dirty tracking costs on a 1 GiB fully present region, 2% of pages written per round."""
import statistics, sys, time
import numpy as np
import pylazymem as plm
from pylazymem._binding import ffi, lib

N = (1 << 30) // 4096
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
r = plm.Region(N * 4096)
v = r.ndarray(np.uint8).reshape(N, 4096)
v[:, 0] = 1                                  # every page present, private
rng = np.random.default_rng(1)
have = hasattr(lib, "lm_dirty_bitmap")
words = np.zeros(N // 64, np.uint64)
cw = ffi.from_buffer("uint64_t[]", words)
t = {"mark": [], "working_set": [], "reset": [], "bitmap": [], "take": [], "dirty_pages": []}

def timed(key, fn):
    t0 = time.perf_counter(); out = fn(); t[key].append((time.perf_counter() - t0) * 1e3); return out

def write2():
    pages = rng.choice(N, N // 50, replace=False)
    v[pages, 1] += 1
    return pages

with r._use() as lm:
    for i in range(reps):
        write2(); timed("mark", r.mark_working_set)
        pages = write2(); ws = timed("working_set", r.working_set)
        assert set(pages.tolist()) <= set(ws.tolist())
        if have:
            write2(); timed("reset", lambda: lib.lm_dirty_reset(lm, ffi.NULL))
            pages = write2(); timed("bitmap", lambda: lib.lm_dirty_bitmap(lm, cw))
            d = timed("dirty_pages", r.dirty_pages)
            assert set(pages.tolist()) <= set(d.tolist()) and d.size == pages.size, d.size
            write2(); timed("take", lambda: lib.lm_dirty_reset(lm, cw))
for k, x in t.items():
    if x:
        print("%-12s median %7.2f ms  (min %.2f, max %.2f, n=%d)" % (k, statistics.median(x), min(x), max(x), len(x)))
r.close()
