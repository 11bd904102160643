/* Small regular files of one directory read into FILE operations, each checked for
 * having stayed as it was while it was read (fstree.h: sms_read_files). */
#define _GNU_SOURCE
#include "fstree.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
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

static size_t read_serially(int dir_fd, const sms_rec_list *recs, const size_t *idx, size_t n, uint64_t max_size,
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

/* --- reading with threads -------------------------------------------------------- */
/* Opening, checking and reading a small file is a dozen system calls, nearly all of the
 * sender's time with small files: a directory's files are read by READ_THREADS threads,
 * each file into the place the scan's record of its size gives it (a file whose size
 * changed since is left to the caller's careful path), then the operations are closed up. */
#define READ_THREADS 4
#define PARALLEL_MIN 16 /* files in a call before threads are worth starting */
#define READ_CHUNK 4    /* files a thread takes at a time */

typedef struct {
    int dir_fd;
    const sms_rec_list *recs;
    const size_t *idx;
    uint64_t max_size;
    uint8_t *base;
    const size_t *off, *slot;
    int64_t settle_before_ns;
    uint8_t *failed;
    size_t n, next;
    pthread_mutex_t lock;
} read_job;

static void *read_worker(void *arg)
{
    read_job *jb = arg;
    for (;;) {
        pthread_mutex_lock(&jb->lock);
        size_t k = jb->next, end = k + READ_CHUNK < jb->n ? k + READ_CHUNK : jb->n;
        jb->next = end;
        pthread_mutex_unlock(&jb->lock);
        if (k >= jb->n)
            return NULL;
        for (; k < end; k++) {
            if (jb->failed[k])
                continue;
            sms_buf b = {jb->base + jb->off[k], 0, jb->slot[k]};
            if (read_one(jb->dir_fd, &jb->recs->r[jb->idx[k]], jb->max_size, &b, jb->settle_before_ns) != 0 ||
                b.len != jb->slot[k])
                jb->failed[k] = 1;
        }
    }
}

static int read_threads(void)
{
    static int n;
    if (!n) {
        long cpus = sysconf(_SC_NPROCESSORS_ONLN);
        n = cpus < 1 ? 1 : cpus > READ_THREADS ? READ_THREADS : (int)cpus;
    }
    return n;
}

size_t sms_read_files(int dir_fd, const sms_rec_list *recs, const size_t *idx, size_t n, uint64_t max_size,
                      sms_buf *out, int64_t settle_before_ns, uint8_t *failed, size_t *nfiles, uint64_t *nbytes)
{
    int nthreads = read_threads();
    size_t *off = n >= PARALLEL_MIN && nthreads > 1 ? malloc(2 * n * sizeof *off) : NULL;
    if (!off)
        return read_serially(dir_fd, recs, idx, n, max_size, out, settle_before_ns, failed, nfiles, nbytes);
    size_t *slot = off + n, pos = out->len, taken = 0;
    for (; taken < n; taken++) { /* each file's place, from its record */
        const sms_rec *r = &recs->r[idx[taken]];
        slot[taken] = 0;
        if (r->kind != KIND_FILE || r->size > max_size) {
            failed[taken] = 1;
            continue;
        }
        size_t need = 1 + SMS_REC_HEAD + r->plen + r->xlen + (size_t)r->size;
        if (need > out->cap - pos)
            break;
        off[taken] = pos;
        slot[taken] = need;
        pos += need;
    }
    read_job jb = {.dir_fd = dir_fd, .recs = recs, .idx = idx, .max_size = max_size, .base = out->data, .off = off,
                   .slot = slot, .settle_before_ns = settle_before_ns, .failed = failed, .n = taken, .next = 0};
    pthread_mutex_init(&jb.lock, NULL);
    pthread_t th[READ_THREADS];
    int started = 0;
    for (int t = 1; t < nthreads && (size_t)t * READ_CHUNK < taken; t++)
        if (pthread_create(&th[started], NULL, read_worker, &jb) == 0)
            started++;
    read_worker(&jb);
    for (int t = 0; t < started; t++)
        pthread_join(th[t], NULL);
    pthread_mutex_destroy(&jb.lock);
    size_t w = out->len; /* the operations closed up, in order */
    for (size_t k = 0; k < taken; k++) {
        if (failed[k])
            continue;
        if (off[k] != w)
            memmove(out->data + w, out->data + off[k], slot[k]);
        w += slot[k];
        (*nfiles)++;
        *nbytes += recs->r[idx[k]].size;
    }
    out->len = w;
    free(off);
    return taken;
}
