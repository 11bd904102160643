/* CPython binding of traceread.c (see tracebinding.c). */
#ifndef SMSREPL_TRACEBINDING_H
#define SMSREPL_TRACEBINDING_H

#include <Python.h>

PyObject *sms_py_trace_parse_page(PyObject *self, PyObject *args);
PyObject *sms_py_trace_take(PyObject *self, PyObject *args);
/* Adds the TraceReader type to the module; -1 with an exception set on failure. */
int sms_trace_register(PyObject *module);

#endif
