"""The command line: every command, bad arguments, a corrupt snapshot, the plot, the demo."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE, REPO_DIR

pytestmark = [pytest.mark.timeout(300)]


def cli(*args, timeout=240):
    p = subprocess.run([sys.executable, "-m", "pylazymem", *args], capture_output=True,
                       text=True, timeout=timeout, cwd=REPO_DIR)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "s.plm")
    with plm.Region(64 * PAGE_SIZE, max_cluster_pages=1) as r:
        a = r.alloc("data", (16, PAGE_SIZE), np.uint8)
        a[:8] = np.random.default_rng(3).integers(0, 255, (8, PAGE_SIZE), dtype=np.uint8)
        a[8:12] = 5                  # duplicates
        r.mark_working_set()
        a[3, 0] = 1                  # a write to a present page: in the working set
        del a
        plm.checkpoint(r, path)
    return path


def test_features():
    rc, out, err = cli("features")
    f = plm.features()
    assert rc == (0 if f.mode != "unavailable" else 1)
    assert ("mode:          %s" % f.mode) in out
    rc, out, _ = cli("features", "--json")
    assert json.loads(out)["mode"] == f.mode


@pytest.mark.core
@pytest.mark.uffd
def test_inspect_table_and_json(snapshot):
    rc, out, err = cli("inspect", snapshot)
    assert rc == 0, err
    info = plm.inspect(snapshot)
    assert "duplicate" in out and "working set:" in out and "data" in out
    rc, out, err = cli("inspect", snapshot, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["pages_by_class"] == info.pages_by_class
    assert d["working_set"] == [int(x) for x in info.working_set]
    assert d["arrays"]["data"]["shape"] == [16, PAGE_SIZE]


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.mark.core
@pytest.mark.uffd
def test_inspect_plot(snapshot, tmp_path):
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "map.png")
    rc, out, err = cli("inspect", snapshot, "--plot", png)
    assert rc == 0, err
    w, h = png_size(png)
    assert 400 <= w <= 4000 and 300 <= h <= 4000, (w, h)
    assert os.path.getsize(png) > 5000


@pytest.mark.core
@pytest.mark.uffd
def test_inspect_corrupt_snapshot(snapshot, tmp_path):
    bad = tmp_path / "bad.plm"
    data = bytearray(open(snapshot, "rb").read())
    data[40] ^= 0xFF
    bad.write_bytes(bytes(data))
    rc, out, err = cli("inspect", str(bad))
    assert rc == 1
    assert err.startswith("pylazymem: SnapshotError:") and "checksum" in err
    assert len(err.strip().splitlines()) == 1
    rc, out, err = cli("inspect", str(tmp_path / "missing.plm"))
    assert rc == 1 and "no such snapshot file" in err


@pytest.mark.parametrize("args", [(), ("nosuchcommand",), ("inspect",),
                                  ("demo", "--size", "0"), ("demo", "--size", "x"),
                                  ("bench", "nosuchbench")])
def test_usage_errors_exit_2(args):
    rc, out, err = cli(*args)
    assert rc == 2, (rc, out, err)
    assert "error" in err


@pytest.mark.core
@pytest.mark.uffd
def test_demo_small_json():
    rc, out, err = cli("demo", "--size", "32", "--requests", "20", "--warmup", "20", "--json",
                       "--quiet")
    assert rc == 0, err
    d = json.loads(out)
    assert d["summary"]["all_answers_match"] is True
    variants = {r["variant"]: r for r in d["resumes"]}
    assert set(variants) == {"eager", "lazy", "lazy+ws"}
    assert all(r["answers_match"] and r["mismatches"] == 0 for r in variants.values())
    assert variants["lazy+ws"]["prefetched"] == d["process_a"]["working_set_pages"] > 0
    assert variants["eager"]["faults"] == 0 and variants["lazy"]["faults"] > 0
    assert d["process_a"]["snapshot_bytes"] > 0


@pytest.mark.core
@pytest.mark.uffd
def test_demo_table_output():
    rc, out, err = cli("demo", "--size", "16", "--requests", "10", "--warmup", "10")
    assert rc == 0, err
    assert "eager / lazy+ws" in out and "identical" in out
    for v in ("eager", "lazy", "lazy+ws", "resident"):
        assert "\n%s " % v in out


@pytest.mark.core
@pytest.mark.uffd
def test_demo_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    rc, _, err = cli("demo", "--size", "16", "--requests", "10", "--warmup", "10", "--quiet",
                     "--plot", str(out))
    assert rc == 0, err
    for name in ("pagemap.png", "timeline.png"):
        w, h = png_size(str(out / name))
        assert 400 <= w <= 4000 and 300 <= h <= 4000, (name, w, h)


# ---- found by a review (session 15) ---------------------------------------------------------

@pytest.mark.core(reason="checkpoint and save need the compiled core")
@pytest.mark.uffd
def test_writers_refuse_to_replace_a_device_a_fifo_or_a_directory(tmp_path):
    # A snapshot is written beside its path and renamed over it: over a device node that put a
    # regular file in its place (as root, `checkpoint(r, "/dev/null")` replaced the machine's
    # /dev/null).
    import stat as st_
    targets = [str(tmp_path / "fifo")]
    os.mkfifo(targets[0])
    try:
        os.mknod(str(tmp_path / "null"), 0o666 | st_.S_IFCHR, os.makedev(1, 3))
        targets.append(str(tmp_path / "null"))
    except PermissionError:
        pass   # not root: the FIFO alone
    src = str(tmp_path / "s.plm")
    with plm.Region(4 * PAGE_SIZE) as r:
        plm.checkpoint(r, src)
        for t in targets:
            mode = os.stat(t).st_mode
            with pytest.raises(FileExistsError, match="not replacing it"):
                plm.checkpoint(r, t)
            with pytest.raises(FileExistsError, match="not replacing it"):
                plm.save(t, {"a": np.ones(3)})
            rc, out, err = cli("compact", src, t)
            assert rc == 1 and "not replacing it" in err, (rc, err)
            assert os.stat(t).st_mode == mode   # still what it was
        with pytest.raises(IsADirectoryError):
            plm.checkpoint(r, str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".tmp", ".new"))]


def test_serve_refuses_a_fifo_and_bad_numbers_without_hanging(tmp_path):
    fifo = str(tmp_path / "mem")
    os.mkfifo(fifo)
    sock = str(tmp_path / "s.sock")
    for src in ("--memory-file", "--snapshot"):
        rc, out, err = cli("serve", "--socket", sock, src, fifo, timeout=30)   # it hung
        assert rc == 1 and "regular file" in err, (rc, err)
    mem = str(tmp_path / "m.bin")
    with open(mem, "wb") as f:
        f.write(b"\0" * PAGE_SIZE)
    for bad in (["--stats-every", "-1"], ["--stats-every", "nan"], ["--stats-every", "1e308"],
                ["--allow-uid", "-5"], ["--socket-group", "99999999999999"]):
        rc, out, err = cli("serve", "--socket", sock, "--memory-file", mem, *bad, timeout=30)
        assert rc == 2 and "error:" in err, (bad, rc, err)   # argparse's usage error
    rc, out, err = cli("serve", "--socket", str(tmp_path / "no" / "s.sock"), "--memory-file",
                       mem, timeout=30)
    assert rc == 1 and "no/s.sock" in err, err


def test_inspect_pid_of_no_process_and_multi_line_errors(tmp_path):
    rc, out, err = cli("inspect", "--pid", "999999999")
    assert rc == 1 and "no process 999999999" in err and "Traceback" not in err, err
    name = str(tmp_path / "new\nline.plm")
    rc, out, err = cli("inspect", name)
    assert rc == 1 and "line.plm" in err and "\\n" in err, err   # escaped, not cut at \n


@pytest.mark.core(reason="the demo needs the compiled core")
@pytest.mark.uffd
def test_sigterm_to_the_demo_leaves_no_process_and_no_work_directory(tmp_path):
    import glob
    import signal
    import time
    env = dict(os.environ, TMPDIR=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "pylazymem", "demo", "--size", "64",
                          "--quiet"], cwd=REPO_DIR, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / "pylazymem-demo-*" / "state.plm")):
        assert p.poll() is None and time.monotonic() < deadline, "the demo ended early"
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM
    time.sleep(1)
    assert not glob.glob(str(tmp_path / "pylazymem-demo-*")), "work directory left"
    children = []   # processes whose command line names this test's work directory
    for q in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % q, "rb") as f:
                if str(tmp_path).encode() in f.read():
                    children.append(q)
        except OSError:
            pass   # gone meanwhile
    assert not children, children
