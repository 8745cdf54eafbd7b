/* memguard._rss: this process's resident set size, read in C.
 *
 * The request accounting (memguard.tracking) reads RSS at the start and at the end of a
 * sampled request, through a descriptor of /proc/self/statm kept open (memguard.probes).
 * Written in Python, each read is a method call, an os.pread, a split and an int: after a
 * long request has evicted that code from the caches, those cost about 4 us besides the
 * system call itself (measured after a 64 MiB upload). StatmRss is that read as one C
 * call: its instance is the callable the accounting holds, and probes sets its ``fd``
 * (reopened in a forked child: a descriptor opened before fork describes the parent).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <limits.h>
#include <unistd.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int fd;               /* /proc/self/statm, or -1: ``fallback`` answers */
    long page_size;
    PyObject *fallback;   /* called without /proc (psutil's reading) */
} StatmRss;

/* The second field of statm ("size resident shared text lib data dt", in pages). */
static int
resident_pages(const char *text, unsigned long long *pages)
{
    const char *p = text;
    while (*p >= '0' && *p <= '9') {
        p++;
    }
    if (p == text || *p != ' ') {
        return -1;
    }
    p++;
    if (*p < '0' || *p > '9') {
        return -1;
    }
    unsigned long long value = 0;
    for (; *p >= '0' && *p <= '9'; p++) {
        if (value > (ULLONG_MAX - 9) / 10) {
            return -1;
        }
        value = value * 10 + (unsigned long long)(*p - '0');
    }
    if (*p != ' ' && *p != '\n' && *p != '\0') {
        return -1;
    }
    *pages = value;
    return 0;
}

static PyObject *
statm_rss_call(StatmRss *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "StatmRss() takes no arguments");
        return NULL;
    }
    if (self->fd < 0) {
        return PyObject_CallNoArgs(self->fallback);
    }
    /* The GIL is kept: reading statm does not block, and takes a few microseconds. */
    char text[128];
    ssize_t n;
    do {
        n = pread(self->fd, text, sizeof text - 1, 0);
    } while (n < 0 && errno == EINTR && PyErr_CheckSignals() == 0);
    if (n < 0) {
        return PyErr_Occurred() ? NULL : PyErr_SetFromErrno(PyExc_OSError);
    }
    text[n] = '\0';
    unsigned long long pages;
    if (resident_pages(text, &pages) < 0) {
        PyErr_Format(PyExc_ValueError, "not a statm line: %.60s", text);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(pages * (unsigned long long)self->page_size);
}

static PyObject *
statm_rss_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"fd", "page_size", "fallback", NULL};
    int fd;
    long page_size;
    PyObject *fallback;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ilO:StatmRss", names, &fd, &page_size,
                                     &fallback)) {
        return NULL;
    }
    if (page_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be positive");
        return NULL;
    }
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    StatmRss *self = (StatmRss *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)statm_rss_call;
    self->fd = fd;
    self->page_size = page_size;
    Py_INCREF(fallback);
    self->fallback = fallback;
    return (PyObject *)self;
}

static int
statm_rss_traverse(StatmRss *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    return 0;
}

static int
statm_rss_clear(StatmRss *self)
{
    Py_CLEAR(self->fallback);
    return 0;
}

static void
statm_rss_dealloc(StatmRss *self)
{
    PyObject_GC_UnTrack(self);
    statm_rss_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef statm_rss_members[] = {
    {"fd", T_INT, offsetof(StatmRss, fd), 0,
     "the /proc/self/statm descriptor read (-1: the fallback answers)"},
    {NULL}
};

static PyTypeObject StatmRssType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memguard._rss.StatmRss",
    .tp_basicsize = sizeof(StatmRss),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "StatmRss(fd, page_size, fallback)(): this process's RSS in bytes, from the "
              "statm descriptor fd (fallback() when fd is -1).",
    .tp_vectorcall_offset = offsetof(StatmRss, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = statm_rss_new,
    .tp_traverse = (traverseproc)statm_rss_traverse,
    .tp_clear = (inquiry)statm_rss_clear,
    .tp_dealloc = (destructor)statm_rss_dealloc,
    .tp_members = statm_rss_members,
};

static struct PyModuleDef rss_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "memguard._rss",
    .m_doc = "This process's resident set size from /proc/self/statm, read in C.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__rss(void)
{
    if (PyType_Ready(&StatmRssType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&rss_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&StatmRssType);
    if (PyModule_AddObject(module, "StatmRss", (PyObject *)&StatmRssType) < 0) {
        Py_DECREF(&StatmRssType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
