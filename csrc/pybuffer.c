/*
 * pybuffer.c: the buffer-protocol base type of pylazymem.Region (module pylazymem._buffer).
 *
 * Python before 3.12 cannot export a buffer from a class written in Python, and memoryview(r)
 * must be zero-copy. This type exports a fixed address range and counts its exports, which
 * also settles what close() may do while numpy arrays or memoryviews still point at the memory
 * (Python's own mmap.close() raises BufferError then; numpy users keep arrays around longer
 * than the object they came from, so here the memory stays valid instead):
 *  - no export left: the range is unmapped at once;
 *  - exports left: the range stays mapped, and served, with its contents; no new export is
 *    given (RegionClosedError). When the last view is released, the owner's
 *    _last_view_released() is called (with the GIL, from whatever released the view) to stop
 *    serving and unmap. A view can never see memory that is not the region's: never a crash,
 *    never zeros where the region's data belongs.
 *
 * Two objects: the Region (a Python subclass of AddressRange) and the Mapping it makes at
 * _attach(), which owns the address range and is what every view holds (view->obj). Views
 * never hold the Region: a Region that keeps views of itself (`r.a = r.ndarray(...)`) is no
 * reference cycle then, and is freed when the program drops it. A cycle through a numpy array
 * is one the garbage collector can never free (arrays do not take part in it): the region's
 * threads, userfaultfd and memory stayed until exit. The Region's teardown, deferred by
 * views, is a callable the Mapping calls when the last of them goes; it holds what the
 * teardown frees, not the Region.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sys/mman.h>

typedef struct {
    PyObject_HEAD
    char *addr;
    Py_ssize_t len;
    Py_ssize_t exports;
    int closed;
    int unmapped;
    int placeholder;   /* after fork(): our PROT_NONE mapping holds the range (map_abandon) */
    PyObject *on_release;   /* called once the last view goes after _detach() left views */
} MappingObject;

typedef struct {
    PyObject_HEAD
    MappingObject *m;   /* NULL until _attach() */
} RangeObject;

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000   /* Linux 4.17; the value is ABI */
#endif

static PyObject *closed_error;   /* set by the package: pylazymem.RegionClosedError */
static PyTypeObject MappingType;

static void unmap_now(MappingObject *self)
{
    if (!self->unmapped) {
        munmap(self->addr, (size_t)self->len);
        self->unmapped = 1;
    }
}

static int closed_buffer(Py_buffer *view)
{
    PyErr_SetString(closed_error ? closed_error : PyExc_ValueError,
                    "operation on a closed region");
    view->obj = NULL;
    return -1;
}

