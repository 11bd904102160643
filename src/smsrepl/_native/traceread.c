/* Changed-block tracking from the kernel's block tracepoints: see traceread.h. */
#define _GNU_SOURCE
#include "traceread.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline uint16_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Set the bits of the source's 4 KiB blocks that sectors [sector, sector + nr) of the disk touch. */
static void mark(const struct sms_trace_disk *d, uint64_t sector, uint32_t nr)
{
    uint64_t lo = d->first_sector, hi = d->first_sector + d->nsectors;
    uint64_t end = sector + nr;
    if (!nr || end <= lo || sector >= hi)
        return;
    if (sector < lo)
        sector = lo;
    if (end > hi)
        end = hi;
    uint64_t b0 = (sector - lo) / 8, b1 = (end - lo - 1) / 8 + 1;
    if (b1 > d->nblocks)
        b1 = d->nblocks;
    while (b0 < b1) {
        uint64_t w = b0 / 64, bit = b0 % 64;
        uint64_t n = 64 - bit;
        if (n > b1 - b0)
            n = b1 - b0;
        uint64_t bits = (n == 64 ? ~UINT64_C(0) : ((UINT64_C(1) << n) - 1)) << bit;
        if ((__atomic_load_n(&d->bitmap[w], __ATOMIC_RELAXED) & bits) != bits)
            __atomic_fetch_or(&d->bitmap[w], bits, __ATOMIC_RELEASE);
        b0 += n;
    }
}

static void on_event(const uint8_t *data, uint32_t dlen, const struct sms_trace_layout *lay,
                     const struct sms_trace_disk *disk, struct sms_trace_counts *c)
{
    if (dlen < 2)
        return;
    uint32_t type = rd16(data);
    if (lay->id_marker && type == lay->id_marker) {
        if (dlen >= lay->marker_off + 12 && rd32(data + lay->marker_off) == lay->marker_magic) {
            uint64_t seq = rd64(data + lay->marker_off + 4);
            c->marks++;
            if (seq > c->last_marker)
                c->last_marker = seq;
        }
        return;
    }
    uint32_t o_dev, o_sec, o_nr, o_rwbs;
    if (lay->id_rq && type == lay->id_rq) {
        o_dev = lay->rq_dev, o_sec = lay->rq_sector, o_nr = lay->rq_nr, o_rwbs = lay->rq_rwbs;
    } else if (lay->id_bio && type == lay->id_bio) {
        o_dev = lay->bio_dev, o_sec = lay->bio_sector, o_nr = lay->bio_nr, o_rwbs = lay->bio_rwbs;
    } else {
        c->foreign++;
        return;
    }
    uint32_t need = o_dev + 4;
    if (o_sec + 8 > need)
        need = o_sec + 8;
    if (o_nr + 4 > need)
        need = o_nr + 4;
    if (o_rwbs + 1 > need)
        need = o_rwbs + 1;
    if (dlen < need || rd32(data + o_dev) != disk->dev) {
        c->foreign++;
        return;
    }
    c->events++;
    if (data[o_rwbs] == 'R') /* reads (the kernel's filter normally keeps them out) */
        return;
    mark(disk, rd64(data + o_sec), rd32(data + o_nr));
}

int sms_trace_parse_page(const uint8_t *page, size_t len, const struct sms_trace_layout *lay,
                         const struct sms_trace_disk *disk, struct sms_trace_counts *c)
{
    if (len < lay->data_off || lay->commit_off + lay->commit_size > len ||
        (lay->commit_size != 8 && lay->commit_size != 4))
        return -1;
    uint64_t commit = lay->commit_size == 8 ? rd64(page + lay->commit_off) : rd32(page + lay->commit_off);
    c->pages++;
    if (commit & SMS_TRACE_MISSED_EVENTS)
        c->missed_pages++;
    size_t size = (size_t)(commit & SMS_TRACE_COMMIT_MASK);
    const uint8_t *p = page + lay->data_off;
    if (size > len - lay->data_off)
        return -1;
    size_t pos = 0;
    while (pos + 4 <= size) {
        uint32_t head = rd32(p + pos), tl = head & 31, delta = head >> 5;
        size_t next;
        if (tl == 29) { /* padding: with no time delta, the rest of the page */
            if (delta == 0)
                break;
            if (pos + 8 > size)
                return -1;
            next = pos + 4 + rd32(p + pos + 4);
        } else if (tl >= 30) { /* time extend, absolute time stamp */
            next = pos + 8;
        } else if (tl == 0) {
            if (pos + 8 > size)
                return -1;
            uint32_t l = rd32(p + pos + 4);
            if (l < 4)
                return -1;
            next = pos + 4 + (size_t)l;
            if (next > size)
                return -1;
            on_event(p + pos + 8, l - 4, lay, disk, c);
        } else {
            next = pos + 4 + 4 * (size_t)tl;
            if (next > size)
                return -1;
            on_event(p + pos + 4, 4 * tl, lay, disk, c);
        }
        if (next <= pos)
            return -1;
        pos = next;
    }
    return 0;
}

