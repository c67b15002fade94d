"""Named arrays, tensors and tables in a snapshot: plm.save / plm.load (docs/arrays.md).

save() copies what the caller has (numpy arrays of any dtype and layout, PyTorch CPU tensors,
Arrow arrays and tables, nested dicts of those) once into a region, page-aligned, and writes it
as an ordinary snapshot whose manifest also holds the *state tree*: which array is which leaf,
of what kind. load() restores the snapshot lazily and hands back views of the region: nothing
is read until a page is touched, and the working set recorded at the previous load is prefetched
first. Files of other formats (.npy, .npz, .safetensors) are read lazily through the same fault
path (pylazymem/_foreign.py).

Kinds of leaves (manifest "state" -> "tree", format version STATE_VERSION):
  numpy   {"kind": "numpy", "array": NAME, "fortran": bool[, "ml_dtype": "bfloat16"]}
  torch   {"kind": "torch", "array": NAME, "fortran": bool, "torch_dtype": "float32"}
  arrow   {"kind": "arrow", "array": NAME, "what": "table"|"array"|"chunked"|"batch"}
          (an Arrow IPC stream in the region: reading it back maps its buffers, zero-copy)
  dict    {"kind": "dict", "items": {key: node}}
NAME is the leaf's path joined with "/" (keys may not contain "/"), the name `pylazymem
inspect` shows. "state" -> "metadata" (optional): string -> string, what load() returns as
LoadedState.metadata (a .safetensors file's __metadata__, kept when such a state is saved).
"""
from collections.abc import Mapping
import math
import os
from types import MappingProxyType
import warnings

import numpy as np

from ._errors import InvalidArgumentError, PoisonedPageError, RegionClosedError

STATE_VERSION = 1
SEP = "/"
MAX_DEPTH = 64        # nesting of a state tree, written or read

# torch dtypes stored as a numpy dtype of the same size; bfloat16 has no numpy twin and
# travels as its bits (uint16).
_TORCH_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "complex64", "complex128", "uint16", "uint32", "uint64")


# ---- save --------------------------------------------------------------------------------

def save(path, state, *, working_set=None, compress=None, durable=True):
    """Write `state` (a dict of numpy arrays, torch CPU tensors, Arrow arrays/tables, or nested
    dicts of those; or a LoadedState from load()) to `path` as a snapshot; returns its
    SnapshotInfo.

    working_set: None (none), a LoadedState of this same state (the pages its program touched
    since load, in order: saving a LoadedState uses its own by default), or page indices.
    compress: None (pages stored as they are), "zstd" or "lz4": each stored page compressed on
    its own (snapshot format version 3; load() decompresses pages as they are touched).
    durable: as checkpoint()."""
    from .snapshot import _codec_arg, checkpoint

    path = os.fsdecode(path)   # (str, bytes or a path object, as open() takes)

    _codec_arg(compress)   # an unknown codec fails before anything is done
    metadata = {}
    if isinstance(state, LoadedState) and state.format != "pylazymem":
        # the region of a foreign file is the file's image and has no named arrays: save the
        # arrays themselves (converted to a snapshot), and the file's metadata with them (a
        # conversion that dropped safetensors' __metadata__ would lose it without a word)
        if isinstance(working_set, LoadedState):
            raise InvalidArgumentError("working_set: a %s file's state has no working set "
                                       "to save" % state.format)
        metadata = _checked_metadata(state.metadata, state.path)
        state = dict(state)
    if isinstance(state, LoadedState):
        ws = working_set if working_set is not None else state
        return checkpoint(state.region, path, working_set=_ws_pages(ws, state.region),
                          durable=durable, compress=compress)
    if not isinstance(state, Mapping):
        raise InvalidArgumentError("save() takes a dict of arrays, not %s"
                                   % type(state).__name__)
    from .snapshot import write_arrays

    leaves = []                                  # (name, node, numpy array to store)
    _refuse_poisoned(state, ())   # before _plan: it may copy (read) an array's memory
    tree = _plan(state, (), leaves, 0)
    if isinstance(working_set, LoadedState):
        raise InvalidArgumentError("working_set: a LoadedState's working set applies to that "
                                   "state only (save the LoadedState itself)")
    manifest_state = {"version": STATE_VERSION, "tree": tree}
    if metadata:
        manifest_state["metadata"] = metadata
    # Straight to the file: each array's bytes are read once, no region holds a second copy.
    return write_arrays(path, {name: a for name, _, a in leaves}, {"state": manifest_state},
                        working_set=working_set, durable=durable, compress=compress)


