/* CPython binding of linkfwd.c (see linkbinding.c). */
#ifndef SMSREPL_LINKBINDING_H
#define SMSREPL_LINKBINDING_H

#include <Python.h>

PyObject *sms_py_link_forward(PyObject *self, PyObject *args);

#endif
