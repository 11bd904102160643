/* Thin CPython binding of traceread.c: the TraceReader type, trace_parse_page and trace_take. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "traceread.h"
#include "tracebinding.h"

#define LAYOUT_FIELDS 16

static int parse_layout(PyObject *seq, struct sms_trace_layout *lay)
{
    PyObject *fast = PySequence_Fast(seq, "layout must be a sequence of 16 integers");
    if (!fast)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != LAYOUT_FIELDS) {
        PyErr_Format(PyExc_ValueError, "layout must have %d fields, got %zd", LAYOUT_FIELDS,
                     PySequence_Fast_GET_SIZE(fast));
        Py_DECREF(fast);
        return -1;
    }
    uint32_t v[LAYOUT_FIELDS];
    for (int i = 0; i < LAYOUT_FIELDS; i++) {
        unsigned long x = PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(fast, i));
        if (PyErr_Occurred() || x > UINT32_MAX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "layout fields must fit 32 bits");
            Py_DECREF(fast);
            return -1;
        }
        v[i] = (uint32_t)x;
    }
    Py_DECREF(fast);
    *lay = (struct sms_trace_layout){v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
                                     v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
    if (lay->data_off > 1 << 20 || lay->commit_off > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "layout offsets out of range");
        return -1;
    }
    return 0;
}

/* The disk and its bitmap (a writable buffer of ceil(nblocks / 64) uint64 words). */
static int parse_disk(unsigned long dev, unsigned long long first, unsigned long long nsectors,
                      Py_buffer *bm, struct sms_trace_disk *disk)
{
    uint64_t nblocks = (nsectors + 7) / 8;
    if ((size_t)bm->len < (nblocks + 63) / 64 * 8 || ((uintptr_t)bm->buf & 7)) {
        PyErr_Format(PyExc_ValueError, "bitmap must be 8-byte aligned and hold %llu bits",
                     (unsigned long long)nblocks);
        return -1;
    }
    *disk = (struct sms_trace_disk){(uint32_t)dev, first, nsectors, (uint64_t *)bm->buf, nblocks};
    return 0;
}

typedef struct {
    PyObject_HEAD
    struct sms_trace_reader r;
    Py_buffer bitmap;
    uint8_t *page;
    int running;
} TraceReader;

static int reader_init(TraceReader *self, PyObject *args, PyObject *Py_UNUSED(kw))
{
    int pipe_fd, marker_fd, cpu;
    unsigned int page_size, idle_us;
    unsigned long dev;
    unsigned long long first, nsectors;
    PyObject *layout, *bitmap;
    if (self->page) {
        PyErr_SetString(PyExc_RuntimeError, "TraceReader is initialised already");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "iiiIIOkKKO:TraceReader", &pipe_fd, &marker_fd, &cpu, &page_size,
                          &idle_us, &layout, &dev, &first, &nsectors, &bitmap))
        return -1;
    if (page_size < 64 || page_size > (1u << 20)) {
        PyErr_Format(PyExc_ValueError, "page_size %u out of range", page_size);
        return -1;
    }
    memset(&self->r, 0, sizeof self->r);
    if (parse_layout(layout, &self->r.lay) < 0)
        return -1;
    if (PyObject_GetBuffer(bitmap, &self->bitmap, PyBUF_WRITABLE) < 0)
        return -1;
    if (parse_disk(dev, first, nsectors, &self->bitmap, &self->r.disk) < 0) {
        PyBuffer_Release(&self->bitmap);
        return -1;
    }
    self->page = malloc(page_size);
    self->r.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!self->page || self->r.wake_fd < 0) {
        int err = errno;
        if (self->r.wake_fd >= 0)
            close(self->r.wake_fd);
        free(self->page);
        self->page = NULL;
        PyBuffer_Release(&self->bitmap);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->r.pipe_fd = pipe_fd, self->r.marker_fd = marker_fd, self->r.cpu = cpu;
    self->r.page_size = page_size, self->r.idle_us = idle_us;
    return 0;
}

