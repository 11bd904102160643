/* Thin CPython binding of the file-tree kernels (fstree.h): each function parses its
 * arguments, runs its kernel with the GIL released, and builds the Python result. The
 * kernels' process-wide state is sms_tree_cache_process(). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fstree.h"
#include "fstree_binding.h"

#define RECORDS_RUN_PAST "entry record runs past the end of its listing"

/* xattr_cache(clear=False, min_age=None) -> (entries, hits): the no-xattrs cache's size and
 * how many probes it saved; clear empties it; min_age sets the age (seconds) an entry's ctime
 * needs to be kept (tests). */
PyObject *sms_py_xattr_cache(PyObject *Py_UNUSED(self), PyObject *args, PyObject *kw)
{
    static char *names[] = {"clear", "min_age", NULL};
    int clear = 0;
    PyObject *min_age = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pO:xattr_cache", names, &clear, &min_age))
        return NULL;
    double age = 0;
    if (min_age != Py_None) {
        age = PyFloat_AsDouble(min_age);
        if (age == -1 && PyErr_Occurred())
            return NULL;
        if (!(age >= 0 && age <= 3600)) {
            PyErr_SetString(PyExc_ValueError, "min_age must be 0 to 3600 seconds");
            return NULL;
        }
    }
    sms_tree_cache *cache = sms_tree_cache_process();
    if (min_age != Py_None)
        sms_tree_cache_set_min_age(cache, age);
    if (clear)
        sms_tree_cache_clear(cache);
    uint64_t entries, hits;
    sms_tree_cache_stats(cache, &entries, &hits);
    return Py_BuildValue("(KK)", (unsigned long long)entries, (unsigned long long)hits);
}

/* scan_dir(dir_fd, prefix, dir_path or None) -> (records, names, kinds, ends, errors, file_bytes)
 * Records of every entry of the directory, sorted by name, paths `prefix/name`; names: the
 * records' leaf names; kinds: a kind code per record; ends: each record's end offset;
 * errors: (name, errno) of entries that could not be read. With dir_path (the directory's
 * path), records carry the entries' xattrs. file_bytes: the sizes of the regular files. */
PyObject *sms_py_scan_dir(PyObject *Py_UNUSED(self), PyObject *args)
{
    int dir_fd;
    Py_buffer prefix = {0};
    PyObject *dpath_o;
    if (!PyArg_ParseTuple(args, "iy*O:scan_dir", &dir_fd, &prefix, &dpath_o))
        return NULL;
    const char *dpath = NULL;
    Py_ssize_t dlen = 0;
    if (dpath_o != Py_None) {
        if (PyBytes_AsStringAndSize(dpath_o, (char **)&dpath, &dlen) < 0) {
            PyBuffer_Release(&prefix);
            return NULL;
        }
        if ((size_t)dlen != strlen(dpath)) {
            PyBuffer_Release(&prefix);
            PyErr_SetString(PyExc_ValueError, "dir_path contains a NUL byte");
            return NULL;
        }
    }
    sms_scan_out o = {0};
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = sms_scan_dir(dir_fd, prefix.buf, (size_t)prefix.len, dpath, (size_t)dlen, sms_tree_cache_process(), &o);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&prefix);
    PyObject *res = NULL, *blob = NULL, *names = NULL, *kinds = NULL, *ends = NULL, *errors = NULL;
    if (err) {
        sms_scan_free(&o);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    blob = PyBytes_FromStringAndSize((const char *)o.blob.data, (Py_ssize_t)o.blob.len);
    names = PyList_New((Py_ssize_t)o.nrec);
    kinds = PyBytes_FromStringAndSize((const char *)o.kinds, (Py_ssize_t)o.nrec);
    ends = PyList_New((Py_ssize_t)o.nrec);
    errors = PyList_New(0);
    if (!blob || !names || !kinds || !ends || !errors)
        goto fail;
    for (size_t k = 0; k < o.nrec; k++) {
        const sms_dname *dn = &o.names[o.nameidx[k]];
        PyObject *nm = PyBytes_FromStringAndSize(dn->name, (Py_ssize_t)dn->len);
        PyObject *e = PyLong_FromSize_t(o.ends[k]);
        if (!nm || !e) {
            Py_XDECREF(nm);
            Py_XDECREF(e);
            goto fail;
        }
        PyList_SET_ITEM(names, (Py_ssize_t)k, nm);
        PyList_SET_ITEM(ends, (Py_ssize_t)k, e);
    }
    for (size_t i = 0; i < o.count; i++) {
        if (!o.errs[i])
            continue;
        PyObject *t = Py_BuildValue("(y#i)", o.names[i].name, (Py_ssize_t)o.names[i].len, o.errs[i]);
        if (!t || PyList_Append(errors, t) < 0) {
            Py_XDECREF(t);
            goto fail;
        }
        Py_DECREF(t);
    }
    res = Py_BuildValue("(OOOOOK)", blob, names, kinds, ends, errors, (unsigned long long)o.file_bytes);
fail:
    Py_XDECREF(blob);
    Py_XDECREF(names);
    Py_XDECREF(kinds);
    Py_XDECREF(ends);
    Py_XDECREF(errors);
    sms_scan_free(&o);
    return res;
}

