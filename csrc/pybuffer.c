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
 * (The module also has the Gate, which counts a region's calls in progress: see its section.)
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

/* ---- Gate: the calls in progress into a region ------------------------------------------ */

/*
 * close() must wait for the calls in progress (they run with the GIL released) before it
 * frees the native region, so every call is counted in and out. The count was kept by a
 * context manager written in Python, and a KeyboardInterrupt raised between two of its
 * bytecodes could leave it off by one: close() then waited forever. CPython runs signal
 * handlers, and so raises KeyboardInterrupt, only between bytecodes; this context manager
 * runs none between counting a call and the `with` block owning it, nor between the block's
 * end and counting it out, so one interrupt cannot tear the two apart.
 *
 * The gate owns the native region's handle (lm): __enter__ hands it out, close() takes it
 * away once, waits for the calls in progress and calls the teardown with it (or leaves that
 * to the last call to end, when called from inside one), so an interrupt anywhere can leak
 * the region at worst, never free it twice. A hold() counts a call that ends on another
 * thread (a background checkpoint) and is counted out by release() or when it is freed.
 *
 * State other than the count is guarded by the GIL: every method holds it throughout and
 * runs no Python code while it changes anything (hooks and the teardown are called once the
 * state is consistent). The count is also guarded by mu, under which close() waits without
 * the GIL.
 */
#include <pthread.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t idle;
    long users;          /* calls in progress, holds included (under mu) */
    PyObject *lm;        /* what __enter__ returns; NULL while closed */
    PyObject *reason;    /* the message of the error __enter__ raises while closed */
    PyObject *callers;   /* dict: thread ident -> calls in progress on that thread */
    PyObject *pending, *pending_lm;  /* pending(pending_lm) is run by the call that ends last
                                        (close() from inside a call) */
    PyObject *closing_lm;  /* borrowed: the handle a close() holds while it waits for the calls
                              in progress (forget() in a fork child returns it: the closing
                              thread is the parent's) */
    PyObject *on_enter;  /* called with lm once a reporting call is counted: may raise */
    PyObject *error_type, *on_error;  /* on_error() when a call raises error_type */
} GateObject;

typedef struct {
    PyObject_HEAD
    GateObject *gate;
} QuietObject;

typedef struct {
    PyObject_HEAD
    GateObject *gate;
    PyObject *lm;
    int held;
    unsigned long creator;   /* counted as a call of this thread until adopt() (0: adopted) */
} HoldObject;

static PyTypeObject GateType, QuietType, HoldType;

static void gate_init_sync(GateObject *g)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);   /* a clock change delays no wait */
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->idle, &ca);
    pthread_condattr_destroy(&ca);
}

static PyObject *gate_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw))) {
        PyErr_SetString(PyExc_TypeError, "Gate() takes no arguments");
        return NULL;
    }
    GateObject *g = (GateObject *)type->tp_alloc(type, 0);
    if (!g)
        return NULL;
    gate_init_sync(g);
    if (!(g->callers = PyDict_New())) {
        Py_DECREF(g);
        return NULL;
    }
    return (PyObject *)g;
}

static int gate_traverse(GateObject *g, visitproc visit, void *arg)
{
    Py_VISIT(g->lm);
    Py_VISIT(g->reason);
    Py_VISIT(g->callers);
    Py_VISIT(g->pending);
    Py_VISIT(g->pending_lm);
    Py_VISIT(g->on_enter);
    Py_VISIT(g->error_type);
    Py_VISIT(g->on_error);
    return 0;
}

static int gate_clear(GateObject *g)
{
    Py_CLEAR(g->lm);
    Py_CLEAR(g->reason);
    Py_CLEAR(g->callers);
    Py_CLEAR(g->pending);
    Py_CLEAR(g->pending_lm);
    Py_CLEAR(g->on_enter);
    Py_CLEAR(g->error_type);
    Py_CLEAR(g->on_error);
    return 0;
}

static void gate_dealloc(GateObject *g)
{
    PyObject_GC_UnTrack(g);
    gate_clear(g);
    /* mu and idle are not destroyed: after fork() the child's copy may be held (by a thread
       of the parent that is not there); glibc's destroy frees nothing anyway. */
    Py_TYPE(g)->tp_free((PyObject *)g);
}

