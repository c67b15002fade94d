"""Page metadata as Python sees it: enums and the numpy dtype, both derived from lazymem.h."""
import enum

import numpy as np

from ._binding import ffi, lib


class PageState(enum.IntEnum):
    EMPTY = lib.LM_EMPTY          # never given contents: reads as zero
    DEFERRED = lib.LM_DEFERRED    # not present; contents described by cls/canon
    BUSY = lib.LM_BUSY            # in a transition (transient)
    PRESENT = lib.LM_PRESENT      # mapped


class PageClass(enum.IntEnum):
    NONE = lib.LM_CLS_NONE
    ZERO = lib.LM_CLS_ZERO
    CANONICAL = lib.LM_CLS_CANONICAL
    DATA = lib.LM_CLS_DATA
    SNAPSHOT = lib.LM_CLS_SNAPSHOT


class PageFlag(enum.IntFlag):
    NEEDS_UPDATE = lib.LM_F_NEEDS_UPDATE
    READAHEAD = lib.LM_F_READAHEAD
    WRITE_FAULT = lib.LM_F_WRITE_FAULT
    MATERIALIZED = lib.LM_F_MATERIALIZED
    POISONED = lib.LM_F_POISONED
    PREFETCHED = lib.LM_F_PREFETCHED
    BACKGROUND = lib.LM_F_BACKGROUND


#: How a page was first made present, in Region.timeline().
PATHS = {lib.LM_PATH_DEMAND: "demand", lib.LM_PATH_READAHEAD: "readahead",
         lib.LM_PATH_PREFETCH: "prefetch", lib.LM_PATH_BACKGROUND: "background",
         lib.LM_PATH_MATERIALIZE: "materialize"}

#: The known content class "zero", for Region.defer_fill().
ZERO = PageClass.ZERO

_FIELD_TYPES = {"uint64_t": "<u8", "uint32_t": "<u4", "uint16_t": "<u2", "uint8_t": "u1"}


def _struct_dtype(name):
    """The numpy dtype of a C struct of lazymem.h, field for field."""
    ctype = ffi.typeof(name)
    names, formats, offsets = [], [], []
    for name, field in ctype.fields:
        names.append(name)
        formats.append(_FIELD_TYPES[field.type.cname])
        offsets.append(field.offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": ffi.sizeof(ctype)})


META_DTYPE = _struct_dtype("struct lm_page_meta")
#: One entry of a snapshot's page table (docs/snapshot-format.md).
SNAP_PAGE_DTYPE = _struct_dtype("struct lm_snap_page")