/* A list of ints from n size_t values (NULL with an exception set on failure). */
static PyObject *size_list(const size_t *v, size_t n)
{
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t k = 0; list && k < n; k++) {
        PyObject *x = PyLong_FromSize_t(v[k]);
        if (!x)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, (Py_ssize_t)k, x);
    }
    return list;
}

/* diff_records(source, target) -> (actions, gone)
 * Both bodies sorted by path. actions: a byte per source record, 2 where the target has
 * no entry at its path, else 0 alike, 3 metadata only, 4 data, 1 anything else (fstree_diff.c);
 * gone: indices of target records the source does not have. */
PyObject *sms_py_diff_records(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer sb = {0}, tb = {0};
    if (!PyArg_ParseTuple(args, "y*y*:diff_records", &sb, &tb))
        return NULL;
    uint8_t *actions = NULL;
    size_t *gone = NULL, ns = 0, ngone = 0;
    PyObject *res = NULL;
    int rc = sms_diff_records(sb.buf, (size_t)sb.len, tb.buf, (size_t)tb.len, &actions, &ns, &gone, &ngone);
    if (rc == SMS_DIFF_NOMEM) {
        PyErr_NoMemory();
    } else if (rc == SMS_DIFF_MALFORMED) {
        PyErr_SetString(PyExc_ValueError, RECORDS_RUN_PAST);
    } else if (rc == SMS_DIFF_UNSORTED) {
        PyErr_SetString(PyExc_ValueError, "listing not sorted by path, or a path listed twice");
    } else {
        PyObject *a = PyBytes_FromStringAndSize((const char *)actions, (Py_ssize_t)ns);
        PyObject *g = a ? size_list(gone, ngone) : NULL;
        if (a && g)
            res = PyTuple_Pack(2, a, g);
        Py_XDECREF(a);
        Py_XDECREF(g);
    }
    free(actions);
    free(gone);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&tb);
    return res;
}

/* group_records(body) -> [(parent, start, end)]
 * Runs of consecutive records of a listing body that share a parent directory (parent b""
 * for the root's entries; None for the root's own record, whose path is empty). */
PyObject *sms_py_group_records(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer bb = {0};
    if (!PyArg_ParseTuple(args, "y*:group_records", &bb))
        return NULL;
    sms_group *groups = NULL;
    size_t n = 0;
    int rc = sms_group_records(bb.buf, (size_t)bb.len, &groups, &n);
    PyObject *out = NULL;
    if (rc == SMS_DIFF_NOMEM)
        PyErr_NoMemory();
    else if (rc < 0)
        PyErr_SetString(PyExc_ValueError, RECORDS_RUN_PAST);
    else
        out = PyList_New((Py_ssize_t)n);
    for (size_t k = 0; out && k < n; k++) {
        const sms_group *g = &groups[k];
        PyObject *t = g->root ? Py_BuildValue("(Onn)", Py_None, (Py_ssize_t)g->start, (Py_ssize_t)g->end)
                              : Py_BuildValue("(y#nn)", (const char *)g->parent, (Py_ssize_t)g->parent_len,
                                              (Py_ssize_t)g->start, (Py_ssize_t)g->end);
        if (!t)
            Py_CLEAR(out);
        else
            PyList_SET_ITEM(out, (Py_ssize_t)k, t);
    }
    free(groups);
    PyBuffer_Release(&bb);
    return out;
}

/* read_files(dir_fd, records, indices, max_size, out, pos, settle_before_ns=0) -> (end, taken, left, files, bytes)
 * FILE operations for the regular files of `records` (one directory's, as scan_dir made
 * them) at `indices`, read relative to dir_fd straight into the writable buffer `out` from
 * offset `pos`, until the next one does not fit. end: where they end in `out`; taken: how
 * many indices were dealt with (the rest did not fit); left: those of them not done here,
 * for the caller's careful path (changed while read, vanished, not regular, larger than
 * max_size, changed after settle_before_ns without a lease: see fstree_read.c). */
