/* File-tree kernels: directory scans, listing comparison, and reading and writing
 * runs of small files (see fstree.c). Records use the entry layout of
 * smsrepl/files/wire.py. */
#ifndef SMSREPL_FSTREE_H
#define SMSREPL_FSTREE_H

#include <stddef.h>
#include <stdint.h>

/* header of an entry record: kind .. has_digest */
#define SMS_REC_HEAD 50
#define SMS_OP_FILE 3

typedef struct {
    uint8_t kind;
    uint32_t mode, uid, gid, nlink;
    uint64_t size, rdev;
    int64_t mtime_ns;
    const uint8_t *path, *link, *xattrs;
    uint32_t plen, llen, xlen;
    int has_digest;
    size_t total; /* bytes of the whole record */
} sms_rec;

/* Parse one record at p (avail bytes); 0, or -1 if it runs past the end or is malformed. */
int sms_parse_rec(const uint8_t *p, size_t avail, sms_rec *r);

/* A growable byte buffer. */
typedef struct {
    uint8_t *data;
    size_t len, cap;
} sms_buf;

int sms_buf_reserve(sms_buf *b, size_t extra);
void sms_buf_free(sms_buf *b);

#ifdef Py_PYTHON_H
PyObject *sms_py_scan_dir(PyObject *self, PyObject *args);
PyObject *sms_py_xattr_cache(PyObject *self, PyObject *args, PyObject *kw);
PyObject *sms_py_diff_records(PyObject *self, PyObject *args);
PyObject *sms_py_group_records(PyObject *self, PyObject *args);
PyObject *sms_py_read_files(PyObject *self, PyObject *args);
PyObject *sms_py_write_files(PyObject *self, PyObject *args);
PyObject *sms_py_link_files(PyObject *self, PyObject *args);
#endif

#endif
