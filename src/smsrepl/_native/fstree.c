/* File-tree kernels: the per-file work of a file round, done for a whole directory or a
 * whole run of files per call, so that a tree of many small files does not pay Python's
 * per-object cost for each file.
 *
 *   scan_dir     lstat (and readlink, xattrs) of every entry of one directory, as wire records
 *   diff_records which source records differ from the target's (both sorted by path)
 *   read_files   small regular files of one directory, read into FILE operations
 *   write_files  a run of FILE operations written as anonymous files (O_TMPFILE) by threads
 *   link_files   those files given their names (after the caller made them durable)
 *
 * Records and operations use the layouts of smsrepl/files/wire.py. System calls run with
 * the GIL released; Python objects are made before or after. */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "fstree.h"

#define KIND_FILE 1
#define KIND_DIR 2
#define KIND_SYMLINK 3
#define SPARSE_BLOCK 4096
#define NAME_MAX_BYTES 255

/* --- byte helpers --------------------------------------------------------- */
static uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static uint8_t *put16(uint8_t *p, uint16_t v)
{
    p[0] = v >> 8;
    p[1] = (uint8_t)v;
    return p + 2;
}
static uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24;
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}
static uint8_t *put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    return put32(p + 4, (uint32_t)v);
}

int sms_buf_reserve(sms_buf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *d = realloc(b->data, cap);
    if (!d)
        return -1;
    b->data = d;
    b->cap = cap;
    return 0;
}

/* Room in array *p (capacity *cap elements of elem bytes) for element n: doubled when full. */
static int grow(void **p, size_t *cap, size_t n, size_t elem)
{
    if (n < *cap)
        return 0;
    size_t c = *cap ? *cap * 2 : 64;
    void *q = realloc(*p, c * elem);
    if (!q)
        return -1;
    *p = q;
    *cap = c;
    return 0;
}

void sms_buf_free(sms_buf *b)
{
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}

int sms_parse_rec(const uint8_t *p, size_t avail, sms_rec *r)
{
    if (avail < SMS_REC_HEAD)
        return -1;
    r->kind = p[0];
    r->mode = be32(p + 1);
    r->uid = be32(p + 5);
    r->gid = be32(p + 9);
    r->size = be64(p + 13);
    r->mtime_ns = (int64_t)be64(p + 21);
    r->rdev = be64(p + 29);
    r->nlink = be32(p + 37);
    r->plen = be16(p + 41);
    r->llen = be16(p + 43);
    r->xlen = be32(p + 45);
    r->has_digest = p[49] != 0;
    size_t need = SMS_REC_HEAD + (size_t)r->plen + r->llen + r->xlen + (r->has_digest ? 16 : 0);
    if (need > avail)
        return -1;
    r->path = p + SMS_REC_HEAD;
    r->link = r->path + r->plen;
    r->xattrs = r->link + r->llen;
    r->total = need;
    return 0;
}

static int kind_of(mode_t m)
{
    switch (m & S_IFMT) {
    case S_IFREG: return KIND_FILE;
    case S_IFDIR: return KIND_DIR;
    case S_IFLNK: return KIND_SYMLINK;
    case S_IFCHR: return 4;
    case S_IFBLK: return 5;
    case S_IFIFO: return 6;
    case S_IFSOCK: return 7;
    default: return 0;
    }
}

