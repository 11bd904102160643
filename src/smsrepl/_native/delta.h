/* rsync-style rolling-checksum delta kernels (no Python.h).
 *
 * Weak checksum (identical in smsrepl/_pure/__init__.py, bit for bit):
 *     W(b[0..n)) = sum_{k=0}^{n-1} (b[k] + 1) * M^(n-1-k)   mod 2^32,  M = 0x9E3779B1
 * i.e. Horner: h = 0; for each byte: h = h*M + (byte+1)  (all mod 2^32).
 * Rolling a window of length n by one byte:
 *     h' = h*M + (in+1) - (out+1)*M^n   mod 2^32.
 * Strong checksum: XXH3_64bits(block), seed 0, no remapping.
 *
 * Search bounds (see delta.c for the full algorithm):
 *   SMS_DELTA_MAX_CHAIN   hash-chain entries examined per position;
 *   SMS_DELTA_FAIL_BUDGET positions per MiB of new data (MiB = pos >> 20) at which
 *                         the window's strong hash was computed without a match;
 *                         once reached, no candidate is verified for the rest of
 *                         that MiB (its data becomes literal unless already matched).
 */
#ifndef SMSREPL_DELTA_H
#define SMSREPL_DELTA_H

#include <stddef.h>
#include <stdint.h>

#define SMS_WEAK_MULT UINT32_C(0x9E3779B1)
#define SMS_BUCKET_MULT UINT32_C(0x85EBCA6B)
#define SMS_DELTA_MAX_CHAIN 8
#define SMS_DELTA_FAIL_BUDGET 32

uint32_t sms_weak(const uint8_t *p, size_t n);

/* weak_out: 4*nblocks bytes, strong_out: 8*nblocks bytes (any alignment).
 * Returns the block count. */
size_t sms_file_signature(const uint8_t *buf, size_t len, size_t block_size,
                          uint8_t *weak_out, uint8_t *strong_out);

typedef struct {
    int64_t *rows; /* 3 * n int64: (kind, a, b) */
    size_t n, cap;
} sms_rows;

/* weak_raw / strong_raw hold ceil(old_len/block_size) entries.
 * Appends rows to *out (caller frees out->rows). Returns 0, or -1 on ENOMEM. */
int sms_delta_search(const uint8_t *weak_raw, const uint8_t *strong_raw, size_t block_size,
                     uint64_t old_len, const uint8_t *data, size_t n, sms_rows *out);

#endif
