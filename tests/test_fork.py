"""fork() in a process that owns regions: the child gets RegionClosedError from every Region
method (regions are MADV_DONTFORK), the parent is unaffected, nothing hangs.
Everything runs in subprocesses (a hang fails the test)."""

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(150)]

SETUP = """
    rng = np.random.default_rng(9)
    page = random_page(rng)
    r = plm.Region(64 * PS, max_cluster_pages=1)
    c = r.canonical(page.tobytes())
    r.defer_fill(0, 32 * PS, c)                 # 0-31 canonical, 32-47 zero, 48-63 EMPTY
    r.defer_fill(32 * PS, 16 * PS, plm.ZERO)
    v = pages(r)
    expected = np.zeros((64, PS), np.uint8)
    expected[:32] = page
    assert np.array_equal(v[0], page)           # some pages present before the fork
    v[40, :8] = 5
    expected[40, :8] = 5

    def child_checks(r, c):
        code = 0
        calls = {
            "stats": lambda: r.stats(),
            "defer_fill": lambda: r.defer_fill(PS, PS, plm.ZERO),
            "materialize": lambda: r.materialize(),
            "signatures": lambda: r.signatures(),
            "canonical": lambda: r.canonical(bytes(PS)),
            "ndarray": lambda: r.ndarray(np.uint8),
        }
        for name, call in calls.items():
            try:
                call()
            except plm.RegionClosedError as e:
                if "parent" not in str(e):
                    print("child: message does not name the parent process:", name, e)
                    code |= 2
            except BaseException as e:
                print("child: wrong exception from", name, repr(e))
                code |= 4
            else:
                print("child: no exception from", name)
                code |= 8
        try:
            memoryview(r)
        except Exception:
            pass
        else:
            print("child: memoryview(r) did not raise")
            code |= 16
        return code

    def child_new_region():
        with plm.Region(8 * PS, max_cluster_pages=1) as r2:   # the child can make its own
            c2 = r2.canonical(page.tobytes())
            r2.defer_fill(0, r2.nbytes, c2)
            assert np.array_equal(pages(r2)[3], page)
            assert np.array_equal(pages(r2)[0], page)

    def parent_verify():
        bad, n = first_bad_pages(v, expected)
        assert n == 0, f"parent: {n} pages wrong after fork, first {bad}"
        assert r.stats()["errors"] == 0
"""