/* Thread tid's calls in progress, changed by delta (>= 0 afterwards); -1 on error. */
static long gate_calls_of(GateObject *g, unsigned long tid, long delta)
{
    if (!g->callers)
        return 0;
    PyObject *key = PyLong_FromUnsignedLong(tid);
    if (!key)
        return -1;
    PyObject *v = PyDict_GetItemWithError(g->callers, key);
    long n = v ? PyLong_AsLong(v) : 0;
    if (!v && PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    n += delta;
    int rc = 0;
    if (delta && n > 0) {
        PyObject *nv = PyLong_FromLong(n);
        rc = nv ? PyDict_SetItem(g->callers, key, nv) : -1;
        Py_XDECREF(nv);
    } else if (delta && v) {
        rc = PyDict_DelItem(g->callers, key);
    }
    Py_DECREF(key);
    return rc < 0 ? -1 : (n > 0 ? n : 0);
}

static long gate_mine(GateObject *g, long delta)
{
    return gate_calls_of(g, PyThread_get_thread_ident(), delta);
}

static long gate_count(GateObject *g, long delta)
{
    pthread_mutex_lock(&g->mu);
    long n = g->users += delta;
    if (n <= 0)
        pthread_cond_broadcast(&g->idle);
    pthread_mutex_unlock(&g->mu);
    return n;
}

/* Count a call (per_thread) or a hold out; the teardown a close() from inside a call left
   pending runs when the last one ends. An exception already set (the caller's) is kept,
   unless the teardown raises: -1 then, with its exception. */
static int gate_leave(GateObject *g, int per_thread)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    if (per_thread && gate_mine(g, -1) < 0)
        PyErr_Clear();   /* (only out of memory) the count below is what close() waits for */
    PyObject *finish = NULL, *lm = NULL;
    if (gate_count(g, -1) <= 0 && g->pending) {
        finish = g->pending;
        lm = g->pending_lm;
        g->pending = g->pending_lm = NULL;
    }
    if (finish) {
        PyObject *res = PyObject_CallOneArg(finish, lm);
        Py_DECREF(finish);
        Py_DECREF(lm);
        if (!res) {
            Py_XDECREF(et);
            Py_XDECREF(ev);
            Py_XDECREF(tb);
            return -1;
        }
        Py_DECREF(res);
    }
    PyErr_Restore(et, ev, tb);
    return 0;
}

static int gate_closed_error(GateObject *g)
{
    PyErr_SetObject(closed_error ? closed_error : PyExc_ValueError,
                    g->reason ? g->reason : Py_None);
    return -1;
}

static PyObject *gate_enter_impl(GateObject *g, int report)
{
    if (!g->lm) {
        gate_closed_error(g);
        return NULL;
    }
    if (gate_mine(g, 1) < 0)
        return NULL;
    gate_count(g, 1);
    PyObject *lm = Py_NewRef(g->lm);
    if (report && g->on_enter) {
        PyObject *hook = Py_NewRef(g->on_enter);
        PyObject *res = PyObject_CallOneArg(hook, lm);
        Py_DECREF(hook);
        if (!res) {   /* the call does not happen: counted out again */
            Py_DECREF(lm);
            gate_leave(g, 1);
            return NULL;
        }
        Py_DECREF(res);
    }
    return lm;
}

static PyObject *gate_exit_impl(GateObject *g, PyObject *args)
{
    PyObject *et = PyTuple_GET_SIZE(args) ? PyTuple_GET_ITEM(args, 0) : Py_None;
    /* While the call still counts (the hook reads the native region). */
    if (et != Py_None && g->error_type && g->on_error) {
        int sub = PyObject_IsSubclass(et, g->error_type);
        if (sub < 0)
            PyErr_Clear();
        if (sub == 1) {
            PyObject *hook = Py_NewRef(g->on_error);
            PyObject *res = PyObject_CallNoArgs(hook);
            Py_DECREF(hook);
            if (!res) {   /* its exception replaces the call's; counted out all the same */
                gate_leave(g, 1);
                return NULL;
            }
            Py_DECREF(res);
        }
    }
    if (gate_leave(g, 1) < 0)
        return NULL;
    Py_RETURN_FALSE;
}

