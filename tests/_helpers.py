"""Small helpers shared by the tests and by the scripts they run in subprocesses.

Everything here is plain Python/numpy; nothing touches a region by itself.
"""

import os
import time

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def pages(r):
    """A (npages, page_size) uint8 view of region `r` (zero-copy: reading it faults pages in)."""
    return r.ndarray(np.uint8).reshape(r.npages, r.page_size)


def random_page(rng, page_size=PAGE_SIZE):
    """A page of random bytes as a uint8 array (never all zero)."""
    p = rng.integers(0, 256, size=page_size, dtype=np.uint8)
    p[0] |= 1
    return p


def status_kib(field):
    """A field of /proc/self/status in KiB ("RssAnon", "VmRSS"), or None if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def rss_anon():
    """Anonymous resident memory of this process in bytes (RssAnon; VmRSS on old kernels)."""
    kib = status_kib("RssAnon")
    if kib is None:
        kib = status_kib("VmRSS")
    return kib * 1024


def first_bad_pages(view, expected, limit=8):
    """Indices of (up to `limit`) pages whose bytes differ between two (npages, ps) arrays."""
    bad = np.nonzero((view != expected).any(axis=1))[0]
    return [int(i) for i in bad[:limit]], int(bad.size)


def wait_background(r, timeout=30.0):
    """Poll region r until its background fill has finished (an assertion after `timeout`)."""
    deadline = time.monotonic() + timeout
    while r.stats()["background_running"]:
        assert time.monotonic() < deadline, "background fill still running after %ss" % timeout
        time.sleep(0.005)


def pmd_mapped(r):
    """Bytes of region r's range mapped through PMDs from shared memory (ShmemPmdMapped in
    /proc/self/smaps): huge pages of a canonical chunk or a complete pool."""
    lo, hi, total, inside = r.address, r.address + r.nbytes, 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):
                inside = lo <= int(head.split("-")[0], 16) < hi
            elif inside and head == "ShmemPmdMapped:":
                total += int(line.split()[1]) * 1024
    return total
