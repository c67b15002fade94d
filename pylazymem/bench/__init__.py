"""pylazymem benchmarks: ``python -m pylazymem.bench [NAME ...] [--quick] [--json]``.

Each benchmark module exposes ``run(quick: bool = False, *, reps=None, file=None) -> dict``; the
dict holds the medians per variant ("rows"), the ratios with their targets ("ratios") and any
problems seen (wrong contents, handler errors).

  fault_service  4K fault service, one Python thread: pylazymem vs a minimal C userfaultfd loop
  template_init  fill 1 GiB with a template page, read 1% of pages: defer_fill vs a numpy copy
  sequential     sequential first touch per page: deferred canonical region vs kernel anonymous pages,
                 4 KiB pages and transparent huge pages, ratios to both side by side
  reap           REAP scenario, 1 GiB state: eager np.load and np.load(mmap_mode="r") vs lazy restore
                 (no prefetch / working-set prefetch) vs state already in memory; cold and warm page
                 cache; a uniform 10% workload recorded and replayed, and a Zipf-chunk workload recorded
                 on one sample and timed on another
  restore_none   time for restore(prefetch="none") of a 1 GiB snapshot to return, and close()
  restore_default  time for restore(path) with its default arguments (working-set prefetch, background
                 fill) to return, and until the fill is done, beside prefetch="none", same snapshots
  restore_sequential  sequential read of a lazily restored region, per page, vs kernel first touch
                 (4 KiB pages and transparent huge pages)
  checkpoint     checkpoint of 1 GiB (50% zero, 25% duplicate, 25% unique pages) vs np.save: time and size
  server         4K fault service through a page server process (native, Python thread, Python
                 page provider) vs in-process serving
  shared         restore(share=True) across spawned processes (issue 11): Pss of 8 processes sharing
                 one snapshot vs np.load(mmap_mode="r"/"c") and private restores; second process vs
                 first vs np.load(mmap_mode="r"); template fill; REAP with a shared first restore
  arrays         named tensors (issue 14), 2 GiB in 200 arrays: plm.save/plm.load vs safetensors,
                 np.load(mmap_mode="r") and torch.load: time to the first inference, time until all
                 resident, Pss of 4 processes loading the same state
  incremental    checkpoint(parent=) of 1 GiB after 2% of pages were written vs the full checkpoint
                 before it (issue 12): time and file size, with and without dirty tracking
  compress       compressed snapshots (issue 12): plm.save(compress=None/zstd/lz4) beside
                 np.savez_compressed and zstd over the raw bytes, on a trained scikit-learn MLP's
                 weights, the stdlib's sources as text and a sparse float array: size, save time,
                 load time (prefetch all)
  bgckpt         checkpoint(background=True) of 1 GiB while a native or a Python thread stores to random
                 pages (issue 12): the pause, the writer's store rate and longest stall beside its rate
                 without a checkpoint, the synchronous checkpoint; the pause at 256 MiB, 1 GiB, 4 GiB
  reap_compressed  the REAP flow (Zipf workload, working set recorded on another sample) over a zstd
                 snapshot of 1 GiB of text vs eager np.load, cold page cache (issue 12); the
                 uniform REAP flow of issue 3 beside it
  objstore       snapshots in an S3 bucket (issue 13; needs the gateway of scripts/s3-server.sh):
                 lazy restore vs download-then-restore, warm chunk cache vs a local file, 4
                 machines at once (bytes fetched vs needed), the upload of a 90%-shared snapshot
"""
BENCHMARKS = ("fault_service", "template_init", "sequential", "reap", "restore_none", "restore_default",
              "restore_sequential", "checkpoint", "server", "shared", "arrays", "incremental", "compress",
              "bgckpt", "reap_compressed", "objstore")

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
