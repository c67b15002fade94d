"""The pylazymem command line: ``pylazymem features`` and ``pylazymem bench``.

Exit codes: 0 success, 1 the operation failed, 2 usage error. Errors go to stderr on one line.
"""
import argparse
import dataclasses
import json
import sys


def _features(args):
    from ._features import features

    f = features()
    if args.json:
        print(json.dumps(dataclasses.asdict(f), indent=1))
    else:
        print("mode:          %s" % f.mode)
        print("source:        %s" % (f.source or "-"))
        print("api features:  0x%x" % f.api_features)
        for name in ("has_wp", "has_wp_async", "has_minor_shmem", "has_poison", "has_move"):
            print("%-14s %s" % (name[4:] + ":", "yes" if getattr(f, name) else "no"))
        if f.reason:
            print("reason:        %s" % f.reason)
    return 0 if f.mode != "unavailable" else 1


def _bench(args):
    from .bench.__main__ import main as bench_main

    argv = list(args.names) + (["--quick"] if args.quick else []) + (["--json"] if args.json else [])
    return bench_main(argv)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="pylazymem", description="Lazy memory on userfaultfd.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("features", help="what this machine and build support, and the fixes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_features)
    p = sub.add_parser("bench", help="run the benchmarks and print their ratio tables")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # one line with the reason; the library's messages name the fix
        print("pylazymem: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
