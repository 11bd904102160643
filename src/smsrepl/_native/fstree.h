/* File-tree kernels: directory scans, listing comparison, and reading and writing runs of
 * small files, in plain C (no Python.h; fstree_binding.c makes them the _core functions).
 * Records and operations use the layouts of smsrepl/files/wire.py.
 *
 *   fstree_record.c  the entry record: parse, write, kinds, paths; growable buffers
 *   fstree_cache.c   the process-wide state the kernels share (sms_tree_cache)
 *   fstree_scan.c    one directory's entries (lstat, readlink, xattrs) as records
 *   fstree_diff.c    which source records differ from the target's; records by parent
 *   fstree_read.c    small regular files of one directory read into FILE operations
 *   fstree_write.c   FILE operations written as anonymous files by threads, then named */
#ifndef SMSREPL_FSTREE_H
#define SMSREPL_FSTREE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

/* --- records (fstree_record.c) ---------------------------------------------- */
/* header of an entry record: kind .. has_digest */
#define SMS_REC_HEAD 50
#define SMS_OP_FILE 3
#define KIND_FILE 1
#define KIND_DIR 2
#define KIND_SYMLINK 3
#define NAME_MAX_BYTES 255

typedef struct {
    uint8_t kind;
    uint32_t mode, uid, gid, nlink;
    uint64_t size, rdev;
    int64_t mtime_ns;
    const uint8_t *path, *link, *xattrs;
    uint32_t plen, llen, xlen;
    int has_digest;
    size_t total; /* bytes of the whole record */
} sms_rec;

/* Parse one record at p (avail bytes); 0, or -1 if it runs past the end or is malformed. */
int sms_parse_rec(const uint8_t *p, size_t avail, sms_rec *r);

/* All records of a body. */
typedef struct {
    sms_rec *r;
    size_t n;
} sms_rec_list;

/* 0; -1 if a record is malformed or runs past the end; -2 out of memory. out->r is the
 * caller's to free() either way. */
int sms_parse_all(const uint8_t *p, size_t len, sms_rec_list *out);

/* A growable byte buffer. */
typedef struct {
    uint8_t *data;
    size_t len, cap;
} sms_buf;

int sms_buf_reserve(sms_buf *b, size_t extra);
void sms_buf_free(sms_buf *b);
/* Room in array *p (capacity *cap elements of elem bytes) for element n: doubled when full. */
int sms_grow(void **p, size_t *cap, size_t n, size_t elem);

/* wire.py's kind code of a file type; 0 for one Linux does not otherwise have. */
int sms_kind_of(mode_t m);
int64_t sms_mtime_ns(const struct stat *st);
/* Append a record: header from st, then path (prefix/name, or name without a prefix), link
 * and xattr block. 0 or ENOMEM. */
int sms_put_record(sms_buf *b, const struct stat *st, const uint8_t *prefix, size_t prelen, const uint8_t *name,
                   size_t nlen, const uint8_t *link, size_t llen, const uint8_t *xb, size_t xlen);
/* The last component of a record's path (*len bytes). */
const uint8_t *sms_leaf_of(const sms_rec *r, size_t *len);
/* A component is a name a target may hold: not empty, '.', '..', nor over-long. */
int sms_good_component(const uint8_t *p, size_t n);
/* A relative path of good components, without NUL. */
int sms_good_path(const uint8_t *p, size_t n);

/* Big-endian fields, as wire.py packs them. */
static inline uint16_t be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static inline uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }
static inline uint8_t *put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
    return p + 2;
}
static inline uint8_t *put32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
    return p + 4;
}
static inline uint8_t *put64(uint8_t *p, uint64_t v)
{
    put32(p, (uint32_t)(v >> 32));
    return put32(p + 4, (uint32_t)v);
}

