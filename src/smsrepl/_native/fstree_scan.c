/* One directory's entries as wire records, sorted by name: lstat of each, readlink of
 * symlinks and, where asked, the xattrs (fstree.h: sms_scan_dir). */
#define _GNU_SOURCE
#include "fstree.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static int cmp_dname(const void *a, const void *b)
{
    return strcmp(((const sms_dname *)a)->name, ((const sms_dname *)b)->name);
}

static int cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

#ifndef SYS_listxattrat
#define SYS_listxattrat 465 /* Linux 6.13 (x86_64 and the generic table alike) */
#endif

/* Whether entry `name` of dir_fd may have xattrs: listxattrat() answers without resolving
 * a path (half the cost of llistxattr by path, where most entries have none). */
static int may_have_xattrs(sms_tree_cache *cache, int dir_fd, const char *name)
{
    if (!cache->have_listxattrat)
        return 1;
    long n = syscall(SYS_listxattrat, dir_fd, name, AT_SYMLINK_NOFOLLOW, NULL, (size_t)0);
    if (n == 0)
        return 0;
    if (n < 0 && (errno == ENOSYS || errno == EINVAL || errno == EPERM))
        cache->have_listxattrat = 0; /* an older kernel, or a filter that refuses it */
    return 1;
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

void sms_scan_free(sms_scan_out *o)
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

int sms_scan_dir(int dir_fd, const uint8_t *prefix, size_t prelen, const char *dpath, size_t dlen,
                 sms_tree_cache *cache, sms_scan_out *o)
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
        if (sms_grow((void **)&o->names, &cap, o->count, sizeof *o->names) < 0) {
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
    if (dpath && cache)
        sms_nox_lookup(cache, sts, o->errs, o->count, known);
    for (size_t i = 0; i < o->count; i++) {
        const sms_dname *dn = &o->names[i];
        const struct stat *st = &sts[i];
        if (o->errs[i])
            continue;
        if (!sms_kind_of(st->st_mode)) {
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
            if (!cache || may_have_xattrs(cache, dir_fd, dn->name)) {
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
        if ((err = sms_put_record(&o->blob, st, prefix, prelen, (const uint8_t *)dn->name, dn->len, linkbuf,
                              llen, xb.data, xb.len)))
            goto done;
        if (S_ISREG(st->st_mode))
            o->file_bytes += (uint64_t)st->st_size;
        o->kinds[o->nrec] = (uint8_t)sms_kind_of(st->st_mode);
        o->ends[o->nrec] = o->blob.len;
        o->nameidx[o->nrec] = i;
        o->nrec++;
    }
    if (nbare && cache)
        sms_nox_remember(cache, sts, bare, nbare, now);
done:
    free(xpath);
    free(linkbuf);
    free(sts);
    free(known);
    free(bare);
    sms_buf_free(&xb);
    return err;
}
