/* memguard._speedups: the per-chunk path of the ASGI body guard, in C.
 *
 * A request body arrives as one ASGI message per chunk, and a receive wrapper written
 * in Python costs a coroutine frame per chunk, on every suspension and resumption of
 * the app's task as well as at the call (0.2 us for the smallest possible wrapper,
 * measured: 5% of what a fast in-process server spends per 64 KiB chunk). This module
 * removes that frame for the common chunk and nothing else:
 *
 * - BodyCounter is the base class of memguard.body.ASGIBody. The app's receive() is
 *   its Receiver, whose call either runs the Python method _receive_plain (a finished
 *   or refused body) or, while Python keeps ``fast`` set (from the start), returns a
 *   Pending awaitable around the server's receive() (the previous call's, once the app
 *   has let go of it: no allocation per chunk). The first call of a timed body
 *   calls ASGIBody._start_reading() first, a plain method: the sweeper's registration
 *   and the reading task, once.
 * - Pending forwards send/throw/close to the server's awaitable. When that returns a
 *   dict ``{"type": "http.request", "body": <bytes>, "more_body": True}`` and the count
 *   stays under ``threshold`` (the first byte count Python must look at: past the limit,
 *   or a memory check due), it adds the length and hands the message over; the same for
 *   the last chunk (``more_body`` False or absent), which also marks the body done. Any
 *   other message goes to ASGIBody._finish(message), any exception to
 *   ASGIBody._failed(exc): the rules live in Python, once.
 *
 * Slow-body timing: when ``timed``, each call counts itself in ``calls`` and sets a
 * waiting flag, which the Python sweeper reads. No clock is read and no task looked up
 * per chunk (on this project's VM the read was 1-2% of a 64 KiB chunk, the lookup of the
 * running task about 200 instructions): the sweeper times a wait from the first look that
 * finds it, and cancels the task that read the first chunk (ASGIBody.check).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

/* Per 64 KiB chunk the interpreter's own code already overflows the instruction cache,
 * so each cache line of code the C path runs is a miss (cachegrind): the per-chunk
 * functions keep their rare branches in separate cold functions, out of the way. */
#if defined(__GNUC__) || defined(__clang__)
#define COLD __attribute__((cold, noinline))
#define HOT __attribute__((hot))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define COLD
#define HOT
#define UNLIKELY(x) (x)
#endif

static PyObject *str_body, *str_more_body, *str_type;
static PyObject *str_receive_plain, *str_start_reading, *str_finish, *str_failed;
static PyObject *str_throw, *str_close;
static PyObject *CancelledError;

typedef struct {
    PyObject_HEAD
    PyObject *inner;        /* the server's receive */
    Py_ssize_t received;    /* body bytes counted so far */
    Py_ssize_t threshold;   /* the first count Python must see */
    Py_ssize_t calls;       /* receive() calls while timed: tells one wait from the next */
    char fast;              /* the C path may take the next chunk */
    char done;              /* the body ended (its last chunk, or a refusal) */
    char timed;             /* count calls and note waits, for the sweeper */
    char waiting;           /* a receive() is in progress */
} BodyCounter;

typedef struct {
    PyObject_HEAD
    BodyCounter *owner;
    PyObject *iter;         /* the server's awaitable, as an iterator */
} Pending;

static PyTypeObject PendingType;

/* Finished Pendings kept for reuse, as asyncio's C module keeps its future iterators
 * (fi_freelist in Modules/_asynciomodule.c): one receive() per chunk would otherwise be
 * a GC allocation and free per chunk, and each GC allocation also brings the next
 * young-generation collection closer. One body reads one chunk at a time, so a few
 * entries cover every body a loop reads at once. */
#define PENDING_FREE_MAX 16
static Pending *pending_free[PENDING_FREE_MAX];
static int pending_free_count;

/* ---- BodyCounter ------------------------------------------------------------------- */

static int
counter_traverse(BodyCounter *self, visitproc visit, void *arg)
{
    /* The heap subclass's traverse (ASGIBody) visits the type. */
    Py_VISIT(self->inner);
    return 0;
}

static int
counter_clear(BodyCounter *self)
{
    Py_CLEAR(self->inner);
    return 0;
}

