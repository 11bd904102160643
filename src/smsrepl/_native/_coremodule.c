/* The smsrepl._native._core extension module: its method table and init, and the thin
 * CPython bindings of the buffer kernels (blockscan.c, delta.c, rangeread.c, filehash.c).
 * The file-tree kernels are bound in fstree_binding.c, the trace reader in tracebinding.c,
 * the link emulator's forwarder in linkbinding.c.
 * Every binding validates its arguments, runs the kernel with the GIL released, and builds
 * the Python result; the kernels themselves do not include Python.h. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "blockscan.h"
#include "delta.h"
#include "filehash.h"
#include "fstree_binding.h"
#include "rangeread.h"
#include "tracebinding.h"
#include "linkbinding.h"

/* Validate a block size; multiple_of_8 for the block-digest kernels. */
static int check_block_size(Py_ssize_t bs, int multiple_of_8)
{
    if (bs <= 0 || (multiple_of_8 && bs % 8 != 0)) {
        PyErr_Format(PyExc_ValueError,
                     multiple_of_8 ? "block_size must be a positive multiple of 8, got %zd"
                                   : "block_size must be positive, got %zd",
                     bs);
        return -1;
    }
    return 0;
}

static int check_out(const Py_buffer *b, size_t need, const char *name)
{
    if ((size_t)b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s too small: need %zu bytes, got %zd", name, need,
                     b->len);
        return -1;
    }
    return 0;
}

typedef size_t (*per_block_kernel)(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out);

/* f(buf, block_size, out) -> kernel's count: `kernel` over buf's blocks into out, which
 * needs out_per_block bytes a block. */