static void reader_dealloc(TraceReader *self)
{
    if (self->bitmap.obj)
        PyBuffer_Release(&self->bitmap);
    if (self->page && self->r.wake_fd >= 0)
        close(self->r.wake_fd);
    free(self->page);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *reader_run(TraceReader *self, PyObject *Py_UNUSED(unused))
{
    if (!self->page || self->running) {
        PyErr_SetString(PyExc_RuntimeError, "TraceReader.run: not initialised, or running already");
        return NULL;
    }
    int rc;
    self->running = 1;
    Py_INCREF(self); /* the loop uses the struct without the GIL */
    Py_BEGIN_ALLOW_THREADS
    rc = sms_trace_run(&self->r, self->page);
    Py_END_ALLOW_THREADS
    self->running = 0;
    Py_DECREF(self);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *reader_stop(TraceReader *self, PyObject *Py_UNUSED(unused))
{
    if (self->page)
        sms_trace_wake(&self->r, 0);
    Py_RETURN_NONE;
}

static PyObject *reader_request(TraceReader *self, PyObject *arg)
{
    unsigned long long seq = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (!seq || !self->page) {
        PyErr_SetString(PyExc_ValueError, "request: a boundary is numbered from 1, on an initialised reader");
        return NULL;
    }
    sms_trace_wake(&self->r, (uint64_t)seq);
    Py_RETURN_NONE;
}

static PyObject *reader_state(TraceReader *self, PyObject *Py_UNUSED(unused))
{
    struct sms_trace_reader *r = &self->r;
    uint64_t seen = __atomic_load_n(&r->seen, __ATOMIC_ACQUIRE);
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsi}", "seen", seen, "seen_missed",
                         __atomic_load_n(&r->seen_missed, __ATOMIC_RELAXED), "pages",
                         __atomic_load_n(&r->counts.pages, __ATOMIC_RELAXED), "events",
                         __atomic_load_n(&r->counts.events, __ATOMIC_RELAXED), "marks",
                         __atomic_load_n(&r->counts.marks, __ATOMIC_RELAXED), "missed_pages",
                         __atomic_load_n(&r->counts.missed_pages, __ATOMIC_RELAXED), "foreign",
                         __atomic_load_n(&r->counts.foreign, __ATOMIC_RELAXED), "marker_failures",
                         __atomic_load_n(&r->marker_failures, __ATOMIC_RELAXED), "error",
                         __atomic_load_n(&r->error, __ATOMIC_ACQUIRE));
}

static PyMethodDef reader_methods[] = {
    {"run", (PyCFunction)reader_run, METH_NOARGS,
     "run(): pin this thread to the reader's CPU and read until stop(); OSError when reading fails"},
    {"stop", (PyCFunction)reader_stop, METH_NOARGS, "stop(): end run() within one idle period"},
    {"request", (PyCFunction)reader_request, METH_O,
     "request(seq): write boundary seq's marker on this CPU; state()['seen'] reaches seq once read"},
    {"state", (PyCFunction)reader_state, METH_NOARGS, "state() -> dict of counters"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TraceReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "smsrepl._native._core.TraceReader",
    .tp_basicsize = sizeof(TraceReader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "TraceReader(pipe_fd, marker_fd, cpu, page_size, idle_us, layout, dev, first_sector, "
              "nsectors, bitmap): one CPU's reader of a tracefs instance (traceread.h)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)reader_init,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_methods = reader_methods,
};

PyObject *sms_py_trace_parse_page(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer page = {0}, bm = {0};
    PyObject *layout, *res = NULL;
    unsigned long dev;
    unsigned long long first, nsectors;
    struct sms_trace_layout lay;
    struct sms_trace_disk disk;
    struct sms_trace_counts c = {0};
    if (!PyArg_ParseTuple(args, "y*OkKKw*:trace_parse_page", &page, &layout, &dev, &first, &nsectors, &bm))
        return NULL;
    if (parse_layout(layout, &lay) < 0 || parse_disk(dev, first, nsectors, &bm, &disk) < 0)
        goto done;
    int rc = sms_trace_parse_page(page.buf, (size_t)page.len, &lay, &disk, &c);
    res = Py_BuildValue("{sisKsKsKsKsKsK}", "ok", rc == 0, "pages", c.pages, "events", c.events, "marks",
                        c.marks, "missed_pages", c.missed_pages, "foreign", c.foreign, "last_marker",
                        c.last_marker);
done:
    PyBuffer_Release(&page);
    PyBuffer_Release(&bm);
    return res;
}

PyObject *sms_py_trace_take(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer bm = {0}, out = {0};
    PyObject *res = NULL;
    if (!PyArg_ParseTuple(args, "w*w*:trace_take", &bm, &out))
        return NULL;
    if (bm.len != out.len || bm.len % 8 || ((uintptr_t)bm.buf & 7) || ((uintptr_t)out.buf & 7)) {
        PyErr_SetString(PyExc_ValueError, "trace_take: two 8-byte aligned buffers of equal whole words");
        goto done;
    }
    uint64_t taken;
    Py_BEGIN_ALLOW_THREADS
    taken = sms_trace_take(bm.buf, out.buf, (size_t)bm.len / 8);
    Py_END_ALLOW_THREADS
    res = PyLong_FromUnsignedLongLong(taken);
done:
    PyBuffer_Release(&bm);
    PyBuffer_Release(&out);
    return res;
}

int sms_trace_register(PyObject *module)
{
    if (PyType_Ready(&TraceReaderType) < 0)
        return -1;
    Py_INCREF(&TraceReaderType);
    if (PyModule_AddObject(module, "TraceReader", (PyObject *)&TraceReaderType) < 0) {
        Py_DECREF(&TraceReaderType);
        return -1;
    }
    return 0;
}
