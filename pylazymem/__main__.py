"""The pylazymem command line.

    pylazymem features [--json]
    pylazymem inspect SNAPSHOT [--json] [--plot FILE.png]
    pylazymem inspect --pid PID [--json]
    pylazymem compact SNAPSHOT OUT
    pylazymem push SNAPSHOT s3://BUCKET/PREFIX [--name NAME] [--chunk-size BYTES] [--json]
    pylazymem pull s3://BUCKET/PREFIX/NAME OUT
    pylazymem demo [--size MiB] [--requests N] [--json] [--quiet]
    pylazymem bench [NAME ...] [--quick] [--json]
    pylazymem serve --socket PATH (--memory-file FILE | --snapshot FILE) [--allow-uid UID ...]
                    [--socket-group GID] [--engine auto|c|python] [--stats-every SECONDS]
                    [--share [--prefetch-pool]]

Exit codes: 0 success, 1 the operation failed, 2 usage error. Errors go to stderr on one line,
with the fix where there is one.
"""
import argparse
import dataclasses
import json
import math
import os
import sys


def _features(args):
    from ._features import features

    import pylazymem

    f = features()
    if args.json:
        d = dataclasses.asdict(f)
        d["backend"] = pylazymem.backend
        d["backend_features"] = dataclasses.asdict(pylazymem.backend_features)
        print(json.dumps(d, indent=1))
    else:
        bf = pylazymem.backend_features
        print("backend:       %s%s" % (pylazymem.backend, " (%s)" % bf.reason if bf.reason
                                       else ""))
        print("mode:          %s" % f.mode)
        print("source:        %s" % (f.source or "-"))
        print("api features:  0x%x" % f.api_features)
        for name in ("has_wp", "has_wp_async", "has_minor_shmem", "has_poison", "has_move"):
            print("%-14s %s" % (name[4:] + ":", "yes" if getattr(f, name) else "no"))
        if f.reason:
            print("reason:        %s" % f.reason)
        print("shared pages:  %s" % ("yes" if f.shared_pages else
                                     "no (%s)" % f.shared_pages_reason))
        print("dirty pages:   %s%s" % (f.dirty_tracking, " (%s)" % f.dirty_tracking_reason
                                       if f.dirty_tracking_reason else ""))
        print("compression:   %s" % (", ".join(f.codecs) or "none (needs the compiled core)"))
    return 0 if f.mode != "unavailable" else 1


def _push(args):
    from .objstore import push

    info = push(args.snapshot, args.url, chunk_bytes=args.chunk_size, name=args.name)
    if args.json:
        print(json.dumps(info._asdict()))
    else:
        print("%s: %d entries, %d new (%d chunks, %.1f MiB sent for a %.1f MiB file)"
              % (info.url, info.entries, info.new_entries, info.chunks_uploaded,
                 info.bytes_uploaded / 2**20, info.snapshot_bytes / 2**20))
    return 0


def _pull(args):
    from .objstore import pull

    print(pull(args.url, args.out))
    return 0


def _usage(message):
    print(message, file=sys.stderr)
    return 2


def _inspect_pid(args):
    from ._smaps import pool_mappings

    t = pool_mappings(args.pid)
    if args.json:
        print(json.dumps(t, indent=1))
        return 0
    print("process:       %d, %d shared-pool mapping%s" % (args.pid, t["mappings"],
                                                        "" if t["mappings"] == 1 else "s"))
    mib = lambda k: t[k] / 2**20   # noqa: E731
    print("resident:      %.1f MiB (Pss %.1f MiB)" % (mib("Rss"), mib("Pss")))
    print("shared:        %.1f MiB (pool pages also mapped by other processes)"
          % (mib("Shared_Clean") + mib("Shared_Dirty")))
    print("private:       %.1f MiB (of which written copies: %.1f MiB)"
          % (mib("Private_Clean") + mib("Private_Dirty"), mib("Anonymous")))
    print("huge:          %.1f MiB (mapped 2 MiB at a time from a complete pool)"
          % mib("ShmemPmdMapped"))
    return 0


