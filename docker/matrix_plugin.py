"""pytest plugin for docker/matrix_checks.py: records every test's markers and outcome.

Loaded with `-p matrix_plugin`; writes a JSON list to $PYLAZYMEM_MATRIX_REPORT at the end of
the session: [{"nodeid", "markers", "outcome", "reason", "where", "skipped_for"}]. The matrix
uses it to check that tests skip on the *declared* feature: `skipped_for` is the need
(marker) tests/conftest.py skipped the test for, not message text.
"""
import json
import os

_markers = {}
_results = {}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        _markers[item.nodeid] = sorted({m.name for m in item.iter_markers()})


def pytest_runtest_logreport(report):
    rec = _results.setdefault(report.nodeid, {"outcome": "passed", "reason": "", "where": ""})
    if report.skipped:
        rec["outcome"] = "skipped"
        rec["skipped_for"] = dict(report.user_properties).get("skipped_for", "")
        longrepr = report.longrepr
        if isinstance(longrepr, tuple) and len(longrepr) == 3:   # (path, line, reason)
            rec["where"] = "%s:%s" % (longrepr[0], longrepr[1])
            rec["reason"] = str(longrepr[2])
        else:
            rec["reason"] = str(longrepr)
    elif report.failed:
        rec["outcome"] = "failed"
        crash = getattr(report.longrepr, "reprcrash", None)   # where and why it failed
        rec["reason"] = "%s failed%s" % (report.when, ": %s:%s: %s" % (
            crash.path.split("/")[-1], crash.lineno, crash.message) if crash else "")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PYLAZYMEM_MATRIX_REPORT")
    if not path:
        return
    out = [{"nodeid": nodeid, "markers": _markers.get(nodeid, []), **rec}
           for nodeid, rec in _results.items()]
    with open(path, "w") as f:
        json.dump(out, f)
