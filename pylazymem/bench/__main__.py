"""python -m pylazymem.bench [NAME ...] [--quick] [--json] [--reps N]"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

from . import BENCHMARKS


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "item") and callable(o.item):  # numpy scalars
        return o.item()
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pylazymem.bench", description=__doc__)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default all): {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="smaller regions, fewer repetitions")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (tables go to stderr)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per variant (default: 7, quick: 5)")
    a = p.parse_args(argv)
    for n in a.names:
        if n not in BENCHMARKS:
            p.error(f"unknown benchmark {n!r}; choose from {', '.join(BENCHMARKS)}")
    names = a.names or list(BENCHMARKS)
    out = sys.stderr if a.json else sys.stdout

    results = {}
    for i, name in enumerate(names):
        if i:
            print(file=out)
        t0 = time.perf_counter()
        results[name] = importlib.import_module(f"{__package__}.{name}").run(a.quick, reps=a.reps, file=out)
        print(f"# {name} took {time.perf_counter() - t0:.1f} s", file=out)
        out.flush()

    print(file=out)
    print("# summary", file=out)
    for name, res in results.items():
        for r in res["ratios"].values():
            print(f"SUMMARY {name}.{r['name']} = {r['value']:.3f}x (target {r['op']} {r['target']}x) "
                  f"{'PASS' if r['ok'] else 'MISS'}", file=out)
        for prob in res.get("problems", []):
            print(f"SUMMARY {name} PROBLEM {prob}", file=out)
    if a.json:
        json.dump(_jsonable(results), sys.stdout, indent=1)
        print()
    return 1 if any(res.get("problems") for res in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
