/* Changed-block tracking from the kernel's block tracepoints (no Python.h).
 *
 * A tracefs instance records block:block_rq_complete (request-based disks) or
 * block:block_bio_complete (bio-based ones) for one disk into per-CPU ring
 * buffers. One reader per CPU, pinned to that CPU, reads its trace_pipe_raw a
 * sub-buffer ("page") at a time, sets a bit per 4 KiB block of the source that
 * a completed write, discard or write-zeroes touched, and places round
 * boundaries: asked for boundary N, it writes a marker carrying N to
 * trace_marker_raw from its CPU, so the marker lands in that CPU's buffer
 * after every event recorded there before it; once it has read its marker,
 * every write that completed on its CPU before the request is in the bitmap.
 *
 * Page layout (read from tracefs's events/header_page, offsets passed in):
 *     u64 timestamp, local_t commit (data length in its low 27 bits, bit 31:
 *     events were lost before this page, bit 30: their count is stored after
 *     the data), data.
 * Event layout (events/header_event): a 32-bit word, type_len in its low 5
 * bits; type_len 1..28: data of type_len * 4 bytes follows; 0: a 32-bit
 * length (data + 4) then data; 29: padding (time_delta 0: end of page);
 * 30, 31: time extend / absolute stamp, 8 bytes in all. The data starts with
 * the event's u16 common_type; field offsets come from each event's format.
 */
#ifndef SMSREPL_TRACEREAD_H
#define SMSREPL_TRACEREAD_H

#include <stddef.h>
#include <stdint.h>

#define SMS_TRACE_MISSED_EVENTS (UINT64_C(1) << 31)
#define SMS_TRACE_MISSED_STORED (UINT64_C(1) << 30)
#define SMS_TRACE_COMMIT_MASK ((UINT64_C(1) << 27) - 1)

struct sms_trace_layout {
    uint32_t commit_off, commit_size, data_off; /* page header */
    uint32_t id_rq, id_bio, id_marker;          /* event ids (0: not recorded) */
    uint32_t rq_dev, rq_sector, rq_nr, rq_rwbs; /* field offsets of block_rq_complete */
    uint32_t bio_dev, bio_sector, bio_nr, bio_rwbs;
    uint32_t marker_off;   /* offset of raw_data's u32 id; the marker's u64 sequence follows */
    uint32_t marker_magic; /* the id our markers carry */
};

struct sms_trace_disk {
    uint32_t dev;          /* kernel dev_t of the whole disk: major << 20 | minor */
    uint64_t first_sector; /* where the source starts on it (a partition's start, else 0) */
    uint64_t nsectors;     /* the source's length in 512-byte sectors */
    uint64_t *bitmap;      /* bit b of word b/64: block b of the source; set atomically */
    uint64_t nblocks;
};

struct sms_trace_counts {
    uint64_t pages, events, marks, missed_pages, foreign, last_marker;
};

/* Parse one page: set the bits of every write of `disk`, count, and return in
 * counts->last_marker the highest marker sequence seen (unchanged if none).
 * Returns 0, or -1 when the page is malformed (the rest of it is skipped). */
int sms_trace_parse_page(const uint8_t *page, size_t len, const struct sms_trace_layout *lay,
                         const struct sms_trace_disk *disk, struct sms_trace_counts *counts);

struct sms_trace_reader {
    int pipe_fd;   /* per_cpu/cpuN/trace_pipe_raw, O_NONBLOCK */
    int marker_fd; /* trace_marker_raw */
    int wake_fd;   /* an eventfd: a request or stop wakes an idle reader at once (-1: none) */
    int cpu;
    uint32_t page_size;
    uint32_t idle_us; /* wait this long (or until woken) when the buffer is empty */
    struct sms_trace_layout lay;
    struct sms_trace_disk disk;
    /* shared with the controlling thread (atomic access) */
    uint64_t want;          /* the boundary asked for */
    uint64_t written;       /* the last boundary whose marker was written */
    uint64_t seen;          /* the last boundary whose marker was read */
    uint64_t seen_missed;   /* missed_pages when `seen` was read */
    uint64_t marker_failures;
    int stop;
    int error; /* errno of the failure that ended run(), 0 while fine */
    struct sms_trace_counts counts;
};

/* Ask for boundary seq (or stop, with seq 0) and wake the reader. */
void sms_trace_wake(struct sms_trace_reader *r, uint64_t seq);

/* Pin the calling thread to r->cpu and read until r->stop: returns 0, or -errno
 * (also left in r->error) when pinning, reading or writing a marker failed. */
int sms_trace_run(struct sms_trace_reader *r, uint8_t *page);

/* out[i] |= bitmap[i], bitmap[i] = 0, word by word atomically (a reader may be
 * setting bits meanwhile: each lands in out or stays for the next take). Returns
 * the number of bits taken. */
uint64_t sms_trace_take(uint64_t *bitmap, uint64_t *out, size_t words);

#endif
