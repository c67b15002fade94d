"""Replacing a file whole: a temporary beside it, written, then renamed over it. Used by every
writer of snapshot files (checkpoint, save, compact, pull).

A writer holds an exclusive flock on its temporary from creation to the rename, so the sweep
that the next writer runs removes exactly the temporaries of writers that are gone: flock
works across PID namespaces (containers sharing a directory), where a pid in a file name
names nothing, and outlives no process, where a pid can be reused."""
import errno
import fcntl
import glob
import os
import stat
import tempfile
import time

NEW_GRACE_SEC = 60


def _sweep_stale_temporaries(path):
    """Temporaries of checkpoints whose process died (kill -9) are removed by the next one.
    A writer holds an exclusive flock on its temporary until the rename: a lock the sweep can
    take belongs to nobody alive. (Not the pid in the name: a writer in another PID namespace
    sharing the directory has a pid that means nothing here, and a dead writer's pid can
    belong to a new process.)"""
    d, base = os.path.split(os.path.abspath(path))
    pattern = os.path.join(glob.escape(d), ".%s.*" % glob.escape(base))
    for tmp in glob.glob(pattern + ".tmp") + glob.glob(pattern + ".new"):
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:   # gone meanwhile, a symlink, not ours to read: left alone
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            # a .new is locked microseconds after its creation: one that is not, and is a
            # minute old, was left by a writer killed in between
            if tmp.endswith(".new") and time.time() - st.st_mtime < NEW_GRACE_SEC:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:   # a writer at work (EWOULDBLOCK), or no locks here: left alone
                continue
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        finally:
            os.close(fd)


# flock refused by the filesystem itself (some NFS and FUSE mounts): the checkpoint goes on
# unlocked. Its temporary is then never swept, because the sweep's own flock fails the same
# way and it leaves alone what it cannot lock: a leftover file, never a live one removed.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _lock(fd):
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise


def _check_target(path):
    """What is at `path` may be replaced by a file only if it is a regular file (or nothing):
    a rename over a device node, a FIFO or a socket put a regular file in its place (as root,
    `checkpoint(r, "/dev/null")` replaced /dev/null for the whole machine)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError:
        return   # not ours to judge (a dangling name, no search permission): rename decides
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a device" if
                stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a FIFO" if
                stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        raise IsADirectoryError(errno.EISDIR, "%s is a directory: a snapshot is written as a "
                                "file" % path, path) if kind == "a directory" else \
            FileExistsError(errno.EEXIST, "%s is %s: not replacing it with a file" % (path, kind),
                            path)


def _temporary(path):
    """(fd, name) of a new temporary beside `path`, for an atomic replacement by _commit()."""
    _check_target(path)
    d, base = os.path.split(os.path.abspath(path))
    _sweep_stale_temporaries(path)
    # Made under a name the sweep does not match, locked, then given its .tmp name: a sweep
    # never sees this writer's temporary unlocked.
    try:
        fd, new = tempfile.mkstemp(dir=d, prefix=".%s.%d." % (base, os.getpid()), suffix=".new")
    except OSError as e:   # named after the file asked for, not the temporary's random name
        raise type(e)(e.errno, "cannot write %s (its temporary in %s: %s)"
                      % (path, d, e.strerror), path) from None
    tmp = new[:-len(".new")] + ".tmp"
    try:
        _lock(fd)   # held until _commit's rename
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; a snapshot is an ordinary file
        os.rename(new, tmp)
    except BaseException:
        _abandon(fd, new)
        raise
    return fd, tmp


def _commit(fd, tmp, path, durable):
    """Replace `path` with the finished temporary. It owns fd and tmp from the call on (the
    caller must not abandon them): whatever fails, the fd is closed once and the temporary
    removed, and the error is the one that happened."""
    try:
        if durable:
            os.fsync(fd)
    except BaseException:
        _abandon(fd, tmp)
        raise
    try:
        _check_target(path)   # again: it may have appeared while the file was written
        os.rename(tmp, path)   # before the close: the lock keeps the sweep off until then
    except BaseException:
        _abandon(fd, tmp)
        raise
    os.close(fd)
    if durable:
        _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _abandon(fd, tmp):
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def _umask():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _fsync_dir(d):
    try:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as e:   # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(dfd)