def _checked_metadata(metadata, path):
    """A LoadedState's metadata as the manifest stores it: a dict of strings to strings (what
    load() accepts back; the caller may have changed st.metadata since the load)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidArgumentError("save: the metadata of the state loaded from %s must map "
                                   "strings to strings" % path)
    return dict(metadata)


def _refuse_poisoned(state, path):
    """PoisonedPageError if a leaf's memory lies on a poisoned page of a live Region.

    Reading such a page raises SIGBUS, which kills the interpreter; checkpoint() of the region
    refuses it with PoisonedPageError, and so must saving its arrays (nothing is written: the
    file at the path stays as it was). The span between an array's first and last byte is
    checked, so a strided array may be refused for a page between its elements. A page
    poisoned after this check (a fill failing meanwhile) still raises SIGBUS."""
    from .region import _live_regions

    regions = [r for r in list(_live_regions) if not r.closed]
    if not regions:
        return
    for name, lo, hi in _leaf_spans(state, path, 0):
        for r in regions:
            start, end = max(lo, r.address), min(hi, r.address + r.nbytes)
            if start >= end:
                continue
            first = (start - r.address) // r.page_size
            last = (end - 1 - r.address) // r.page_size
            try:
                bad = r.poisoned_pages(first * r.page_size, (last + 1 - first) * r.page_size)
            except RegionClosedError:   # closed meanwhile: its views keep serving the memory
                continue
            if bad.size:
                shown = ", ".join(str(int(p)) for p in bad[:16]) + (", ..." if bad.size > 16
                                                                    else "")
                raise PoisonedPageError(
                    "save: state[%r] lies on %d poisoned page%s (%s) of %r: their contents "
                    "could not be served and are lost (reading them would raise SIGBUS); "
                    "nothing was written" % (name, bad.size, "" if bad.size == 1 else "s",
                                             shown, r), bad.tolist())


def _leaf_spans(obj, path, depth):
    """(name, first byte address, end address) of the memory of every leaf of a state."""
    if depth > MAX_DEPTH:
        return   # _plan refuses it, with words
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if isinstance(k, str) and k and SEP not in k:   # else _plan refuses it
                yield from _leaf_spans(v, path + (k,), depth + 1)
        return
    name = SEP.join(path)
    kind = _kind_of(obj)
    spans = []
    if kind == "numpy" and not isinstance(obj, np.ma.MaskedArray):
        try:
            a = np.asarray(obj)
        except Exception:   # _plan says what is wrong with it
            return
        spans.append(_span(a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize))
    elif kind == "torch":
        # a sparse (or other non-strided) tensor has no one block of memory: _plan refuses it
        if obj.device.type == "cpu" and str(obj.layout) == "torch.strided":
            es = obj.element_size()
            spans.append(_span(obj.data_ptr(), tuple(obj.shape),
                               tuple(x * es for x in obj.stride()), es))
    elif kind == "arrow":
        for buf in _arrow_buffers(obj):
            spans.append((buf.address, buf.address + buf.size))
    for lo, hi in spans:
        if hi > lo:
            yield name, lo, hi


def _span(ptr, shape, strides, itemsize):
    """[lo, hi) of the bytes an array with these strides (bytes) reaches from ptr."""
    if any(n == 0 for n in shape):
        return ptr, ptr
    lo = ptr + sum((n - 1) * st for n, st in zip(shape, strides) if st < 0)
    hi = ptr + sum((n - 1) * st for n, st in zip(shape, strides) if st > 0) + itemsize
    return lo, hi


def _arrow_buffers(obj):
    """Every buffer of an Arrow table, batch, chunked array or array (children included)."""
    import pyarrow as pa

    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        cols = obj.columns
    elif isinstance(obj, pa.ChunkedArray):
        cols = obj.chunks
    else:
        cols = [obj]
    for col in cols:
        for arr in (col.chunks if isinstance(col, pa.ChunkedArray) else [col]):
            yield from (b for b in arr.buffers() if b is not None)
            if isinstance(arr, pa.DictionaryArray):
                yield from _arrow_buffers(arr.dictionary)


def _ws_pages(working_set, region):
    if isinstance(working_set, LoadedState):
        if working_set.region is not region:
            raise InvalidArgumentError("working_set: a LoadedState's working set applies to "
                                       "that state only (save the LoadedState itself)")
        return working_set.working_set()
    return working_set


def _check_key(key, path):
    if not isinstance(key, str) or not key or SEP in key:
        raise InvalidArgumentError("state key %r at %s: keys must be non-empty strings "
                                   "without %r" % (key, SEP.join(path) or "the top", SEP))


def _plan(obj, path, leaves, depth):
    """The state tree of `obj`; appends (name, node, array) for every leaf to store."""
    if depth > MAX_DEPTH:
        raise InvalidArgumentError("state nested more than %d deep" % MAX_DEPTH)
    if isinstance(obj, Mapping):
        items = {}
        for k, v in obj.items():
            _check_key(k, path)
            items[k] = _plan(v, path + (k,), leaves, depth + 1)
        return {"kind": "dict", "items": items}
    if not path:
        raise InvalidArgumentError("save() takes a dict at the top")
    name = SEP.join(path)
    node, array = _leaf(obj, name)
    node["array"] = name
    leaves.append((name, node, array))
    return node


def _leaf(obj, name):
    """(node, the numpy array whose bytes are stored) for one leaf."""
    kind = _kind_of(obj)
    if kind == "torch":
        return _torch_leaf(obj, name)
    if kind == "arrow":
        return _arrow_leaf(obj, name)
    if kind is None:
        raise InvalidArgumentError("state[%r]: cannot save a %s (numpy arrays, torch CPU "
                                   "tensors, Arrow arrays/tables and dicts of them)"
                                   % (name, type(obj).__name__))
    if isinstance(obj, np.ma.MaskedArray):   # np.asarray would drop the mask, silently
        raise InvalidArgumentError("state[%r]: a masked array: save its data and its mask as "
                                   "two arrays (a.data, np.ma.getmaskarray(a))" % name)
    a = np.asarray(obj)
    node = {"kind": "numpy"}
    a, node["fortran"] = _c_order(a)
    a, ml = _plain_dtype(a, name)
    if ml:
        node["ml_dtype"] = ml
    return node, a


def _kind_of(obj):
    t = type(obj)
    mod = t.__module__ or ""
    if mod.startswith("torch") and t.__name__ in ("Tensor", "Parameter"):
        return "torch"
    if mod.startswith("pyarrow") and t.__name__ in ("Table", "ChunkedArray", "RecordBatch") \
            or (mod.startswith("pyarrow") and _is_arrow_array(obj)):
        return "arrow"
    if isinstance(obj, (np.ndarray, np.generic)) or hasattr(obj, "__array_interface__"):
        return "numpy"
    return None


def _is_arrow_array(obj):
    try:
        import pyarrow as pa
    except ImportError:
        return False
    return isinstance(obj, pa.Array)


def _c_order(a):
    """(C-contiguous array, fortran): a Fortran-ordered array is stored as its transpose, so
    its bytes are stored as they are and load() gives a Fortran-ordered view back."""
    if a.ndim > 1 and a.flags.f_contiguous and not a.flags.c_contiguous:
        return a.T, True
    # (not np.ascontiguousarray: it makes a 0-d array 1-d)
    return (a if a.flags.c_contiguous else a.copy(order="C")), False


def _plain_dtype(a, name):
    """ml_dtypes' types (bfloat16, float8_*) have no numpy descriptor that reads back: store
    their bits as an unsigned integer of the same size and the type's name beside it."""
    if a.dtype.hasobject:
        raise InvalidArgumentError("state[%r]: arrays of Python objects cannot be saved" % name)
    if type(a.dtype).__module__.startswith("ml_dtypes") or (
            a.dtype.kind == "V" and a.dtype.fields is None and a.dtype.type.__module__
            .startswith("ml_dtypes")):
        if not a.dtype.isnative:
            # The manifest keeps the type's name, not its byte order, and load() reads the
            # bits in native order: a '>' bfloat16 stored as it is came back byte-swapped
            # (wrong values, no error). Stored in native order, it loads as the native type,
            # with the same values (ml_dtypes casts between the two byte orders).
            a = a.astype(a.dtype.newbyteorder("="), order="C")
        return a.view("<u%d" % a.dtype.itemsize), a.dtype.name
    if a.dtype.itemsize == 0:
        raise InvalidArgumentError("state[%r]: dtype %s has no size" % (name, a.dtype))
    if a.dtype.fields is not None:
        if _ml_fields(a.dtype):
            raise InvalidArgumentError("state[%r]: a structured dtype with a field of an "
                                       "ml_dtypes type (%s): it would come back as raw bytes; "
                                       "save that field as an array of its own" % (name, a.dtype))
        try:   # what the manifest stores: numpy cannot describe overlapping fields
            np.lib.format.dtype_to_descr(a.dtype)
        except ValueError as e:
            raise InvalidArgumentError("state[%r]: dtype %s cannot be saved: %s"
                                       % (name, a.dtype, e)) from None
    return a, None


