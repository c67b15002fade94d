"""Page metadata as Python sees it: enums and numpy dtypes mirroring csrc/lazymem.h.

The values are written out rather than read from the cffi module so that they exist under the
ctypes backend too (inspect() reads snapshot tables with SNAP_PAGE_DTYPE without the core);
tests/test_backend.py checks every one of them, in both directions, against the compiled header.
"""
import enum

import numpy as np


class PageState(enum.IntEnum):   # enum lm_state
    EMPTY = 0          # never given contents: reads as zero
    DEFERRED = 1       # not present; contents described by cls/canon
    BUSY = 2           # in a transition (transient)
    PRESENT = 3        # mapped
    POISONED = 4       # could not be served: an access raises SIGBUS (SIGSEGV on kernels
                       # without UFFDIO_POISON); defer_fill() gives it new contents
    PINNED = 5         # present, held by a reader (signatures, checkpoint) (transient)


class PageClass(enum.IntEnum):   # enum lm_class (LM_CLS_*)
    NONE = 0
    ZERO = 1
    CANONICAL = 2
    DATA = 3
    SNAPSHOT = 4


class PageFlag(enum.IntFlag):    # enum lm_flag (LM_F_*)
    NEEDS_UPDATE = 1
    READAHEAD = 2
    WRITE_FAULT = 4
    MATERIALIZED = 8
    POISONED = 16
    PREFETCHED = 32
    BACKGROUND = 64
    SHARED = 128         # maps a pool page (shared restore) not written here as of the last sync
    PRIVATE_FILL = 256   # a shared restore's snapshot page served by a private copy
    COPY_FALLBACK = 512  # a canonical page copied because the VMA budget for chunks was spent


#: How a page was first made present, in Region.timeline() (enum lm_path, LM_PATH_*).
PATHS = {1: "demand", 2: "readahead", 3: "prefetch", 4: "background", 5: "materialize"}

#: The known content class "zero", for Region.defer_fill().
ZERO = PageClass.ZERO

#: A snapshot's page-map entries (enum lm_snap_class): untouched, zero, or SNAP_STORED + i for
#: store entry i; snapshot.inspect_tables() splits them into a class and a store entry.
SNAP_UNTOUCHED = 0
SNAP_ZERO = 1
SNAP_STORED = 2
#: In a version 3 file with a parent: "as the parent's page of the same index".
SNAP_PARENT = 0xFFFFFFFF

#: struct lm_page_meta, one 32-byte record per page (Region.meta).
META_DTYPE = np.dtype({
    "names": ["signature", "order", "canon", "aux", "state", "cls", "flags", "reserved"],
    "formats": ["<u8", "<u8", "<u4", "<u4", "u1", "u1", "<u2", "<u4"],
    "offsets": [0, 8, 16, 20, 24, 25, 26, 28],
    "itemsize": 32,
})

#: struct lm_snap_page: one entry of a snapshot's page map (docs/snapshot-format.md).
SNAP_PAGE_DTYPE = np.dtype({"names": ["entry"], "formats": ["<u4"], "offsets": [0],
                            "itemsize": 4})
