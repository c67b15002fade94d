#!/usr/bin/env python3
"""Derive "Docker's default seccomp profile + userfaultfd" from an engine's default.json.

    python3 docker/derive_seccomp_profile.py DEFAULT_JSON OUT_JSON

Docker's default profile is an allow-list (defaultAction SCMP_ACT_ERRNO) that does not list
userfaultfd. The derived profile is the same list with one more rule allowing userfaultfd
unconditionally, and userfaultfd removed from any rule that denies it. Nothing else changes,
so a container run with it can do exactly what the default allows, plus userfaultfd.

Where to find DEFAULT_JSON: Docker embeds its default profile in the daemon; the JSON is in the
engine's source (profiles/seccomp/default.json). On Debian it is shipped by the package
golang-github-docker-docker-dev, at
/usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json
(docker/run-matrix.sh fetches that package with `apt-get download` and extracts only this file).
"""
import json
import sys

NAME = "userfaultfd"


def derive(profile):
    if profile.get("defaultAction") != "SCMP_ACT_ERRNO":
        raise SystemExit("expected an allow-list profile (defaultAction SCMP_ACT_ERRNO), got %r"
                         % profile.get("defaultAction"))
    rules = []
    for rule in profile.get("syscalls", []):
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if NAME in names and rule.get("action") != "SCMP_ACT_ALLOW":
            names = [n for n in names if n != NAME]
            if not names:
                continue
            rule = dict(rule, names=names)
            rule.pop("name", None)
        rules.append(rule)
    rules.append({
        "names": [NAME],
        "action": "SCMP_ACT_ALLOW",
        "comment": "pylazymem: userfaultfd without /dev/userfaultfd (user-mode-only unless "
                   "CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1)",
    })
    out = dict(profile)
    out["syscalls"] = rules
    return out


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        profile = json.load(f)
    out = derive(profile)
    with open(argv[1], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("%s: %d rules (+1: allow %s)" % (argv[1], len(out["syscalls"]) - 1, NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
