/* The process-wide state of the file-tree kernels (sms_tree_cache, see fstree.h): the
 * table of entries known to have no xattrs, and what the kernel was found to support. */
#define _GNU_SOURCE
#include "fstree.h"

#include <stdlib.h>

#define NOX_FIRST_SLOTS ((size_t)1 << 16)
#define NOX_MAX_SLOTS ((size_t)1 << 21) /* 32 MiB: a million entries at half load */

static sms_tree_cache process_cache = SMS_TREE_CACHE_INIT;

sms_tree_cache *sms_tree_cache_process(void)
{
    return &process_cache;
}

void sms_tree_cache_init(sms_tree_cache *c)
{
    *c = (sms_tree_cache)SMS_TREE_CACHE_INIT;
    pthread_mutex_init(&c->lock, NULL);
}

void sms_tree_cache_destroy(sms_tree_cache *c)
{
    free(c->slots);
    c->slots = NULL;
    pthread_mutex_destroy(&c->lock);
}

void sms_tree_cache_clear(sms_tree_cache *c)
{
    pthread_mutex_lock(&c->lock);
    free(c->slots);
    c->slots = NULL;
    c->mask = c->used = 0;
    c->hits = 0;
    pthread_mutex_unlock(&c->lock);
}

void sms_tree_cache_set_min_age(sms_tree_cache *c, double min_age)
{
    pthread_mutex_lock(&c->lock);
    c->min_age = min_age;
    pthread_mutex_unlock(&c->lock);
}

void sms_tree_cache_stats(sms_tree_cache *c, uint64_t *entries, uint64_t *hits)
{
    pthread_mutex_lock(&c->lock);
    *entries = c->used;
    *hits = c->hits;
    pthread_mutex_unlock(&c->lock);
}

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

static sms_nox_slot *nox_find(sms_tree_cache *c, uint64_t key) /* the key's slot, or the empty one it would take */
{
    for (size_t i = (size_t)key & c->mask;; i = (i + 1) & c->mask)
        if (c->slots[i].key == key || !c->slots[i].key)
            return &c->slots[i];
}

/* One lock for a whole directory: its scan threads would otherwise meet on it at every entry. */
void sms_nox_lookup(sms_tree_cache *c, const struct stat *sts, const int *errs, size_t n, uint8_t *known)
{
    pthread_mutex_lock(&c->lock);
    if (c->slots) {
        for (size_t i = 0; i < n; i++) {
            if (errs[i])
                continue;
            sms_nox_slot *s = nox_find(c, nox_key(&sts[i]));
            known[i] = s->key && s->ctime_ns == ctime_ns(&sts[i]);
            c->hits += known[i];
        }
    }
    pthread_mutex_unlock(&c->lock);
}

/* Room for one more entry, growing the table while it may (lock held); 0 when full. */
static int nox_room(sms_tree_cache *c)
{
    if (c->slots && (c->used + 1) * 2 <= c->mask + 1)
        return 1;
    size_t slots = c->slots ? (c->mask + 1) * 2 : NOX_FIRST_SLOTS;
    sms_nox_slot *grown = slots <= NOX_MAX_SLOTS ? calloc(slots, sizeof *grown) : NULL;
    if (!grown) /* at its largest (or no memory): fill to three quarters, then keep what is known */
        return c->slots && (c->used + 1) * 4 <= (c->mask + 1) * 3;
    sms_nox_slot *old = c->slots;
    size_t old_slots = old ? c->mask + 1 : 0;
    c->slots = grown;
    c->mask = slots - 1;
    for (size_t i = 0; i < old_slots; i++)
        if (old[i].key)
            *nox_find(c, old[i].key) = old[i];
    free(old);
    return 1;
}

void sms_nox_remember(sms_tree_cache *c, const struct stat *sts, const size_t *idx, size_t n, double now)
{
    pthread_mutex_lock(&c->lock);
    for (size_t k = 0; k < n; k++) {
        const struct stat *st = &sts[idx[k]];
        if ((double)st->st_ctim.tv_sec + (double)st->st_ctim.tv_nsec / 1e9 > now - c->min_age)
            continue;
        if (!nox_room(c))
            break;
        uint64_t key = nox_key(st);
        sms_nox_slot *s = nox_find(c, key);
        c->used += !s->key;
        s->key = key;
        s->ctime_ns = ctime_ns(st);
    }
    pthread_mutex_unlock(&c->lock);
}
