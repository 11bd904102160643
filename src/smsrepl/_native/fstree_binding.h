/* CPython binding of the file-tree kernels (fstree.h; see fstree_binding.c). */
#ifndef SMSREPL_FSTREE_BINDING_H
#define SMSREPL_FSTREE_BINDING_H

#include <Python.h>

PyObject *sms_py_scan_dir(PyObject *self, PyObject *args);
PyObject *sms_py_xattr_cache(PyObject *self, PyObject *args, PyObject *kw);
PyObject *sms_py_diff_records(PyObject *self, PyObject *args);
PyObject *sms_py_group_records(PyObject *self, PyObject *args);
PyObject *sms_py_read_files(PyObject *self, PyObject *args);
PyObject *sms_py_write_files(PyObject *self, PyObject *args);
PyObject *sms_py_link_files(PyObject *self, PyObject *args);

#endif