static void
counter_dealloc(BodyCounter *self)
{
    /* Reached through the heap subclass's dealloc (ASGIBody), which releases the
     * reference to its type itself: a static base must not. */
    PyObject_GC_UnTrack(self);
    counter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
counter_init(BodyCounter *self, PyObject *args, PyObject *kwds)
{
    /* ASGIBody.__init__ sets the fields; accept and ignore its arguments here. */
    return 0;
}

/* Not on the C path (a finished or refused body): Python. */
COLD static PyObject *
counter_call_python(BodyCounter *self)
{
    return PyObject_CallMethodNoArgs((PyObject *)self, str_receive_plain);
}

/* The iterator of an awaitable that is not a coroutine (a Future, say). Steals the
 * reference to ``awaitable``. */
COLD static PyObject *
awaitable_iter(PyObject *awaitable)
{
    unaryfunc getter = Py_TYPE(awaitable)->tp_as_async != NULL
        ? Py_TYPE(awaitable)->tp_as_async->am_await : NULL;
    if (getter == NULL) {
        PyErr_Format(PyExc_TypeError, "receive() returned a non-awaitable %.100s",
                     Py_TYPE(awaitable)->tp_name);
        Py_DECREF(awaitable);
        return NULL;
    }
    PyObject *iter = getter(awaitable);
    Py_DECREF(awaitable);
    return iter;
}

COLD static Pending *
pending_alloc(void)
{
    return PyObject_GC_New(Pending, &PendingType);
}

/* A receive() call begins a wait: counted for the sweeper when the body is timed. */
static inline void
wait_begins(BodyCounter *self)
{
    if (self->timed) {
        self->calls++;
        self->waiting = 1;
    }
}

/* A Pending around ``iter`` (the server's awaitable, as an iterator; the reference is
 * stolen). */
HOT static PyObject *
pending_new(BodyCounter *self, PyObject *iter)
{
    if (UNLIKELY(!PyCoro_CheckExact(iter))) {  /* a coroutine drives itself (am_send) */
        if ((iter = awaitable_iter(iter)) == NULL) {
            return NULL;
        }
    }
    wait_begins(self);
    /* Tracked by the cycle collector: while it is awaited, the awaiting task's frame
     * holds it, and it holds this body, which holds that task (for the slow-body
     * timer). A task dropped while suspended must still be collectable. */
    Pending *pending;
    if (pending_free_count > 0) {
        pending = pending_free[--pending_free_count];
        _Py_NewReference((PyObject *)pending);
    }
    else if (UNLIKELY((pending = pending_alloc()) == NULL)) {
        Py_DECREF(iter);
        self->waiting = 0;
        return NULL;
    }
    Py_INCREF(self);
    pending->owner = self;
    pending->iter = iter;
    PyObject_GC_Track(pending);
    return (PyObject *)pending;
}

/* The first receive() of a timed body: ASGIBody._start_reading() registers the body
 * with its loop's sweeper and notes the task reading it. -1 with the error set when it
 * raised. */
COLD static int
counter_start_reading(BodyCounter *self)
{
    PyObject *res = PyObject_CallMethodNoArgs((PyObject *)self, str_start_reading);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* ---- Receiver: the receive() the app calls ------------------------------------------
 *
 * A static type with a vectorcall entry around the body: calling an instance of
 * ASGIBody itself (a heap type, which cannot have one on 3.11) builds an argument tuple
 * and checks the result: 48 instructions more per chunk (callgrind). */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    BodyCounter *body;
    /* The Pending the last call returned, kept for the next one (see below). */
    Pending *spare;
} Receiver;

static PyTypeObject ReceiverType;

/* receive(): the server's receive() in a Pending, or Python's (a finished or refused
 * body). Each call waits for the previous one's result (ASGI gives messages in order),
 * so the Pending the previous call returned is free again once the app has let go of it
 * (only this receiver holds it): it is reused. Allocated per chunk, even from the free
 * list, it cost a cycle collector's tracking and untracking, a reference and a
 * deallocation per chunk: 0.3 to 0.4 points of a 64 MiB upload's 2.4 to 2.6 % in two
 * comparisons of ten alternating processes each (benchmarks/body_guard.py). One the app
 * still holds is left to it and a new one is made. */
HOT static PyObject *
receiver_vectorcall(Receiver *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (UNLIKELY(PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL)) {
        PyErr_SetString(PyExc_TypeError, "receive() takes no arguments");
        return NULL;
    }
    BodyCounter *body = self->body;
    if (UNLIKELY(!body->fast || body->inner == NULL)) {
        return counter_call_python(body);
    }
    if (UNLIKELY(body->timed && body->calls == 0) && counter_start_reading(body) < 0) {
        return NULL;
    }
    PyObject *iter = PyObject_Vectorcall(body->inner, NULL, 0, NULL);
    if (UNLIKELY(iter == NULL)) {
        return NULL;
    }
    Pending *spare = self->spare;
    if (spare != NULL && Py_REFCNT(spare) == 1 && PyCoro_CheckExact(iter)) {
        /* Not NULL when the app let go of it without awaiting it to the end: the
         * server's awaitable is released now (a Pending dropped so was freed at once),
         * last, since that may run the server's code. */
        PyObject *abandoned = spare->iter;
        wait_begins(body);
        spare->iter = iter;
        Py_INCREF(spare);
        Py_XDECREF(abandoned);
        return (PyObject *)spare;
    }
    PyObject *fresh = pending_new(body, iter);
    if (fresh != NULL) {
        Py_INCREF(fresh);
        Py_XSETREF(self->spare, (Pending *)fresh);
    }
    return fresh;
}

static int
receiver_traverse(Receiver *self, visitproc visit, void *arg)
{
    Py_VISIT(self->body);
    Py_VISIT(self->spare);
    return 0;
}

static int
receiver_clear(Receiver *self)
{
    Py_CLEAR(self->body);
    Py_CLEAR(self->spare);
    return 0;
}

static void
receiver_dealloc(Receiver *self)
{
    PyObject_GC_UnTrack(self);
    receiver_clear(self);
    PyObject_GC_Del(self);
}

static PyMemberDef receiver_members[] = {
    {"body", T_OBJECT, offsetof(Receiver, body), READONLY, "the body it reads"},
    {NULL}
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._speedups.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "The receive() an app gets for a body: BodyCounter.receiver().",
    .tp_vectorcall_offset = offsetof(Receiver, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)receiver_traverse,
    .tp_clear = (inquiry)receiver_clear,
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_members = receiver_members,
};

static PyObject *
counter_receiver(BodyCounter *self, PyObject *unused)
{
    Receiver *receiver = PyObject_GC_New(Receiver, &ReceiverType);
    if (receiver == NULL) {
        return NULL;
    }
    receiver->vectorcall = (vectorcallfunc)receiver_vectorcall;
    Py_INCREF(self);
    receiver->body = self;
    receiver->spare = NULL;
    PyObject_GC_Track(receiver);
    return (PyObject *)receiver;
}

static PyMethodDef counter_methods[] = {
    {"receiver", (PyCFunction)counter_receiver, METH_NOARGS,
     "receiver(): the receive() the app calls, counted in C."},
    {NULL}
};

static PyMemberDef counter_members[] = {
    {"_receive", T_OBJECT, offsetof(BodyCounter, inner), 0, "the server's receive"},
    {"received", T_PYSSIZET, offsetof(BodyCounter, received), 0, NULL},
    {"_threshold", T_PYSSIZET, offsetof(BodyCounter, threshold), 0, NULL},
    {"_calls", T_PYSSIZET, offsetof(BodyCounter, calls), 0, NULL},
    {"_fast", T_BOOL, offsetof(BodyCounter, fast), 0, NULL},
    {"done", T_BOOL, offsetof(BodyCounter, done), 0, NULL},
    {"_timed", T_BOOL, offsetof(BodyCounter, timed), 0, NULL},
    {"_waiting", T_BOOL, offsetof(BodyCounter, waiting), 0, NULL},
    {NULL}
};

static PyTypeObject BodyCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._speedups.BodyCounter",
    .tp_basicsize = sizeof(BodyCounter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Base of memguard.body.ASGIBody: the per-chunk receive path in C.",
    .tp_traverse = (traverseproc)counter_traverse,
    .tp_clear = (inquiry)counter_clear,
    .tp_dealloc = (destructor)counter_dealloc,
    .tp_members = counter_members,
    .tp_methods = counter_methods,
    .tp_init = (initproc)counter_init,
    .tp_new = PyType_GenericNew,
};

/* ---- Pending ----------------------------------------------------------------------- */

static int
pending_traverse(Pending *self, visitproc visit, void *arg)
{
    Py_VISIT(self->owner);
    Py_VISIT(self->iter);
    return 0;
}

static int
pending_clear(Pending *self)
{
    Py_CLEAR(self->owner);
    Py_CLEAR(self->iter);
    return 0;
}

HOT static void
pending_dealloc(Pending *self)
{
    PyObject_GC_UnTrack(self);
    pending_clear(self);
    if (pending_free_count < PENDING_FREE_MAX) {
        pending_free[pending_free_count++] = self;
        return;
    }
    PyObject_GC_Del(self);
}

/* Every message the C path does not count goes to ASGIBody._finish(message), and an
 * error a dict lookup raised (a key whose __eq__ raises) is raised. Steals the
 * reference to ``message``. */
COLD static PyObject *
pending_returned_python(BodyCounter *owner, PyObject *message)
{
    if (PyErr_Occurred()) {
        Py_DECREF(message);
        return NULL;
    }
    PyObject *result = PyObject_CallMethodOneArg((PyObject *)owner, str_finish, message);
    Py_DECREF(message);
    return result;
}

/* The last chunk of a body, counted here when it stays under ``threshold``: a dict
 * ``{"type": "http.request", "body": <bytes>}`` whose ``more_body`` is False or absent
 * (its type is read: other messages have no more_body either). The body is then done
 * and leaves the C path; the sweeper drops it at its next look, the request's end
 * closes it. 1 when taken. */
COLD static int
counter_took_last(BodyCounter *owner, PyObject *message, PyObject *more)
{
    if (more != Py_False && (more != NULL || PyErr_Occurred())) {
        return 0;
    }
    PyObject *type = PyDict_GetItemWithError(message, str_type);
    if (type == NULL || !PyUnicode_Check(type)
            || PyUnicode_CompareWithASCIIString(type, "http.request") != 0) {
        return 0;
    }
    PyObject *body = PyDict_GetItemWithError(message, str_body);
    if (body == NULL || !PyBytes_CheckExact(body)) {
        return 0;
    }
    Py_ssize_t received = owner->received + PyBytes_GET_SIZE(body);
    if (received >= owner->threshold) {
        return 0;
    }
    owner->received = received;
    owner->done = 1;
    owner->fast = 0;
    return 1;
}

/* The server's receive() returned ``message``: count it here or hand it to Python.
 * Steals the reference to ``message``; returns a new reference or NULL.
 *
 * A middle chunk is a dict whose ``more_body`` is True and whose ``body`` is bytes: only
 * an http.request has those, and counting another message's bytes could only refuse
 * sooner, so its ``type`` is not read. The two keys are looked up, not read in place
 * with PyDict_Next: that walk is 150 instructions fewer a chunk but code the
 * interpreter runs nowhere else per chunk, and each of its cache lines is an
 * instruction-cache miss (cachegrind: 7 to 9 more a chunk), where lookups run the code
 * Starlette's own ``message.get()`` has just run. */
HOT static PyObject *
pending_returned(Pending *self, PyObject *message)
{
    BodyCounter *owner = self->owner;
    owner->waiting = 0;
    if (PyDict_CheckExact(message)) {
        PyObject *more = PyDict_GetItemWithError(message, str_more_body);
        if (more == Py_True) {
            PyObject *body = PyDict_GetItemWithError(message, str_body);
            if (body != NULL && PyBytes_CheckExact(body)) {
                Py_ssize_t received = owner->received + PyBytes_GET_SIZE(body);
                if (received < owner->threshold) {
                    owner->received = received;
                    return message;
                }
            }
        }
        else if (counter_took_last(owner, message, more)) {
            return message;
        }
    }
    return pending_returned_python(owner, message);
}

/* The exception being raised, as an instance with its traceback; the error is cleared. */
COLD static PyObject *
fetch_exception(void)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL) {
        PyException_SetTraceback(value, tb);
    }
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* The StopIteration being raised: its value (a new reference; NULL with an error set if
 * there is none). The error is cleared. */