static int64_t mtime_ns(const struct stat *st)
{
    return (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

/* Append a record: header from st, then path (prefix/name), link and xattr block. */
static int put_record(sms_buf *b, const struct stat *st, const uint8_t *prefix, size_t prelen,
                      const uint8_t *name, size_t nlen, const uint8_t *link, size_t llen,
                      const uint8_t *xb, size_t xlen)
{
    size_t plen = prelen ? prelen + 1 + nlen : nlen;
    if (sms_buf_reserve(b, SMS_REC_HEAD + plen + llen + xlen) < 0)
        return ENOMEM;
    uint8_t *p = b->data + b->len;
    *p++ = (uint8_t)kind_of(st->st_mode);
    p = put32(p, st->st_mode & 07777);
    p = put32(p, st->st_uid);
    p = put32(p, st->st_gid);
    p = put64(p, (uint64_t)st->st_size);
    p = put64(p, (uint64_t)mtime_ns(st));
    p = put64(p, (uint64_t)st->st_rdev);
    p = put32(p, (uint32_t)st->st_nlink);
    p = put16(p, (uint16_t)plen);
    p = put16(p, (uint16_t)llen);
    p = put32(p, (uint32_t)xlen);
    *p++ = 0;
    if (prelen) {
        memcpy(p, prefix, prelen);
        p += prelen;
        *p++ = '/';
    }
    memcpy(p, name, nlen);
    p += nlen;
    if (llen)
        memcpy(p, link, llen);
    p += llen;
    if (xlen)
        memcpy(p, xb, xlen);
    p += xlen;
    b->len = (size_t)(p - b->data);
    return 0;
}

/* --- scan_dir ------------------------------------------------------------- */
typedef struct {
    char *name;
    size_t len;
} dname;

static int cmp_dname(const void *a, const void *b)
{
    return strcmp(((const dname *)a)->name, ((const dname *)b)->name);
}

static int cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

#ifndef SYS_listxattrat
#define SYS_listxattrat 465 /* Linux 6.13 (x86_64 and the generic table alike) */
#endif
static int have_listxattrat = 1;

/* Whether entry `name` of dir_fd may have xattrs: listxattrat() answers without resolving
 * a path (half the cost of llistxattr by path, where most entries have none). */
static int may_have_xattrs(int dir_fd, const char *name)
{
    if (!have_listxattrat)
        return 1;
    long n = syscall(SYS_listxattrat, dir_fd, name, AT_SYMLINK_NOFOLLOW, NULL, (size_t)0);
    if (n == 0)
        return 0;
    if (n < 0 && (errno == ENOSYS || errno == EINVAL || errno == EPERM))
        have_listxattrat = 0; /* an older kernel, or a filter that refuses it */
    return 1;
}

/* Entries known to have no xattrs, across the scans of this process (a continuous sync's
 * sender and a long-running receiver scan the same trees round after round): the key is a
 * hash of (device, inode), the value the entry's ctime. Setting or removing an xattr (or an
 * ACL) changes the ctime, so an entry whose ctime is what it was when it was found bare is
 * still bare, and its listxattrat() is skipped (about a fifth of a scan). Only entries whose
 * ctime was at least nox_min_age seconds old when found are kept: ctime comes from a clock
 * that ticks every few milliseconds, and a change later in the same tick would keep it. A
 * hash collision misleads only where the two inodes' ctimes are equal to the nanosecond. */
#define NOX_FIRST_SLOTS ((size_t)1 << 16)
#define NOX_MAX_SLOTS ((size_t)1 << 21) /* 32 MiB: a million entries at half load */
typedef struct {
    uint64_t key, ctime_ns;
} nox_slot;
static nox_slot *nox_slots;
static size_t nox_mask, nox_used;
static uint64_t nox_hits;
static double nox_min_age = 2.0;
static pthread_mutex_t nox_lock = PTHREAD_MUTEX_INITIALIZER;

static uint64_t nox_key(const struct stat *st)
{
    uint64_t h = (uint64_t)st->st_dev * 0x9E3779B97F4A7C15ULL ^ (uint64_t)st->st_ino;
    h ^= h >> 33;
    h *= 0xFF51AFD7ED558CCDULL;
    h ^= h >> 33;
    h *= 0xC4CEB9FE1A85EC53ULL;
    h ^= h >> 33;
    return h ? h : 1; /* 0 marks an empty slot */
}

static uint64_t ctime_ns(const struct stat *st)
{
    return (uint64_t)st->st_ctim.tv_sec * 1000000000ULL + (uint64_t)st->st_ctim.tv_nsec;
}

static nox_slot *nox_find(uint64_t key) /* the key's slot, or the empty one it would take */
{
    for (size_t i = (size_t)key & nox_mask;; i = (i + 1) & nox_mask)
        if (nox_slots[i].key == key || !nox_slots[i].key)
            return &nox_slots[i];
}

/* known[i] = 1 for each entry i (of n, errs[i] == 0) known to have no xattrs at its present
 * ctime. One lock for a whole directory: its scan threads would otherwise meet on it at
 * every entry. */
static void nox_lookup(const struct stat *sts, const int *errs, size_t n, uint8_t *known)
{
    pthread_mutex_lock(&nox_lock);
    if (nox_slots) {
        for (size_t i = 0; i < n; i++) {
            if (errs[i])
                continue;
            nox_slot *s = nox_find(nox_key(&sts[i]));
            known[i] = s->key && s->ctime_ns == ctime_ns(&sts[i]);
            nox_hits += known[i];
        }
    }
    pthread_mutex_unlock(&nox_lock);
}

/* Room for one more entry, growing the table while it may (lock held); 0 when full. */
static int nox_room(void)
{
    if (nox_slots && (nox_used + 1) * 2 <= nox_mask + 1)
        return 1;
    size_t slots = nox_slots ? (nox_mask + 1) * 2 : NOX_FIRST_SLOTS;
    nox_slot *grown = slots <= NOX_MAX_SLOTS ? calloc(slots, sizeof *grown) : NULL;
    if (!grown) /* at its largest (or no memory): fill to three quarters, then keep what is known */
        return nox_slots && (nox_used + 1) * 4 <= (nox_mask + 1) * 3;
    nox_slot *old = nox_slots;
    size_t old_slots = old ? nox_mask + 1 : 0;
    nox_slots = grown;
    nox_mask = slots - 1;
    for (size_t i = 0; i < old_slots; i++)
        if (old[i].key)
            *nox_find(old[i].key) = old[i];
    free(old);
    return 1;
}

/* Remember entries idx[0..n) of sts, found without xattrs, whose ctime was at least
 * nox_min_age old at `now` (when the scan began, seconds). */
static void nox_remember(const struct stat *sts, const size_t *idx, size_t n, double now)
{
    pthread_mutex_lock(&nox_lock);
    for (size_t k = 0; k < n; k++) {
        const struct stat *st = &sts[idx[k]];
        if ((double)st->st_ctim.tv_sec + (double)st->st_ctim.tv_nsec / 1e9 > now - nox_min_age)
            continue;
        if (!nox_room())
            break;
        uint64_t key = nox_key(st);
        nox_slot *s = nox_find(key);
        nox_used += !s->key;
        s->key = key;
        s->ctime_ns = ctime_ns(st);
    }
    pthread_mutex_unlock(&nox_lock);
}

/* xattr_cache(clear=False, min_age=None) -> (entries, hits): the no-xattrs cache's size and
 * how many probes it saved; clear empties it; min_age sets the age (seconds) an entry's ctime
 * needs to be kept (tests). */
PyObject *sms_py_xattr_cache(PyObject *self, PyObject *args, PyObject *kw)
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
    pthread_mutex_lock(&nox_lock);
    if (min_age != Py_None)
        nox_min_age = age;
    if (clear) {
        free(nox_slots);
        nox_slots = NULL;
        nox_mask = nox_used = 0;
        nox_hits = 0;
    }
    PyObject *r = Py_BuildValue("(KK)", (unsigned long long)nox_used, (unsigned long long)nox_hits);
    pthread_mutex_unlock(&nox_lock);
    return r;
}

/* The xattr block of `path` (u16 count, then per item u16 name length, name, u32 value
 * length, value; sorted by name), empty where there are none. 0 or an errno. */
static int read_xattrs(const char *path, sms_buf *xb)
{
    xb->len = 0;
    char *list = NULL;
    char **names = NULL;
    char *val = NULL;
    int err = 0;
    for (int attempt = 0;; attempt++) {
        ssize_t n = llistxattr(path, NULL, 0);
        if (n < 0)
            return (errno == ENOTSUP || errno == EPERM) ? 0 : errno;
        if (n == 0)
            return 0;
        char *l2 = realloc(list, (size_t)n);
        if (!l2) {
            free(list);
            return ENOMEM;
        }
        list = l2;
        ssize_t got = llistxattr(path, list, (size_t)n);
        if (got >= 0) {
            n = got;
            size_t count = 0;
            for (ssize_t i = 0; i < n; i += (ssize_t)strlen(list + i) + 1)
                count++;
            if (count == 0)
                goto out;
            names = malloc(count * sizeof *names);
            if (!names) {
                err = ENOMEM;
                goto out;
            }
            size_t k = 0;
            for (ssize_t i = 0; i < n; i += (ssize_t)strlen(list + i) + 1)
                names[k++] = list + i;
            qsort(names, count, sizeof *names, cmp_cstr);
            if (sms_buf_reserve(xb, 2) < 0) {
                err = ENOMEM;
                goto out;
            }
            xb->len = 2;
            uint16_t kept = 0;
            for (size_t i = 0; i < count && kept < 0xFFFF; i++) {
                ssize_t vn = lgetxattr(path, names[i], NULL, 0);
                if (vn >= 0) {
                    free(val);
                    val = malloc(vn ? (size_t)vn : 1);
                    if (!val) {
                        err = ENOMEM;
                        goto out;
                    }
                    vn = lgetxattr(path, names[i], val, (size_t)vn);
                }
                if (vn < 0) {
                    if (errno == ENODATA || errno == ENOTSUP || errno == EPERM)
                        continue;
                    err = errno; /* ERANGE: it grew meanwhile; reported like any other error */
                    goto out;
                }
                size_t nl = strlen(names[i]);
                if (sms_buf_reserve(xb, 6 + nl + (size_t)vn) < 0) {
                    err = ENOMEM;
                    goto out;
                }
                uint8_t *p = put16(xb->data + xb->len, (uint16_t)nl);
                memcpy(p, names[i], nl);
                p = put32(p + nl, (uint32_t)vn);
                memcpy(p, val, (size_t)vn);
                xb->len += 6 + nl + (size_t)vn;
                kept++;
            }
            if (kept)
                put16(xb->data, kept);
            else
                xb->len = 0;
            goto out;
        }
        if (errno != ERANGE || attempt >= 3) {
            err = (errno == ENOTSUP || errno == EPERM) ? 0 : errno;
            goto out;
        }
    }
out:
    free(list);
    free(names);
    free(val);
    return err;
}

typedef struct {
    sms_buf blob;
    uint64_t file_bytes; /* sizes of the regular files */
    dname *names; /* sorted; entries that failed have their errno in errs */
    size_t count;
    uint8_t *kinds;  /* per record */
    size_t *ends;    /* per record: end offset in blob */
    size_t *nameidx; /* per record: index into names */
    size_t nrec;
    int *errs; /* per name: 0 or errno */
} scan_out;

static void scan_free(scan_out *o)
{
    sms_buf_free(&o->blob);
    for (size_t i = 0; i < o->count; i++)
        free(o->names[i].name);
    free(o->names);
    free(o->kinds);
    free(o->ends);
    free(o->nameidx);
    free(o->errs);
}

static int scan_impl(int dir_fd, const uint8_t *prefix, size_t prelen, const char *dpath, size_t dlen,
                     scan_out *o)
{
    int fd = openat(dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return e;
    }
    size_t cap = 0;
    struct dirent *de;
    int err = 0;
    for (;;) {
        errno = 0;
        de = readdir(d);
        if (!de) {
            err = errno;
            break;
        }
        const char *n = de->d_name;
        if (n[0] == '.' && (n[1] == 0 || (n[1] == '.' && n[2] == 0)))
            continue;
        if (grow((void **)&o->names, &cap, o->count, sizeof *o->names) < 0) {
            err = ENOMEM;
            break;
        }
        size_t len = strlen(n);
        char *copy = malloc(len + 1);
        if (!copy) {
            err = ENOMEM;
            break;
        }
        memcpy(copy, n, len + 1);
        o->names[o->count].name = copy;
        o->names[o->count].len = len;
        o->count++;
    }
    closedir(d);
    if (err)
        return err;
    if (o->count)
        qsort(o->names, o->count, sizeof *o->names, cmp_dname);
    size_t n = o->count ? o->count : 1;
    o->kinds = malloc(n);
    o->ends = malloc(n * sizeof *o->ends);
    o->nameidx = malloc(n * sizeof *o->nameidx);
    o->errs = calloc(n, sizeof *o->errs);
    char *xpath = dpath ? malloc(dlen + 2 + NAME_MAX_BYTES + 1) : NULL;
    uint8_t *linkbuf = malloc(65536);
    struct stat *sts = malloc(n * sizeof *sts);
    uint8_t *known = calloc(n, 1);
    size_t *bare = malloc(n * sizeof *bare), nbare = 0;
    sms_buf xb = {0};
    if (!o->kinds || !o->ends || !o->nameidx || !o->errs || !linkbuf || !sts || !known || !bare ||
        (dpath && !xpath)) {
        err = ENOMEM;
        goto done;
    }
    if (dpath) {
        memcpy(xpath, dpath, dlen);
        xpath[dlen] = '/';
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double now = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
    for (size_t i = 0; i < o->count; i++)
        if (fstatat(dir_fd, o->names[i].name, &sts[i], AT_SYMLINK_NOFOLLOW) < 0)
            o->errs[i] = errno;
    if (dpath)
        nox_lookup(sts, o->errs, o->count, known);
    for (size_t i = 0; i < o->count; i++) {
        const dname *dn = &o->names[i];
        const struct stat *st = &sts[i];
        if (o->errs[i])
            continue;
        if (!kind_of(st->st_mode)) {
            o->errs[i] = EINVAL; /* a file type Linux does not otherwise have */
            continue;
        }
        if ((prelen ? prelen + 1 : 0) + dn->len > 0xFFFF) {
            o->errs[i] = ENAMETOOLONG;
            continue;
        }
        size_t llen = 0;
        if (S_ISLNK(st->st_mode)) {
            ssize_t r = readlinkat(dir_fd, dn->name, (char *)linkbuf, 65535);
            if (r < 0) {
                o->errs[i] = errno;
                continue;
            }
            llen = (size_t)r;
        }
        xb.len = 0;
        if (dpath && !known[i]) {
            if (may_have_xattrs(dir_fd, dn->name)) {
                memcpy(xpath + dlen + 1, dn->name, dn->len + 1);
                int e = read_xattrs(xpath, &xb);
                if (e) {
                    o->errs[i] = e;
                    continue;
                }
            }
            if (!xb.len)
                bare[nbare++] = i;
        }
        if ((err = put_record(&o->blob, st, prefix, prelen, (const uint8_t *)dn->name, dn->len, linkbuf,
                              llen, xb.data, xb.len)))
            goto done;
        if (S_ISREG(st->st_mode))
            o->file_bytes += (uint64_t)st->st_size;
        o->kinds[o->nrec] = (uint8_t)kind_of(st->st_mode);
        o->ends[o->nrec] = o->blob.len;
        o->nameidx[o->nrec] = i;
        o->nrec++;
    }
    if (nbare)
        nox_remember(sts, bare, nbare, now);
done:
    free(xpath);
    free(linkbuf);
    free(sts);
    free(known);
    free(bare);
    sms_buf_free(&xb);
    return err;
}

/* scan_dir(dir_fd, prefix, dir_path or None) -> (records, names, kinds, ends, errors, file_bytes)
 * Records of every entry of the directory, sorted by name, paths `prefix/name`; names: the
 * records' leaf names; kinds: a kind code per record; ends: each record's end offset;
 * errors: (name, errno) of entries that could not be read. With dir_path (the directory's
 * path), records carry the entries' xattrs. file_bytes: the sizes of the regular files. */
PyObject *sms_py_scan_dir(PyObject *self, PyObject *args)
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
    scan_out o = {0};
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = scan_impl(dir_fd, prefix.buf, (size_t)prefix.len, dpath, (size_t)dlen, &o);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&prefix);
    PyObject *res = NULL, *blob = NULL, *names = NULL, *kinds = NULL, *ends = NULL, *errors = NULL;
    if (err) {
        scan_free(&o);
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
        const dname *dn = &o.names[o.nameidx[k]];
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
    scan_free(&o);
    return res;
}

/* --- diff_records ----------------------------------------------------------- */
typedef struct {
    sms_rec *r;
    size_t n;
} rec_list;

/* All records of a body; -1 (and a Python error set by the caller) if malformed. */
static int parse_all(const uint8_t *p, size_t len, rec_list *out)
{
    size_t cap = 0, pos = 0;
    out->r = NULL;
    out->n = 0;
    while (pos < len) {
        if (grow((void **)&out->r, &cap, out->n, sizeof *out->r) < 0)
            return -2;
        if (sms_parse_rec(p + pos, len - pos, &out->r[out->n]) < 0)
            return -1;
        pos += out->r[out->n].total;
        out->n++;
    }
    return 0;
}

static int cmp_path(const sms_rec *a, const sms_rec *b)
{
    size_t n = a->plen < b->plen ? a->plen : b->plen;
    int c = memcmp(a->path, b->path, n);
    if (c)
        return c;
    return (a->plen > b->plen) - (a->plen < b->plen);
}

/* What the target's entry t at the same path as source entry s asks for: 0 nothing (alike),
 * 3 metadata only (a file with the same size and mtime), 4 data (a file there whose size or
 * mtime differs, or which is a hard link where the source's is not), 1 anything else
 * (another kind, metadata of a non-file, a source hard link, a special file). */
static int verdict(const sms_rec *s, const sms_rec *t)
{
    if (s->kind != t->kind)
        return 1;
    int meta = s->mode == t->mode && s->uid == t->uid && s->gid == t->gid && s->mtime_ns == t->mtime_ns &&
               s->xlen == t->xlen && !memcmp(s->xattrs, t->xattrs, s->xlen);
    switch (s->kind) {
    case KIND_FILE:
        if (s->nlink != 1)
            return 1;
        if (s->size != t->size || s->mtime_ns != t->mtime_ns || t->nlink != 1)
            return 4;
        return meta ? 0 : 3;
    case KIND_DIR:
        return meta ? 0 : 1;
    case KIND_SYMLINK:
        return meta && s->llen == t->llen && !memcmp(s->link, t->link, s->llen) ? 0 : 1;
    default:
        return 1;
    }
}

/* diff_records(source, target) -> (actions, gone)
 * Both bodies sorted by path. actions: a byte per source record, 2 where the target has
 * no entry at its path, else verdict()'s;
 * gone: indices of target records the source does not have. */
PyObject *sms_py_diff_records(PyObject *self, PyObject *args)
{
    Py_buffer sb = {0}, tb = {0};
    if (!PyArg_ParseTuple(args, "y*y*:diff_records", &sb, &tb))
        return NULL;
    rec_list s = {0}, t = {0};
    PyObject *res = NULL, *actions = NULL, *gone = NULL;
    int rc = parse_all(sb.buf, (size_t)sb.len, &s);
    if (rc == 0)
        rc = parse_all(tb.buf, (size_t)tb.len, &t);
    if (rc == -2) {
        PyErr_NoMemory();
        goto done;
    }
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "entry record runs past the end of its listing");
        goto done;
    }
    for (size_t k = 1; k < s.n || k < t.n; k++) {
        if ((k < s.n && cmp_path(&s.r[k - 1], &s.r[k]) >= 0) || (k < t.n && cmp_path(&t.r[k - 1], &t.r[k]) >= 0)) {
            PyErr_SetString(PyExc_ValueError, "listing not sorted by path, or a path listed twice");
            goto done;
        }
    }
    actions = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)s.n);
    gone = PyList_New(0);
    if (!actions || !gone)
        goto done;
    uint8_t *a = (uint8_t *)PyBytes_AS_STRING(actions);
    size_t i = 0, j = 0;
    while (i < s.n || j < t.n) {
        int c = i >= s.n ? 1 : j >= t.n ? -1 : cmp_path(&s.r[i], &t.r[j]);
        if (c < 0) {
            a[i++] = 2;
        } else if (c == 0) {
            a[i] = (uint8_t)verdict(&s.r[i], &t.r[j]);
            i++;
            j++;
        } else {
            PyObject *v = PyLong_FromSize_t(j++);
            if (!v || PyList_Append(gone, v) < 0) {
                Py_XDECREF(v);
                goto done;
            }
            Py_DECREF(v);
        }
    }
    res = PyTuple_Pack(2, actions, gone);
