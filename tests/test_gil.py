"""The fault path never needs the GIL: faults taken while the faulting thread holds the GIL
(memoryview indexing, small numpy operations) complete, with the right values, while another
Python thread competes for the GIL. Run in subprocesses: a GIL deadlock would hang."""

import textwrap

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

SCRIPT = """
    sys.setswitchinterval(1e-4)
    stop = threading.Event()
    spins = [0]

    def spin():                       # wants the GIL all the time
        while not stop.is_set():
            spins[0] += 1

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    rng = np.random.default_rng(7)
    page = random_page(rng)
    with plm.Region(64 * PS, max_cluster_pages=1, **REGION_KW) as r:
        c = r.canonical(page.tobytes())
        r.defer_fill(0, 32 * PS, c)
        r.defer_fill(32 * PS, 16 * PS, plm.ZERO)
        mv = memoryview(r)
        a = r.ndarray(np.uint8)
        # memoryview indexing: one byte of a deferred canonical page, of a ZERO and an EMPTY page
        for p in range(0, 32, 3):
            off = p * PS + (p * 97) % PS
            assert mv[off] == page[off % PS], ("mv canonical", p)
        assert mv[40 * PS + 17] == 0
        assert mv[50 * PS + 5] == 0
        # small numpy operations (no GIL release below numpy's threshold) on untouched pages
        for p in range(1, 32, 3):
            lo = p * PS + 64
            got = int(a[lo:lo + 64].sum())
            assert got == int(page[64:128].sum(dtype=np.int64)), ("numpy sum", p, got)
        assert int(a[41 * PS:41 * PS + 32].sum()) == 0
        assert int(a[52 * PS + 8:52 * PS + 40].max()) == 0
        # stores through memoryview into deferred pages
        mv[2 * PS + 1] = 0xEE
        mv[44 * PS + 3] = 0x11
        want = page.copy()
        want[1] = 0xEE
        assert bytes(mv[2 * PS:3 * PS]) == want.tobytes()
        assert mv[44 * PS + 3] == 0x11 and mv[44 * PS + 2] == 0
        st = r.stats()
        assert st["faults"] >= 28, st
    stop.set()
    spinner.join()
    print("OK", spins[0] > 0)
"""


@pytest.mark.parametrize("region_kw", ["{}", "{'serve_cpus': [], 'serve_threads': 1}",
                                       "{'serve_cpus': [min(os.sched_getaffinity(0))]}"])
def test_faults_while_holding_gil(run_py_ok, region_kw):
    out = run_py_ok(f"REGION_KW = {region_kw}\n" + textwrap.dedent(SCRIPT),
                    timeout=60)
    assert out.strip().splitlines()[-1] == "OK True"