COLD static PyObject *
fetch_stop_value(void)
{
    PyObject *stop = fetch_exception();
    PyObject *value = stop != NULL ? PyObject_GetAttrString(stop, "value") : NULL;
    Py_XDECREF(stop);
    return value;
}

/* throw(typ[, val[, tb]])'s exception, raised here (the error is set): what a generator
 * does when what it delegates to has no throw(), or has ended. -1 when ``args`` are not
 * a throw()'s (a TypeError is set instead). */
COLD static int
set_thrown(PyObject *args)
{
    PyObject *typ, *val = NULL, *tb = NULL;
    if (!PyArg_UnpackTuple(args, "throw", 1, 3, &typ, &val, &tb)) {
        return -1;
    }
    if (PyExceptionInstance_Check(typ)) {
        PyErr_SetObject((PyObject *)Py_TYPE(typ), typ);
    }
    else {
        PyErr_SetObject(typ, val);
    }
    return 0;
}

/* iter.close(), when it has one; -1 with the error set when it raised. */
COLD static int
close_iterator(PyObject *iter)
{
    PyObject *close = PyObject_GetAttr(iter, str_close);
    if (close == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *res = PyObject_CallNoArgs(close);
    Py_DECREF(close);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

/* The server's receive() raised (the error is set): ASGIBody._failed(exc) re-raises it
 * or answers with a message (a slow-body timeout turned into a 408). */
COLD static PyObject *
pending_raised(Pending *self)
{
    self->owner->waiting = 0;
    if (!PyErr_ExceptionMatches(CancelledError)) {
        return NULL;  /* only a cancellation can be the sweeper's */
    }
    PyObject *value = fetch_exception();
    PyObject *result = NULL;
    if (value != NULL) {
        result = PyObject_CallMethodOneArg((PyObject *)self->owner, str_failed, value);
    }
    Py_XDECREF(value);
    return result;
}

COLD static PySendResult
pending_reused(PyObject **presult)
{
    PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited receive()");
    *presult = NULL;
    return PYGEN_ERROR;
}

HOT static PySendResult
pending_am_send(Pending *self, PyObject *arg, PyObject **presult)
{
    if (UNLIKELY(self->iter == NULL)) {
        return pending_reused(presult);
    }
    PyObject *res = NULL;
    PySendResult status = PyIter_Send(self->iter, arg, &res);
    if (status == PYGEN_NEXT) {
        *presult = res;
        return PYGEN_NEXT;
    }
    Py_CLEAR(self->iter);
    PyObject *out = status == PYGEN_RETURN ? pending_returned(self, res) : pending_raised(self);
    *presult = out;
    return out == NULL ? PYGEN_ERROR : PYGEN_RETURN;
}

/* StopIteration(value) as the error, whatever value is (a tuple would be unpacked). */
COLD static void
set_stop_iteration(PyObject *value)
{
    PyObject *exc = PyObject_CallOneArg(PyExc_StopIteration, value);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_StopIteration, exc);
        Py_DECREF(exc);
    }
}

