/* Small regular files of one directory read into FILE operations, each checked for
 * having stayed as it was while it was read (fstree.h: sms_read_files). */
#define _GNU_SOURCE
#include "fstree.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

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

static int changed_since(const struct stat *st, int64_t settle_before_ns)
{
    return settle_before_ns > 0 && (int64_t)st->st_ctim.tv_sec * 1000000000LL + st->st_ctim.tv_nsec > settle_before_ns;
}

static int unsettled(int fd, int leased, const struct stat *after, int64_t settle_before_ns)
{
    if (leased)
        return fcntl(fd, F_GETLEASE) != F_RDLCK;
    return changed_since(after, settle_before_ns);
}

/* One small file as a FILE operation written at out->len (out->cap is fixed: the caller's
 * buffer). 0 if done; 1 if it did not fit (nothing written); -1 if the file is left to the
 * caller (not regular, too large, unreadable, changed while being read, or maybe: see
 * unsettled()). */
static int read_one(int dir_fd, const sms_rec *r, uint64_t max_size, sms_buf *out, int64_t settle_before_ns)
{
    size_t nlen;
    const uint8_t *leaf = sms_leaf_of(r, &nlen);
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
    /* A file unchanged since `settle_before_ns` is trusted without a lease, as it is where
     * none is to be had: a lease is granted only while nobody has the file open for writing,
     * so one could only ever vouch for a file that no write is under way on, and a write that
     * starts during the read changes the ctime that is checked after it. Three fcntl calls and
     * the lease's removal at close were a tenth of a sender's CPU time with small files. */
    int leased = changed_since(&before, settle_before_ns) && lease(fd);
    size_t size = (size_t)before.st_size;
    if (out->len + 1 + SMS_REC_HEAD + r->plen + r->xlen + size > out->cap) {
        rc = 1;
        goto out;
    }
    size_t mark = out->len;
    out->data[out->len++] = SMS_OP_FILE;
    sms_put_record(out, &before, NULL, 0, r->path, r->plen, NULL, 0, r->xattrs, r->xlen); /* fits: checked */
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
        sms_mtime_ns(&after) != sms_mtime_ns(&before) || after.st_ctim.tv_sec != before.st_ctim.tv_sec ||
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

size_t sms_read_files(int dir_fd, const sms_rec_list *recs, const size_t *idx, size_t n, uint64_t max_size,
                      sms_buf *out, int64_t settle_before_ns, uint8_t *failed, size_t *nfiles, uint64_t *nbytes)
{
    size_t taken = 0;
    for (; taken < n; taken++) {
        const sms_rec *r = &recs->r[idx[taken]];
        size_t before = out->len;
        int got = r->kind == KIND_FILE ? read_one(dir_fd, r, max_size, out, settle_before_ns) : -1;
        if (got == 1)
            break;
        if (got < 0) {
            failed[taken] = 1;
        } else {
            (*nfiles)++;
            *nbytes += out->len - before - 1 - SMS_REC_HEAD - r->plen - r->xlen;
        }
    }
    return taken;
}