static int map_getbuffer(PyObject *obj, Py_buffer *view, int flags)
{
    MappingObject *self = (MappingObject *)obj;
    if (self->closed)
        return closed_buffer(view);
    if (PyBuffer_FillInfo(view, obj, self->addr, self->len, 0, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void map_releasebuffer(PyObject *obj, Py_buffer *view)
{
    (void)view;
    MappingObject *self = (MappingObject *)obj;
    if (--self->exports != 0 || !self->closed || self->unmapped)
        return;
    /* The region was closed while views were alive: its teardown was waiting for this. The
       range goes first, while still registered (as close() does with no view left). A view
       may be released while an exception propagates: keep it aside during the call. */
    unmap_now(self);
    PyObject *cb = self->on_release;
    self->on_release = NULL;
    if (!cb)
        return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = PyObject_CallObject(cb, NULL);
    if (res)
        Py_DECREF(res);
    else
        PyErr_WriteUnraisable(cb);
    Py_DECREF(cb);
    PyErr_Restore(type, value, tb);
}

static PyBufferProcs map_as_buffer = {map_getbuffer, map_releasebuffer};

static void map_dealloc(MappingObject *self)
{
    /* Exports keep a reference to us, so none is left here. */
    unmap_now(self);
    if (self->placeholder) {
        munmap(self->addr, (size_t)self->len);
        self->placeholder = 0;
    }
    Py_CLEAR(self->on_release);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* No new exports from now on. Returns True if the range is unmapped (now or before), False
   if views keep it mapped: then the on_release callable is called when the last one goes. */
static PyObject *map_detach(MappingObject *self, PyObject *unused)
{
    (void)unused;
    self->closed = 1;
    if (self->unmapped)
        Py_RETURN_TRUE;
    if (self->exports == 0) {
        unmap_now(self);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

/* After fork(), in the child: the range is not mapped in this process (MADV_DONTFORK); forget
   it without munmap, which could hit whatever has been mapped there since. And hold the range
   with an inaccessible mapping while views inherited from the parent may point into it: else
   the next mmap of the child lands there, and such a view reads and writes that memory
   silently; with the placeholder an access faults (SIGSEGV). Where something is mapped there
   already (a range not given up at fork), it is left alone. The parent's teardown is not the
   child's to run: on_release is dropped. */
static PyObject *map_abandon(MappingObject *self, PyObject *unused)
{
    (void)unused;
    if (!self->unmapped && !self->placeholder) {
        void *p = mmap(self->addr, (size_t)self->len, PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED_NOREPLACE, -1, 0);
        if (p == (void *)self->addr)
            self->placeholder = 1;
        else if (p != MAP_FAILED)   /* a kernel that takes NOREPLACE as a hint only */
            munmap(p, (size_t)self->len);
    }
    self->closed = 1;
    self->unmapped = 1;
    Py_CLEAR(self->on_release);
    Py_RETURN_NONE;
}

/* The callable the last view's release calls (None: nothing). Returns the previous one. */
static PyObject *map_set_on_release(MappingObject *self, PyObject *cb)
{
    PyObject *old = self->on_release;
    if (cb == Py_None) {
        self->on_release = NULL;
    } else if (!PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "on_release must be callable or None");
        return NULL;
    } else {
        Py_INCREF(cb);
        self->on_release = cb;
    }
    if (!old) {
        Py_INCREF(Py_None);
        old = Py_None;
    }
    return old;
}

static PyObject *map_exports(MappingObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->exports);
}

static PyMethodDef map_methods[] = {
    {"_detach", (PyCFunction)map_detach, METH_NOARGS, "give up the range (see module doc)"},
    {"_abandon", (PyCFunction)map_abandon, METH_NOARGS, "forget the range without unmapping"},
    {"_set_on_release", (PyCFunction)map_set_on_release, METH_O,
     "callable for the last view's release after _detach(); returns the previous one"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef map_getset[] = {
    {"_exports", (getter)map_exports, NULL, "number of live buffer exports", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylazymem._buffer.Mapping",
    .tp_basicsize = sizeof(MappingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The address range of a region, held by every view of it.",
    .tp_dealloc = (destructor)map_dealloc,
    .tp_as_buffer = &map_as_buffer,
    .tp_methods = map_methods,
    .tp_getset = map_getset,
};

/* ---- AddressRange: the base of Region; its buffer requests go to its Mapping ---------- */

static int range_getbuffer(PyObject *obj, Py_buffer *view, int flags)
{
    RangeObject *self = (RangeObject *)obj;
    if (!self->m)
        return closed_buffer(view);
    return map_getbuffer((PyObject *)self->m, view, flags);   /* view->obj: the Mapping */
}

/* Never called: views hold the Mapping, whose release is called. But it must exist: numpy's
   frombuffer keeps a view (a memoryview) only of a type that has one; of any other it keeps
   the object itself and releases the view at once, so nothing would count its arrays. */
static void range_releasebuffer(PyObject *obj, Py_buffer *view)
{
    (void)obj;
    (void)view;
}

static PyBufferProcs range_as_buffer = {range_getbuffer, range_releasebuffer};

static PyObject *range_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;   /* subclasses take their own arguments */
    (void)kwds;
    return type->tp_alloc(type, 0);
}

static void range_dealloc(RangeObject *self)
{
    /* Never closed (close() detaches): the Mapping unmaps when no view is left. */
    if (self->m && !self->m->closed)
        self->m->closed = 1;
    Py_CLEAR(self->m);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *range_attach(RangeObject *self, PyObject *args)
{
    unsigned long long addr;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "Kn", &addr, &len))
        return NULL;
    if (self->m) {
        PyErr_SetString(PyExc_RuntimeError, "address range already attached");
        return NULL;
    }
    if (len <= 0) {
        PyErr_SetString(PyExc_ValueError, "address range of no bytes");
        return NULL;
    }
    MappingObject *m = PyObject_New(MappingObject, &MappingType);
    if (!m)
        return NULL;
    m->addr = (char *)(uintptr_t)addr;
    m->len = len;
    m->exports = 0;
    m->closed = m->unmapped = m->placeholder = 0;
    m->on_release = NULL;
    self->m = m;
    Py_RETURN_NONE;
}

static PyObject *range_mapping(RangeObject *self, void *closure)
{
    (void)closure;
    PyObject *m = self->m ? (PyObject *)self->m : Py_None;
    Py_INCREF(m);
    return m;
}

static PyObject *range_exports(RangeObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->m ? self->m->exports : 0);
}

static PyObject *range_detach(RangeObject *self, PyObject *unused)
{
    if (!self->m)
        Py_RETURN_TRUE;
    return map_detach(self->m, unused);
}

static PyObject *range_abandon(RangeObject *self, PyObject *unused)
{
    if (!self->m)
        Py_RETURN_NONE;
    return map_abandon(self->m, unused);
}

static PyMethodDef range_methods[] = {
    {"_attach", (PyCFunction)range_attach, METH_VARARGS, "take ownership of (address, nbytes)"},
    {"_detach", (PyCFunction)range_detach, METH_NOARGS, "give up the range (see module doc)"},
    {"_abandon", (PyCFunction)range_abandon, METH_NOARGS, "forget the range without unmapping"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef range_getset[] = {
    {"_exports", (getter)range_exports, NULL, "number of live buffer exports", NULL},
    {"_mapping", (getter)range_mapping, NULL, "the Mapping every view holds (None: none yet)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RangeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylazymem._buffer.AddressRange",
    .tp_basicsize = sizeof(RangeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "An address range exported through the buffer protocol.",
    .tp_new = range_new,
    .tp_dealloc = (destructor)range_dealloc,
    .tp_as_buffer = &range_as_buffer,
    .tp_methods = range_methods,
    .tp_getset = range_getset,
};

static PyObject *set_closed_error(PyObject *mod, PyObject *cls)
{
    (void)mod;
    Py_XINCREF(cls);
    Py_XSETREF(closed_error, cls);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"set_closed_error", set_closed_error, METH_O, "exception raised on buffer requests after close"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pylazymem._buffer", NULL, -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__buffer(void)
{
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&RangeType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&RangeType);
    if (PyModule_AddObject(m, "AddressRange", (PyObject *)&RangeType) < 0) {
        Py_DECREF(&RangeType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