def _ml_fields(dtype):
    """Whether a structured dtype has a field (at any depth) of an ml_dtypes type."""
    for f in dtype.fields.values():
        t = f[0].base
        if type(t).__module__.startswith("ml_dtypes") or t.type.__module__.startswith("ml_dtypes"):
            return True
        if t.fields is not None and _ml_fields(t):
            return True
    return False


def _torch_leaf(t, name):
    if t.device.type != "cpu":
        raise InvalidArgumentError("state[%r]: a tensor on %s: move it to the CPU first "
                                   "(tensor.cpu())" % (name, t.device))
    if str(t.layout) != "torch.strided":
        # a sparse or mkldnn tensor has no dense block of memory to store (and .contiguous()
        # fails on it with torch's RuntimeError)
        raise InvalidArgumentError("state[%r]: a %s tensor: only dense (strided) tensors can "
                                   "be saved (tensor.to_dense())" % (name, t.layout))
    dt = str(t.dtype).replace("torch.", "")
    if dt not in _TORCH_DTYPES:
        raise InvalidArgumentError("state[%r]: torch dtype %s is not supported" % (name, dt))
    t = t.detach()
    fortran = t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()
    if fortran:
        t = t.t()
    # x.conj(), x.mH (and the imaginary part of those: a negative bit) are views whose values
    # torch computes on access; numpy() refuses them. Their values are what is stored.
    t = t.contiguous().resolve_conj().resolve_neg()
    if dt == "bfloat16":
        import torch
        a = t.view(torch.int16).numpy().view(np.uint16)
    else:
        a = t.numpy()
    return {"kind": "torch", "fortran": fortran, "torch_dtype": dt}, a


