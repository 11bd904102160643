/* FILE operations written as anonymous files (O_TMPFILE) by threads, then given their
 * names once the caller made them durable (fstree.h: sms_plan_writes .. sms_link_files). */
#define _GNU_SOURCE
#include "fstree.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SPARSE_BLOCK 4096

int sms_plan_writes(const uint8_t *b, size_t len, size_t pos, size_t max_files, sms_wrun *run)
{
    size_t p = pos, cap = 0;
    const uint8_t *last_parent = NULL;
    size_t last_plen = 0;
    *run = (sms_wrun){0};
    while (p < len && b[p] == SMS_OP_FILE && run->n < max_files) {
        sms_rec r;
        if (sms_parse_rec(b + p + 1, len - p - 1, &r) < 0 || r.kind != KIND_FILE || r.mode > 07777 || r.xlen ||
            r.llen || r.has_digest || r.size > len - p - 1 - r.total || !sms_good_path(r.path, r.plen))
            break; /* the careful path says what is wrong with it */
        size_t nlen;
        const uint8_t *leaf = sms_leaf_of(&r, &nlen);
        size_t parent_len = leaf > r.path ? (size_t)(leaf - r.path) - 1 : 0;
        if (!last_parent || parent_len != last_plen || memcmp(last_parent, r.path, parent_len)) {
            run->ndirs++;
            last_parent = r.path;
            last_plen = parent_len;
        }
        if (sms_grow((void **)&run->files, &cap, run->n, sizeof *run->files) < 0)
            return ENOMEM;
        run->files[run->n++] = (sms_wfile){
            .name = leaf, .nlen = nlen, .path = r.path, .plen = r.plen, .data = b + p + 1 + r.total,
            .size = r.size, .mode = r.mode, .uid = r.uid, .gid = r.gid, .mtime_ns = r.mtime_ns,
            .dir = run->ndirs - 1, .fd = -1, .named = 0, .err = 0, .step = NULL};
        run->bytes += r.size;
        p += 1 + r.total + (size_t)r.size;
    }
    run->end = p;
    run->dir_fds = malloc((run->ndirs ? run->ndirs : 1) * sizeof *run->dir_fds);
    run->dir_named = calloc(run->ndirs ? run->ndirs : 1, 1);
    if (!run->dir_fds || !run->dir_named)
        return ENOMEM;
    for (size_t d = 0; d < run->ndirs; d++)
        run->dir_fds[d] = -1;
    return 0;
}

const uint8_t *sms_wfile_parent(const sms_wfile *f, size_t *len)
{
    *len = f->name > f->path ? (size_t)(f->name - f->path) - 1 : 0;
    return f->path;
}

void sms_drop_run(sms_wrun *run)
{
    for (size_t i = 0; i < run->n; i++) {
        sms_wfile *f = &run->files[i];
        if (f->fd >= 0)
            close(f->fd); /* anonymous: closing drops the file */
        if (f->named && run->dir_fds && run->dir_fds[f->dir] >= 0) {
            char name[NAME_MAX_BYTES + 1];
            snprintf(name, sizeof name, "%.*s", (int)f->nlen, (const char *)f->name);
            unlinkat(run->dir_fds[f->dir], name, 0);
        }
    }
    for (size_t d = 0; d < run->ndirs; d++)
        if (run->dir_fds && run->dir_fds[d] >= 0)
            close(run->dir_fds[d]);
    free(run->files);
    free(run->dir_fds);
    free(run->dir_named);
    *run = (sms_wrun){0};
}

/* --- writing --------------------------------------------------------------------- */
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

static void write_one(const sms_wrun *run, int owner, sms_wfile *f)
{
    int dfd = run->dir_fds[f->dir];
    f->step = "create";
    /* Anonymous until linked (or in a directory nobody sees yet), so made with its
     * permission bits at once; the set-id bits, which a chown would clear, are set after it.
     * chown and chmod mark the inode dirty in the journal (2-3 us a file here): each is made
     * only where the new file differs. A file created under its name costs no orphan-list
     * entry and no link (0.3 of the 1.5 system CPU s of 50,000 small files here). */
    if (run->dir_named[f->dir]) {
        char name[NAME_MAX_BYTES + 1];
        snprintf(name, sizeof name, "%.*s", (int)f->nlen, (const char *)f->name);
        f->fd = openat(dfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, f->mode & 0777);
        if (f->fd >= 0)
            f->named = 1;
        else if (errno != EEXIST) {
            f->err = errno;
            return;
        }
    }
    if (f->fd < 0)
        f->fd = openat(dfd, ".", O_WRONLY | O_TMPFILE | O_CLOEXEC, f->mode & 0777);
    if (f->fd < 0) {
        f->err = errno;
        return;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0) {
        f->err = errno;
        f->step = "stat";
        return;
    }
    struct timespec ts[2];
    ts[0].tv_sec = ts[1].tv_sec = (time_t)(f->mtime_ns >= 0 ? f->mtime_ns / 1000000000LL
                                                             : -((-f->mtime_ns + 999999999LL) / 1000000000LL));
    ts[0].tv_nsec = ts[1].tv_nsec = (long)(f->mtime_ns - (int64_t)ts[0].tv_sec * 1000000000LL);
    if ((f->err = write_sparse(f->fd, f->data, f->size))) {
        f->step = "write";
    } else if (owner && (st.st_uid != f->uid || st.st_gid != f->gid) && fchown(f->fd, f->uid, f->gid) < 0) {
        f->err = errno;
        f->step = "chown";
    } else if ((st.st_mode & 07777) != f->mode && fchmod(f->fd, f->mode) < 0) { /* after chown */
        f->err = errno;
        f->step = "chmod";
    } else if (futimens(f->fd, ts) < 0) {
        f->err = errno;
        f->step = "utime";
    } else if (f->named) {
        close(f->fd); /* its name is what keeps it */
        f->fd = -1;
    }
}

