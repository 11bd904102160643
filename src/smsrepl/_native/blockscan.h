/* Block-level scan kernels (no Python.h): zero detection and per-block digests.
 * All sizes are in bytes. Callers validate arguments; these functions trust them. */
#ifndef SMSREPL_BLOCKSCAN_H
#define SMSREPL_BLOCKSCAN_H

#include <stddef.h>
#include <stdint.h>

#define SMS_ZERO_DIGEST UINT64_C(0)
#define SMS_UNKNOWN_DIGEST UINT64_C(0xFFFFFFFFFFFFFFFF)

/* 1 if p[0..n) is all zero bytes, else 0. Exits on the first non-zero word. */
int sms_is_zero(const uint8_t *p, size_t n);

/* Number of blocks of block_size covering len bytes (last may be short). */
static inline size_t sms_nblocks(size_t len, size_t block_size)
{
    return len / block_size + (len % block_size != 0);
}

/* out[i] (uint64, written with memcpy so any alignment works) = 0 for an
 * all-zero block, else XXH3_64bits(block) remapped away from 0 and ~0.
 * Returns the number of non-zero blocks. */
size_t sms_block_digests(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out);

/* out[i] = 1 if block i is all zero else 0. Returns the number of zero blocks. */
size_t sms_zero_map(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out);

/* out[16*i .. 16*i+16) = canonical (big-endian) XXH3-128 of buf[group_size*i ..), the last
 * group may be short: the coarse digests of a manifest's fine section. */
void sms_group_digests(const uint8_t *buf, size_t len, size_t group_size, uint8_t *out);

#endif
