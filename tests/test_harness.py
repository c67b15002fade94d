"""The harness itself: run_py must turn a hang into a test failure and leave no process behind."""

import os
import signal
import time

import pytest


def test_run_py_reports_output_and_status(run_py):
    res = run_py("import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)",
                 prelude=False)
    assert res == (3, "out\n", "err\n")


def test_run_py_fails_on_timeout_and_kills_the_group(run_py, tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as ei:
        run_py(f"""
            import os, time
            pid = os.fork()
            if pid == 0:
                time.sleep(100)
                os._exit(0)
            open({str(pidfile)!r}, "w").write(str(pid))
            print("started", flush=True)
            time.sleep(100)
        """, timeout=2, prelude=False)
    assert time.monotonic() - t0 < 30
    assert "timed out" in str(ei.value) and "started" in str(ei.value)
    gpid = int(pidfile.read_text())
    for _ in range(100):                      # the forked grandchild is gone too
        try:
            os.kill(gpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(gpid, signal.SIGKILL)
        pytest.fail("grandchild survived the timeout")


@pytest.mark.core
@pytest.mark.uffd
@pytest.mark.timeout(60)
def test_run_py_kills_a_process_stuck_in_a_fault(run_py):
    """A real hang: the handler is stopped and the main thread touches a lazy page."""
    with pytest.raises(pytest.fail.Exception) as ei:
        run_py("""
            r = plm.Region(4 * PS)
            r.defer_fill(0, r.nbytes, plm.ZERO)
            r.handler.stop()
            print("touching", flush=True)
            memoryview(r)[0]
            print("not reached")
        """, timeout=3)
    msg = str(ei.value)
    stdout = msg.split("--- stdout ---")[1].split("--- stderr ---")[0]
    assert "timed out" in msg and "touching" in stdout and "not reached" not in stdout, msg
