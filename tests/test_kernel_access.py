"""Kernel accesses to missing pages (system calls reading or writing region memory).

Full mode: the kernel's copy_{to,from}_user faults are served like user faults.
User-mode-only mode: they fail with EFAULT (documented), never with wrong bytes or a hang.
Run in subprocesses: a kernel access that is never served would block in the system call."""

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

SETUP = """
    rng = np.random.default_rng(3)
    page = random_page(rng)
    filedata = random_page(rng)
    r = plm.Region(16 * PS, max_cluster_pages=1)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, 6 * PS, c)               # pages 0-5 canonical
    r.defer_fill(6 * PS, 4 * PS, plm.ZERO)   # pages 6-9 zero, 10-15 EMPTY
    mv = memoryview(r)
    rfd, wfd = os.pipe()

    def read_exactly(fd, n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            assert chunk, "EOF"
            buf += chunk
        return buf
"""


@pytest.mark.uffd_full
@pytest.mark.parametrize("acquire", ["auto", "syscall"])
def test_pipe_write_and_readinto(run_py_ok, probe_mode, tmp_path, acquire):
    if acquire != "auto" and probe_mode(acquire)[0] != "full":
        pytest.skip(f"PYLAZYMEM_UFFD={acquire} is not full mode here")
    path = tmp_path / "data.bin"
    out = run_py_ok(SETUP + f"""
    # os.write from a deferred canonical page: the kernel reads missing memory
    assert r.meta["state"][1] == int(plm.PageState.DEFERRED)
    n = os.write(wfd, mv[PS:2 * PS])
    assert n == PS, n
    assert read_exactly(rfd, PS) == page.tobytes(), "pipe: canonical page 1"
    assert r.meta["state"][1] == int(plm.PageState.PRESENT)
    # four pages at once: canonical 4, 5, zero 6, 7
    n = os.write(wfd, mv[4 * PS:8 * PS])
    assert n == 4 * PS, n
    assert read_exactly(rfd, 4 * PS) == page.tobytes() * 2 + bytes(2 * PS), "pipe: pages 4-7"
    # an EMPTY page
    assert os.write(wfd, mv[10 * PS:11 * PS]) == PS
    assert read_exactly(rfd, PS) == bytes(PS), "pipe: EMPTY page 10"

    # readinto: the kernel writes missing memory
    with open({str(path)!r}, "wb") as f:
        f.write(filedata.tobytes())
    with open({str(path)!r}, "rb", buffering=0) as f:
        assert f.readinto(mv[12 * PS:13 * PS]) == PS                  # EMPTY page, whole
        assert bytes(mv[12 * PS:13 * PS]) == filedata.tobytes(), "readinto EMPTY page 12"
        f.seek(0)
        assert f.readinto(mv[8 * PS:9 * PS]) == PS                    # ZERO page, whole
        assert bytes(mv[8 * PS:9 * PS]) == filedata.tobytes(), "readinto ZERO page 8"
        f.seek(0)
        assert f.readinto(mv[3 * PS + 100:3 * PS + 200]) == 100       # canonical page, part
        want = page.copy()
        want[100:200] = filedata[:100]
        assert bytes(mv[3 * PS:4 * PS]) == want.tobytes(), "readinto part of canonical page 3"
    # untouched pages still read right afterwards
    assert bytes(mv[0:PS]) == page.tobytes()
    assert bytes(mv[9 * PS:10 * PS]) == bytes(PS)
    assert r.stats()["errors"] == 0
    r.close()
    print("OK")
    """, env={"PYLAZYMEM_UFFD": acquire}, timeout=60)
    assert out.strip().endswith("OK")


def test_user_mode_only_kernel_access_is_efault(run_py_ok, probe_mode):
    mode, _, reason = probe_mode("user-mode-only")
    if mode != "user-mode-only":
        pytest.skip(f"user-mode-only uffd not available: {reason}")
    out = run_py_ok(SETUP + """
    import errno
    assert plm.features().mode == "user-mode-only"
    try:
        n = os.write(wfd, mv[PS:2 * PS])
    except OSError as e:
        assert e.errno == errno.EFAULT, e
        print("EFAULT")
    else:   # allowed only if the bytes are right
        assert n == PS and read_exactly(rfd, PS) == page.tobytes()
        print("served")
    # the page is still readable by the program, with the right contents
    assert bytes(mv[PS:2 * PS]) == page.tobytes()
    r.close()
    print("OK")
    """, env={"PYLAZYMEM_UFFD": "user-mode-only"}, timeout=60)
    assert out.strip().endswith("OK")