static PyObject *per_block(PyObject *args, const char *format, int multiple_of_8, size_t out_per_block,
                           per_block_kernel kernel)
{
    PyObject *buf_o, *out_o;
    Py_ssize_t bs;
    Py_buffer buf = {0}, out = {0};
    PyObject *res = NULL;
    size_t count = 0;
    if (!PyArg_ParseTuple(args, format, &buf_o, &bs, &out_o))
        return NULL;
    if (check_block_size(bs, multiple_of_8) < 0)
        return NULL;
    if (PyObject_GetBuffer(buf_o, &buf, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(out_o, &out, PyBUF_WRITABLE) < 0)
        goto done;
    size_t nb = sms_nblocks((size_t)buf.len, (size_t)bs);
    if (check_out(&out, nb * out_per_block, "out") < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    count = kernel(buf.buf, (size_t)buf.len, (size_t)bs, out.buf);
    Py_END_ALLOW_THREADS
    res = PyLong_FromSize_t(count);
done:
    if (buf.obj)
        PyBuffer_Release(&buf);
    if (out.obj)
        PyBuffer_Release(&out);
    return res;
}

static PyObject *py_block_digests(PyObject *Py_UNUSED(self), PyObject *args)
{
    return per_block(args, "OnO:block_digests", 1, 8, sms_block_digests);
}

static PyObject *py_zero_map(PyObject *Py_UNUSED(self), PyObject *args)
{
    return per_block(args, "OnO:zero_map", 1, 1, sms_zero_map);
}

static size_t group_digests(const uint8_t *buf, size_t len, size_t group_size, uint8_t *out)
{
    sms_group_digests(buf, len, group_size, out);
    return sms_nblocks(len, group_size);
}

static PyObject *py_group_digests(PyObject *Py_UNUSED(self), PyObject *args)
{
    return per_block(args, "OnO:group_digests", 0, 16, group_digests);
}

static PyObject *py_file_signature(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *buf_o, *weak_o, *strong_o;
    Py_ssize_t bs;
    Py_buffer buf = {0}, weak = {0}, strong = {0};
    PyObject *res = NULL;
    size_t count = 0;
    if (!PyArg_ParseTuple(args, "OnOO:file_signature", &buf_o, &bs, &weak_o, &strong_o))
        return NULL;
    if (check_block_size(bs, 0) < 0)
        return NULL;
    if (PyObject_GetBuffer(buf_o, &buf, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(weak_o, &weak, PyBUF_WRITABLE) < 0)
        goto done;
    if (PyObject_GetBuffer(strong_o, &strong, PyBUF_WRITABLE) < 0)
        goto done;
    size_t nb = sms_nblocks((size_t)buf.len, (size_t)bs);
    if (check_out(&weak, nb * 4, "weak_out") < 0 || check_out(&strong, nb * 8, "strong_out") < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    count = sms_file_signature(buf.buf, (size_t)buf.len, (size_t)bs, weak.buf, strong.buf);
    Py_END_ALLOW_THREADS
    res = PyLong_FromSize_t(count);
done:
    if (buf.obj)
        PyBuffer_Release(&buf);
    if (weak.obj)
        PyBuffer_Release(&weak);
    if (strong.obj)
        PyBuffer_Release(&strong);
    return res;
}

/* Returns bytes holding n*3 native int64 (kind, a, b); kernels.py reshapes. */
static PyObject *py_delta_search(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *weak_o, *strong_o, *data_o;
    Py_ssize_t bs;
    unsigned long long old_len;
    Py_buffer weak = {0}, strong = {0}, data = {0};
    PyObject *res = NULL;
    sms_rows rows = {0};
    int rc = 0;
    if (!PyArg_ParseTuple(args, "OOnKO:delta_search", &weak_o, &strong_o, &bs, &old_len, &data_o))
        return NULL;
    if (check_block_size(bs, 0) < 0)
        return NULL;
    if (PyObject_GetBuffer(weak_o, &weak, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(strong_o, &strong, PyBUF_SIMPLE) < 0)
        goto done;
    if (PyObject_GetBuffer(data_o, &data, PyBUF_SIMPLE) < 0)
        goto done;
    unsigned long long nb = old_len / (unsigned long long)bs + (old_len % (unsigned long long)bs != 0);
    if (nb > (unsigned long long)INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many old blocks (max 2**31-1)");
        goto done;
    }
    if (check_out(&weak, (size_t)nb * 4, "weak") < 0 || check_out(&strong, (size_t)nb * 8, "strong") < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rc = sms_delta_search(weak.buf, strong.buf, (size_t)bs, old_len, data.buf, (size_t)data.len, &rows);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_NoMemory();
        goto done;
    }
    res = PyBytes_FromStringAndSize((const char *)rows.rows, (Py_ssize_t)(rows.n * 3 * sizeof(int64_t)));
done:
    free(rows.rows);
    if (weak.obj)
        PyBuffer_Release(&weak);
    if (strong.obj)
        PyBuffer_Release(&strong);
    if (data.obj)
        PyBuffer_Release(&data);
    return res;
}

static PyObject *py_weak_checksum(PyObject *Py_UNUSED(self), PyObject *arg)
{
    Py_buffer buf;
    uint32_t h;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    h = sms_weak(buf.buf, (size_t)buf.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(h);
}

/* The int64 offset and length arrays of read_ranges / write_ranges, checked against the buffer. */
static int check_ranges(Py_buffer *buf, Py_buffer *offs, Py_buffer *lens, size_t *n, const char *name)
{
    *n = (size_t)offs->len / 8;
    if (offs->len % 8 || lens->len != offs->len || ((uintptr_t)offs->buf & 7) || ((uintptr_t)lens->buf & 7)) {
        PyErr_Format(PyExc_ValueError, "%s: offsets and lengths must be aligned int64 arrays of one length", name);
        return -1;
    }
    const int64_t *o = offs->buf, *l = lens->buf;
    int64_t need = 0;
    for (size_t i = 0; i < *n; i++) {
        if (o[i] < 0 || l[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative offset or length", name);
            return -1;
        }
        need += l[i];
    }
    if (need > buf->len) {
        PyErr_Format(PyExc_ValueError, "%s: the ranges need %lld bytes, the buffer has %zd", name, (long long)need,
                     buf->len);
        return -1;
    }
    return 0;
}

/* read_ranges (reading) or write_ranges: scattered I/O of one fd through one buffer. */
static PyObject *ranges(PyObject *args, int reading)
{
    int fd;
    unsigned int depth = 0;
    Py_buffer buf = {0}, offs = {0}, lens = {0};
    PyObject *res = NULL;
    size_t n;
    const char *name = reading ? "read_ranges" : "write_ranges";
    if (!(reading ? PyArg_ParseTuple(args, "iw*y*y*I:read_ranges", &fd, &buf, &offs, &lens, &depth)
                  : PyArg_ParseTuple(args, "iy*y*y*:write_ranges", &fd, &buf, &offs, &lens)))
        return NULL;
    if (check_ranges(&buf, &offs, &lens, &n, name) < 0)
        goto done;
    int64_t got;
    Py_BEGIN_ALLOW_THREADS
    got = reading ? sms_read_ranges(fd, buf.buf, offs.buf, lens.buf, n, depth)
                  : sms_write_ranges(fd, buf.buf, offs.buf, lens.buf, n);
    Py_END_ALLOW_THREADS
    if (got < 0) {
        errno = (int)-got;
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    res = PyLong_FromLongLong(got);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&offs);
    PyBuffer_Release(&lens);
    return res;
}

static PyObject *py_read_ranges(PyObject *Py_UNUSED(self), PyObject *args)
{
    return ranges(args, 1);
}

static PyObject *py_write_ranges(PyObject *Py_UNUSED(self), PyObject *args)
{
    return ranges(args, 0);
}

/* hash_files(dir_fd, names, out, budget) -> (done, bytes, errors)
 * XXH3-128 of the regular files `names` (bytes, relative to dir_fd) into out[16*i], in order,
 * until more than `budget` bytes were read (at least one file per call): done is how many
 * names were dealt with, errors [(index, errno)] those that could not be read (their
 * digest is left as it was). */
#define HASH_BUF (1u << 20)
static PyObject *py_hash_files(PyObject *Py_UNUSED(self), PyObject *args)
{
    int dir_fd;
    PyObject *names_o;
    Py_buffer out = {0};
    unsigned long long budget;
    if (!PyArg_ParseTuple(args, "iOw*K:hash_files", &dir_fd, &names_o, &out, &budget))
        return NULL;
    PyObject *seq = PySequence_Fast(names_o, "names must be a sequence of bytes"), *res = NULL, *errors = NULL;
    const char **names = NULL;
    int *errs = NULL;
    uint8_t *buf = NULL;
    if (!seq)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (check_out(&out, (size_t)n * 16, "out") < 0)
        goto done;
    names = malloc((n ? n : 1) * sizeof *names);
    errs = calloc(n ? n : 1, sizeof *errs);
    buf = malloc(HASH_BUF);
    if (!names || !errs || !buf) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(item) || (Py_ssize_t)strlen(PyBytes_AS_STRING(item)) != PyBytes_GET_SIZE(item)) {
            PyErr_Format(PyExc_ValueError, "names[%zd] must be bytes without NUL", i);
            goto done;
        }
        names[i] = PyBytes_AS_STRING(item); /* seq holds the objects: a tuple or our own list copy */
    }
    Py_ssize_t i = 0;
    unsigned long long total = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; i < n && (i == 0 || total <= budget); i++) {
        uint64_t size;
        errs[i] = sms_hash_file_at(dir_fd, names[i], buf, HASH_BUF, (uint8_t *)out.buf + 16 * i, &size);
        total += size;
    }
    Py_END_ALLOW_THREADS
    errors = PyList_New(0);
    if (!errors)
        goto done;
    for (Py_ssize_t k = 0; k < i; k++) {
        if (errs[k]) {
            PyObject *t = Py_BuildValue("(ni)", k, errs[k]);
            if (!t || PyList_Append(errors, t) < 0) {
                Py_XDECREF(t);
                goto done;
            }
            Py_DECREF(t);
        }
    }
    res = Py_BuildValue("(nKO)", i, total, errors);
done:
    Py_XDECREF(errors);
    Py_XDECREF(seq);
    free(names);
    free(errs);
    free(buf);
    PyBuffer_Release(&out);
    return res;
}

static PyMethodDef core_methods[] = {
    {"hash_files", py_hash_files, METH_VARARGS,
     "hash_files(dir_fd, names, out, budget) -> (done, bytes, errors): XXH3-128 of whole files (filehash.h)"},
    {"write_ranges", py_write_ranges, METH_VARARGS,
     "write_ranges(fd, buf, offsets, lengths) -> bytes written: scattered pwrites (rangeread.h)"},
    {"read_ranges", py_read_ranges, METH_VARARGS,
     "read_ranges(fd, buf, offsets, lengths, depth) -> bytes read: scattered reads, depth in flight (rangeread.h)"},
    {"scan_dir", sms_py_scan_dir, METH_VARARGS,
     "scan_dir(dir_fd, prefix, dir_path|None) -> (records, names, kinds, ends, errors, file_bytes)"},
    {"xattr_cache", (PyCFunction)(void (*)(void))sms_py_xattr_cache, METH_VARARGS | METH_KEYWORDS,
     "xattr_cache(clear=False, min_age=None) -> (entries, hits): scan_dir's cache of entries without xattrs"},
    {"diff_records", sms_py_diff_records, METH_VARARGS, "diff_records(source, target) -> (actions, gone)"},
    {"group_records", sms_py_group_records, METH_VARARGS, "group_records(body) -> [(parent, start, end)]"},
    {"read_files", sms_py_read_files, METH_VARARGS,
     "read_files(dir_fd, records, indices, max_size, out, pos, settle_before_ns=0) -> (end, taken, left, files, bytes)"},
    {"write_files", sms_py_write_files, METH_VARARGS,
     "write_files(body, pos, dir_fd_of, owner, max_files, threads) -> (end, files, bytes, fds, dir_fds, file_dirs, names, paths)"},
    {"link_files", sms_py_link_files, METH_VARARGS, "link_files(fds, dir_fds, file_dirs, names, tag) -> failures"},
    {"group_digests", py_group_digests, METH_VARARGS,
     "group_digests(buf, group_size, out) -> number of groups (16-byte canonical XXH3-128 each)"},
    {"block_digests", py_block_digests, METH_VARARGS,
     "block_digests(buf, block_size, out) -> number of non-zero blocks"},
    {"zero_map", py_zero_map, METH_VARARGS, "zero_map(buf, block_size, out) -> number of zero blocks"},
    {"file_signature", py_file_signature, METH_VARARGS,
     "file_signature(buf, block_size, weak_out, strong_out) -> block count"},
    {"delta_search", py_delta_search, METH_VARARGS,
     "delta_search(weak, strong, block_size, old_len, data) -> bytes of int64 rows (kind, a, b)"},
    {"weak_checksum", py_weak_checksum, METH_O, "weak_checksum(buf) -> uint32 weak checksum"},
    {"trace_parse_page", sms_py_trace_parse_page, METH_VARARGS,
     "trace_parse_page(page, layout, dev, first_sector, nsectors, bitmap) -> counts (traceread.h)"},
    {"trace_take", sms_py_trace_take, METH_VARARGS,
     "trace_take(bitmap, out) -> bits moved: out |= bitmap, bitmap = 0, word by word atomically"},
    {"link_forward", sms_py_link_forward, METH_VARARGS,
     "link_forward(fd_a, fd_b, stop_fd, dir_ab, dir_ba, seed, mtu) -> (stats_ab, stats_ba): the link emulator (linkfwd.h)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT, "smsrepl._native._core",
    "Native kernels of smsrepl: block digests, zero maps and group digests, rsync-style delta, "
    "scattered reads and writes, whole-file digests, file-tree scans and runs of small files, "
    "and the block tracer's trace reader.", -1, core_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__core(void)
{
    PyObject *m = PyModule_Create(&core_module);
    if (!m)
        return NULL;
    if (PyModule_AddObject(m, "ZERO_DIGEST", PyLong_FromUnsignedLongLong(SMS_ZERO_DIGEST)) < 0 ||
        PyModule_AddObject(m, "UNKNOWN_DIGEST", PyLong_FromUnsignedLongLong(SMS_UNKNOWN_DIGEST)) < 0 ||
        PyModule_AddIntConstant(m, "DELTA_MAX_CHAIN", SMS_DELTA_MAX_CHAIN) < 0 ||
        PyModule_AddIntConstant(m, "DELTA_FAIL_BUDGET", SMS_DELTA_FAIL_BUDGET) < 0 ||
        sms_trace_register(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