/* --- process-wide state (fstree_cache.c) ------------------------------------ */
/* What one call of the kernels learns that later ones use, kept for the life of the
 * process (a continuous sync's sender and a long-running receiver scan and write the same
 * trees round after round). The kernels take it as an argument; fstree_binding.c hands
 * them the one instance, sms_tree_cache_process().
 *
 * The no-xattrs table: entries known to have no xattrs, keyed by a hash of (device,
 * inode), the value the entry's ctime. Setting or removing an xattr (or an ACL) changes
 * the ctime, so an entry whose ctime is what it was when it was found bare is still bare,
 * and its listxattrat() is skipped (about a fifth of a scan). Only entries whose ctime was
 * at least min_age seconds old when found are kept: ctime comes from a clock that ticks
 * every few milliseconds, and a change later in the same tick would keep it. A hash
 * collision misleads only where the two inodes' ctimes are equal to the nanosecond.
 * Under `lock`.
 *
 * The probes: what the running kernel was found to support (no lock: each is a single int
 * that only ever moves from "untried" to its answer, and a thread that reads a stale value
 * just tries again). sms_tree_cache_clear() leaves them. */
typedef struct {
    uint64_t key, ctime_ns;
} sms_nox_slot;

typedef struct {
    pthread_mutex_t lock;
    sms_nox_slot *slots; /* NULL until the first entry is kept */
    size_t mask, used;
    uint64_t hits;  /* lookups the table answered */
    double min_age; /* seconds */
    int have_listxattrat; /* 1 until the kernel refuses it */
    int link_mode;        /* 0: untried, 1: linkat(AT_EMPTY_PATH) works, 2: through /proc/self/fd */
    unsigned int temp_counter; /* link_files' temporary names: one number each */
} sms_tree_cache;

#define SMS_TREE_CACHE_INIT {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0, 0, 2.0, 1, 0, 0}

/* The process's instance (statically initialised: no call needed before first use). */
sms_tree_cache *sms_tree_cache_process(void);
/* Initialise another instance; free it with sms_tree_cache_destroy(). */
void sms_tree_cache_init(sms_tree_cache *c);
void sms_tree_cache_destroy(sms_tree_cache *c);
/* Empty the no-xattrs table and its hit count. */
void sms_tree_cache_clear(sms_tree_cache *c);
/* The age (seconds) an entry's ctime needs for the table to keep it. */
void sms_tree_cache_set_min_age(sms_tree_cache *c, double min_age);
/* The table's entries and the lookups it answered. */
void sms_tree_cache_stats(sms_tree_cache *c, uint64_t *entries, uint64_t *hits);
/* known[i] = 1 for each entry i of sts (of n, errs[i] == 0) known to have no xattrs at its
 * present ctime. */
void sms_nox_lookup(sms_tree_cache *c, const struct stat *sts, const int *errs, size_t n, uint8_t *known);
/* Remember entries idx[0..n) of sts, found without xattrs, whose ctime was at least
 * min_age old at `now` (when the scan began, seconds). */
void sms_nox_remember(sms_tree_cache *c, const struct stat *sts, const size_t *idx, size_t n, double now);

/* --- scan (fstree_scan.c) ------------------------------------------------------ */
typedef struct {
    char *name;
    size_t len;
} sms_dname;

typedef struct {
    sms_buf blob;        /* the records */
    uint64_t file_bytes; /* sizes of the regular files */
    sms_dname *names;    /* sorted; entries that failed have their errno in errs */
    size_t count;
    uint8_t *kinds;  /* per record */
    size_t *ends;    /* per record: end offset in blob */
    size_t *nameidx; /* per record: index into names */
    size_t nrec;
    int *errs; /* per name: 0 or errno */
} sms_scan_out;

/* Records of every entry of dir_fd, sorted by name, paths prefix/name. With dpath (the
 * directory's path, dlen bytes) records carry the entries' xattrs, and `cache` (may be
 * NULL) skips the probes of entries known to have none. 0 or the errno that stopped the
 * scan; free *o with sms_scan_free() either way. */
int sms_scan_dir(int dir_fd, const uint8_t *prefix, size_t prelen, const char *dpath, size_t dlen,
                 sms_tree_cache *cache, sms_scan_out *o);
void sms_scan_free(sms_scan_out *o);

/* --- comparison and grouping (fstree_diff.c) ---------------------------------- */
#define SMS_DIFF_NOMEM (-2)
#define SMS_DIFF_MALFORMED (-1)
#define SMS_DIFF_UNSORTED (-3)

