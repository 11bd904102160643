/* Listings compared and grouped: which source records differ from the target's (both
 * sorted by path), and the runs of records that share a parent directory. */
#define _GNU_SOURCE
#include "fstree.h"

#include <stdlib.h>
#include <string.h>

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

static int compare(const sms_rec_list *s, const sms_rec_list *t, uint8_t *a, size_t **gone, size_t *ngone)
{
    size_t cap = 0;
    for (size_t k = 1; k < s->n || k < t->n; k++) {
        if ((k < s->n && cmp_path(&s->r[k - 1], &s->r[k]) >= 0) ||
            (k < t->n && cmp_path(&t->r[k - 1], &t->r[k]) >= 0))
            return SMS_DIFF_UNSORTED;
    }
    size_t i = 0, j = 0;
    while (i < s->n || j < t->n) {
        int c = i >= s->n ? 1 : j >= t->n ? -1 : cmp_path(&s->r[i], &t->r[j]);
        if (c < 0) {
            a[i++] = 2;
        } else if (c == 0) {
            a[i] = (uint8_t)verdict(&s->r[i], &t->r[j]);
            i++;
            j++;
        } else {
            if (sms_grow((void **)gone, &cap, *ngone, sizeof **gone) < 0)
                return SMS_DIFF_NOMEM;
            (*gone)[(*ngone)++] = j++;
        }
    }
    return 0;
}

int sms_diff_records(const uint8_t *src, size_t slen, const uint8_t *tgt, size_t tlen, uint8_t **actions,
                     size_t *ns, size_t **gone, size_t *ngone)
{
    sms_rec_list s = {0}, t = {0};
    *actions = NULL;
    *gone = NULL;
    *ns = *ngone = 0;
    int rc = sms_parse_all(src, slen, &s);
    if (rc == 0)
        rc = sms_parse_all(tgt, tlen, &t);
    if (rc == 0) {
        *actions = malloc(s.n ? s.n : 1);
        rc = *actions ? compare(&s, &t, *actions, gone, ngone) : SMS_DIFF_NOMEM;
        *ns = s.n;
    }
    free(s.r);
    free(t.r);
    return rc;
}

int sms_group_records(const uint8_t *b, size_t len, sms_group **groups, size_t *n)
{
    size_t pos = 0, cap = 0;
    sms_group cur = {0};
    int have = 0;
    *groups = NULL;
    *n = 0;
    while (pos <= len) {
        sms_rec r;
        int end = pos == len;
        if (!end && sms_parse_rec(b + pos, len - pos, &r) < 0)
            return SMS_DIFF_MALFORMED;
        size_t nlen = 0;
        const uint8_t *leaf = end ? NULL : sms_leaf_of(&r, &nlen);
        size_t pl = end ? 0 : leaf > r.path ? (size_t)(leaf - r.path) - 1 : 0;
        int is_root = !end && r.plen == 0;
        if (have && (end || is_root || cur.root || pl != cur.parent_len || memcmp(cur.parent, r.path, pl))) {
            if (sms_grow((void **)groups, &cap, *n, sizeof **groups) < 0)
                return SMS_DIFF_NOMEM;
            cur.end = pos;
            (*groups)[(*n)++] = cur;
            have = 0;
        }
        if (end)
            break;
        if (!have) {
            have = 1;
            cur = (sms_group){.start = pos, .parent = r.path, .parent_len = pl, .root = is_root};
        }
        pos += r.total;
    }
    return 0;
}