static PyObject *gate_enter(GateObject *g, PyObject *unused)
{
    (void)unused;
    return gate_enter_impl(g, 1);
}

static PyObject *gate_exit(GateObject *g, PyObject *args)
{
    return gate_exit_impl(g, args);
}

static PyObject *gate_open(GateObject *g, PyObject *lm)
{
    Py_XSETREF(g->lm, Py_NewRef(lm));
    Py_CLEAR(g->reason);
    Py_RETURN_NONE;
}

/* Wait, without the GIL, until no call is in progress; signal handlers run every 50 ms (an
   exception from one ends the wait: -1). */
static int gate_wait(GateObject *g)
{
    for (;;) {
        long busy;
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&g->mu);
        if (g->users > 0) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_nsec += 50 * 1000 * 1000;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&g->idle, &g->mu, &until);
        }
        busy = g->users;
        pthread_mutex_unlock(&g->mu);
        Py_END_ALLOW_THREADS
        if (busy <= 0)
            return 0;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

/*
 * close(reason, finish): no new calls from now on (they raise the closed error with reason).
 * The handle is taken once: a second close() returns at once. From inside a call on this
 * thread (a signal handler that ran while the call waited), finish(lm) is left to the call
 * that ends last, and close() returns: waiting would wait for itself. Otherwise it waits for
 * the calls in progress, then returns finish(lm). Interrupted while it waits, the gate is open
 * again (calls still run: the region must stay usable, and close() can be called again).
 */
static PyObject *gate_close(GateObject *g, PyObject *args)
{
    PyObject *reason, *finish;
    if (!PyArg_ParseTuple(args, "OO:close", &reason, &finish))
        return NULL;
    if (!g->lm) {   /* closed already (or never opened: a forked child's gate) */
        if (!g->reason)
            g->reason = Py_NewRef(reason);
        Py_RETURN_NONE;
    }
    long mine = gate_mine(g, 0);
    if (mine < 0)
        return NULL;
    PyObject *lm = g->lm;   /* ours now */
    g->lm = NULL;
    Py_XSETREF(g->reason, Py_NewRef(reason));
    if (mine > 0 && g->users > 0) {
        if (finish != Py_None) {
            Py_XSETREF(g->pending, Py_NewRef(finish));
            Py_XSETREF(g->pending_lm, lm);
        } else {
            Py_DECREF(lm);
        }
        Py_RETURN_NONE;
    }
    g->closing_lm = lm;
    int waited = gate_wait(g);
    if (g->closing_lm != lm) {
        /* forget() took it while we waited: a fork from a signal handler that ran inside the
           wait, and this is the child, whose forget() freed the parent's region. Nothing is
           ours to finish (the reference went with it). */
        if (waited < 0)
            return NULL;   /* the interrupt that ended the wait */
        Py_RETURN_NONE;
    }
    g->closing_lm = NULL;
    if (waited < 0) {
        if (!g->lm) {
            g->lm = lm;
            Py_CLEAR(g->reason);
        } else {
            Py_DECREF(lm);
        }
        return NULL;
    }
    PyObject *res = finish != Py_None ? PyObject_CallOneArg(finish, lm) : Py_NewRef(Py_None);
    Py_DECREF(lm);
    return res;
}

/* In a child after fork(): forget everything (the threads counted are the parent's) and
   return the handle, or the one a pending close() held (None: neither). */
static PyObject *gate_forget(GateObject *g, PyObject *unused)
{
    (void)unused;
    gate_init_sync(g);   /* a parent thread may have held mu at the fork */
    g->users = 0;
    PyObject *lm = g->lm;
    g->lm = NULL;
    if (!lm) {
        lm = g->pending_lm;
        g->pending_lm = NULL;
    } else {
        Py_CLEAR(g->pending_lm);
    }
    if (!lm && g->closing_lm)   /* a parent thread's close() was waiting at the fork */
        lm = Py_NewRef(g->closing_lm);
    g->closing_lm = NULL;
    Py_CLEAR(g->pending);
    if (g->callers)
        PyDict_Clear(g->callers);
    return lm ? lm : Py_NewRef(Py_None);
}