done:
    Py_XDECREF(actions);
    Py_XDECREF(gone);
    free(s.r);
    free(t.r);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&tb);
    return res;
}

static const uint8_t *leaf_of(const sms_rec *r, size_t *len)
{
    const uint8_t *p = r->path + r->plen;
    while (p > r->path && p[-1] != '/')
        p--;
    *len = (size_t)(r->path + r->plen - p);
    return p;
}

/* --- group_records ---------------------------------------------------------- */
/* group_records(body) -> [(parent, start, end)]
 * Runs of consecutive records of a listing body that share a parent directory (parent b""
 * for the root's entries; None for the root's own record, whose path is empty). */
PyObject *sms_py_group_records(PyObject *self, PyObject *args)
{
    Py_buffer bb = {0};
    if (!PyArg_ParseTuple(args, "y*:group_records", &bb))
        return NULL;
    const uint8_t *b = bb.buf;
    size_t len = (size_t)bb.len, pos = 0, start = 0;
    const uint8_t *par = NULL;
    size_t parlen = 0;
    int have = 0, root = 0;
    PyObject *out = PyList_New(0);
    while (out && pos <= len) {
        sms_rec r;
        int end = pos == len;
        if (!end && sms_parse_rec(b + pos, len - pos, &r) < 0) {
            PyErr_SetString(PyExc_ValueError, "entry record runs past the end of its listing");
            Py_CLEAR(out);
            break;
        }
        size_t nlen = 0;
        const uint8_t *leaf = end ? NULL : leaf_of(&r, &nlen);
        size_t pl = end ? 0 : leaf > r.path ? (size_t)(leaf - r.path) - 1 : 0;
        int is_root = !end && r.plen == 0;
        if (have && (end || is_root || root || pl != parlen || memcmp(par, r.path, pl))) {
            PyObject *t = root ? Py_BuildValue("(Onn)", Py_None, (Py_ssize_t)start, (Py_ssize_t)pos)
                               : Py_BuildValue("(y#nn)", (const char *)par, (Py_ssize_t)parlen, (Py_ssize_t)start,
                                               (Py_ssize_t)pos);
            if (!t || PyList_Append(out, t) < 0)
                Py_CLEAR(out);
            Py_XDECREF(t);
            have = 0;
        }
        if (end)
            break;
        if (!have) {
            have = 1;
            start = pos;
            par = r.path;
            parlen = pl;
            root = is_root;
        }
        pos += r.total;
    }
    PyBuffer_Release(&bb);
    return out;
}