static PyObject *
pending_finish_send(PySendResult status, PyObject *result)
{
    if (status == PYGEN_NEXT) {
        return result;
    }
    if (status == PYGEN_RETURN) {
        set_stop_iteration(result);
        Py_DECREF(result);
    }
    return NULL;
}

static PyObject *
pending_iternext(Pending *self)
{
    PyObject *result;
    PySendResult status = pending_am_send(self, Py_None, &result);
    return pending_finish_send(status, result);
}

static PyObject *
pending_send(Pending *self, PyObject *value)
{
    PyObject *result;
    PySendResult status = pending_am_send(self, value, &result);
    return pending_finish_send(status, result);
}

COLD static PyObject *
pending_throw(Pending *self, PyObject *args)
{
    if (self->iter == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited receive()");
        return NULL;
    }
    PyObject *throw = PyObject_GetAttr(self->iter, str_throw);
    if (throw == NULL) {
        /* An iterator without throw(): raise the exception here, as a generator
         * delegating to it would. */
        PyErr_Clear();
        if (set_thrown(args) < 0) {
            return NULL;
        }
        Py_CLEAR(self->iter);
        PyObject *out = pending_raised(self);
        if (out != NULL) {
            set_stop_iteration(out);
            Py_DECREF(out);
        }
        return NULL;
    }
    PyObject *res = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    if (res != NULL) {
        return res;  /* the server's receive caught it and waits again */
    }
    Py_CLEAR(self->iter);
    PyObject *out;
    if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        PyObject *message = fetch_stop_value();
        if (message == NULL) {
            return NULL;
        }
        out = pending_returned(self, message);
    }
    else {
        out = pending_raised(self);
    }
    if (out != NULL) {
        set_stop_iteration(out);
        Py_DECREF(out);
    }
    return NULL;
}

