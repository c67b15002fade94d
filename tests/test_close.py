"""close() racing with other threads: no hang, no wrong data. Run in subprocesses.

Documented lifetime (docs/design.md, "Lifetimes"): close() waits for calls in progress; with no
view left it stops serving and unmaps the memory while still registered; views that outlive
close() keep the memory valid, with its contents, and served, until the last one goes (issue 10,
case 1: a stale view used to kill the interpreter with SIGSEGV)."""

import signal
import textwrap

import pytest

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]


@pytest.mark.parametrize("region_kw", ["{}", "{'max_cluster_pages': 1}"])
def test_close_while_threads_fault(run_py, region_kw):
    res = run_py(f"""
        rng = np.random.default_rng(12)
        page = random_page(rng)
        r = plm.Region(32 << 20, **{region_kw})
        r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
        v = pages(r)
        start = threading.Barrier(5)
        counts = [0] * 4

        def reader(t):
            start.wait()
            for p in np.random.default_rng(t).permutation(r.npages):
                if not np.array_equal(v[p], page):
                    print("BAD", t, int(p), flush=True)
                counts[t] += 1

        ts = [threading.Thread(target=reader, args=(t,)) for t in range(4)]
        for t in ts:
            t.start()
        start.wait()
        time.sleep(0.05)
        print("closing", counts, flush=True)
        r.close()
        print("closed", flush=True)
        r.close()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts), "a faulting thread hung after close()"
        print("OK", counts)
    """, timeout=90)
    assert "BAD" not in res.stdout, res.describe()
    assert "closing" in res.stdout, res.describe()
    # The readers either all finished before close() or one touched the closed range: SIGSEGV.
    assert res.returncode in (0, -signal.SIGSEGV), res.describe()
    if res.returncode == 0:
        assert "OK" in res.stdout, res.describe()


def test_view_outliving_close_stays_valid(run_py_ok):
    """Issue 10, case 1: `r.close(); a[0]` with an array of the region still alive used to kill
    the interpreter (SIGSEGV). The view keeps the memory valid and served, with the right bytes,
    until it goes; then the region is torn down (memory unmapped, serving threads gone)."""
    out = run_py_ok("""
        def threads():
            return len(os.listdir("/proc/self/task"))

        def mapped(addr):
            with open("/proc/self/maps") as f:
                return any(int(l.split("-")[0], 16) == addr for l in f)

        base_threads = threads()
        page = random_page(np.random.default_rng(1))
        r = plm.Region(1 << 20, max_cluster_pages=1)
        r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
        a = r.ndarray(np.uint8)
        v = pages(r)
        assert np.array_equal(v[1], page)
        addr = r.address
        r.close()
        assert r.closed
        assert int(a[0]) == int(page[0])                 # the issue's reproducer
        assert np.array_equal(v[5], page)                # never touched before close: served
        assert all(np.array_equal(v[p], page) for p in range(r.npages))
        v[3, :] = 7                                      # writable too, like any live array
        assert int(a[3 * PS]) == 7
        for call in (lambda: memoryview(r), lambda: r.ndarray(np.uint8), lambda: r.stats(),
                     lambda: r.signatures()):
            try:
                call()
            except plm.RegionClosedError:
                pass
            else:
                raise AssertionError("a closed region gave something out")
        assert mapped(addr) and threads() > base_threads
        del a
        assert mapped(addr), "a view is still alive"
        del v
        import gc; gc.collect()
        assert not mapped(addr), "the last view is gone: the memory must be unmapped"
        assert threads() == base_threads, (threads(), base_threads)
        r.close()                                        # still idempotent
        print("OK")
    """, timeout=60)
    assert out.strip().endswith("OK")


