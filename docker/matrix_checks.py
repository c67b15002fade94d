"""In-container checks of docker/run-matrix.sh: the expected outcome of one matrix case.

    python3 matrix_checks.py CASE [--pytest]

CASE is one of
  full-root       root with --device /dev/userfaultfd: full mode from the device
  full-user       an unprivileged user with the device (entrypoint: PYLAZYMEM_RUN_AS): full mode
  user-mode-only  an unprivileged user, no device, a seccomp profile that allows userfaultfd,
                  vm.unprivileged_userfaultfd=0: user-mode-only; kernel accesses fail with EFAULT
  blocked         Docker's default seccomp profile, no device: unavailable, the message says
                  "blocked by seccomp" and gives the run flags that fix it

With --pytest the test suite runs too (from /app, its markers recorded by matrix_plugin.py) and
the case's expectations on skips are checked; PYLAZYMEM_MATRIX_PYTEST_ARGS adds pytest arguments
(e.g. "-m 'not slow'"). Lines starting with "== " are the digest the host
prints; everything else (pytest's output) goes to the host's log. Exit status 0 means every
expectation held; the last line is "== RESULT <case> PASS|FAIL <summary>".
"""
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# What the "blocked" case's message must contain (features().reason, `pylazymem features`,
# and str(UnavailableError) from Region()). See docs/containers.md.
BLOCKED_PHRASES = ("blocked by seccomp", "--device /dev/userfaultfd", "--security-opt seccomp=")

CASES = ("full-root", "full-user", "user-mode-only", "blocked")

failures = []
notes = []


def say(msg):
    print("== " + msg, flush=True)


def expect(cond, what, detail=""):
    if cond:
        say("ok    " + what)
    else:
        failures.append(what)
        say("FAIL  " + what + (": " + detail if detail else ""))
    return cond


def run(cmd, timeout, **kw):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, **kw)


def features_cli():
    """(exit code, text output, parsed --json output) of `pylazymem features`."""
    text = run(["pylazymem", "features"], 60)
    js = run(["pylazymem", "features", "--json"], 60)
    try:
        data = json.loads(js.stdout)
    except ValueError:
        data = {}
    return text.returncode, text.stdout, data


# A lazy page read by the kernel (os.write from the region into a pipe), in a subprocess so a
# kernel access that is never served cannot hang the check.
KERNEL_ACCESS = r"""
import errno, json, os
import pylazymem as plm
ps = os.sysconf("SC_PAGE_SIZE")
page = bytes((i * 7 + 1) % 251 for i in range(ps))
res = {}
with plm.Region(4 * ps) as r:
    r.defer_fill(0, r.nbytes, r.canonical(page))
    mv = memoryview(r)
    rfd, wfd = os.pipe()
    try:
        n = os.write(wfd, mv[ps:2 * ps])          # the kernel reads a lazy (missing) page
        res["write"] = "served" if n == ps and os.read(rfd, ps) == page else "WRONG BYTES"
    except OSError as e:
        res["write"] = "OSError"
        res["errno"] = errno.errorcode.get(e.errno, str(e.errno))
        res["error"] = str(e)
    res["user_read_ok"] = bytes(mv[ps:2 * ps]) == page      # the program itself reads it fine
    r.materialize(2 * ps, ps)                                # the documented workaround
    n = os.write(wfd, mv[2 * ps:3 * ps])
    res["after_materialize_ok"] = n == ps and os.read(rfd, ps) == page
    res["stats_errors"] = r.stats()["errors"]
print(json.dumps(res))
"""

BLOCKED_REGION = r"""
import json
import pylazymem as plm
try:
    plm.Region(4096)
except plm.UnavailableError as e:
    print(json.dumps({"raised": "UnavailableError", "oserror": isinstance(e, OSError),
                      "message": str(e)}))
except Exception as e:
    print(json.dumps({"raised": type(e).__name__, "message": str(e)}))
else:
    print(json.dumps({"raised": None, "message": ""}))
"""


def py_json(code, timeout=60):
    res = run([sys.executable, "-c", code], timeout)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"crashed": True, "output": res.stdout.strip()[-2000:]}
    return json.loads(lines[-1])