def _inspect_foreign(args):
    """`pylazymem inspect` of an .npy/.npz/.safetensors file (what plm.load reads too): its
    arrays; None when the file is not one (then it is read as a snapshot, and errors say so)."""
    from ._foreign import HEAD_BYTES, detect, read_header
    from ._snapfile import _open, _pread

    fd = _open(args.snapshot)
    try:
        fmt = detect(_pread(fd, HEAD_BYTES, 0, args.snapshot, "the file's magic number"))
    finally:
        os.close(fd)
    if fmt is None:
        return None
    if args.plot:
        return _usage("pylazymem inspect: error: --plot needs a pylazymem snapshot, not a "
                      "%s file" % fmt)
    fmt, entries, metadata, size = read_header(args.snapshot, fmt)

    def nbytes(e):
        n = e["dtype"].itemsize
        for x in e["shape"]:
            n *= x
        return n
    if args.json:
        print(json.dumps({"path": args.snapshot, "format": fmt, "file_bytes": size,
                          "metadata": metadata,
                          "arrays": {n: {"offset": e["offset"], "dtype": str(e["dtype"]),
                                         "shape": list(e["shape"]), "nbytes": nbytes(e),
                                         "fortran": e["fortran"]}
                                     for n, e in entries.items()}}, indent=1))
        return 0
    print("file:          %s (%s, %.1f MiB; plm.load reads it lazily)" % (args.snapshot, fmt,
                                                                        size / 2**20))
    if metadata:
        print("metadata:      %s" % json.dumps(metadata))
    print("arrays:        %d, %.1f MiB" % (len(entries), sum(nbytes(e) for e in
                                                           entries.values()) / 2**20))
    print("  %-28s %-12s %-20s %12s %12s" % ("name", "dtype", "shape", "bytes", "offset"))
    for n, e in entries.items():
        print("  %-28s %-12s %-20s %12d %12d" % (
            _shown(n), e["dtype"], str(tuple(e["shape"])) + (" F" if e["fortran"] else ""),
            nbytes(e), e["offset"]))
    return 0


