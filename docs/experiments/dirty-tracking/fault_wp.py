"""Fault path with and without write-protected fills: per-page cost of read faults, of read
faults followed by a store (the store then takes the kernel's async WP fault), of sequential
reads (readahead clusters), all on canonical deferrals (copies), median of reps."""
import statistics, sys, time
import numpy as np
import pylazymem as plm

N = (256 << 20) // 4096
K = 20000
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
tmpl = np.random.default_rng(0).integers(1, 255, 4096, dtype=np.uint8).tobytes()
res = {"random read": [], "random read+store": [], "store only (no fault)": [],
       "sequential read": []}
for rep in range(reps):
    rng = np.random.default_rng(rep)
    pages = rng.choice(N, K, replace=False)
    with plm.Region(N * 4096, max_cluster_pages=1, share_canonical=False) as r:
        r.defer_fill(0, r.nbytes, r.canonical(tmpl))
        v = r.ndarray(np.uint8).reshape(N, 4096)
        t0 = time.perf_counter()
        for p in pages.tolist():
            v[p, 7]
        res["random read"].append((time.perf_counter() - t0) / K * 1e6)
        t0 = time.perf_counter()
        for p in pages.tolist():
            v[p, 9] = 1
        res["store only (no fault)"].append((time.perf_counter() - t0) / K * 1e6)
    with plm.Region(N * 4096, max_cluster_pages=1, share_canonical=False) as r:
        r.defer_fill(0, r.nbytes, r.canonical(tmpl))
        v = r.ndarray(np.uint8).reshape(N, 4096)
        t0 = time.perf_counter()
        for p in pages.tolist():
            v[p, 9] = v[p, 7] + 1
        res["random read+store"].append((time.perf_counter() - t0) / K * 1e6)
    with plm.Region(N * 4096, share_canonical=False) as r:
        r.defer_fill(0, r.nbytes, r.canonical(tmpl))
        r.reset_dirty()
        v = r.ndarray(np.uint8).reshape(N, 4096)
        t0 = time.perf_counter()
        s = int(v[:, 5].sum())
        res["sequential read"].append((time.perf_counter() - t0) / N * 1e6)
        dp = r.dirty_pages().size if hasattr(r, "dirty_pages") else -1
print("dirty pages after sequential read of %d: %d" % (N, dp))
for k, x in res.items():
    print("%-24s median %6.2f us/page (min %.2f max %.2f)" % (k, statistics.median(x), min(x), max(x)))
