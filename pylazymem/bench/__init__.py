"""pylazymem benchmarks: ``python -m pylazymem.bench [NAME ...] [--quick] [--json]``.

Each benchmark module exposes ``run(quick: bool = False, *, reps=None, file=None) -> dict``; the
dict holds the medians per variant ("rows"), the ratios with their targets ("ratios") and any
problems seen (wrong contents, handler errors).

  fault_service  4K fault service, one Python thread: pylazymem vs a minimal C userfaultfd loop
  template_init  fill 1 GiB with a template page, read 1% of pages: defer_fill vs a numpy copy
  sequential     sequential first touch per page: deferred canonical region vs kernel anonymous pages
"""
BENCHMARKS = ("fault_service", "template_init", "sequential")

__all__ = ["BENCHMARKS", "run"]


def run(names=None, quick: bool = False, **kw) -> dict:
    """Run the named benchmarks (default: all) and return {name: result dict}."""
    import importlib

    out = {}
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        out[name] = importlib.import_module(f"{__name__}.{name}").run(quick, **kw)
    return out
