/* Scattered reads of one file into one buffer, many in flight at once, and scattered writes (no Python.h). */
#ifndef SMSREPL_RANGEREAD_H
#define SMSREPL_RANGEREAD_H

#include <stddef.h>
#include <stdint.h>

/* Read range i (offsets[i], lengths[i] bytes) of fd into buf at the sum of the lengths
 * before it, up to `depth` reads in flight (Linux native AIO; where the kernel has none,
 * one pread after another). With O_DIRECT the buffer, offsets and lengths must be
 * aligned as the file requires. Returns the bytes read (less than the total only where
 * the file ended), or -errno. */
int64_t sms_read_ranges(int fd, uint8_t *buf, const int64_t *offsets, const int64_t *lengths, size_t n,
                        unsigned depth);

/* Write range i (offsets[i], lengths[i] bytes) from buf at the sum of the lengths before it,
 * one pwrite after another (a sync round's scattered blocks into the page cache: the
 * cost is the calls, not the disk). Returns the bytes written, or -errno. */
int64_t sms_write_ranges(int fd, const uint8_t *buf, const int64_t *offsets, const int64_t *lengths, size_t n);

#endif
