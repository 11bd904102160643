/* A userspace link between two TUN devices (no Python.h): each direction has a bottleneck
 * of a given rate with a drop-tail queue, a one-way delay, jitter that never reorders, and
 * random loss. smsrepl.lab.linkemu runs it in a process of its own. */
#ifndef SMSREPL_LINKFWD_H
#define SMSREPL_LINKFWD_H

#include <stdint.h>

struct sms_link_dir {
    uint64_t rate_bps;    /* bits per second of IP packets (headers included); 0: no bottleneck, no queue */
    uint64_t delay_ns;    /* one-way delay after the bottleneck */
    uint64_t jitter_ns;   /* each packet's delay uniform in [delay - jitter, delay + jitter], then never
                             earlier than the packet before it (no reordering) */
    uint64_t loss_p32;    /* probability that a packet is lost, times 2^32 (2^32: all) */
    uint64_t queue_bytes; /* bytes waiting for the bottleneck beyond which an arriving packet is dropped */
};

struct sms_link_stats {
    uint64_t packets, bytes;  /* delivered */
    uint64_t lost;            /* dropped at random (loss) */
    uint64_t dropped;         /* dropped by the full queue */
    uint64_t write_errors;    /* packets the far device refused */
    uint64_t peak_queue_bytes;
    uint64_t late_ns_max;     /* how late the forwarder released a packet, worst and summed */
    uint64_t late_ns_sum;
    uint64_t late_1ms;        /* packets released over 1 ms late */
};

/* Forwards packets read from fds[0] to fds[1] shaped by dirs[0], and from fds[1] to fds[0]
 * shaped by dirs[1], until stop_fd is readable or hung up (packets still in flight are
 * dropped). mtu: the largest packet. Returns 0, or -errno of a failing poll or read, with
 * the stats counted so far. The fds are made non-blocking. */
int sms_link_forward(const int fds[2], int stop_fd, const struct sms_link_dir dirs[2], uint64_t seed,
                     uint32_t mtu, struct sms_link_stats stats[2]);

#endif