def check_identity(case):
    euid = os.geteuid()
    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
            sysctl = f.read().strip()
    except OSError:
        sysctl = "?"
    dev = "/dev/userfaultfd"
    say("uid=%d seccomp=%s CapEff=%s vm.unprivileged_userfaultfd=%s %s=%s /dev/kvm=%s" % (
        euid, status.get("Seccomp", "?").strip(), status.get("CapEff", "?").strip(), sysctl, dev,
        "rw" if os.access(dev, os.R_OK | os.W_OK) else ("present" if os.path.exists(dev) else "absent"),
        "present" if os.path.exists("/dev/kvm") else "absent"))
    if case in ("full-root", "blocked"):
        expect(euid == 0, "runs as root")
    else:
        expect(euid != 0, "runs as an unprivileged user")
    if case in ("full-root", "full-user"):
        expect(os.access(dev, os.R_OK | os.W_OK), "%s is read-write for this user" % dev)
    else:
        expect(not os.path.exists(dev), "%s is not in the container" % dev)
    if case == "user-mode-only":
        expect(sysctl == "0", "vm.unprivileged_userfaultfd is 0", "it is %s" % sysctl)
    if case == "blocked":
        expect(status.get("Seccomp", "").strip() == "2", "a seccomp filter is active")


def check_features(case):
    rc, text, data = features_cli()
    for line in text.rstrip().splitlines():
        say("  | " + line)
    mode, reason = data.get("mode"), data.get("reason", "")
    if case in ("full-root", "full-user"):
        expect(rc == 0 and mode == "full", "pylazymem features: mode full", "rc=%d mode=%r" % (rc, mode))
        expect(data.get("source") == "/dev/userfaultfd", "source /dev/userfaultfd",
               repr(data.get("source")))
    elif case == "user-mode-only":
        expect(rc == 0 and mode == "user-mode-only", "pylazymem features: mode user-mode-only",
               "rc=%d mode=%r" % (rc, mode))
        expect("EFAULT" in reason and "materialize" in reason,
               "reason says kernel accesses fail with EFAULT and names materialize()", reason)
    else:
        expect(rc == 1, "pylazymem features exits 1", "rc=%d" % rc)
        expect(mode == "unavailable", "mode unavailable", repr(mode))
        for phrase in BLOCKED_PHRASES:
            expect(phrase in text, "features output says %r" % phrase)
    return mode


def check_kernel_access(case):
    res = py_json(KERNEL_ACCESS)
    say("kernel access check: %s" % json.dumps(res, sort_keys=True))
    if res.get("crashed"):
        expect(False, "kernel access check ran", res.get("output", ""))
        return
    expect(res.get("user_read_ok") is True, "the program reads a lazy page correctly")
    if case == "user-mode-only":
        expect(res.get("write") == "OSError" and res.get("errno") == "EFAULT",
               "os.write() from a lazy page fails with EFAULT", json.dumps(res))
    else:
        expect(res.get("write") == "served", "os.write() from a lazy page is served (full mode)",
               json.dumps(res))
    expect(res.get("after_materialize_ok") is True, "os.write() after materialize() is correct")
    expect(res.get("stats_errors") == 0, "no serving errors")


def check_blocked_region():
    res = py_json(BLOCKED_REGION)
    say("Region(4096): %s: %s" % (res.get("raised"), res.get("message")))
    if res.get("crashed"):
        expect(False, "Region(4096) check ran", res.get("output", ""))
        return
    expect(res.get("raised") == "UnavailableError" and res.get("oserror") is True,
           "Region(4096) raises UnavailableError (an OSError)", json.dumps(res))
    for phrase in BLOCKED_PHRASES:
        expect(phrase in res.get("message", ""), "UnavailableError message says %r" % phrase)


