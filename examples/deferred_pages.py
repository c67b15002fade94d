"""Deferred page updates in a few lines: the main demo until the suspend/resume demo lands.

A 512 MiB region is initialised from a 4 KiB template and a zero range without writing a
byte; pages are copied (or mapped to the shared zero page) only when first touched.

    python examples/deferred_pages.py [--size MiB]
"""
import argparse
import os
import time

import numpy as np

import pylazymem as plm


def rss_anon_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="region size in MiB (default 512)")
    args = ap.parse_args(argv)

    f = plm.features()
    print("userfaultfd: mode=%s source=%s" % (f.mode, f.source))
    if f.mode == "unavailable":
        raise SystemExit("pylazymem: " + f.reason)

    nbytes = args.size << 20
    rng = np.random.default_rng(1)
    template = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with plm.Region(nbytes) as r:
        ps = r.page_size
        t0 = time.perf_counter()
        tmpl = r.canonical(template)
        half = (r.npages // 2) * ps
        r.defer_fill(0, half, tmpl)                 # first half: copies of the template
        r.defer_fill(half, nbytes - half, plm.ZERO)  # second half: known zero
        t_defer = time.perf_counter() - t0
        print("deferred %d MiB (template + zero) in %.2f ms; nothing written yet"
              % (args.size, t_defer * 1e3))

        pages = r.ndarray(np.uint8).reshape(r.npages, ps)
        rss0 = rss_anon_mib()
        sample = np.sort(rng.choice(r.npages // 2, size=max(1, r.npages // 200), replace=False))
        t0 = time.perf_counter()
        ok = all(pages[i].tobytes() == template for i in sample)
        t_touch = time.perf_counter() - t0
        print("read %d random template pages in %.2f ms: contents %s"
              % (len(sample), t_touch * 1e3, "correct" if ok else "WRONG"))

        zero_sum = int(pages[r.npages // 2:].sum(dtype=np.uint64))
        print("read the whole zero half (%d MiB): sum=%d, RssAnon grew %.1f MiB "
              "(zero pages share the kernel's zero page)"
              % ((nbytes - half) >> 20, zero_sum, rss_anon_mib() - rss0))

        m = r.meta
        print("page states: %s" % {plm.PageState(s).name: int(c) for s, c in
                                    zip(*np.unique(m["state"], return_counts=True))})
        st = r.stats()
        print("faults=%d (canonical %d, zero %d) readahead pages=%d, service p50=%d ns p99=%d ns"
              % (st["faults"], st["faults_by_class"]["canonical"], st["faults_by_class"]["zero"],
                 st["readahead_pages"], st["fault_service_ns"]["p50"],
                 st["fault_service_ns"]["p99"]))
        del pages, m
        if not ok or zero_sum:
            raise SystemExit("demo: wrong contents")
    print("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