def test_fork_child_gets_region_closed(run_py_ok):
    out = run_py_ok(SETUP + """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = child_checks(r, c)
            child_new_region()
        except BaseException:
            traceback.print_exc()
            code |= 32
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child exit {os.waitstatus_to_exitcode(status)}"
    parent_verify()
    r.defer_fill(0, PS, plm.ZERO)                # the parent's region still works fully
    assert not v[0].any()
    r.close()
    print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK"), out


def test_fork_child_exits_normally(run_py_ok):
    """The child runs interpreter shutdown with the inherited Region object alive (finalizers,
    atexit): it must exit cleanly without touching the parent's serving threads."""
    out = run_py_ok(SETUP + """
    pid = os.fork()
    if pid == 0:
        try:
            r.stats()
        except plm.RegionClosedError:
            pass
        sys.exit(0)                              # normal shutdown; r is collected here
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, os.waitstatus_to_exitcode(status)
    parent_verify()
    r.close()
    print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK"), out


def test_fork_while_faulting(run_py_ok):
    """Forks while another parent thread takes faults; children close their copies and exit
    normally; the parent's contents stay right."""
    out = run_py_ok(SETUP + """
    import warnings
    warnings.simplefilter("ignore", DeprecationWarning)   # fork() with threads (3.12+)
    big = plm.Region(16 << 20)
    big_page = random_page(rng)
    big.defer_fill(0, big.nbytes, big.canonical(big_page.tobytes()))
    bv = pages(big)
    errors = []
    done = threading.Event()

    def reader():
        try:
            order = np.random.default_rng(1).permutation(big.npages)
            for p in order:
                if not np.array_equal(bv[p], big_page):
                    errors.append(int(p))
        except BaseException as e:
            errors.append(repr(e))
        finally:
            done.set()

    t = threading.Thread(target=reader)
    t.start()
    statuses = []
    for i in range(10):
        pid = os.fork()
        if pid == 0:
            try:
                big.close()
                r.close()
                sys.exit(0)
            except plm.RegionClosedError:
                sys.exit(0)
        statuses.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        time.sleep(0.005)
    t.join(60)
    assert not t.is_alive(), "reader thread hung"
    assert statuses == [0] * 10, statuses
    assert not errors, errors[:10]
    parent_verify()
    big.close()
    r.close()
    print("OK")
    """, timeout=90)
    assert out.strip().endswith("OK"), out


def test_fork_child_inherited_view_faults(run_py_ok):
    """Region memory is not inherited (MADV_DONTFORK): a child touching an inherited view
    crashes instead of reading zeros where the parent's deferred contents belong."""
    out = run_py_ok(SETUP + """
    import signal
    pid = os.fork()
    if pid == 0:
        x = int(v[5, 0])                         # deferred canonical page of the parent
        print("child read", x, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
    parent_verify()
    r.close()
    print("OK")
    """, timeout=60)
    assert "child read" not in out, out
    assert out.strip().endswith("OK"), out


def test_fork_child_inherited_view_faults_even_after_the_child_maps_memory(run_py_ok):
    """The child's next mmap used to land on the region's free range, and an inherited view
    then read and wrote that memory silently. The range is held by an inaccessible mapping
    in the child: the access faults."""
    out = run_py_ok(SETUP + """
    import mmap, signal
    pid = os.fork()
    if pid == 0:
        m = mmap.mmap(-1, r.nbytes)             # the child's own memory, same size
        m.write(b"\\x42" * r.nbytes)
        x = int(v[1, 0])
        print("child read", x, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV, status
    parent_verify()
    r.close()
    print("OK")
    """, timeout=60)
    assert "child read" not in out, out
    assert out.strip().endswith("OK"), out


def test_fork_while_another_thread_is_inside_a_call(run_py_ok):
    """A call another parent thread had in progress at fork() (its count, and any lock it held)
    stays in the child: the child's first call waited forever instead of raising
    RegionClosedError."""
    out = run_py_ok(SETUP + """
    import signal
    held, release = threading.Event(), threading.Event()

    def holder():
        with r._use():
            held.set()
            release.wait(30)
    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        try:
            r.stats()
            print("child: stats() worked", flush=True)
        except plm.RegionClosedError:
            print("child: closed", flush=True)
        os._exit(0)
    release.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    r.close()
    print("OK")
    """, timeout=60)
    assert "child: closed" in out and out.strip().endswith("OK"), out


def test_fork_while_another_thread_waits_in_close(run_py_ok):
    """close() in another parent thread, waiting for a call in progress at fork(): its handle
    was in that thread's hands only, so the child neither forgot the region nor gave its range
    up, and memoryview(r) was handed out over memory the child does not have."""
    out = run_py_ok(SETUP + """
    import signal
    held, release = threading.Event(), threading.Event()

    def holder():
        with r._use():
            held.set()
            release.wait(30)
    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    closer = threading.Thread(target=r.close)
    closer.start()
    while not r.closed:   # the close() has taken the handle and waits for the call
        time.sleep(0.001)
    time.sleep(0.05)
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        for what, call in (("memoryview", lambda: memoryview(r)), ("stats", r.stats)):
            try:
                call()
                print("child: %s worked" % what, flush=True)
            except plm.RegionClosedError:
                print("child: %s closed" % what, flush=True)
        with open("/proc/self/maps") as f:   # the range is held, inaccessible
            print("child: held", any(int(l.split("-")[0], 16) == r.address and " ---p " in l
                                     for l in f), flush=True)
        os._exit(0)
    release.set()
    t.join()
    closer.join()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), status
    print("OK")
    """, timeout=60)
    assert "child: memoryview closed" in out and "child: stats closed" in out, out
    assert "child: held True" in out and out.strip().endswith("OK"), out


def test_fork_from_a_signal_handler_inside_close(run_py_ok):
    """The closing thread itself forks (a signal handler run while close() waits for a call
    in progress): the child's fork hook freed the region the close() then went on to tear
    down in the child (a hang or SIGSEGV). The child's close() now returns."""
    out = run_py_ok("""
        import signal
        r = plm.Region(1 << 20)
        r.ndarray(np.uint8)[:] = 1
        held, release = threading.Event(), threading.Event()

        def holder():
            with r._use():
                held.set()
                release.wait(10)
        t = threading.Thread(target=holder)
        t.start()
        held.wait()
        pids = []

        def handler(s, f):
            if pids:
                return
            pid = os.fork()
            if pid == 0:
                signal.alarm(10)
                pids.append(0)
                return          # back into close()'s wait, in the child
            pids.append(pid)
            threading.Timer(0.3, release.set).start()
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        r.close()
        if pids and pids[0] == 0:
            print("child: close() returned", flush=True)
            os._exit(0)
        t.join()
        _, status = os.waitpid(pids[0], 0)
        print("child status", os.waitstatus_to_exitcode(status), flush=True)
        print("OK" if r.closed else "parent not closed")
    """, timeout=60)
    assert "child: close() returned" in out and "child status 0" in out, out
    assert out.strip().endswith("OK"), out