def _inspect(args):
    from ._snapfile import inspect_tables

    if args.pid is not None:
        if args.snapshot is not None:
            return _usage("pylazymem inspect: error: give a SNAPSHOT or --pid PID, not both")
        return _inspect_pid(args)
    if args.snapshot is None:
        return _usage("pylazymem inspect: error: give a SNAPSHOT or --pid PID")
    foreign = _inspect_foreign(args)
    if foreign is not None:
        return foreign
    info, table = inspect_tables(args.snapshot)
    pbc = info.pages_by_class
    raw = info.npages * info.page_size
    # An incremental snapshot is usable only with its chain: checked in both modes, as
    # restore() checks it (a broken chain: exit 1).
    chain = _check_chain(info) if info.parent is not None else None
    fortran = _fortran_arrays(args.snapshot) if info.arrays else set()

    def shape(n, a):
        # what plm.load returns: a Fortran-ordered array is stored as its transpose (the
        # manifest's shape), and loaded as the transpose of that
        return tuple(a["shape"])[::-1] if n in fortran else tuple(a["shape"])
    if args.json:
        d = dataclasses.asdict(info)
        d["working_set"] = [int(x) for x in info.working_set]
        d["arrays"] = {n: {"offset": a["offset"], "dtype": str(a["dtype"]),
                           "shape": list(shape(n, a)), "fortran": n in fortran,
                           "nbytes": a["nbytes"], "kind": a["kind"]}
                       for n, a in info.arrays.items()}
        # "chain": null for a file that needs no parent; else {"broken": null or why,
        # "files": [one per file, leaf first]} (files empty when broken)
        d["chain"] = chain
        print(json.dumps(d, indent=1))
        if chain is not None and chain["broken"]:
            return 1
    else:
        ps = info.page_size
        print("snapshot:      %s (format v%d)" % (info.path, info.version))
        print("region:        %d pages of %d bytes = %.1f MiB" % (info.npages, ps, raw / 2**20))
        print("file:          %.1f MiB (%.1f%% of the region)" % (
            info.file_bytes / 2**20, 100.0 * info.file_bytes / raw))
        print("%-14s %10s %10s" % ("pages", "count", "MiB"))
        for name in ("untouched", "zero", "unique", "duplicate", "parent"):
            if name not in pbc:
                continue
            print("  %-12s %10d %10.1f" % (name, pbc[name], pbc[name] * ps / 2**20))
        saved_zero = (pbc["zero"] + pbc["untouched"]) * ps
        print("zero/untouched savings: %.1f MiB; dedup savings: %.1f MiB; stored %.1f MiB" % (
            saved_zero / 2**20, pbc["duplicate"] * ps / 2**20, info.stored_bytes / 2**20))
        if info.compressed:
            print("compression:   %s; stored %.1f MiB of %.1f MiB of pages (%.1f%%)" % (
                ", ".join("%s %d" % kv for kv in info.codecs.items()),
                info.stored_bytes / 2**20, info.raw_bytes / 2**20,
                100.0 * info.stored_bytes / max(1, info.raw_bytes)))
        else:
            print("compression:   none")
        print("working set:   %d pages (%.1f MiB), prefetched first on restore" % (
            len(info.working_set), len(info.working_set) * ps / 2**20))
        if chain is not None:
            _print_chain(info, chain)
            if chain["broken"]:
                return 1
        if info.arrays:
            print("arrays:        %d, %.1f MiB" % (len(info.arrays), sum(
                a["nbytes"] for a in info.arrays.values()) / 2**20))
            print("  %-28s %-16s %-12s %-20s %12s %12s" % ("name", "kind", "dtype", "shape",
                                                          "bytes", "offset"))
            for n, a in info.arrays.items():
                print("  %-28s %-16s %-12s %-20s %12d %12d" % (
                    _shown(n), _shown(a["kind"]), a["dtype"],
                    str(shape(n, a)) + (" F" if n in fortran else ""),
                    a["nbytes"], a["offset"]))
    if args.plot:
        from .plot import page_map

        page_map(table, info.working_set, args.plot,
                 title="%s: %d pages" % (info.path, info.npages))
        if not args.json:
            print("page map:      %s" % args.plot)
    return 0


def _fortran_arrays(path):
    """The arrays of the snapshot at `path` that plm.load returns in Fortran order (their
    stored shape is the transpose's). The manifest is read again: inspect_tables() describes
    the file, not its state tree."""
    from ._snapfile import SnapshotError, _load
    from .arrays import _fortran_arrays as fortran_of

    try:
        return fortran_of(_load(path).manifest)
    except SnapshotError:   # the file changed since it was checked: shapes as stored
        return set()


def _shown(name):
    """A name from a file, fit for one line of a terminal: control characters and lone
    surrogates (which a file's names may hold) escaped, as repr() would."""
    if name.isprintable():
        try:
            name.encode("utf-8")
            return name
        except UnicodeEncodeError:
            pass
    return repr(name)[1:-1]


def _check_chain(info):
    """The chain of parents an incremental snapshot needs, as open_chain() finds it:
    {"broken": None or why (restore() would fail with the same reason), "files": one dict
    per file, leaf first (Chain.describe())}."""
    from ._chain import open_chain
    from ._snapfile import SnapshotError

    try:
        chain = open_chain(info.path)
    except SnapshotError as e:
        return {"broken": str(e), "files": []}
    with chain:
        return {"broken": None, "files": chain.describe()}