COLD static PyObject *
pending_close(Pending *self, PyObject *Py_UNUSED(ignored))
{
    if (self->iter != NULL) {
        self->owner->waiting = 0;
        if (close_iterator(self->iter) < 0) {
            return NULL;
        }
        Py_CLEAR(self->iter);
    }
    Py_RETURN_NONE;
}

HOT static PyObject *
pending_await(Pending *self)
{
    Py_INCREF(self);
    return (PyObject *)self;
}

static PyAsyncMethods pending_as_async = {
    .am_await = (unaryfunc)pending_await,
    .am_send = (sendfunc)pending_am_send,
};

static PyMethodDef pending_methods[] = {
    {"send", (PyCFunction)pending_send, METH_O, NULL},
    {"throw", (PyCFunction)pending_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)pending_close, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject PendingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._speedups.Pending",
    .tp_basicsize = sizeof(Pending),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One receive() in progress, counted when it returns.",
    .tp_traverse = (traverseproc)pending_traverse,
    .tp_clear = (inquiry)pending_clear,
    .tp_dealloc = (destructor)pending_dealloc,
    .tp_as_async = &pending_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)pending_iternext,
    .tp_methods = pending_methods,
};

/* ---- Guarded: the middleware's call of the app, without a coroutine frame ---------- */

/* What the middleware's __call__ returns: an awaitable that calls
 * ``app(scope, receive, send)`` when first driven, forwards send/throw/close to what that
 * returned, and once it has ended (returned or raised) calls
 * ``after(exc or None, *after_args)`` once. ``after`` raises to end with an error,
 * returns None to end, or returns an awaitable to await before ending (a refusal to
 * send). Every coroutine frame between the server and the app is resumed at each
 * suspension of the request's task, once per body chunk: this object forwards in C
 * what an ``async def __call__`` would resume in the interpreter. */

#define GUARDED_MAX_ARGS 6

typedef struct {
    PyObject_HEAD
    PyObject *call[4];      /* app, scope, receive, send: until the app is called */
    PyObject *iter;         /* what is awaited: the app's, then after()'s */
    PyObject *after;        /* NULL once called */
    PyObject *args[GUARDED_MAX_ARGS + 1];  /* [0] is the exception slot */
    Py_ssize_t nargs;       /* extra arguments in args[1:] */
} Guarded;

static PyTypeObject GuardedType;

static int
guarded_traverse(Guarded *self, visitproc visit, void *arg)
{
    for (int i = 0; i < 4; i++) {
        Py_VISIT(self->call[i]);
    }
    Py_VISIT(self->iter);
    Py_VISIT(self->after);
    for (Py_ssize_t i = 1; i <= self->nargs; i++) {
        Py_VISIT(self->args[i]);
    }
    return 0;
}

static void
guarded_clear_after(Guarded *self)
{
    Py_CLEAR(self->after);
    for (Py_ssize_t i = 1; i <= self->nargs; i++) {
        Py_CLEAR(self->args[i]);
    }
}

static void
guarded_clear_call(Guarded *self)
{
    for (int i = 0; i < 4; i++) {
        Py_CLEAR(self->call[i]);
    }
}

static int
guarded_clear(Guarded *self)
{
    guarded_clear_call(self);
    Py_CLEAR(self->iter);
    guarded_clear_after(self);
    return 0;
}

/* The app's awaitable ended, with ``exc`` (NULL: it returned). Calls after() and
 * returns a new reference: Py_None to end, an iterator to drive next, or NULL with
 * the error set. */
COLD static PyObject *
guarded_finish(Guarded *self, PyObject *exc)
{
    PyObject *after = self->after;
    self->after = NULL;
    self->args[0] = exc != NULL ? exc : Py_None;
    PyObject *result = PyObject_Vectorcall(after, self->args, 1 + self->nargs, NULL);
    self->args[0] = NULL;
    Py_DECREF(after);
    guarded_clear_after(self);
    if (result == NULL || result == Py_None) {
        return result;
    }
    if (PyCoro_CheckExact(result)) {
        return result;
    }
    return awaitable_iter(result);
}

/* One step of the app's awaitable (or after()'s) ended with ``status``/``res``: hand on
 * what it yielded, or end the app's part and go on with after()'s. */
COLD static PySendResult
guarded_step(Guarded *self, PySendResult status, PyObject *res, PyObject **presult)
{
    for (;;) {
        if (status == PYGEN_NEXT) {
            *presult = res;
            return PYGEN_NEXT;
        }
        Py_CLEAR(self->iter);
        if (self->after == NULL) {  /* after()'s awaitable ended: so does this */
            *presult = res;
            return status;
        }
        PyObject *exc = NULL;
        if (status == PYGEN_RETURN) {
            Py_DECREF(res);
        }
        else if ((exc = fetch_exception()) == NULL) {
            *presult = NULL;
            return PYGEN_ERROR;
        }
        PyObject *next = guarded_finish(self, exc);
        Py_XDECREF(exc);
        if (next == NULL || next == Py_None) {
            *presult = next;
            return next == NULL ? PYGEN_ERROR : PYGEN_RETURN;
        }
        self->iter = next;
        res = NULL;
        status = PyIter_Send(next, Py_None, &res);
    }
}