PyObject *sms_py_read_files(PyObject *Py_UNUSED(self), PyObject *args)
{
    int dir_fd;
    Py_buffer rb = {0}, ob = {0};
    PyObject *idx_o;
    unsigned long long max_size;
    Py_ssize_t pos;
    long long settle_before_ns = 0;
    if (!PyArg_ParseTuple(args, "iy*OKw*n|L:read_files", &dir_fd, &rb, &idx_o, &max_size, &ob, &pos,
                          &settle_before_ns))
        return NULL;
    sms_rec_list recs = {0};
    size_t *idx = NULL;
    uint8_t *failed = NULL;
    PyObject *res = NULL, *left = NULL, *seq = NULL;
    if (pos < 0 || pos > ob.len) {
        PyErr_SetString(PyExc_ValueError, "read_files: pos outside the buffer");
        goto done;
    }
    int rc = sms_parse_all(rb.buf, (size_t)rb.len, &recs);
    if (rc < 0) {
        if (rc == -2)
            PyErr_NoMemory();
        else
            PyErr_SetString(PyExc_ValueError, RECORDS_RUN_PAST);
        goto done;
    }
    seq = PySequence_Fast(idx_o, "indices must be a sequence");
    if (!seq)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    idx = malloc((n ? n : 1) * sizeof *idx);
    failed = calloc(n ? n : 1, 1);
    if (!idx || !failed) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t v = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (v == -1 && PyErr_Occurred())
            goto done;
        if (v < 0 || (size_t)v >= recs.n) {
            PyErr_Format(PyExc_IndexError, "record index %zd out of range", v);
            goto done;
        }
        idx[k] = (size_t)v;
    }
    sms_buf out = {ob.buf, (size_t)pos, (size_t)ob.len};
    size_t nfiles = 0, taken;
    uint64_t nbytes = 0;
    Py_BEGIN_ALLOW_THREADS
    taken = sms_read_files(dir_fd, &recs, idx, (size_t)n, max_size, &out, (int64_t)settle_before_ns, failed,
                           &nfiles, &nbytes);
    Py_END_ALLOW_THREADS
    left = PyList_New(0);
    if (!left)
        goto done;
    for (size_t k = 0; k < taken; k++) {
        if (!failed[k])
            continue;
        PyObject *v = PyLong_FromSize_t(idx[k]);
        if (!v || PyList_Append(left, v) < 0) {
            Py_XDECREF(v);
            goto done;
        }
        Py_DECREF(v);
    }
    res = Py_BuildValue("(nnOnK)", (Py_ssize_t)out.len, (Py_ssize_t)taken, left, (Py_ssize_t)nfiles,
                        (unsigned long long)nbytes);
done:
    Py_XDECREF(seq);
    Py_XDECREF(left);
    free(recs.r);
    free(idx);
    free(failed);
    PyBuffer_Release(&rb);
    if (ob.obj)
        PyBuffer_Release(&ob);
    return res;
}