def test_view_released_while_exception_propagates(run_py_ok):
    """The last view may go while an exception unwinds (a frame holding it): the teardown runs
    and the exception arrives intact."""
    out = run_py_ok("""
        r = plm.Region(16 * PS)
        r.defer_fill(0, r.nbytes, plm.ZERO)

        def use():
            a = r.ndarray(np.uint8)
            int(a[PS])
            r.close()
            raise KeyError("mine")

        try:
            use()
        except KeyError as e:
            assert e.args == ("mine",), e.args
        assert r.closed
        print("OK")
    """, timeout=30)
    assert out.strip().endswith("OK")


def test_fork_child_with_view_of_closed_region(run_py_ok):
    """A region closed while a view lives, then fork(): the child forgets it (its memory is
    not inherited) without unmapping anything of its own; the parent's view still works."""
    out = run_py_ok("""
        page = random_page(np.random.default_rng(3))
        r = plm.Region(16 * PS)
        r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
        v = pages(r)
        r.close()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if r.closed else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        assert np.array_equal(v[9], page)
        print("OK")
    """, timeout=30)
    assert out.strip().endswith("OK")


def test_close_waits_for_call_in_progress(run_py_ok):
    """close() from one thread while another runs materialize() (GIL released) on 256 MiB."""
    out = run_py_ok("""
        page = random_page(np.random.default_rng(2))
        r = plm.Region(256 << 20)
        r.defer_fill(0, r.nbytes, r.canonical(page.tobytes()))
        result = []

        def work():
            try:
                r.materialize()
                result.append("done")
            except plm.RegionClosedError:
                result.append("closed")
            except BaseException as e:
                result.append(repr(e))

        t = threading.Thread(target=work)
        t.start()
        time.sleep(0.01)
        r.close()
        t.join(60)
        assert not t.is_alive(), "materialize() hung"
        assert result in (["done"], ["closed"]), result
        assert r.closed
        print("OK", result[0])
    """, timeout=90)
    assert "OK" in out


def test_close_with_handler_stopped(run_py_ok):
    out = run_py_ok("""
        r = plm.Region(1 << 20)
        r.defer_fill(0, r.nbytes, plm.ZERO)
        r.handler.stop()
        r.close()
        assert r.closed and not r.handler.is_alive()
        print("OK")
    """, timeout=30)
    assert out.strip().endswith("OK")


def test_close_from_a_signal_handler_during_a_call_does_not_deadlock(run_py):
    # A SIGTERM handler that closes the region runs on the main thread while that thread is
    # inside a call of the region (materialize, GIL released in the core): close() waited for
    # that call, i.e. for itself. The call ends, then the region closes.
    res = run_py("""
        import signal
        # copied page by page by the core (not kernel-served chunks): a long call
        r = plm.Region(256 << 20, share_canonical=False)
        r.defer_fill(0, r.nbytes, r.canonical(bytes(range(256)) * (PS // 256)))
        closed_in_handler = []

        def on_term(sig, frame):
            r.close()
            closed_in_handler.append(r.closed)
        signal.signal(signal.SIGTERM, on_term)
        threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGTERM)).start()
        try:
            r.materialize()
            print("materialize returned", flush=True)
        except plm.RegionClosedError:
            print("materialize saw the close", flush=True)
        time.sleep(0.3)
        print("handler ran:", closed_in_handler, "closed:", r.closed, flush=True)
        print("OK")
    """, timeout=60)
    assert res.returncode == 0, res.describe()
    assert "OK" in res.stdout and "closed: True" in res.stdout, res.describe()