def _print_chain(info, chain):
    """The chain, leaf first, or why it is broken. Paths and reasons come from the files
    (a parent's path is its child's manifest): escaped (_shown), one line each."""
    print("parent pages:  %d (as the parent holds them)" % info.parent["pages"])
    if chain["broken"]:
        print("chain:         broken: %s" % _shown(chain["broken"]))
        return
    print("chain:         %d files, leaf first" % len(chain["files"]))
    print("  %-40s %-16s %10s %10s %10s" % ("file", "content id", "stored", "parent", "MiB"))
    for d in chain["files"]:
        print("  %-40s %-16s %10d %10d %10.1f" % (_shown(d["path"]), d["id"], d["stored_pages"],
                                                  d["parent_pages"], d["file_bytes"] / 2**20))
    for child, d in zip(chain["files"], chain["files"][1:]):
        if d["named_as"] != d["id"]:
            # the parent's working set was rewritten since (same pages, a new content id)
            print("  (%s was taken from %s as %s; its working set was rewritten since, its "
                  "pages are the same)" % (_shown(child["path"]), _shown(d["path"]),
                                           d["named_as"]))


def _compact(args):
    from .snapshot import compact

    info = compact(args.snapshot, args.out)
    print("%s: %d pages, %.1f MiB, needs no parent" % (info.path, info.npages,
                                                       info.file_bytes / 2**20))
    return 0


def _demo(args):
    from ._backend import require_core
    from .demo import run

    require_core("pylazymem demo")
    return run(args)


def _bench(args):
    from ._backend import require_core
    from .bench import BENCHMARKS
    from .bench.__main__ import main as bench_main

    if all(n in BENCHMARKS for n in args.names):   # else bench_main reports the usage error
        require_core("pylazymem bench")
    argv = list(args.names) + (["--quick"] if args.quick else []) + (["--json"] if args.json else [])
    return bench_main(argv)