/* The OSError of a file the run could not write: errno, message, path, and .step. */
static void set_write_error(const sms_wfile *f)
{
    PyObject *path = PyBytes_FromStringAndSize((const char *)f->path, (Py_ssize_t)f->plen);
    PyObject *exc = path ? PyObject_CallFunction(PyExc_OSError, "isO", f->err, strerror(f->err), path) : NULL;
    if (exc) {
        PyObject *step = PyUnicode_FromString(f->step ? f->step : "write");
        if (step) {
            PyObject_SetAttrString(exc, "step", step);
            Py_DECREF(step);
        }
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    Py_XDECREF(path);
}

/* The run's directories: dir_fd_of(parent path) for each, duplicated. 0, or -1 with an
 * exception set. */
static int open_run_dirs(sms_wrun *run, PyObject *dir_fd_of)
{
    size_t d = 0;
    for (size_t i = 0; i < run->n; i++) {
        if (i && run->files[i].dir == run->files[i - 1].dir)
            continue;
        size_t plen;
        const uint8_t *parent = sms_wfile_parent(&run->files[i], &plen);
        PyObject *fd_o = PyObject_CallFunction(dir_fd_of, "y#", (const char *)parent, (Py_ssize_t)plen);
        if (!fd_o)
            return -1;
        int named = 0; /* (fd, True): a directory not yet under its own name */
        if (PyTuple_Check(fd_o) && PyTuple_GET_SIZE(fd_o) == 2) {
            named = PyObject_IsTrue(PyTuple_GET_ITEM(fd_o, 1));
            PyObject *first = PyTuple_GET_ITEM(fd_o, 0);
            Py_INCREF(first);
            Py_DECREF(fd_o);
            fd_o = first;
            if (named < 0) {
                Py_DECREF(fd_o);
                return -1;
            }
        }
        long fd = PyLong_AsLong(fd_o);
        Py_DECREF(fd_o);
        if (fd == -1 && PyErr_Occurred())
            return -1;
        run->dir_named[d] = (unsigned char)named;
        int dup_fd = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
        if (dup_fd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        run->dir_fds[d++] = dup_fd;
    }
    return 0;
}

/* write_files(body, pos, dir_fd_of, owner, max_files, threads)
 *   -> (end, files, bytes, fds, dir_fds, file_dirs, names, paths)
 * Writes the run of FILE operations of `body` starting at `pos` (up to max_files, and
 * only plain ones: a regular file without xattrs, a well-formed path) as anonymous files
 * in their directories, `threads` at a time: data (all-zero 4 KiB blocks as holes),
 * owner (with `owner`), mode and times. dir_fd_of(parent path) gives each directory's
 * descriptor (and checks the path), or (descriptor, True) for a directory that has no name
 * of its own yet, whose files are created under their names (fd -1: nothing to link);
 * the run keeps duplicates of them (dir_fds). end:
 * where the first operation not taken starts. The files have no name yet: link_files
 * names them, closing fds. On an error no file is kept and OSError names the path. */
PyObject *sms_py_write_files(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer body = {0};
    Py_ssize_t pos, max_files;
    PyObject *dir_fd_of;
    int owner, nthreads;
    if (!PyArg_ParseTuple(args, "y*nOpni:write_files", &body, &pos, &dir_fd_of, &owner, &max_files, &nthreads))
        return NULL;
    if (pos < 0 || pos > body.len || nthreads < 1 || nthreads > 16 || max_files < 0) {
        PyBuffer_Release(&body);
        PyErr_SetString(PyExc_ValueError, "write_files: pos, threads or max_files out of range");
        return NULL;
    }
    sms_wrun run;
    PyObject *res = NULL;
    if (sms_plan_writes(body.buf, (size_t)body.len, (size_t)pos, (size_t)max_files, &run)) {
        PyErr_NoMemory();
        goto fail;
    }
    if (open_run_dirs(&run, dir_fd_of) < 0)
        goto fail;
    Py_BEGIN_ALLOW_THREADS
    sms_write_run(&run, owner, nthreads);
    Py_END_ALLOW_THREADS
    for (size_t i = 0; i < run.n; i++) {
        if (run.files[i].err) {
            set_write_error(&run.files[i]);
            goto fail;
        }
    }
    PyObject *fds = PyList_New((Py_ssize_t)run.n), *dirs = PyList_New((Py_ssize_t)run.ndirs),
             *fdirs = PyList_New((Py_ssize_t)run.n), *names = PyList_New((Py_ssize_t)run.n),
             *paths = PyList_New((Py_ssize_t)run.n);
    if (!fds || !dirs || !fdirs || !names || !paths)
        goto build_fail;
    for (size_t d = 0; d < run.ndirs; d++)
        PyList_SET_ITEM(dirs, (Py_ssize_t)d, PyLong_FromLong(run.dir_fds[d]));
    for (size_t i = 0; i < run.n; i++) {
        sms_wfile *f = &run.files[i];
        PyList_SET_ITEM(fds, (Py_ssize_t)i, PyLong_FromLong(f->fd));
        PyList_SET_ITEM(fdirs, (Py_ssize_t)i, PyLong_FromSize_t(f->dir));
        PyList_SET_ITEM(names, (Py_ssize_t)i, PyBytes_FromStringAndSize((const char *)f->name, (Py_ssize_t)f->nlen));
        PyList_SET_ITEM(paths, (Py_ssize_t)i, PyBytes_FromStringAndSize((const char *)f->path, (Py_ssize_t)f->plen));
    }
    if (PyErr_Occurred())
        goto build_fail;
    res = Py_BuildValue("(nnKNNNNN)", (Py_ssize_t)run.end, (Py_ssize_t)run.n, (unsigned long long)run.bytes, fds,
                        dirs, fdirs, names, paths);
    free(run.files);
    free(run.dir_fds);
    free(run.dir_named);
    PyBuffer_Release(&body);
    return res;
build_fail:
    Py_XDECREF(fds);
    Py_XDECREF(dirs);
    Py_XDECREF(fdirs);
    Py_XDECREF(names);
    Py_XDECREF(paths);
fail:
    sms_drop_run(&run);
    PyBuffer_Release(&body);
    return NULL;
}

/* link_files(fds, dir_fds, file_dirs, names, tag) -> failures
 * Gives each anonymous file of a write_files run its name, atomically replacing what is
 * there (through a temporary name `.smsrepl~<tag><counter>~name`), and closes every fd
 * and dir fd. failures: (index, errno, temporary name or None): a file not named (where
 * a temporary name is given, the file waits under it: a directory holds its name). */
PyObject *sms_py_link_files(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *fds_o, *dirs_o, *fdirs_o, *names_o;
    unsigned int tag;
    if (!PyArg_ParseTuple(args, "O!O!O!O!I:link_files", &PyList_Type, &fds_o, &PyList_Type, &dirs_o, &PyList_Type,
                          &fdirs_o, &PyList_Type, &names_o, &tag))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(fds_o), nd = PyList_GET_SIZE(dirs_o);
    if (PyList_GET_SIZE(fdirs_o) != n || PyList_GET_SIZE(names_o) != n) {
        PyErr_SetString(PyExc_ValueError, "link_files: lists of different lengths");
        return NULL;
    }
    int *fds = malloc((n ? n : 1) * sizeof *fds), *dirs = malloc((nd ? nd : 1) * sizeof *dirs);
    size_t *fdirs = malloc((n ? n : 1) * sizeof *fdirs);
    char **names = calloc(n ? n : 1, sizeof *names);
    int *errs = calloc(n ? n : 1, sizeof *errs);
    char (*tmps)[NAME_MAX_BYTES + 1] = calloc(n ? n : 1, sizeof *tmps);
    PyObject *res = NULL;
    int filled = 0; /* fds and dirs hold the descriptors: close them */
    if (!fds || !dirs || !fdirs || !names || !errs || !tmps) {
        PyErr_NoMemory();
        goto done;
    }
    filled = 1;
    for (Py_ssize_t d = 0; d < nd; d++)
        dirs[d] = (int)PyLong_AsLong(PyList_GET_ITEM(dirs_o, d));
    for (Py_ssize_t i = 0; i < n; i++) /* all of them before any check: every one is closed below */
        fds[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds_o, i));
    for (Py_ssize_t i = 0; i < n; i++) {
        fdirs[i] = PyLong_AsSize_t(PyList_GET_ITEM(fdirs_o, i));
        PyObject *nm = PyList_GET_ITEM(names_o, i);
        if (!PyBytes_Check(nm) || (size_t)PyBytes_GET_SIZE(nm) > NAME_MAX_BYTES ||
            !sms_good_component((const uint8_t *)PyBytes_AS_STRING(nm), (size_t)PyBytes_GET_SIZE(nm)) ||
            memchr(PyBytes_AS_STRING(nm), '/', (size_t)PyBytes_GET_SIZE(nm)) || fdirs[i] >= (size_t)nd) {
            PyErr_SetString(PyExc_ValueError, "link_files: a bad name or directory index");
            goto done;
        }
        names[i] = PyBytes_AS_STRING(nm);
    }
    if (PyErr_Occurred())
        goto done;
    Py_BEGIN_ALLOW_THREADS
    sms_link_files(sms_tree_cache_process(), fds, dirs, fdirs, names, (size_t)n, tag, errs, tmps);
    Py_END_ALLOW_THREADS
    res = PyList_New(0);
    for (Py_ssize_t i = 0; res && i < n; i++) {
        if (!errs[i])
            continue;
        PyObject *t = tmps[i][0] ? Py_BuildValue("(niy)", i, errs[i], tmps[i]) : Py_BuildValue("(niO)", i, errs[i], Py_None);
        if (!t || PyList_Append(res, t) < 0)
            Py_CLEAR(res);
        Py_XDECREF(t);
    }
done:
    for (Py_ssize_t i = 0; filled && i < n; i++)
        close(fds[i]);
    for (Py_ssize_t d = 0; filled && d < nd; d++)
        close(dirs[d]);
    free(fds);
    free(dirs);
    free(fdirs);
    free(names);
    free(errs);
    free(tmps);
    return res;
}