/* The first drive: call the app. An app that raises at the call is an app that
 * raised: after() sees it. */
COLD static PySendResult
guarded_start(Guarded *self, PyObject *arg, PyObject **presult)
{
    PyObject *awaitable = PyObject_Vectorcall(self->call[0], self->call + 1, 3, NULL);
    guarded_clear_call(self);
    if (awaitable != NULL) {
        self->iter = PyCoro_CheckExact(awaitable) ? awaitable : awaitable_iter(awaitable);
    }
    if (self->iter == NULL) {
        return guarded_step(self, PYGEN_ERROR, NULL, presult);
    }
    PyObject *res = NULL;
    PySendResult status = PyIter_Send(self->iter, arg, &res);
    return guarded_step(self, status, res, presult);
}

COLD static PySendResult
guarded_not_started(Guarded *self, PyObject *arg, PyObject **presult)
{
    if (self->call[0] != NULL) {
        return guarded_start(self, arg, presult);
    }
    PyErr_SetString(PyExc_RuntimeError, "cannot reuse already awaited coroutine");
    *presult = NULL;
    return PYGEN_ERROR;
}

/* Twice per body chunk (the app's task suspends and resumes): the forwarding alone is
 * hot, the end of the app's part is not (each cache line here is an instruction-cache
 * miss per chunk). */
HOT static PySendResult
guarded_am_send(Guarded *self, PyObject *arg, PyObject **presult)
{
    if (UNLIKELY(self->iter == NULL)) {
        return guarded_not_started(self, arg, presult);
    }
    PyObject *res = NULL;
    PySendResult status = PyIter_Send(self->iter, arg, &res);
    if (status == PYGEN_NEXT) {
        *presult = res;
        return PYGEN_NEXT;
    }
    return guarded_step(self, status, res, presult);
}

static PyObject *
guarded_iternext(Guarded *self)
{
    PyObject *result;
    PySendResult ended = guarded_am_send(self, Py_None, &result);
    return pending_finish_send(ended, result);
}

static PyObject *
guarded_send(Guarded *self, PyObject *value)
{
    PyObject *result;
    PySendResult ended = guarded_am_send(self, value, &result);
    return pending_finish_send(ended, result);
}

COLD static PyObject *
guarded_throw(Guarded *self, PyObject *args)
{
    if (self->iter == NULL) {
        /* Not started, or over: the exception is raised here (a coroutine that has not
         * started raises it too, without running its body). */
        guarded_clear_call(self);
        if (set_thrown(args) < 0 || self->after == NULL) {
            return NULL;
        }
        PyObject *result;
        PySendResult ended = guarded_step(self, PYGEN_ERROR, NULL, &result);
        return pending_finish_send(ended, result);
    }
    PySendResult status;
    PyObject *res = NULL;
    PyObject *throw = PyObject_GetAttr(self->iter, str_throw);
    if (throw == NULL) {
        return NULL;
    }
    res = PyObject_Call(throw, args, NULL);
    Py_DECREF(throw);
    if (res != NULL) {
        status = PYGEN_NEXT;
    }
    else if (PyErr_ExceptionMatches(PyExc_StopIteration)) {
        if ((res = fetch_stop_value()) == NULL) {
            return NULL;
        }
        status = PYGEN_RETURN;
    }
    else {
        status = PYGEN_ERROR;
    }
    PyObject *result;
    PySendResult ended = guarded_step(self, status, res, &result);
    return pending_finish_send(ended, result);
}

/* close(): close what is awaited; if the app's part had not ended, after() sees a
 * GeneratorExit (its cleanup runs, as a coroutine's finally blocks would), and an
 * awaitable it returns is closed unawaited. */
COLD static PyObject *
guarded_close(Guarded *self, PyObject *Py_UNUSED(ignored))
{
    guarded_clear_call(self);
    if (self->iter != NULL) {
        if (close_iterator(self->iter) < 0) {
            return NULL;
        }
        Py_CLEAR(self->iter);
    }
    if (self->after != NULL) {
        PyObject *exit = PyObject_CallNoArgs(PyExc_GeneratorExit);
        if (exit == NULL) {
            return NULL;
        }
        PyObject *next = guarded_finish(self, exit);
        Py_DECREF(exit);
        if (next == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_GeneratorExit)) {
                return NULL;
            }
            PyErr_Clear();
        }
        else {
            int closed = next != Py_None ? close_iterator(next) : 0;
            Py_DECREF(next);
            if (closed < 0) {
                return NULL;
            }
        }
    }
    Py_RETURN_NONE;
}

/* Dropped before it ended (a task destroyed while suspended, or never awaited): closed,
 * as a coroutine is, so that the middleware's accounting of the request still ends. */
static void
guarded_finalize(Guarded *self)
{
    if (self->after == NULL) {
        return;
    }
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *res = guarded_close(self, NULL);
    if (res == NULL) {
        PyErr_WriteUnraisable((PyObject *)self);
    }
    else {
        Py_DECREF(res);
    }
    PyErr_Restore(type, value, tb);
}

static void
guarded_dealloc(Guarded *self)
{
    if (PyObject_CallFinalizerFromDealloc((PyObject *)self) < 0) {
        return;  /* resurrected */
    }
    PyObject_GC_UnTrack(self);
    guarded_clear(self);
    PyObject_GC_Del(self);
}