static PyObject *gate_set_hooks(GateObject *g, PyObject *args)
{
    PyObject *on_enter, *error_type, *on_error;
    if (!PyArg_ParseTuple(args, "OOO:set_hooks", &on_enter, &error_type, &on_error))
        return NULL;
    Py_XSETREF(g->on_enter, on_enter == Py_None ? NULL : Py_NewRef(on_enter));
    Py_XSETREF(g->error_type, error_type == Py_None ? NULL : Py_NewRef(error_type));
    Py_XSETREF(g->on_error, on_error == Py_None ? NULL : Py_NewRef(on_error));
    Py_RETURN_NONE;
}

static PyObject *gate_quiet(GateObject *g, PyObject *unused)
{
    (void)unused;
    QuietObject *q = PyObject_GC_New(QuietObject, &QuietType);
    if (!q)
        return NULL;
    q->gate = (GateObject *)Py_NewRef(g);
    PyObject_GC_Track(q);
    return (PyObject *)q;
}

static PyObject *gate_hold(GateObject *g, PyObject *unused)
{
    (void)unused;
    if (!g->lm) {
        gate_closed_error(g);
        return NULL;
    }
    /* Until another thread adopts it, a call of this thread: a close() from a signal handler
       on it is deferred rather than wait for a hold only this thread can release. */
    if (gate_mine(g, 1) < 0)
        return NULL;
    HoldObject *h = PyObject_GC_New(HoldObject, &HoldType);
    if (!h) {
        gate_mine(g, -1);
        return NULL;
    }
    h->gate = (GateObject *)Py_NewRef(g);
    h->lm = Py_NewRef(g->lm);
    h->held = 1;
    h->creator = PyThread_get_thread_ident();
    gate_count(g, 1);
    PyObject_GC_Track(h);
    return (PyObject *)h;
}

static PyObject *gate_users(GateObject *g, void *closure)
{
    (void)closure;
    pthread_mutex_lock(&g->mu);
    long n = g->users;
    pthread_mutex_unlock(&g->mu);
    return PyLong_FromLong(n);
}

static PyObject *gate_mine_get(GateObject *g, void *closure)
{
    (void)closure;
    long n = gate_mine(g, 0);
    return n < 0 ? NULL : PyLong_FromLong(n);
}

static PyObject *gate_lm_get(GateObject *g, void *closure)
{
    (void)closure;
    return Py_NewRef(g->lm ? g->lm : Py_None);
}