def test_an_interrupted_close_can_be_called_again(run_py):
    # KeyboardInterrupt while close() waits for a call in progress: the region was marked
    # closed already, so nothing ever freed its threads and descriptors.
    res = run_py("""
        import signal
        r = plm.Region(4 << 20)
        use = r._use()
        entered, leave = threading.Event(), threading.Event()

        def call_in_progress():
            with use:
                entered.set()
                leave.wait(30)
        t = threading.Thread(target=call_in_progress)
        t.start()
        entered.wait(30)
        signal.signal(signal.SIGALRM, signal.default_int_handler)
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        try:
            r.close()
            print("close returned", flush=True)
        except KeyboardInterrupt:
            print("interrupted; closed:", r.closed, flush=True)
        leave.set()
        t.join()
        r.close()
        print("closed after all:", r.closed, "serving:", r.handler.is_alive())
    """, timeout=60)
    assert res.returncode == 0, res.describe()
    assert "interrupted; closed: False" in res.stdout, res.describe()
    assert "closed after all: True serving: False" in res.stdout, res.describe()


def test_a_view_of_a_region_closed_while_its_handler_was_stopped_is_still_served(run_py):
    res = run_py("""
        r = plm.Region(4 << 20, share_canonical=False)   # first touches come to the handler
        r.defer_fill(0, r.nbytes, r.canonical(b"\\x07" * PS))
        a = r.ndarray(np.uint8)
        r.handler.stop()
        r.close()                 # views are left: the memory stays mapped, and served
        signal_free = int(a[12345])
        print("read", signal_free, flush=True)
    """, timeout=60)
    assert res.returncode == 0, res.describe()
    assert "read 7" in res.stdout, res.describe()


def test_a_region_in_a_reference_cycle_with_its_views_is_collected(run_py):
    # r -> holder -> memoryview -> r: the garbage collector runs the region's __del__ (close:
    # views left, teardown deferred) and then clears the cycle, the region's attributes
    # possibly before the view; the teardown read them and failed, so the region's threads,
    # uffd and memory stayed until exit. Another finalizer of the cycle may still read the
    # view after the region's __del__: its bytes must be there.
    res = run_py("""
        import gc
        def fds(): return len(os.listdir("/proc/self/fd"))
        def threads(): return len(os.listdir("/proc/self/task"))
        class Holder:
            def __del__(self):
                print("holder read", self.mv[5 * PS], flush=True)
        gc.collect()
        before = (fds(), threads())
        for i in range(5):
            r = plm.Region(4 << 20)
            r.defer_fill(0, r.nbytes, r.canonical(b"\\x07" * PS))
            h = Holder()
            h.mv = memoryview(r)
            r.holder = h
            r.views = [memoryview(r)[PS:], memoryview(r)]
            r.arr = r.ndarray(np.uint8)   # numpy arrays are invisible to the collector:
            r.arrays2 = {"x": pages(r)}   # views must not reference the region at all
            del r, h
            gc.collect()
        print("left", fds() - before[0], threads() - before[1], flush=True)
    """, timeout=60)
    assert res.returncode == 0, res.describe()
    assert res.stdout.count("holder read 7") == 5, res.describe()
    assert "left 0 0" in res.stdout, res.describe()
    assert "Exception ignored" not in res.stderr, res.describe()


def test_a_region_dropped_while_views_live_is_torn_down_by_its_last_view(run_py):
    # The region object goes first (nothing names it), its views later: the memory stays
    # served until then, and the last view's release frees everything. A fork child in
    # between forgets the parent's teardown (runs none of it) and faults on the view.
    res = run_py("""
        import gc, signal
        def fds(): return len(os.listdir("/proc/self/fd"))
        def threads(): return len(os.listdir("/proc/self/task"))
        def mapped(addr):
            with open("/proc/self/maps") as f:
                return any(int(l.split("-")[0], 16) == addr for l in f)
        before = (fds(), threads())
        r = plm.Region(4 << 20)
        r.defer_fill(0, r.nbytes, r.canonical(b"\\x09" * PS))
        a, addr = r.ndarray(np.uint8), r.address
        del r
        gc.collect()
        assert int(a[3 * PS + 1]) == 9 and mapped(addr)
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGSEGV, signal.SIG_DFL)
            gc.collect()
            int(a[5 * PS])      # not this process's memory: must fault, never hang
            os._exit(3)
        _, status = os.waitpid(pid, 0)
        print("child", status & 0x7f == signal.SIGSEGV, flush=True)
        assert int(a[7 * PS]) == 9
        del a
        print("left", fds() - before[0], max(0, threads() - before[1]), mapped(addr),
              flush=True)   # (a thread of the harness may end meanwhile: fewer is fine)
    """, timeout=60)
    assert res.returncode == 0, res.describe()
    assert "child True" in res.stdout, res.describe()
    assert "left 0 0 False" in res.stdout, res.describe()