/* --- read_files ------------------------------------------------------------- */
/* Whether a write may have gone on while the file was read, although size, mtime and ctime
 * read the same before and after: the times change when a write() starts, so one that was
 * under way when the read began and still was when it ended leaves them alike. A read lease
 * (F_RDLCK) settles it: the kernel grants one only while nobody has the file open for
 * writing, and breaks it when anybody opens it so; a lease held from before the read to
 * after it means no write went on. Where no lease is to be had (open for writing elsewhere,
 * not our file without CAP_LEASE, leases off), a file changed after `settle_before_ns`
 * (its ctime) is not trusted. Lease breaks are signalled with SIGURG, whose default is to be
 * ignored (SIGIO's ends the process); the opener waits until this descriptor is closed,
 * which is right after the read. */
static int lease(int fd)
{
    fcntl(fd, F_SETSIG, SIGURG);
    return fcntl(fd, F_SETLEASE, F_RDLCK) == 0;
}

static int unsettled(int fd, int leased, const struct stat *after, int64_t settle_before_ns)
{
    if (leased)
        return fcntl(fd, F_GETLEASE) != F_RDLCK;
    return settle_before_ns > 0 &&
           (int64_t)after->st_ctim.tv_sec * 1000000000LL + after->st_ctim.tv_nsec > settle_before_ns;
}