def run_pytest(case):
    fd, report = tempfile.mkstemp(prefix="matrix-", suffix=".json")
    os.close(fd)
    env = dict(os.environ, PYLAZYMEM_MATRIX_REPORT=report,
               PYTHONPATH=os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    extra = shlex.split(os.environ.get("PYLAZYMEM_MATRIX_PYTEST_ARGS", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "matrix_plugin",
           "-rfEs", *extra, "tests"]
    say("$ " + shlex.join(cmd[2:]))
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd="/app", env=env, timeout=1800)   # output straight to the log
    secs = time.monotonic() - t0
    try:
        with open(report) as f:
            recs = json.load(f)
    except (OSError, ValueError):
        recs = []
    counts = {}
    for r in recs:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = ", ".join("%d %s" % (n, k) for k, n in sorted(counts.items())) or "no tests"
    say("pytest: exit %d, %s in %.1fs" % (proc.returncode, summary, secs))
    notes.append("%s (%.0fs)" % (summary, secs))
    failed = [r for r in recs if r["outcome"] == "failed"]
    # The failures first and named in the verdict: CI shows only the head and tail of a long
    # digest, and a failure listed after the skip reasons was cut from it.
    for r in failed:
        say("  failed       %s: %s" % (r["nodeid"], re.sub(r"\s+", " ", r["reason"])[-600:]))
    expect(proc.returncode == 0, "the test suite passes", "pytest exit %d%s" % (
        proc.returncode, "; failed: " + ", ".join(r["nodeid"] for r in failed[:3]) if failed else ""))
    expect(counts.get("passed", 0) > 0, "tests ran")

    def has(r, m):
        return m in r["markers"]

    def by_marker(r):   # skipped by tests/conftest.py because of its uffd/uffd_full marker
        return r["outcome"] == "skipped" and r.get("skipped_for") in ("uffd", "uffd_full")

    uffd_tests = [r for r in recs if has(r, "uffd") or has(r, "uffd_full")]
    full_tests = [r for r in recs if has(r, "uffd_full")]
    skipped = [r for r in recs if r["outcome"] == "skipped"]
    reasons = {}
    for r in skipped:
        key = "%s: %s" % (r["where"].split("/")[-1], re.sub(r"\s+", " ", r["reason"]))
        key = key.replace("Skipped: ", "")[:140]
        reasons[key] = reasons.get(key, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        say("  skipped %3d  %s" % (n, reason))
    if case in ("full-root", "full-user"):
        bad = [r["nodeid"] for r in uffd_tests if by_marker(r)]
        expect(not bad, "no test is skipped for its uffd/uffd_full marker (%d marked tests)"
               % len(uffd_tests), ", ".join(bad[:5]))
    elif case == "user-mode-only":
        ran = [r for r in uffd_tests if not has(r, "uffd_full") and r["outcome"] == "passed"]
        expect(len(ran) > 0, "tests marked uffd run in user-mode-only mode (%d passed)" % len(ran))
        not_skipped = [r["nodeid"] for r in full_tests if not by_marker(r)]
        expect(full_tests and not not_skipped,
               "every test marked uffd_full (kernel accesses) skips on the declared feature "
               "(%d tests)" % len(full_tests), ", ".join(not_skipped[:5]))
    else:
        not_skipped = [r["nodeid"] for r in uffd_tests if not by_marker(r)]
        expect(uffd_tests and not not_skipped,
               "every test marked uffd/uffd_full skips on the declared feature (%d tests)"
               % len(uffd_tests), ", ".join(not_skipped[:5]))
    os.unlink(report)


def main(argv):
    if not argv or argv[0] not in CASES:
        print(__doc__, file=sys.stderr)
        return 2
    case = argv[0]
    t0 = time.monotonic()
    check_identity(case)
    mode = check_features(case)
    if case == "blocked":
        check_blocked_region()
    elif mode in ("full", "user-mode-only"):
        check_kernel_access(case)
    if "--pytest" in argv[1:]:
        run_pytest(case)
    verdict = "FAIL" if failures else "PASS"
    detail = ("failed: " + "; ".join(failures)) if failures else "all expectations held"
    say("RESULT %s %s mode=%s %s%s (%.0fs)" % (case, verdict, mode, detail,
                                              (" | pytest: " + notes[0]) if notes else "",
                                              time.monotonic() - t0))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