def _arrow_leaf(obj, name):
    """An Arrow object as an IPC stream (schema, then record batches), 64-byte-aligned
    buffers: read back through pyarrow's IPC reader over the region, which maps the buffers
    instead of copying them."""
    import pyarrow as pa

    if isinstance(obj, pa.Table):
        what, table = "table", obj
    elif isinstance(obj, pa.RecordBatch):
        what, table = "batch", pa.Table.from_batches([obj])
    elif isinstance(obj, pa.ChunkedArray):
        what, table = "chunked", pa.table({"a": obj})
    else:
        what, table = "array", pa.table({"a": obj})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    buf = sink.getvalue()
    return {"kind": "arrow", "what": what}, np.frombuffer(buf, np.uint8)


# ---- load --------------------------------------------------------------------------------

class LoadedState(Mapping):
    """What load() returns: name -> lazily loaded array (numpy, torch or Arrow, as saved),
    nested read-only mappings for nested state. The arrays are views of one region
    (`.region`); pages are read when first touched. Writes to them stay in this process unless
    it saves again.

    close(): releases the region; arrays still referenced keep its memory valid (and served)
    until they go. working_set(): the pages touched since load, in first-touch order (what
    record_working_set() and save() store)."""

    def __init__(self, region, items, path, fmt, metadata=None):
        self.region = region
        self._items = items
        self.path = path
        self.format = fmt          # "pylazymem", "npy", "npz" or "safetensors"
        self.metadata = metadata or {}

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        return "<pylazymem.LoadedState %s %s: %d entries%s>" % (
            self.format, self.path, len(self._items), " (closed)" if self.region.closed else "")

    def working_set(self):
        return self.region.working_set()

    def _recorded_working_set(self):
        """working_set(), for storing: warns where the background fill made it partial."""
        ws = self.region.working_set()
        filled = self.region.stats()["background_pages"]
        if filled:
            # Pages the fill brought in are present before the program touches them: no
            # fault, so no first touch to record. What is recorded then depends on timing.
            warnings.warn("%s: the background fill brought in %d pages since load, and the "
                          "program's first touches of those were not seen: this working set "
                          "(%d pages) may miss pages it used. Record working sets from a "
                          "load(..., background=False)." % (self.path, filled, len(ws)),
                          RuntimeWarning, stacklevel=3)
        return ws

    def close(self):
        self.region.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load(path, *, prefetch="working-set", share=False, readonly=False, background=None,
         verify=False, **region_kw):
    """Load a state saved by save() (or an .npy, .npz or .safetensors file) lazily: returns a
    LoadedState. prefetch, share, background, verify: as restore() (a foreign file has no
    working set: "working-set" prefetches nothing there; verify=True of an .npz also checks
    its members' CRC-32s, which are not read otherwise). readonly: the arrays returned refuse
    writes (numpy's writeable flag; Arrow data is read-only anyway). Arrow leaves are
    validated in full at load (their pages are read then)."""
    from ._snapfile import MAGIC, SnapshotError, _open, _pread

    path = os.fsdecode(path)
    fd = _open(path)
    try:
        head = _pread(fd, 64, 0, path, "the magic number")   # EIO: a SnapshotError naming it
    finally:
        os.close(fd)
    if head.startswith(MAGIC):
        return _load_snapshot(path, prefetch, share, readonly, background, verify, region_kw)
    try:
        from ._foreign import detect, open_foreign
    except ImportError:   # a build without the foreign formats' reader
        def detect(head):
            return None
    fmt = detect(head)
    if fmt is None:
        raise SnapshotError("%s: not a pylazymem snapshot, .npy, .npz or .safetensors file"
                            % path)
    region, entries = open_foreign(
        path, fmt, prefetch="none" if isinstance(prefetch, str) and prefetch == "working-set"
        else prefetch, share=share,
        background=background, verify=verify, **region_kw)
    try:
        items = {}
        for name, e in entries.items():
            # a foreign entry's shape is the array's own (a Fortran-ordered .npy's data are its
            # transpose's, C-ordered: the shape _view wants is reversed)
            fortran = e.get("fortran", False)
            shape = tuple(e["shape"])[::-1] if fortran else e["shape"]
            items[name] = _view(region, e["dtype"], shape, e["offset"], fortran, readonly)
        return LoadedState(region, items, path, fmt, getattr(region, "foreign_metadata", None))
    except BaseException:
        region.close()
        raise