static PyAsyncMethods guarded_as_async = {
    .am_await = (unaryfunc)pending_await,
    .am_send = (sendfunc)guarded_am_send,
};

static PyMethodDef guarded_methods[] = {
    {"send", (PyCFunction)guarded_send, METH_O, NULL},
    {"throw", (PyCFunction)guarded_throw, METH_VARARGS, NULL},
    {"close", (PyCFunction)guarded_close, METH_NOARGS, NULL},
    {NULL}
};

static PyTypeObject GuardedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._speedups.Guarded",
    .tp_basicsize = sizeof(Guarded),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One call of the app by the middleware, awaited without a coroutine frame.",
    .tp_traverse = (traverseproc)guarded_traverse,
    .tp_clear = (inquiry)guarded_clear,
    .tp_dealloc = (destructor)guarded_dealloc,
    .tp_finalize = (destructor)guarded_finalize,
    .tp_as_async = &guarded_as_async,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)guarded_iternext,
    .tp_methods = guarded_methods,
};

/* guard(app, scope, receive, send, after, *after_args): see Guarded. */
static PyObject *
guard(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 5 || nargs > 5 + GUARDED_MAX_ARGS) {
        PyErr_Format(PyExc_TypeError, "guard() takes 5 to %d arguments",
                     5 + GUARDED_MAX_ARGS);
        return NULL;
    }
    Guarded *self = PyObject_GC_New(Guarded, &GuardedType);
    if (self == NULL) {
        return NULL;
    }
    for (int i = 0; i < 4; i++) {
        self->call[i] = Py_NewRef(args[i]);
    }
    self->iter = NULL;
    self->after = Py_NewRef(args[4]);
    self->args[0] = NULL;
    self->nargs = nargs - 5;
    for (Py_ssize_t i = 0; i < self->nargs; i++) {
        self->args[i + 1] = Py_NewRef(args[5 + i]);
    }
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* ---- Dispatch: MemGuardMiddleware's __call__ ---------------------------------------- */

/* The base of memguard.asgi.MemGuardMiddleware with the extension: its call sends each
 * scope where it goes without running a Python frame for the choice (a tenth of what the
 * middleware adds to a request without a body): the app's own call for non-``http``
 * scopes, else the Python method ``_bodyless`` (no Content-Length, no
 * Transfer-Encoding, HTTP/1), ``_guarded_body``, or ``_endpoint_or_request`` when the
 * middleware answers paths itself. Any scope this does not read plainly (not a dict, a
 * key missing) goes to the Python ``_dispatch``, the same choice written in Python. */

typedef struct {
    PyObject_HEAD
    PyObject *app;
    char has_endpoints;
} Dispatch;

static PyObject *str_http, *str_headers, *str_http_version;
static PyObject *str_bodyless, *str_guarded_body, *str_endpoint_or_request, *str_dispatch;

static int
framing(PyObject *headers);

static int
dispatch_traverse(Dispatch *self, visitproc visit, void *arg)
{
    Py_VISIT(self->app);
    return 0;
}

static int
dispatch_clear(Dispatch *self)
{
    Py_CLEAR(self->app);
    return 0;
}

static void
dispatch_dealloc(Dispatch *self)
{
    /* Reached through the heap subclass's dealloc, as BodyCounter's. */
    PyObject_GC_UnTrack(self);
    dispatch_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
dispatch_init(Dispatch *self, PyObject *args, PyObject *kwds)
{
    return 0;  /* MemGuardMiddleware.__init__ sets the fields */
}

/* Whether ``version`` (NULL: absent, which the ASGI spec reads as 1.1) is HTTP/1. */
static int
is_http1(PyObject *version)
{
    return version == NULL
        || (PyUnicode_Check(version)
            && (PyUnicode_CompareWithASCIIString(version, "1.1") == 0
                || PyUnicode_CompareWithASCIIString(version, "1.0") == 0));
}

COLD static PyObject *
dispatch_python(PyObject *self, PyObject *args)
{
    PyErr_Clear();
    PyObject *method = PyObject_GetAttr(self, str_dispatch);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Call(method, args, NULL);
    Py_DECREF(method);
    return result;
}

static PyObject *
dispatch_call(Dispatch *self, PyObject *args, PyObject *kwds)
{
    if (kwds != NULL || PyTuple_GET_SIZE(args) != 3) {
        return dispatch_python((PyObject *)self, args);
    }
    PyObject *scope = PyTuple_GET_ITEM(args, 0);
    if (!PyDict_CheckExact(scope)) {
        return dispatch_python((PyObject *)self, args);
    }
    PyObject *type = PyDict_GetItemWithError(scope, str_type);
    if (type == NULL) {
        return dispatch_python((PyObject *)self, args);
    }
    if (type != str_http && !(PyUnicode_Check(type)
                              && PyUnicode_Compare(type, str_http) == 0)) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        return PyObject_Call(self->app, args, NULL);
    }
    PyObject *name;
    if (self->has_endpoints) {
        name = str_endpoint_or_request;
    }
    else {
        PyObject *headers = PyDict_GetItemWithError(scope, str_headers);
        if (headers == NULL) {
            return dispatch_python((PyObject *)self, args);
        }
        int framed = framing(headers);
        if (framed < 0) {
            return NULL;
        }
        PyObject *version = framed ? NULL : PyDict_GetItemWithError(scope, str_http_version);
        if (version == NULL && PyErr_Occurred()) {
            return NULL;
        }
        name = !framed && is_http1(version) ? str_bodyless : str_guarded_body;
    }
    PyObject *stack[4] = {(PyObject *)self, scope, PyTuple_GET_ITEM(args, 1),
                          PyTuple_GET_ITEM(args, 2)};
    return PyObject_VectorcallMethod(name, stack, 4, NULL);
}

