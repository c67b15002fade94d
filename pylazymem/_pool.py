"""The shared page pool of a restore(share=True) (docs/shared-pages.md, section 2).

A pool is a memfd holding page p of a snapshot's region at offset p, shared by every process of
this user that restores the same snapshot content. The compiled core finds a live pool among
this user's processes or creates one (lm_pool_open); this module holds a reference for a Region
and says what the pool is.
"""
from ._binding import check, ffi, lib

ROLES = {1: "created", 2: "joined", 3: "unshared"}   # enum lm_pool_role


class Pool:
    """One reference to a pool; release() gives it back (once)."""

    def __init__(self, header_xxh3, npages, page_size, max_bytes=0):
        out = ffi.new("struct lm_pool **")
        check(lib.lm_pool_open(header_xxh3, npages, page_size, max_bytes, out), "shared pool")
        self._p = out[0]

    def _info(self):
        if self._p is None:
            raise ValueError("pool released")
        i = ffi.new("struct lm_pool_info *")
        check(lib.lm_pool_info(self._p, i), "shared pool")
        return i

    @property
    def fd(self):
        return self._info().fd

    def info(self):
        """What the pool is: id, role (created / joined / unshared), slot, sealed, resident
        bytes, inode (the same inode in two processes: one pool)."""
        i = self._info()
        return {"id": "%016x" % i.id, "role": ROLES.get(i.role, i.role), "slot": i.slot,
                "sealed": bool(i.sealed), "bytes": i.bytes, "inode": i.inode}

    def release(self):
        p, self._p = self._p, None
        if p is not None:
            lib.lm_pool_release(p)

    def forget(self):
        """After fork(), in the child: the core's fork handler has let the pool go (closed
        its fds); this gives back the child's copy of the reference, which frees it."""
        p, self._p = self._p, None
        if p is not None:
            lib.lm_pool_release(p)
