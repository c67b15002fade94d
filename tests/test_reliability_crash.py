"""Reliability: crash safety of checkpoint() (issue 5).

A child process checkpoints a 256 MiB region to the same path in a loop, one generation after
another (every page holds [generation, page index, fixed pattern]); the parent kills it with
SIGKILL at a random moment (during its first checkpoint, or after 1-2 of them plus a random
delay up to a checkpoint's duration). After every kill:
  - the file at the path passes plm.inspect() and restores (in a subprocess) to exactly one
    generation: the last one the child reported, or the one it was writing when killed
    (never a mixture, never a torn page);
  - once the next child has finished a checkpoint, no temporary file (.NAME.PID.*.tmp) of a
    dead process is left; after a final clean run there are none at all.
Children alternate between a fresh region (every page rewritten each generation) and a lazy
restore of the snapshot at the path itself (only page 0 rewritten; the other pages are
checkpointed from the file that each checkpoint replaces)."""

import os
import queue
import random
import signal
import threading
import time

import pytest

import pylazymem as plm
from _reliability import LONG, kill_tree, last_json, record, start_py

pytestmark = [pytest.mark.core, pytest.mark.uffd_full, pytest.mark.timeout(3600 if LONG else 300)]

NBYTES = 256 << 20
KILLS = 60 if LONG else 8

CHILD = """
import sys, _reliability
_reliability.crash_child(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]),
                         once=sys.argv[5] == "1")
"""
VERIFY = """
import sys, _reliability
_reliability.crash_verify(sys.argv[1])
"""


def tmp_files(d, name):
    return sorted(f for f in os.listdir(d) if f.startswith("." + name + ".")
                  and f.endswith(".tmp"))


def tmp_pid(fname, name):
    return int(fname[len(name) + 2:].split(".", 1)[0])


class Child:
    """A checkpointing child; its stdout lines arrive on a queue (read by a thread)."""

    def __init__(self, path, gen0, mode, once=False):
        self.proc = start_py(CHILD, args=(path, gen0, mode, NBYTES, int(once)))
        self.lines = queue.Queue()
        self.done = []
        self.stderr = []
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines),
                         daemon=True).start()
        threading.Thread(target=lambda: self.stderr.append(self.proc.stderr.read()),
                         daemon=True).start()

    @staticmethod
    def _read(f, q):
        for line in f:
            q.put(line.strip())
        q.put(None)

    def expect(self, what, timeout=60):
        """Wait for the next line starting with `what`; returns its words."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                pytest.fail("child printed no %r within %ss" % (what, timeout), pytrace=False)
            if line is None:
                self.proc.wait()
                time.sleep(0.1)
                pytest.fail("child exited (%s) before %r:\n%s"
                            % (self.proc.returncode, what, "".join(self.stderr)[-4000:]),
                            pytrace=False)
            words = line.split()
            if words[0] == "done":
                self.done.append(int(words[1]))
            if words[0] == what:
                return words

    def kill(self):
        kill_tree(self.proc, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def drain(self):
        """After the child is dead: the 'done' lines it printed before dying."""
        while True:
            try:
                line = self.lines.get(timeout=10)
            except queue.Empty:
                return
            if line is None:
                return
            if line.startswith("done"):
                self.done.append(int(line.split()[1]))


def verify(run_py_ok, path):
    info = plm.inspect(path)                       # the reader accepts it (no lazy memory)
    assert info.npages == NBYTES // info.page_size, info
    assert info.file_bytes == os.path.getsize(path)
    m = last_json(run_py_ok(VERIFY, timeout=120, args=(path,)))
    assert m["bad_pages"] == 0, "torn or foreign pages in the snapshot: %s" % m
    assert m["errors"] == 0, m
    assert m["ngens"] == 1, "pages of several generations mixed: %s" % m
    return m["page0"], m["others"][0]


def test_sigkill_during_checkpoints_leaves_an_intact_snapshot(run_py_ok, tmp_path):
    rnd = random.Random(5)
    name = "state.snap"
    path = str(tmp_path / name)
    # generation 1 (fresh, run to completion): the snapshot every later kill must preserve
    first = Child(path, 1, "fresh", once=True)
    first.expect("done", timeout=120)
    assert first.proc.wait(timeout=60) == 0, "".join(first.stderr)
    state = verify(run_py_ok, path)
    assert state == (1, 1), state
    stats = dict(kills=0, killed_before_first_done=0, dead_tmp_files_seen=0,
                 file_was_new_generation=0, file_was_last_reported=0, checkpoints_reported=0,
                 ckpt_seconds=[])
    t0 = time.monotonic()
    ckpt_time = 0.5
    for it in range(KILLS):
        mode = "fresh" if it % 2 == 0 else "restored"
        gen0 = (it + 2) * 1000
        child = Child(path, gen0, mode)
        pid = child.proc.pid
        child.expect("ready", timeout=120)

        def new_state(g):
            return (g, g) if mode == "fresh" else (g, state[1])

        ndone = (0, 1, 2, 1)[it % 4]
        t_ready = time.monotonic()
        for k in range(ndone):
            child.expect("done", timeout=120)
            if k == 0:
                # the first checkpoint of a new process has swept dead processes' temporaries
                dead = [f for f in tmp_files(tmp_path, name) if tmp_pid(f, name) != pid]
                assert not dead, "temporaries of dead processes left: %s" % dead
                ckpt_time = min(5.0, time.monotonic() - t_ready)
                stats["ckpt_seconds"].append(round(ckpt_time, 3))
        time.sleep(rnd.uniform(0, 1.2 * ckpt_time))
        child.kill()
        child.drain()
        stats["kills"] += 1
        stats["checkpoints_reported"] += len(child.done)
        if not child.done:
            stats["killed_before_first_done"] += 1
            allowed = {state, new_state(gen0)}
        else:
            allowed = {new_state(child.done[-1]), new_state(child.done[-1] + 1)}
        left = [f for f in tmp_files(tmp_path, name) if tmp_pid(f, name) == pid]
        stats["dead_tmp_files_seen"] += len(left)
        got = verify(run_py_ok, path)
        assert got in allowed, ("iteration %d (%s): the snapshot holds generation %s, expected "
                                "one of %s (child reported %s)"
                                % (it, mode, got, sorted(allowed), child.done[-3:]))
        if child.done and got == new_state(child.done[-1]):
            stats["file_was_last_reported"] += 1
        elif got != state:
            stats["file_was_new_generation"] += 1
        state = got
    # a final clean run: its checkpoint removes every dead process's temporary
    last = Child(path, 99999, "fresh", once=True)
    last.expect("done", timeout=120)
    assert last.proc.wait(timeout=60) == 0, "".join(last.stderr)
    assert tmp_files(tmp_path, name) == [], tmp_files(tmp_path, name)
    assert verify(run_py_ok, path) == (99999, 99999)
    stats["seconds"] = round(time.monotonic() - t0, 1)
    record("crash", stats)
    assert stats["dead_tmp_files_seen"] > 0, (
        "no kill landed inside a checkpoint (no temporary left behind): %s" % stats)