static PyMemberDef dispatch_members[] = {
    {"app", T_OBJECT, offsetof(Dispatch, app), 0, "the wrapped ASGI app"},
    {"_has_endpoints", T_BOOL, offsetof(Dispatch, has_endpoints), 0, NULL},
    {NULL}
};

static PyTypeObject DispatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._speedups.Dispatch",
    .tp_basicsize = sizeof(Dispatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Base of memguard.asgi.MemGuardMiddleware: which path a scope takes.",
    .tp_traverse = (traverseproc)dispatch_traverse,
    .tp_clear = (inquiry)dispatch_clear,
    .tp_dealloc = (destructor)dispatch_dealloc,
    .tp_call = (ternaryfunc)dispatch_call,
    .tp_members = dispatch_members,
    .tp_init = (initproc)dispatch_init,
    .tp_new = PyType_GenericNew,
};

/* ---- the bodyless request test ---------------------------------------------------- */

/* Whether an ASGI header list frames a body (a content-length or transfer-encoding
 * header). The middleware asks this of every request, and most have no body: in
 * Python the loop over a request's headers costs more than everything else the
 * middleware does for it. Names are compared as ASGI gives them, lower-case bytes. */
static int
framing(PyObject *headers)
{
    PyObject *seq = PySequence_Fast(headers, "ASGI headers must be iterable");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int found = 0;
    for (Py_ssize_t i = 0; i < count && !found; i++) {
        PyObject *item = items[i];
        PyObject *name;
        if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) > 0) {
            name = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        }
        else if (PyList_CheckExact(item) && PyList_GET_SIZE(item) > 0) {
            name = Py_NewRef(PyList_GET_ITEM(item, 0));
        }
        else if ((name = PySequence_GetItem(item, 0)) == NULL) {
            Py_DECREF(seq);
            return -1;
        }
        if (PyBytes_Check(name)) {
            Py_ssize_t size = PyBytes_GET_SIZE(name);
            const char *text = PyBytes_AS_STRING(name);
            found = (size == 14 && memcmp(text, "content-length", 14) == 0)
                || (size == 17 && memcmp(text, "transfer-encoding", 17) == 0);
        }
        Py_DECREF(name);
    }
    Py_DECREF(seq);
    return found;
}

static PyObject *
has_body_framing(PyObject *module, PyObject *headers)
{
    int found = framing(headers);
    return found < 0 ? NULL : PyBool_FromLong(found);
}

static PyMethodDef speedups_functions[] = {
    {"guard", (PyCFunction)(void(*)(void))guard, METH_FASTCALL,
     "guard(app, scope, receive, send, after, *after_args): the app's call, frame-less."},
    {"has_body_framing", (PyCFunction)has_body_framing, METH_O,
     "has_body_framing(headers): a content-length or transfer-encoding header is there."},
    {NULL}
};

/* ---- module ------------------------------------------------------------------------ */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memguard._speedups",
    .m_doc = "The per-chunk path of memguard's ASGI body guard, in C.",
    .m_size = -1,
    .m_methods = speedups_functions,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&BodyCounterType) < 0 || PyType_Ready(&PendingType) < 0
            || PyType_Ready(&ReceiverType) < 0
            || PyType_Ready(&GuardedType) < 0 || PyType_Ready(&DispatchType) < 0) {
        return NULL;
    }
#define INTERN(var, text) if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL
    INTERN(str_body, "body");
    INTERN(str_type, "type");
    INTERN(str_http, "http");
    INTERN(str_headers, "headers");
    INTERN(str_http_version, "http_version");
    INTERN(str_bodyless, "_bodyless");
    INTERN(str_guarded_body, "_guarded_body");
    INTERN(str_endpoint_or_request, "_endpoint_or_request");
    INTERN(str_dispatch, "_dispatch");
    INTERN(str_more_body, "more_body");
    INTERN(str_receive_plain, "_receive_plain");
    INTERN(str_start_reading, "_start_reading");
    INTERN(str_finish, "_finish");
    INTERN(str_failed, "_failed");
    INTERN(str_throw, "throw");
    INTERN(str_close, "close");
#undef INTERN
    PyObject *exceptions = PyImport_ImportModule("asyncio.exceptions");
    if (exceptions == NULL) {
        return NULL;
    }
    CancelledError = PyObject_GetAttrString(exceptions, "CancelledError");
    Py_DECREF(exceptions);
    if (CancelledError == NULL) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&BodyCounterType);
    if (PyModule_AddObject(module, "BodyCounter", (PyObject *)&BodyCounterType) < 0) {
        Py_DECREF(&BodyCounterType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&DispatchType);
    if (PyModule_AddObject(module, "Dispatch", (PyObject *)&DispatchType) < 0) {
        Py_DECREF(&DispatchType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&GuardedType);
    if (PyModule_AddObject(module, "Guarded", (PyObject *)&GuardedType) < 0) {
        Py_DECREF(&GuardedType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
