/* The link emulator's forwarding loop (see linkfwd.h).
 *
 * A packet read at time t from one side: lost with the loss probability; else it joins the
 * bottleneck's queue unless the bytes still waiting there (what the serializer has not sent
 * by t) would pass queue_bytes; it leaves the bottleneck at done = max(t, busy) + len * 8 / rate,
 * and is written to the other side at max(done + delay + jitter, the previous release).
 * Releases are monotonic, so each direction is a FIFO, and one ppoll with a nanosecond
 * timeout waits for the next release or the next packet. */
#define _GNU_SOURCE
#include "linkfwd.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define BATCH 256                       /* packets read from one side per wake-up at most */
#define MAX_INFLIGHT ((uint64_t)1 << 30) /* bytes held per direction, whatever the settings */

struct pkt {
    uint64_t due;
    uint32_t len;
    unsigned char *data;
};

struct line {
    struct pkt *ring;
    size_t cap, head, count;
    uint64_t busy_until;   /* when the bottleneck has sent everything queued */
    uint64_t last_due;
    uint64_t inflight;     /* bytes held */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_rand(uint64_t *s) /* xorshift64* */
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

static int push(struct line *ln, uint64_t due, const unsigned char *buf, uint32_t len)
{
    if (ln->count == ln->cap) {
        size_t cap = ln->cap ? ln->cap * 2 : 1024;
        struct pkt *ring = malloc(cap * sizeof *ring);
        if (!ring)
            return -1;
        for (size_t i = 0; i < ln->count; i++)
            ring[i] = ln->ring[(ln->head + i) % ln->cap];
        free(ln->ring);
        ln->ring = ring;
        ln->cap = cap;
        ln->head = 0;
    }
    unsigned char *data = malloc(len ? len : 1);
    if (!data)
        return -1;
    memcpy(data, buf, len);
    ln->ring[(ln->head + ln->count) % ln->cap] = (struct pkt){due, len, data};
    ln->count++;
    ln->inflight += len;
    return 0;
}

/* What happens to a packet of len bytes arriving at now: queued with its release time, or counted as lost or dropped. */
static void arrive(struct line *ln, const struct sms_link_dir *d, struct sms_link_stats *st, uint64_t *rng,
                   uint64_t now, const unsigned char *buf, uint32_t len)
{
    if (d->loss_p32 && (next_rand(rng) >> 32) < d->loss_p32) {
        st->lost++;
        return;
    }
    uint64_t done = now;
    if (d->rate_bps) {
        uint64_t start = ln->busy_until > now ? ln->busy_until : now;
        double waiting = (double)(start - now) * (double)d->rate_bps / 8e9;
        if (waiting + len > (double)d->queue_bytes || ln->inflight + len > MAX_INFLIGHT) {
            st->dropped++;
            return;
        }
        if (waiting + len > (double)st->peak_queue_bytes)
            st->peak_queue_bytes = (uint64_t)(waiting + len);
        done = start + (uint64_t)((double)len * 8e9 / (double)d->rate_bps + 0.5);
        ln->busy_until = done;
    } else if (ln->inflight + len > MAX_INFLIGHT) {
        st->dropped++;
        return;
    }
    uint64_t delay = d->delay_ns;
    if (d->jitter_ns) {
        uint64_t span = 2 * d->jitter_ns + 1;
        uint64_t draw = next_rand(rng) % span;  /* delay - jitter + draw, floored at 0 */
        delay = delay + draw > d->jitter_ns ? delay + draw - d->jitter_ns : 0;
    }
    uint64_t due = done + delay;
    if (due < ln->last_due)
        due = ln->last_due;
    ln->last_due = due;
    if (push(ln, due, buf, len) < 0)
        st->dropped++;  /* out of memory: the link drops, the process goes on */
}

/* Writes the packets of ln due by now to out_fd; returns the earliest due time left, or UINT64_MAX. */
static uint64_t release(struct line *ln, int out_fd, struct sms_link_stats *st, uint64_t now)
{
    while (ln->count) {
        struct pkt *p = &ln->ring[ln->head];
        if (p->due > now)
            return p->due;
        ssize_t w = write(out_fd, p->data, p->len);
        if (w == (ssize_t)p->len) {
            st->packets++;
            st->bytes += p->len;
        } else {
            st->write_errors++;
        }
        uint64_t late = now - p->due;
        st->late_ns_sum += late;
        if (late > st->late_ns_max)
            st->late_ns_max = late;
        st->late_1ms += late > 1000000;
        ln->inflight -= p->len;
        free(p->data);
        ln->head = (ln->head + 1) % ln->cap;
        ln->count--;
    }
    return UINT64_MAX;
}

static void drain(struct line *ln)
{
    for (size_t i = 0; i < ln->count; i++)
        free(ln->ring[(ln->head + i) % ln->cap].data);
    free(ln->ring);
}

int sms_link_forward(const int fds[2], int stop_fd, const struct sms_link_dir dirs[2], uint64_t seed,
                     uint32_t mtu, struct sms_link_stats stats[2])
{
    struct line lines[2];
    memset(lines, 0, sizeof lines);
    memset(stats, 0, 2 * sizeof *stats);
    uint64_t rng = seed ? seed : 0x9E3779B97F4A7C15ULL;
    unsigned char *buf = malloc((size_t)mtu + 1);
    if (!buf)
        return -ENOMEM;
    for (int i = 0; i < 2; i++) {
        int fl = fcntl(fds[i], F_GETFL);
        if (fl < 0 || fcntl(fds[i], F_SETFL, fl | O_NONBLOCK) < 0) {
            free(buf);
            return -errno;
        }
    }
    prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);  /* wake within 1 us of a release, not 50 */
    int rc = 0;
    for (;;) {
        uint64_t now = now_ns();
        uint64_t next = UINT64_MAX;
        for (int d = 0; d < 2; d++) {
            uint64_t n = release(&lines[d], fds[1 - d], &stats[d], now);
            if (n < next)
                next = n;
        }
        struct pollfd pf[3] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}, {stop_fd, POLLIN, 0}};
        struct timespec ts, *tp = NULL;
        if (next != UINT64_MAX) {
            uint64_t wait = next - now;
            ts.tv_sec = (time_t)(wait / 1000000000u);
            ts.tv_nsec = (long)(wait % 1000000000u);
            tp = &ts;
        }
        int n = ppoll(pf, 3, tp, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = -errno;
            break;
        }
        if (pf[2].revents)
            break;
        if ((pf[0].revents | pf[1].revents) & (POLLERR | POLLNVAL)) {
            rc = -EIO;
            break;
        }
        for (int d = 0; d < 2; d++) {
            if (!(pf[d].revents & POLLIN))
                continue;
            for (int k = 0; k < BATCH; k++) {
                ssize_t r = read(fds[d], buf, (size_t)mtu + 1);
                if (r < 0) {
                    if (errno == EAGAIN || errno == EINTR)
                        break;
                    rc = -errno;
                    goto out;
                }
                if (r == 0 || r > (ssize_t)mtu)  /* nothing, or larger than the link carries */
                    continue;
                arrive(&lines[d], &dirs[d], &stats[d], &rng, now_ns(), buf, (uint32_t)r);
            }
        }
    }
out:
    drain(&lines[0]);
    drain(&lines[1]);
    free(buf);
    return rc;
}