typedef struct {
    sms_wrun *run;
    int owner;
    size_t next; /* next file to take (under lock) */
    pthread_mutex_t lock;
} job;

static void *write_worker(void *arg)
{
    job *jb = arg;
    sms_wrun *run = jb->run;
    for (;;) {
        pthread_mutex_lock(&jb->lock);
        size_t i = jb->next;
        if (i < run->n)
            jb->next = i + 8 < run->n ? i + 8 : run->n;
        pthread_mutex_unlock(&jb->lock);
        if (i >= run->n)
            return NULL;
        size_t end = i + 8 < run->n ? i + 8 : run->n;
        for (; i < end; i++)
            write_one(run, jb->owner, &run->files[i]);
    }
}

/* A path written twice by one run in a directory whose files are created under their names:
 * the later file must win, as linking in order makes it win elsewhere. A file that found its
 * name taken waits anonymous, to be linked over what is there; where a later file of the run
 * took that name (its thread got there first), the earlier one is dropped instead. */
static void drop_overtaken(sms_wrun *run)
{
    for (size_t i = 0; i < run->n; i++) {
        sms_wfile *f = &run->files[i];
        if (f->err || f->named || f->fd < 0 || !run->dir_named[f->dir])
            continue;
        for (size_t j = i + 1; j < run->n; j++) {
            const sms_wfile *g = &run->files[j];
            if (g->named && g->plen == f->plen && memcmp(g->path, f->path, f->plen) == 0) {
                close(f->fd); /* anonymous: closing drops it */
                f->fd = -1;
                break;
            }
        }
    }
}

void sms_write_run(sms_wrun *run, int owner, int nthreads)
{
    job jb = {.run = run, .owner = owner, .next = 0};
    pthread_mutex_init(&jb.lock, NULL);
    pthread_t th[16];
    int started = 0;
    for (int t = 1; t < nthreads && t < 16 && (size_t)t * 8 < run->n; t++)
        if (pthread_create(&th[started], NULL, write_worker, &jb) == 0)
            started++;
    write_worker(&jb);
    for (int t = 0; t < started; t++)
        pthread_join(th[t], NULL);
    pthread_mutex_destroy(&jb.lock);
    drop_overtaken(run);
}

/* --- naming --------------------------------------------------------------------- */
static int link_fd(sms_tree_cache *cache, int fd, int dfd, const char *name)
{
    if (cache->link_mode != 2) {
        if (linkat(fd, "", dfd, name, AT_EMPTY_PATH) == 0) {
            cache->link_mode = 1;
            return 0;
        }
        if (cache->link_mode == 1 || (errno != ENOENT && errno != EPERM))
            return -1;
        cache->link_mode = 2; /* needs CAP_DAC_READ_SEARCH: go through /proc */
    }
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    return linkat(AT_FDCWD, proc, dfd, name, AT_SYMLINK_FOLLOW);
}

void sms_link_files(sms_tree_cache *cache, const int *fds, const int *dirs, const size_t *fdirs, char *const *names,
                    size_t n, unsigned int tag, int *errs, char (*tmps)[NAME_MAX_BYTES + 1])
{
    for (size_t i = 0; i < n; i++) {
        int dfd = dirs[fdirs[i]];
        if (fds[i] < 0)
            continue; /* created under its name */
        if (link_fd(cache, fds[i], dfd, names[i]) == 0)
            continue;
        if (errno != EEXIST) {
            errs[i] = errno;
            continue;
        }
        snprintf(tmps[i], sizeof tmps[i], ".smsrepl~%08x%08x~%.*s", tag, cache->temp_counter++, NAME_MAX_BYTES - 27,
                 names[i]);
        if (link_fd(cache, fds[i], dfd, tmps[i]) < 0) {
            errs[i] = errno;
            tmps[i][0] = 0;
        } else if (renameat(dfd, tmps[i], dfd, names[i]) < 0) {
            errs[i] = errno; /* the file waits under its temporary name */
        } else {
            tmps[i][0] = 0;
        }
    }
}