def _load_snapshot(path, prefetch, share, readonly, background, verify, region_kw):
    from .snapshot import restore

    region = restore(path, prefetch=prefetch, share=share, background=background,
                     verify=verify, **region_kw)
    try:
        state = region._manifest_extra.get("state")
        arrays = region._arrays
        metadata = {}
        if state is None:   # a snapshot of a Region's alloc()ed arrays: flat, numpy
            tree = {"kind": "dict", "items": {n: {"kind": "numpy", "array": n,
                                                  "fortran": False} for n in arrays}}
        else:
            tree = _checked_tree(state, path)
            metadata = _checked_state_metadata(state, path)
        items = _build(tree, region, arrays, readonly, path, 0)
        return LoadedState(region, items, path, "pylazymem", metadata)
    except BaseException:
        region.close()
        raise


def _checked_tree(state, path):
    from ._snapfile import SnapshotError

    if not isinstance(state, dict) or state.get("version") != STATE_VERSION \
            or not isinstance(state.get("tree"), dict) or state["tree"].get("kind") != "dict":
        raise SnapshotError("%s: manifest 'state' is not a state tree of version %d"
                            % (path, STATE_VERSION))
    return state["tree"]


def _checked_state_metadata(state, path):
    from ._snapfile import SnapshotError

    metadata = state.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SnapshotError("%s: manifest 'state' metadata must map strings to strings" % path)
    return dict(metadata)