static int fail(struct sms_trace_reader *r, int err)
{
    __atomic_store_n(&r->error, err, __ATOMIC_RELEASE);
    return -err;
}

int sms_trace_run(struct sms_trace_reader *r, uint8_t *page)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(r->cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) < 0)
        return fail(r, errno);
    if (sched_getcpu() != r->cpu)
        return fail(r, EXDEV);
    struct timespec idle = {r->idle_us / 1000000, (long)(r->idle_us % 1000000) * 1000};
    int idle_ms = (int)(r->idle_us / 1000) ? (int)(r->idle_us / 1000) : 1;
    for (;;) {
        if (__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE))
            return 0;
        uint64_t want = __atomic_load_n(&r->want, __ATOMIC_ACQUIRE);
        if (want > r->written) {
            uint8_t msg[12];
            memcpy(msg, &r->lay.marker_magic, 4);
            memcpy(msg + 4, &want, 8);
            ssize_t w = write(r->marker_fd, msg, sizeof msg);
            if (w == (ssize_t)sizeof msg)
                __atomic_store_n(&r->written, want, __ATOMIC_RELEASE);
            else if (w < 0 && errno != EBADF && errno != EINTR)
                return fail(r, errno);
            else /* EBADF: the buffer is full (or tracing is off); drain it and try again */
                __atomic_fetch_add(&r->marker_failures, 1, __ATOMIC_RELAXED);
        }
        ssize_t n = read(r->pipe_fd, page, r->page_size);
        if (n > 0) {
            uint64_t before = r->counts.last_marker;
            sms_trace_parse_page(page, (size_t)n, &r->lay, &r->disk, &r->counts);
            if (r->counts.last_marker != before && r->counts.last_marker <= r->written) {
                /* every event recorded on this CPU before the marker is marked now */
                __atomic_store_n(&r->seen_missed, r->counts.missed_pages, __ATOMIC_RELAXED);
                __atomic_store_n(&r->seen, r->counts.last_marker, __ATOMIC_RELEASE);
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || errno == EAGAIN) {
            if (r->wake_fd < 0) {
                nanosleep(&idle, NULL);
                continue;
            }
            struct pollfd pfd = {r->wake_fd, POLLIN, 0};
            if (poll(&pfd, 1, idle_ms) > 0) {
                uint64_t v;
                if (read(r->wake_fd, &v, sizeof v) < 0 && errno != EAGAIN && errno != EINTR)
                    return fail(r, errno);
            }
            continue;
        }
        return fail(r, errno);
    }
}

void sms_trace_wake(struct sms_trace_reader *r, uint64_t seq)
{
    if (seq)
        __atomic_store_n(&r->want, seq, __ATOMIC_RELEASE);
    else
        __atomic_store_n(&r->stop, 1, __ATOMIC_RELEASE);
    if (r->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t w = write(r->wake_fd, &one, sizeof one); /* EAGAIN: it is awake already */
        (void)w;
    }
}

uint64_t sms_trace_take(uint64_t *bitmap, uint64_t *out, size_t words)
{
    uint64_t taken = 0;
    for (size_t i = 0; i < words; i++) {
        if (!__atomic_load_n(&bitmap[i], __ATOMIC_RELAXED))
            continue;
        uint64_t v = __atomic_exchange_n(&bitmap[i], 0, __ATOMIC_ACQ_REL);
        out[i] |= v;
        taken += (uint64_t)__builtin_popcountll(v);
    }
    return taken;
}