_INTERRUPT_AT_EACH_POINT = """
    import dis, sys, tempfile
    pkg = os.path.dirname(plm.__file__)
    # where CPython 3.11+ checks for pending signals: RESUME (a frame's entry), and after
    # CALL, CALL_FUNCTION_EX and JUMP_BACKWARD
    DELIVERED_AFTER = ("ENTRY", "CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD")
    _ops = {}

    def opnames(code):
        if code not in _ops:
            _ops[code] = {i.offset: i.opname for i in dis.get_instructions(code)}
        return _ops[code]

    def interrupt_at(n, call, r):
        # raise KeyboardInterrupt at the n-th point of the package's code where CPython could
        # (this thread only); True when it was raised
        seen = [0]

        def tracer(frame, event, arg):
            if not frame.f_code.co_filename.startswith(pkg):
                return None
            frame.f_trace_opcodes = True
            ops = opnames(frame.f_code)
            prev = ["ENTRY"]

            def local(frame, event, arg):
                if event == "opcode":
                    if prev[0] in DELIVERED_AFTER:
                        seen[0] += 1
                        if seen[0] == n:
                            raise KeyboardInterrupt
                    prev[0] = ops.get(frame.f_lasti, "?")
                return local
            return local

        sys.settrace(tracer)
        try:
            call(r)
        except KeyboardInterrupt:
            return True
        finally:
            sys.settrace(None)
        return False

    def close_returns(r, what):
        t = threading.Thread(target=r.close, daemon=True)
        t.start()
        t.join(30)
        if t.is_alive() or not r.closed:
            print("HANG" if t.is_alive() else "OPEN", what, flush=True)
            os._exit(3)

    def each_point(name, make, call):
        n = 1
        while True:
            r = make()
            hit = interrupt_at(n, call, r)
            close_returns(r, "%s %d" % (name, n))
            r.close()   # again: returns at once
            if not hit:
                break
            n += 1
        print("ok", name, n, flush=True)
"""


