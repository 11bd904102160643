/* The entry record of smsrepl/files/wire.py in C: parse one or all of a body, write one
 * from a stat, kinds and paths; and the growable buffers the kernels build them in. */
#define _GNU_SOURCE
#include "fstree.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

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

int sms_grow(void **p, size_t *cap, size_t n, size_t elem)
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

int sms_parse_all(const uint8_t *p, size_t len, sms_rec_list *out)
{
    size_t cap = 0, pos = 0;
    out->r = NULL;
    out->n = 0;
    while (pos < len) {
        if (sms_grow((void **)&out->r, &cap, out->n, sizeof *out->r) < 0)
            return -2;
        if (sms_parse_rec(p + pos, len - pos, &out->r[out->n]) < 0)
            return -1;
        pos += out->r[out->n].total;
        out->n++;
    }
    return 0;
}

int sms_kind_of(mode_t m)
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

/* Nanoseconds since the epoch in an int64 reach 1677-09-21 to 2262-04-11; ext4 keeps times to
 * 2446. Beyond, the time is clamped to the end it passed (files/scan.py: mtime_ns does the
 * same), on the source and on the target alike: a copy made so lists the same time and the
 * next round leaves it alone (the wrapped product made 2300 into 1901, and resent it each round). */
int64_t sms_mtime_ns(const struct stat *st)
{
    int64_t v;
    if (__builtin_mul_overflow((int64_t)st->st_mtim.tv_sec, (int64_t)1000000000, &v) ||
        __builtin_add_overflow(v, (int64_t)st->st_mtim.tv_nsec, &v))
        return st->st_mtim.tv_sec < 0 ? INT64_MIN : INT64_MAX;
    return v;
}

int sms_put_record(sms_buf *b, const struct stat *st, const uint8_t *prefix, size_t prelen, const uint8_t *name,
                   size_t nlen, const uint8_t *link, size_t llen, const uint8_t *xb, size_t xlen)
{
    size_t plen = prelen ? prelen + 1 + nlen : nlen;
    if (sms_buf_reserve(b, SMS_REC_HEAD + plen + llen + xlen) < 0)
        return ENOMEM;
    uint8_t *p = b->data + b->len;
    *p++ = (uint8_t)sms_kind_of(st->st_mode);
    p = put32(p, st->st_mode & 07777);
    p = put32(p, st->st_uid);
    p = put32(p, st->st_gid);
    p = put64(p, (uint64_t)st->st_size);
    p = put64(p, (uint64_t)sms_mtime_ns(st));
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

const uint8_t *sms_leaf_of(const sms_rec *r, size_t *len)
{
    const uint8_t *p = r->path + r->plen;
    while (p > r->path && p[-1] != '/')
        p--;
    *len = (size_t)(r->path + r->plen - p);
    return p;
}

int sms_good_component(const uint8_t *p, size_t n)
{
    return n > 0 && n <= NAME_MAX_BYTES && !(n == 1 && p[0] == '.') && !(n == 2 && p[0] == '.' && p[1] == '.');
}

int sms_good_path(const uint8_t *p, size_t n)
{
    if (n == 0 || memchr(p, 0, n))
        return 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i == n || p[i] == '/') {
            if (!sms_good_component(p + start, i - start))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}