def _fortran_arrays(manifest):
    """The names of the arrays load() returns transposed (stored as a Fortran-ordered array's
    transpose): `pylazymem inspect` shows the shape load() returns. Nothing for a malformed
    tree (load() says what is wrong with it; describing a file must not fail on it)."""
    out = set()
    state = manifest.get("state") if isinstance(manifest, dict) else None
    todo = [state.get("tree")] if isinstance(state, dict) else []
    seen = 0
    while todo and seen < 1 << 20:
        node = todo.pop()
        seen += 1
        if not isinstance(node, dict):
            continue
        if node.get("kind") == "dict" and isinstance(node.get("items"), dict):
            todo.extend(node["items"].values())
        elif isinstance(node.get("array"), str) and node.get("fortran") is True:
            out.add(node["array"])
    return out


def _build(node, region, arrays, readonly, path, depth):
    from ._snapfile import SnapshotError

    def bad(what):
        raise SnapshotError("%s: manifest state tree: %s" % (path, what))

    if not isinstance(node, dict) or depth > MAX_DEPTH:
        bad("a node is not an object, or the tree is nested more than %d deep" % MAX_DEPTH)
    kind = node.get("kind")
    if kind == "dict":
        items = node.get("items")
        if not isinstance(items, dict):
            bad("a dict node without items")
        out = {k: _build(v, region, arrays, readonly, path, depth + 1) for k, v in items.items()}
        # Read-only, as the LoadedState itself: save() of a LoadedState writes the region's
        # state tree, so an entry replaced or added here would be lost without a word.
        return MappingProxyType(out)
    name = node.get("array")
    if not isinstance(name, str) or name not in arrays:
        bad("a leaf names an array the manifest does not have: %r" % (name,))
    a = arrays[name]
    fortran = node.get("fortran", False)
    if not isinstance(fortran, bool):
        bad("%r: 'fortran' must be true or false" % name)
    view = _view(region, a["dtype"], a["shape"], a["offset"], fortran, readonly)
    if kind == "numpy":
        ml = node.get("ml_dtype")
        if ml is not None:
            view = _ml_view(view, ml, name, bad)
        return view
    if kind == "torch":
        dt = node.get("torch_dtype")
        if dt not in _TORCH_DTYPES:
            bad("%r: unknown torch dtype %r" % (name, dt))
        return _torch_view(view, dt, readonly, name, bad)
    if kind == "arrow":
        if node.get("what") not in ("table", "array", "chunked", "batch"):
            bad("%r: unknown Arrow object %r" % (name, node.get("what")))
        return _arrow_view(view, node["what"], name, path, bad)
    bad("%r: unknown kind %r" % (name, kind))


def _view(region, dtype, shape, offset, fortran, readonly=False):
    shape = tuple(shape)
    if readonly:
        # Over a read-only buffer of the region: numpy's writeable flag alone can be set back
        # and leaves .base (the region) writable; an array of a read-only buffer cannot be
        # made writable, nor can anything taken from it. (torch.from_numpy of it is writable
        # all the same: torch has no read-only tensors.)
        flat = np.frombuffer(memoryview(region).toreadonly(), dtype=dtype,
                             count=math.prod(shape), offset=offset)
        a = flat.reshape(shape)
    else:
        a = region.ndarray(dtype, shape, offset)
    return a.T if fortran else a


def _readonly(a):
    a = a.view()
    a.flags.writeable = False
    return a


