/* Thin CPython binding of linkfwd.c: link_forward, run with the GIL released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>

#include "linkfwd.h"
#include "linkbinding.h"

static PyObject *stats_dict(const struct sms_link_stats *s)
{
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsK}", "packets", (unsigned long long)s->packets,
                         "bytes", (unsigned long long)s->bytes, "lost", (unsigned long long)s->lost,
                         "dropped", (unsigned long long)s->dropped,
                         "write_errors", (unsigned long long)s->write_errors,
                         "peak_queue_bytes", (unsigned long long)s->peak_queue_bytes,
                         "late_ns_max", (unsigned long long)s->late_ns_max,
                         "late_ns_sum", (unsigned long long)s->late_ns_sum,
                         "late_1ms", (unsigned long long)s->late_1ms);
}

/* link_forward(fd_a, fd_b, stop_fd, (rate_bps, delay_ns, jitter_ns, loss_p32, queue_bytes) a->b, same b->a,
 *              seed, mtu) -> (stats a->b, stats b->a) */
PyObject *sms_py_link_forward(PyObject *self, PyObject *args)
{
    (void)self;
    int fds[2], stop_fd;
    unsigned long long seed;
    unsigned int mtu;
    struct sms_link_dir dirs[2];
    memset(dirs, 0, sizeof dirs);
    if (!PyArg_ParseTuple(args, "iii(KKKKK)(KKKKK)KI", &fds[0], &fds[1], &stop_fd,
                          &dirs[0].rate_bps, &dirs[0].delay_ns, &dirs[0].jitter_ns, &dirs[0].loss_p32,
                          &dirs[0].queue_bytes, &dirs[1].rate_bps, &dirs[1].delay_ns, &dirs[1].jitter_ns,
                          &dirs[1].loss_p32, &dirs[1].queue_bytes, &seed, &mtu))
        return NULL;
    if (mtu < 68 || mtu > 65535) {
        PyErr_SetString(PyExc_ValueError, "mtu must be in [68, 65535]");
        return NULL;
    }
    struct sms_link_stats stats[2];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = sms_link_forward(fds, stop_fd, dirs, (uint64_t)seed, mtu, stats);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *a = stats_dict(&stats[0]), *b = a ? stats_dict(&stats[1]) : NULL;
    if (!b) {
        Py_XDECREF(a);
        return NULL;
    }
    return Py_BuildValue("(NN)", a, b);
}