@pytest.mark.timeout(600)
def test_an_interrupt_anywhere_in_a_call_leaves_close_working(run_py):
    """A KeyboardInterrupt is raised where CPython runs signal handlers: at a function's entry
    and after a call or a backward jump. Raised at each such point of the package's Python
    code during a call in turn (a trace function raising it at the n-th one), it must never
    leave the call counted in: close() afterwards returns at once instead of waiting for a
    call that is not running. (The count was kept by a context manager written in Python: an
    interrupt at its __exit__'s entry, or after a call inside its __enter__, left it off.)"""
    res = run_py(textwrap.dedent(_INTERRUPT_AT_EACH_POINT) + textwrap.dedent("""
        calls = {
            "stats": lambda r: r.stats(),
            "dirty_pages": lambda r: r.dirty_pages(),
            "signatures": lambda r: r.signatures(0, 8 * r.page_size),
            "materialize": lambda r: r.materialize(0, 4 * r.page_size),
            "handler.is_alive": lambda r: r.handler.is_alive(),
            "close": lambda r: r.close(),
        }
        for name, call in calls.items():
            each_point(name, lambda: plm.Region(1 << 20), call)
        print("DONE", flush=True)
    """), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DONE" in res.stdout and "HANG" not in res.stdout, res.stdout


@pytest.mark.background_checkpoint
@pytest.mark.timeout(600)
def test_an_interrupt_anywhere_in_starting_a_background_checkpoint_leaves_close_working(
        run_py, tmp_path):
    """The same for checkpoint(background=True), whose call is counted on the calling thread
    and counted out on the checkpoint's: interrupted at any point of starting it, the region
    still closes (close() waits for a checkpoint that did start), and its file is whole or
    absent."""
    res = run_py(textwrap.dedent(_INTERRUPT_AT_EACH_POINT) + textwrap.dedent("""
        d = sys.argv[1]

        def make():
            r = plm.Region(64 * PS)
            pages(r)[:8] = 7
            return r

        def bg(r):
            h = plm.checkpoint(r, os.path.join(d, "b.plm"), background=True)
            h.wait()

        each_point("checkpoint(background=True)", make, bg)
        print("DONE", flush=True)
    """), timeout=600, args=(str(tmp_path),))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DONE" in res.stdout, res.stdout


def test_the_gates_hooks_raise_their_own_errors_and_count_out():
    """The Gate (csrc/pybuffer.c) alone: a hook that raises (here KeyboardInterrupt) gets its
    exception through unchanged, and the call is counted out all the same; a hold is counted
    until released or freed; a second close() returns at once."""
    import pylazymem as plm
    from pylazymem._buffer import Gate

    g = Gate()
    g.open("lm")

    def on_error():
        raise KeyboardInterrupt("in on_error")

    g.set_hooks(None, ValueError, on_error)
    with pytest.raises(KeyboardInterrupt, match="in on_error"):
        with g:
            raise ValueError("the call's")
    assert (g.users, g.mine) == (0, 0)

    def on_enter(lm):
        raise KeyboardInterrupt("in on_enter")

    g.set_hooks(on_enter, None, None)
    with pytest.raises(KeyboardInterrupt, match="in on_enter"):
        with g:
            pytest.fail("the call ran although on_enter raised")
    assert (g.users, g.mine) == (0, 0)
    with g.quiet() as lm:   # no on_enter
        assert lm == "lm" and (g.users, g.mine) == (1, 1)
    h = g.hold()   # this thread's call until another thread adopts it
    assert (g.users, g.mine) == (1, 1) and h.lm == "lm"
    h.adopt()
    assert (g.users, g.mine) == (1, 0)
    h.release()
    h.release()   # once
    assert (g.users, g.mine) == (0, 0) and h.lm is None
    h = g.hold()
    del h
    assert (g.users, g.mine) == (0, 0)
    done = []
    assert g.close("closed for the test", lambda lm: done.append(lm)) is None
    assert done == ["lm"] and g.lm is None
    assert g.close("again", lambda lm: done.append(lm)) is None and done == ["lm"]
    with pytest.raises(plm.RegionClosedError, match="closed for the test"):
        with g:
            pass


@pytest.mark.parametrize("how", ["load", "close"])
def test_a_restored_regions_view_outliving_the_region_reads_the_snapshot(run_py_ok, how, tmp_path):
    """The restore's page table (which the core reads, not copies, until every page is
    filled) went with the region object: `y = plm.load(p)["a"]`, the region collected, then
    y's untouched pages read other memory's bytes as entries (wrong data or SIGBUS)."""
    run_py_ok("""
        import gc, sys
        path = sys.argv[1]
        a = np.arange(4 << 20, dtype=np.float64)              # 32 MiB
        plm.save(path, {"a": a})
        if sys.argv[2] == "load":
            y = plm.load(path, prefetch="none", background=False)["a"]
        else:
            st = plm.load(path, prefetch="none", background=False)
            y = st["a"]
            st.close()
            del st
        gc.collect()
        # reuse what was freed: a freed table reads as these words
        junk = [np.full(y.size * 8 // 4096, 5, "<u4") for _ in range(20)]
        assert np.array_equal(y, a)
    """, args=(str(tmp_path / "s.plm"), how), timeout=90)