/* Both bodies sorted by path. actions: a byte per source record (*ns of them): 2 where the
 * target has no entry at its path, else 0 alike, 3 metadata only, 4 data, 1 anything else;
 * gone: indices of target records the source does not have (*ngone). 0, or one of
 * SMS_DIFF_*; the arrays are the caller's to free() either way. */
int sms_diff_records(const uint8_t *src, size_t slen, const uint8_t *tgt, size_t tlen, uint8_t **actions,
                     size_t *ns, size_t **gone, size_t *ngone);

/* A run of consecutive records sharing a parent directory: the parent is the path's
 * first parent_len bytes of the record at `start` (root: the root's own record, path
 * empty). */
typedef struct {
    size_t start, end;
    const uint8_t *parent;
    size_t parent_len;
    int root;
} sms_group;

/* The groups of a listing body; 0, or SMS_DIFF_MALFORMED / SMS_DIFF_NOMEM. *groups is the
 * caller's to free() either way. */
int sms_group_records(const uint8_t *body, size_t len, sms_group **groups, size_t *n);

/* --- reading (fstree_read.c) ---------------------------------------------------- */
/* FILE operations for the regular files recs->r[idx[k]], read relative to dir_fd into out
 * from out->len (out->cap is fixed: the caller's buffer), until the next one does not fit.
 * Returns how many indices were dealt with; failed[k] = 1 for those left to the caller's
 * careful path (changed while read, vanished, not regular, larger than max_size, changed
 * after settle_before_ns without a lease). */
size_t sms_read_files(int dir_fd, const sms_rec_list *recs, const size_t *idx, size_t n, uint64_t max_size,
                      sms_buf *out, int64_t settle_before_ns, uint8_t *failed, size_t *nfiles, uint64_t *nbytes);

/* --- writing and naming (fstree_write.c) ------------------------------------------ */
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
    int fd;     /* an anonymous file's, until it is linked; -1 for one created under its name */
    int named;  /* created under its final name (in a directory not yet under its own) */
    int err;
    const char *step;
} sms_wfile;

typedef struct {
    sms_wfile *files;
    size_t n;
    int *dir_fds; /* one per run of files in one directory: files[i].dir indexes it */
    unsigned char *dir_named; /* per directory: its files are created under their names */
    size_t ndirs;
    uint64_t bytes; /* of the files' data */
    size_t end;     /* where the first operation not taken starts */
} sms_wrun;

/* The run of FILE operations of body starting at pos (up to max_files, and only plain ones:
 * a regular file without xattrs, a well-formed path), each file's dir the number of the
 * run of consecutive files with one parent before it. dir_fds is left to the caller (one
 * per dir). 0 or ENOMEM. */
int sms_plan_writes(const uint8_t *body, size_t len, size_t pos, size_t max_files, sms_wrun *run);
/* The parent path of a planned file: its path's first *len bytes. */
const uint8_t *sms_wfile_parent(const sms_wfile *f, size_t *len);
/* Write the run as anonymous files (O_TMPFILE) in their directories, nthreads (1..16) at a
 * time: data (all-zero 4 KiB blocks as holes), owner (with `owner`), mode and times. In a
 * directory marked dir_named (one that has no name of its own yet: nothing in it can be
 * seen before the caller makes it durable and names it), a file is created under its own
 * name and closed (fd -1, named 1); an anonymous one where that name is taken (dropped,
 * fd -1, where a later file of the run took it: the later one wins). A file's err/step say
 * what failed. */
void sms_write_run(sms_wrun *run, int owner, int nthreads);
/* Close the run's files (anonymous: dropped; named: unlinked) and directories, and free it. */
void sms_drop_run(sms_wrun *run);

/* Give each anonymous file fds[i] the name names[i] in directory dirs[fdirs[i]],
 * atomically replacing what is there (through a temporary name
 * `.smsrepl~<tag><counter>~name`), errs[i] the errno where it failed, tmps[i] the
 * temporary name it waits under (empty where none); fds[i] -1: named already, skipped.
 * Closes nothing. */
void sms_link_files(sms_tree_cache *cache, const int *fds, const int *dirs, const size_t *fdirs, char *const *names,
                    size_t n, unsigned int tag, int *errs, char (*tmps)[NAME_MAX_BYTES + 1]);

#endif