def _serve(args):
    import logging
    import signal
    import threading

    from .server import PageServer

    logging.basicConfig(level=logging.INFO, format="pylazymem serve: %(message)s",
                        stream=sys.stderr)
    srv = PageServer(args.socket, memory_file=args.memory_file, snapshot=args.snapshot,
                     allow_uids=args.allow_uid or None, socket_group=args.socket_group,
                     engine=args.engine, share=args.share, prefetch_pool=args.prefetch_pool)
    done = threading.Event()
    # Every signal that ends a server by default ends it through stop(): the socket file
    # removed, and the clients that do not watch us (Firecracker) poisoned, not left to hang
    # at their next fault. SIGHUP comes when the terminal goes away, SIGQUIT from ^\.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, lambda *_: done.set())
    srv.start()
    try:
        print("pylazymem serve: listening on %s (pid %d)" % (srv.path, os.getpid()), flush=True)
        while not done.wait(args.stats_every or None):
            st = srv.stats()
            print("pylazymem serve: clients %d (alive %d), faults %d, pages copied %d, zero %d, "
                  "removed %d, poisoned %d, errors %d, refused %d" % (
                      st["clients"], st["clients_alive"], st["faults"], st["pages_copied"],
                      st["pages_zero"], st["removed_faults"], st["poisoned"], st["errors"],
                      st["refused"]) + (", pool %d KiB (published %d)" % (
                      st["pool_bytes"] // 1024, st["pool_published"]) if "pool_bytes" in st
                      else ""), file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, exit code 2
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        sys.exit(2)


def main(argv=None):
    from .demo import add_arguments as demo_arguments

    ap = _Parser(prog="pylazymem", description="Lazy memory on userfaultfd.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("features", help="what this machine and build support, and the fixes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_features)
    p = sub.add_parser("inspect", help="describe a snapshot file, or a process's shared "
                                       "pool mappings (--pid)")
    p.add_argument("snapshot", nargs="?")
    p.add_argument("--pid", type=int, help="sum the pylazymem-pool mappings of a process: "
                                           "resident, Pss, shared and private bytes")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE.png", help="write a picture of the page map")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("compact", help="fold a chain of incremental snapshots into one file")
    p.add_argument("snapshot", help="the chain's last snapshot")
    p.add_argument("out", help="the file to write (atomically; not a file of the chain)")
    p.set_defaults(func=_compact)
    p = sub.add_parser("push", help="store a snapshot in an S3 bucket as content-addressed "
                                    "chunks (only those the bucket lacks are sent)")
    p.add_argument("snapshot")
    p.add_argument("url", metavar="s3://BUCKET/PREFIX")
    p.add_argument("--name", help="the snapshot's name under PREFIX (default: the file's name)")
    p.add_argument("--chunk-size", type=int, default=512 << 10, metavar="BYTES",
                   help="bytes per chunk object (default 524288): the unit restores fetch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_push)
    p = sub.add_parser("pull", help="make a local snapshot file from a pushed one")
    p.add_argument("url", metavar="s3://BUCKET/PREFIX/NAME")
    p.add_argument("out")
    p.set_defaults(func=_pull)
    p = sub.add_parser("demo", help="suspend a vector-search service, resume it lazily")
    demo_arguments(p)
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="run the benchmarks and print their ratio tables")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)
    p = sub.add_parser("serve", help="serve other processes' page faults (Firecracker's "
                                     "page-fault handler protocol) from a file")
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="Unix socket to create (mode 0600) and accept clients on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--memory-file", metavar="FILE",
                     help="raw guest memory (a range's bytes are at its offset in FILE)")
    src.add_argument("--snapshot", metavar="FILE", help="a pylazymem snapshot")
    p.add_argument("--allow-uid", type=int, action="append", metavar="UID",
                   help="uid allowed to connect (repeatable; default: this process's uid)")
    p.add_argument("--socket-group", type=int, metavar="GID",
                   help="make the socket 0660 with this group (several allowed uids)")
    p.add_argument("--engine", choices=("auto", "c", "python"), default="auto")
    p.add_argument("--stats-every", type=float, default=0, metavar="SECONDS",
                   help="print the counters to stderr this often (default: never)")
    p.add_argument("--share", action="store_true",
                   help="--snapshot only: one pool of the snapshot's pages shared by the clients "
                        "that ask for it (restore(..., server=, share=True)): they map its pages "
                        "instead of each holding a copy (docs/shared-pages.md 5.3)")
    p.add_argument("--prefetch-pool", action="store_true",
                   help="with --share: publish every page into the pool before listening (a "
                        "complete pool; clients of other uids get only a complete one)")
    p.set_defaults(func=_serve)
    args = ap.parse_args(argv)
    if args.command == "serve":
        if not (math.isfinite(args.stats_every) and args.stats_every >= 0):
            ap.error("--stats-every must be a number of seconds >= 0 (0: never), not %r"
                     % args.stats_every)
        if args.stats_every and args.stats_every < 0.01:
            ap.error("--stats-every below 0.01 s would print without pause")
        if args.stats_every > 10 ** 6:
            ap.error("--stats-every above 10**6 s: use 0 (never)")
        for uid in args.allow_uid or ():
            if not 0 <= uid < 2 ** 32 - 1:
                ap.error("--allow-uid %d is not a uid (0 to 4294967294)" % uid)
        if args.socket_group is not None and not 0 <= args.socket_group < 2 ** 32 - 1:
            ap.error("--socket-group %d is not a gid (0 to 4294967294)" % args.socket_group)
    if args.command == "demo":
        for name in ("size", "requests", "warmup"):
            if getattr(args, name) <= 0:
                ap.error("--%s must be positive" % name)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 1
    except Exception as e:  # one line with the reason; the library's messages name the fix
        # escaped: a message may hold a path or a name from a file (control characters)
        print("pylazymem: %s: %s" % (type(e).__name__,
                                     _shown(str(e)) if str(e) else ""),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