def _ml_view(view, ml, name, bad):
    # save() stores the bits as unsigned integers in native (little-endian) order; anything
    # else would be read as other bits, or not be viewable at all
    if view.dtype.kind != "u" or not view.dtype.isnative:
        bad("%r: %s bits stored as %s, not as unsigned integers" % (name, ml, view.dtype))
    try:
        import ml_dtypes
    except ImportError:
        # The bits are right; without ml_dtypes numpy has no type for them. Said, not hidden.
        warnings.warn("%s: %s needs the ml_dtypes package; returned as its bits (%s)"
                      % (name, ml, view.dtype), stacklevel=4)
        return view
    # only a name of one of ml_dtypes' scalar types: the manifest is not trusted ("__name__"
    # is an attribute of the module too, and np.dtype() of a class such as ml_dtypes.finfo
    # is the object dtype)
    t = getattr(ml_dtypes, ml, None) if isinstance(ml, str) and ml.isidentifier() and \
        not ml.startswith("_") else None
    try:
        dt = np.dtype(t) if isinstance(t, type) and issubclass(t, np.generic) and \
            t.__module__.startswith("ml_dtypes") else None
    except TypeError:
        dt = None
    if dt is None or dt.hasobject or dt.itemsize != view.dtype.itemsize:
        bad("%r: unknown ml_dtypes type %r" % (name, ml))
    try:
        return view.view(dt)
    except (TypeError, ValueError) as e:
        bad("%r: its bits (%s) cannot be viewed as %s: %s" % (name, view.dtype, ml, e))


def _torch_view(view, dt, readonly, name, bad):
    try:
        import torch
    except ImportError:
        bad("%r is a torch tensor, and torch is not installed here (load it with torch "
            "installed)" % name)

    if readonly:
        view = _readonly(view)
    if dt == "bfloat16" and view.dtype != np.uint16:   # ('>u2' is not np.uint16 either)
        bad("%r: bfloat16 stored as %s, not uint16" % (name, view.dtype))
    with warnings.catch_warnings():
        # torch warns that it cannot mark a tensor read-only; readonly= is numpy's promise.
        warnings.simplefilter("ignore", UserWarning)
        try:
            if dt == "bfloat16":
                return torch.from_numpy(view.view(np.int16)).view(torch.bfloat16)
            t = torch.from_numpy(view)
        except (TypeError, ValueError, RuntimeError) as e:
            # a structured, string or byte-swapped array: torch has no type for it
            bad("%r: stored as %s, which torch cannot read: %s" % (name, view.dtype, e))
    if str(t.dtype).replace("torch.", "") != dt:
        bad("%r: stored as %s, which is not torch %s" % (name, view.dtype, dt))
    return t


def _arrow_view(view, what, name, path, bad):
    try:
        import pyarrow as pa
    except ImportError:
        bad("%r is an Arrow %s, and pyarrow is not installed here (load it with pyarrow "
            "installed)" % (name, what))
    from ._snapfile import SnapshotError

    try:
        reader = pa.ipc.open_stream(pa.py_buffer(view))
        table = reader.read_all()
        # full=True reads the leaf's buffers now (its pages load at load() time): the cheap
        # check lets a damaged offset through, and pyarrow would then read out of bounds
        table.validate(full=True)
    except (pa.ArrowException, ValueError, OSError) as e:   # ArrowIOError is an OSError
        raise SnapshotError("%s: Arrow data of %r cannot be read: %s" % (path, name, e)) from None
    if what == "table":
        return table
    if what == "batch":
        return table.combine_chunks().to_batches()[0] if table.num_rows else \
            pa.RecordBatch.from_pylist([], schema=table.schema)
    col = table.column(0)
    if what == "chunked":
        return col
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


# ---- working sets ------------------------------------------------------------------------

def record_working_set(path, state):
    """Store in the snapshot at `path` the working set `state` (what load(path) returned)
    has recorded since it was loaded, keeping every page's contents as saved (the program's
    writes are not saved: save() does that). The file is rewritten atomically."""
    from .snapshot import rewrite_working_set

    if not isinstance(state, LoadedState):
        raise InvalidArgumentError("record_working_set() takes what load() returned")
    if state.format != "pylazymem":
        raise InvalidArgumentError("%s is a %s file, which has no working set: convert it with "
                                   "plm.save(new_path, state)" % (state.path, state.format))
    src = state.region._snapshot
    if src is None or os.path.realpath(src[0]) != os.path.realpath(os.fsdecode(path)):
        raise InvalidArgumentError("record_working_set(%r): that state was loaded from %r"
                                   % (os.fsdecode(path), src[0] if src else None))
    return rewrite_working_set(path, state._recorded_working_set(), expect_id=src[1])