static PyMethodDef gate_methods[] = {
    {"__enter__", (PyCFunction)gate_enter, METH_NOARGS, "count a call in; the native region"},
    {"__exit__", (PyCFunction)gate_exit, METH_VARARGS, "count the call out"},
    {"open", (PyCFunction)gate_open, METH_O, "let calls in: __enter__ returns this object"},
    {"close", (PyCFunction)gate_close, METH_VARARGS,
     "close(reason, finish): no new calls; wait for those in progress, then finish(lm)"},
    {"forget", (PyCFunction)gate_forget, METH_NOARGS, "after fork(): reset, return the handle"},
    {"set_hooks", (PyCFunction)gate_set_hooks, METH_VARARGS,
     "set_hooks(on_enter(lm), error_type, on_error())"},
    {"quiet", (PyCFunction)gate_quiet, METH_NOARGS, "the same gate without on_enter"},
    {"hold", (PyCFunction)gate_hold, METH_NOARGS,
     "count a call that another thread ends (release(), or freeing the hold)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef gate_getset[] = {
    {"users", (getter)gate_users, NULL, "calls in progress (holds included)", NULL},
    {"mine", (getter)gate_mine_get, NULL, "calls in progress on this thread", NULL},
    {"lm", (getter)gate_lm_get, NULL, "the native region (None: closed)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylazymem._buffer.Gate",
    .tp_basicsize = sizeof(GateObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Counts the calls in progress into a region (a context manager).",
    .tp_new = gate_new,
    .tp_dealloc = (destructor)gate_dealloc,
    .tp_traverse = (traverseproc)gate_traverse,
    .tp_clear = (inquiry)gate_clear,
    .tp_methods = gate_methods,
    .tp_getset = gate_getset,
};

static int quiet_traverse(QuietObject *q, visitproc visit, void *arg)
{
    Py_VISIT(q->gate);
    return 0;
}

static int quiet_clear(QuietObject *q)
{
    Py_CLEAR(q->gate);
    return 0;
}

static void quiet_dealloc(QuietObject *q)
{
    PyObject_GC_UnTrack(q);
    quiet_clear(q);
    PyObject_GC_Del(q);
}

static PyObject *quiet_enter(QuietObject *q, PyObject *unused)
{
    (void)unused;
    return gate_enter_impl(q->gate, 0);
}

static PyObject *quiet_exit(QuietObject *q, PyObject *args)
{
    return gate_exit_impl(q->gate, args);
}

static PyMethodDef quiet_methods[] = {
    {"__enter__", (PyCFunction)quiet_enter, METH_NOARGS, "count a call in, not reporting"},
    {"__exit__", (PyCFunction)quiet_exit, METH_VARARGS, "count the call out"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject QuietType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylazymem._buffer.QuietGate",
    .tp_basicsize = sizeof(QuietObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A Gate that does not call its on_enter hook.",
    .tp_dealloc = (destructor)quiet_dealloc,
    .tp_traverse = (traverseproc)quiet_traverse,
    .tp_clear = (inquiry)quiet_clear,
    .tp_methods = quiet_methods,
};

/* Counted out once: by release(), else when the hold is freed. -1 with the teardown's
   exception when it ran and raised. */
static void hold_unmine(HoldObject *h)
{
    if (h->creator && h->gate && gate_calls_of(h->gate, h->creator, -1) < 0)
        PyErr_Clear();   /* (only out of memory) */
    h->creator = 0;
}

static int hold_drop(HoldObject *h)
{
    if (!h->held || !h->gate)
        return 0;
    h->held = 0;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    hold_unmine(h);
    PyErr_Restore(et, ev, tb);
    return gate_leave(h->gate, 0);
}

static int hold_traverse(HoldObject *h, visitproc visit, void *arg)
{
    Py_VISIT(h->gate);
    Py_VISIT(h->lm);
    return 0;
}

static int hold_clear(HoldObject *h)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);   /* freed while an exception propagates: it stays */
    if (hold_drop(h) < 0)
        PyErr_WriteUnraisable((PyObject *)h);
    PyErr_Restore(et, ev, tb);
    Py_CLEAR(h->gate);
    Py_CLEAR(h->lm);
    return 0;
}

static void hold_dealloc(HoldObject *h)
{
    PyObject_GC_UnTrack(h);
    hold_clear(h);
    PyObject_GC_Del(h);
}

static PyObject *hold_release(HoldObject *h, PyObject *unused)
{
    (void)unused;
    if (hold_drop(h) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *hold_adopt(HoldObject *h, PyObject *unused)
{
    (void)unused;
    if (h->held)
        hold_unmine(h);
    Py_RETURN_NONE;
}

static PyObject *hold_lm(HoldObject *h, void *closure)
{
    (void)closure;
    return Py_NewRef(h->held && h->lm ? h->lm : Py_None);
}

static PyMethodDef hold_methods[] = {
    {"release", (PyCFunction)hold_release, METH_NOARGS, "count the call out (once)"},
    {"adopt", (PyCFunction)hold_adopt, METH_NOARGS,
     "no longer a call of the thread that made the hold (the thread that ends it has it)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef hold_getset[] = {
    {"lm", (getter)hold_lm, NULL, "the native region, valid while held", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject HoldType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pylazymem._buffer.GateHold",
    .tp_basicsize = sizeof(HoldObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A call counted into a Gate until release() (or until freed).",
    .tp_dealloc = (destructor)hold_dealloc,
    .tp_traverse = (traverseproc)hold_traverse,
    .tp_clear = (inquiry)hold_clear,
    .tp_methods = hold_methods,
    .tp_getset = hold_getset,
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
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&RangeType) < 0 ||
        PyType_Ready(&GateType) < 0 || PyType_Ready(&QuietType) < 0 ||
        PyType_Ready(&HoldType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "AddressRange", (PyObject *)&RangeType) < 0 ||
        PyModule_AddObjectRef(m, "Gate", (PyObject *)&GateType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