/* One small file as a FILE operation written at out->len (out->cap is fixed: the caller's
 * buffer). 0 if done; 1 if it did not fit (nothing written); -1 if the file is left to the
 * caller (not regular, too large, unreadable, changed while being read, or maybe: see
 * unsettled()). */
static int read_one(int dir_fd, const sms_rec *r, uint64_t max_size, sms_buf *out, int64_t settle_before_ns)
{
    size_t nlen;
    const uint8_t *leaf = leaf_of(r, &nlen);
    char name[NAME_MAX_BYTES + 1];
    if (nlen == 0 || nlen > NAME_MAX_BYTES)
        return -1;
    memcpy(name, leaf, nlen);
    name[nlen] = 0;
    int fd = openat(dir_fd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0)
        return -1;
    struct stat before, after;
    int rc = -1;
    if (fstat(fd, &before) < 0 || !S_ISREG(before.st_mode) || (uint64_t)before.st_size > max_size)
        goto out;
    int leased = lease(fd);
    size_t size = (size_t)before.st_size;
    if (out->len + 1 + SMS_REC_HEAD + r->plen + r->xlen + size > out->cap) {
        rc = 1;
        goto out;
    }
    size_t mark = out->len;
    out->data[out->len++] = SMS_OP_FILE;
    put_record(out, &before, NULL, 0, r->path, r->plen, NULL, 0, r->xattrs, r->xlen); /* fits: checked */
    size_t got = 0;
    while (got < size) {
        ssize_t n = read(fd, out->data + out->len + got, size - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    if (got != size || fstat(fd, &after) < 0 || after.st_size != before.st_size ||
        mtime_ns(&after) != mtime_ns(&before) || after.st_ctim.tv_sec != before.st_ctim.tv_sec ||
        after.st_ctim.tv_nsec != before.st_ctim.tv_nsec || unsettled(fd, leased, &after, settle_before_ns)) {
        out->len = mark;
        goto out;
    }
    out->len += size;
    rc = 0;
out:
    close(fd);
    return rc;
}

/* read_files(dir_fd, records, indices, max_size, out, pos, settle_before_ns=0) -> (end, taken, left, files, bytes)
 * FILE operations for the regular files of `records` (one directory's, as scan_dir made
 * them) at `indices`, read relative to dir_fd straight into the writable buffer `out` from
 * offset `pos`, until the next one does not fit. end: where they end in `out`; taken: how
 * many indices were dealt with (the rest did not fit); left: those of them not done here,
 * for the caller's careful path (changed while read, vanished, not regular, larger than
 * max_size, changed after settle_before_ns without a lease: see unsettled()). */
PyObject *sms_py_read_files(PyObject *self, PyObject *args)
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
    rec_list recs = {0};
    size_t *idx = NULL;
    uint8_t *failed = NULL;
    PyObject *res = NULL, *left = NULL, *seq = NULL;
    if (pos < 0 || pos > ob.len) {
        PyErr_SetString(PyExc_ValueError, "read_files: pos outside the buffer");
        goto done;
    }
    int rc = parse_all(rb.buf, (size_t)rb.len, &recs);
    if (rc < 0) {
        if (rc == -2)
            PyErr_NoMemory();
        else
            PyErr_SetString(PyExc_ValueError, "entry record runs past the end of its listing");
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
    size_t nfiles = 0;
    uint64_t nbytes = 0;
    Py_ssize_t taken = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; taken < n; taken++) {
        const sms_rec *r = &recs.r[idx[taken]];
        size_t before = out.len;
        int got = r->kind == KIND_FILE ? read_one(dir_fd, r, max_size, &out, (int64_t)settle_before_ns) : -1;
        if (got == 1)
            break;
        if (got < 0) {
            failed[taken] = 1;
        } else {
            nfiles++;
            nbytes += out.len - before - 1 - SMS_REC_HEAD - r->plen - r->xlen;
        }
    }
    Py_END_ALLOW_THREADS
    left = PyList_New(0);
    if (!left)
        goto done;
    for (Py_ssize_t k = 0; k < taken; k++) {
        if (!failed[k])
            continue;
        PyObject *v = PyLong_FromSize_t(idx[k]);
        if (!v || PyList_Append(left, v) < 0) {
            Py_XDECREF(v);
            goto done;
        }
        Py_DECREF(v);
    }
    res = Py_BuildValue("(nnOnK)", (Py_ssize_t)out.len, taken, left, (Py_ssize_t)nfiles, (unsigned long long)nbytes);
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

/* --- write_files ------------------------------------------------------------ */
typedef struct {
    const uint8_t *name; /* leaf, not NUL-terminated */
    size_t nlen;
    const uint8_t *path; /* the whole path, for errors */
    size_t plen;
    const uint8_t *data;
    uint64_t size;
    uint32_t mode, uid, gid;
    int64_t mtime_ns;
    size_t dir; /* index into the run's directory descriptors */
    int fd;
    int err;
    const char *step;
} wfile;

typedef struct {
    wfile *files;
    size_t n;
    int *dir_fds;
    int owner;
    int nthreads;
    size_t next; /* next file to take (under lock) */
    pthread_mutex_t lock;
} wrun;

static int all_zero(const uint8_t *p, size_t n)
{
    static const uint8_t zero[SPARSE_BLOCK];
    return memcmp(p, zero, n) == 0;
}

/* Write data with all-zero 4 KiB blocks left as holes; the size is set at the end. */
static int write_sparse(int fd, const uint8_t *data, uint64_t size)
{
    uint64_t pos = 0;
    int hole_at_end = 0;
    while (pos < size) {
        uint64_t blk = size - pos < SPARSE_BLOCK ? size - pos : SPARSE_BLOCK;
        if (all_zero(data + pos, (size_t)blk)) {
            pos += blk;
            hole_at_end = 1;
            continue;
        }
        uint64_t end = pos + blk;
        while (end < size) { /* extend the run of data blocks */
            uint64_t b2 = size - end < SPARSE_BLOCK ? size - end : SPARSE_BLOCK;
            if (all_zero(data + end, (size_t)b2))
                break;
            end += b2;
        }
        while (pos < end) {
            ssize_t w = pwrite(fd, data + pos, (size_t)(end - pos), (off_t)pos);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                return w < 0 ? errno : EIO;
            pos += (uint64_t)w;
        }
        hole_at_end = 0;
    }
    if (hole_at_end && ftruncate(fd, (off_t)size) < 0)
        return errno;
    return 0;
}

static void write_one(wrun *run, wfile *f)
{
    int dfd = run->dir_fds[f->dir];
    f->step = "create";
    f->fd = openat(dfd, ".", O_WRONLY | O_TMPFILE | O_CLOEXEC, 0600);
    if (f->fd < 0) {
        f->err = errno;
        return;
    }
    struct timespec ts[2];
    ts[0].tv_sec = ts[1].tv_sec = (time_t)(f->mtime_ns >= 0 ? f->mtime_ns / 1000000000LL
                                                             : -((-f->mtime_ns + 999999999LL) / 1000000000LL));
    ts[0].tv_nsec = ts[1].tv_nsec = (long)(f->mtime_ns - (int64_t)ts[0].tv_sec * 1000000000LL);
    if ((f->err = write_sparse(f->fd, f->data, f->size))) {
        f->step = "write";
    } else if (run->owner && fchown(f->fd, f->uid, f->gid) < 0) {
        f->err = errno;
        f->step = "chown";
    } else if (fchmod(f->fd, f->mode) < 0) { /* after chown, which clears set-id bits */
        f->err = errno;
        f->step = "chmod";
    } else if (futimens(f->fd, ts) < 0) {
        f->err = errno;
        f->step = "utime";
    }
}

static void *write_worker(void *arg)
{
    wrun *run = arg;
    for (;;) {
        pthread_mutex_lock(&run->lock);
        size_t i = run->next;
        if (i < run->n)
            run->next = i + 8 < run->n ? i + 8 : run->n;
        pthread_mutex_unlock(&run->lock);
        if (i >= run->n)
            return NULL;
        size_t end = i + 8 < run->n ? i + 8 : run->n;
        for (; i < end; i++)
            write_one(run, &run->files[i]);
    }
}

/* A component is a name a target may hold: not empty, '.', '..', nor over-long. */
static int good_component(const uint8_t *p, size_t n)
{
    return n > 0 && n <= NAME_MAX_BYTES && !(n == 1 && p[0] == '.') && !(n == 2 && p[0] == '.' && p[1] == '.');
}

static int good_path(const uint8_t *p, size_t n)
{
    if (n == 0 || memchr(p, 0, n))
        return 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || p[i] == '/') {
            if (!good_component(p + start, i - start))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}

/* write_files(body, pos, dir_fd_of, owner, max_files, threads)
 *   -> (end, files, bytes, fds, dir_fds, file_dirs, names, paths)
 * Writes the run of FILE operations of `body` starting at `pos` (up to max_files, and
 * only plain ones: a regular file without xattrs, a well-formed path) as anonymous files
 * in their directories, `threads` at a time: data (all-zero 4 KiB blocks as holes),
 * owner (with `owner`), mode and times. dir_fd_of(parent path) gives each directory's
 * descriptor (and checks the path); the run keeps duplicates of them (dir_fds). end:
 * where the first operation not taken starts. The files have no name yet: link_files
 * names them, closing fds. On an error no file is kept and OSError names the path. */
PyObject *sms_py_write_files(PyObject *self, PyObject *args)
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
    const uint8_t *b = body.buf;
    size_t len = (size_t)body.len, p = (size_t)pos;
    wrun run = {0};
    size_t cap = 0, dcap = 0, ndirs = 0;
    const uint8_t *last_parent = NULL;
    size_t last_plen = 0;
    PyObject *res = NULL;
    uint64_t total = 0;
    while (p < len && b[p] == SMS_OP_FILE && (Py_ssize_t)run.n < max_files) {
        sms_rec r;
        if (sms_parse_rec(b + p + 1, len - p - 1, &r) < 0 || r.kind != KIND_FILE || r.mode > 07777 || r.xlen ||
            r.llen || r.has_digest || r.size > len - p - 1 - r.total || !good_path(r.path, r.plen))
            break; /* the careful path says what is wrong with it */
        size_t nlen;
        const uint8_t *leaf = leaf_of(&r, &nlen);
        size_t parent_len = leaf > r.path ? (size_t)(leaf - r.path) - 1 : 0;
        if (!last_parent || parent_len != last_plen || memcmp(last_parent, r.path, parent_len)) {
            PyObject *fd_o = PyObject_CallFunction(dir_fd_of, "y#", (const char *)r.path, (Py_ssize_t)parent_len);
            if (!fd_o)
                goto fail;
            long fd = PyLong_AsLong(fd_o);
            Py_DECREF(fd_o);
            if (fd == -1 && PyErr_Occurred())
                goto fail;
            if (grow((void **)&run.dir_fds, &dcap, ndirs, sizeof *run.dir_fds) < 0) {
                PyErr_NoMemory();
                goto fail;
            }
            int dup_fd = fcntl((int)fd, F_DUPFD_CLOEXEC, 0);
            if (dup_fd < 0) {
                PyErr_SetFromErrno(PyExc_OSError);
                goto fail;
            }
            run.dir_fds[ndirs++] = dup_fd;
            last_parent = r.path;
            last_plen = parent_len;
        }
        if (grow((void **)&run.files, &cap, run.n, sizeof *run.files) < 0) {
            PyErr_NoMemory();
            goto fail;
        }
        wfile *f = &run.files[run.n++];
        f->name = leaf;
        f->nlen = nlen;
        f->path = r.path;
        f->plen = r.plen;
        f->data = b + p + 1 + r.total;
        f->size = r.size;
        f->mode = r.mode;
        f->uid = r.uid;
        f->gid = r.gid;
        f->mtime_ns = r.mtime_ns;
        f->dir = ndirs - 1;
        f->fd = -1;
        f->err = 0;
        f->step = NULL;
        total += r.size;
        p += 1 + r.total + (size_t)r.size;
    }
    run.owner = owner;
    run.nthreads = nthreads;
    pthread_mutex_init(&run.lock, NULL);
    Py_BEGIN_ALLOW_THREADS
    pthread_t th[16];
    int started = 0;
    for (int t = 1; t < nthreads && (size_t)t * 8 < run.n; t++)
        if (pthread_create(&th[started], NULL, write_worker, &run) == 0)
            started++;
    write_worker(&run);
    for (int t = 0; t < started; t++)
        pthread_join(th[t], NULL);
    Py_END_ALLOW_THREADS
    pthread_mutex_destroy(&run.lock);
    for (size_t i = 0; i < run.n; i++) {
        wfile *f = &run.files[i];
        if (f->err) {
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
            goto fail;
        }
    }
    PyObject *fds = PyList_New((Py_ssize_t)run.n), *dirs = PyList_New((Py_ssize_t)ndirs),
             *fdirs = PyList_New((Py_ssize_t)run.n), *names = PyList_New((Py_ssize_t)run.n),
             *paths = PyList_New((Py_ssize_t)run.n);
    if (!fds || !dirs || !fdirs || !names || !paths)
        goto build_fail;
    for (size_t d = 0; d < ndirs; d++)
        PyList_SET_ITEM(dirs, (Py_ssize_t)d, PyLong_FromLong(run.dir_fds[d]));
    for (size_t i = 0; i < run.n; i++) {
        wfile *f = &run.files[i];
        PyList_SET_ITEM(fds, (Py_ssize_t)i, PyLong_FromLong(f->fd));
        PyList_SET_ITEM(fdirs, (Py_ssize_t)i, PyLong_FromSize_t(f->dir));
        PyList_SET_ITEM(names, (Py_ssize_t)i, PyBytes_FromStringAndSize((const char *)f->name, (Py_ssize_t)f->nlen));
        PyList_SET_ITEM(paths, (Py_ssize_t)i, PyBytes_FromStringAndSize((const char *)f->path, (Py_ssize_t)f->plen));
    }
    if (PyErr_Occurred())
        goto build_fail;
    res = Py_BuildValue("(nnKNNNNN)", (Py_ssize_t)p, (Py_ssize_t)run.n, (unsigned long long)total, fds, dirs, fdirs,
                        names, paths);
    free(run.files);
    free(run.dir_fds);
    PyBuffer_Release(&body);
    return res;
build_fail:
    Py_XDECREF(fds);
    Py_XDECREF(dirs);
    Py_XDECREF(fdirs);
    Py_XDECREF(names);
    Py_XDECREF(paths);
fail:
    for (size_t i = 0; i < run.n; i++)
        if (run.files[i].fd >= 0)
            close(run.files[i].fd); /* anonymous: closing drops the file */
    for (size_t d = 0; d < ndirs; d++)
        close(run.dir_fds[d]);
    free(run.files);
    free(run.dir_fds);
    PyBuffer_Release(&body);
    return NULL;
}

/* --- link_files --------------------------------------------------------------- */
static int link_mode = 0; /* 0: untried, 1: AT_EMPTY_PATH works, 2: through /proc/self/fd */

static int link_fd(int fd, int dfd, const char *name)
{
    if (link_mode != 2) {
        if (linkat(fd, "", dfd, name, AT_EMPTY_PATH) == 0) {
            link_mode = 1;
            return 0;
        }
        if (link_mode == 1 || (errno != ENOENT && errno != EPERM))
            return -1;
        link_mode = 2; /* needs CAP_DAC_READ_SEARCH: go through /proc */
    }
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    return linkat(AT_FDCWD, proc, dfd, name, AT_SYMLINK_FOLLOW);
}

static unsigned int temp_counter;

/* link_files(fds, dir_fds, file_dirs, names, tag) -> failures
 * Gives each anonymous file of a write_files run its name, atomically replacing what is
 * there (through a temporary name `.smsrepl~<tag><counter>~name`), and closes every fd
 * and dir fd. failures: (index, errno, temporary name or None): a file not named (where
 * a temporary name is given, the file waits under it: a directory holds its name). */
PyObject *sms_py_link_files(PyObject *self, PyObject *args)
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
    if (!fds || !dirs || !fdirs || !names || !errs || !tmps) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t d = 0; d < nd; d++) {
        dirs[d] = (int)PyLong_AsLong(PyList_GET_ITEM(dirs_o, d));
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        fds[i] = (int)PyLong_AsLong(PyList_GET_ITEM(fds_o, i));
        fdirs[i] = PyLong_AsSize_t(PyList_GET_ITEM(fdirs_o, i));
        PyObject *nm = PyList_GET_ITEM(names_o, i);
        if (!PyBytes_Check(nm) || (size_t)PyBytes_GET_SIZE(nm) > NAME_MAX_BYTES ||
            !good_component((const uint8_t *)PyBytes_AS_STRING(nm), (size_t)PyBytes_GET_SIZE(nm)) ||
            memchr(PyBytes_AS_STRING(nm), '/', (size_t)PyBytes_GET_SIZE(nm)) || fdirs[i] >= (size_t)nd) {
            PyErr_SetString(PyExc_ValueError, "link_files: a bad name or directory index");
            goto done;
        }
        names[i] = PyBytes_AS_STRING(nm);
    }
    if (PyErr_Occurred())
        goto done;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        int dfd = dirs[fdirs[i]];
        if (link_fd(fds[i], dfd, names[i]) == 0)
            continue;
        if (errno != EEXIST) {
            errs[i] = errno;
            continue;
        }
        snprintf(tmps[i], sizeof tmps[i], ".smsrepl~%08x%08x~%.*s", tag, temp_counter++, NAME_MAX_BYTES - 27,
                 names[i]);
        if (link_fd(fds[i], dfd, tmps[i]) < 0) {
            errs[i] = errno;
            tmps[i][0] = 0;
        } else if (renameat(dfd, tmps[i], dfd, names[i]) < 0) {
            errs[i] = errno; /* the file waits under its temporary name */
        } else {
            tmps[i][0] = 0;
        }
    }
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
    if (fds)
        for (Py_ssize_t i = 0; i < n; i++)
            close(fds[i]);
    if (dirs)
        for (Py_ssize_t d = 0; d < nd; d++)
            close(dirs[d]);
    free(fds);
    free(dirs);
    free(fdirs);
    free(names);
    free(errs);
    free(tmps);
    return res;
}
