"""A page-server client for the tests, run in a child process (it faults while holding its GIL,
which is fine only because the server is another process).

It maps private anonymous memory, registers it with a userfaultfd through the ctypes binding,
hands the fd to the server with pylazymem._protocol.connect() (the wire protocol's client
side, which pylazymem.server re-exports) and then reads the memory.
"""
import ctypes
import mmap
import os

from pylazymem import uffd as U
from pylazymem._protocol import connect

PS = U.PAGE_SIZE
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)   # 0x4000 on x86-64 and arm64
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class ServedMemory:
    """`sizes` ranges of private anonymous memory, each served from `offsets[i]` of the source."""

    def __init__(self, socket_path, sizes, offsets, features=U.Feature.EVENT_REMOVE,
                 watches_server=False, noreserve=False, wp=False, timeout=5.0):
        self.uffd = U.open_userfaultfd()
        self.uffd.api(features)
        self.maps = []
        for size in sizes:
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                          | (MAP_NORESERVE if noreserve else 0))
            self.maps.append(m)
            self.uffd.register(U.address_of(m), size, wp=wp)
        self.sock, self.answer = connect(
            socket_path, self.uffd.fileno(),
            [(U.address_of(m), len(m), off) for m, off in zip(self.maps, offsets)],
            watches_server=watches_server, timeout=timeout)

    def remove(self, i, offset, length):
        """madvise(MADV_DONTNEED) part of range i, as a balloon does."""
        if _libc.madvise(U.address_of(self.maps[i]) + offset, length, 4) != 0:
            raise OSError(ctypes.get_errno(), "madvise")


def first_mismatch(got, want):
    """Page index of the first difference, or None."""
    if got == want:
        return None
    for p in range(0, len(want), PS):
        if got[p:p + PS] != want[p:p + PS]:
            return p // PS
    return len(want) // PS
