/* Block-level scan kernels. See blockscan.h. */
#define XXH_INLINE_ALL
#include "xxhash.h"

#include <string.h>

#include "blockscan.h"

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, sizeof w);
    return w;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* AVX2: 128 bytes per step in four 32-byte loads, one test per step. Zero
 * blocks must be read whole, so this loop runs at memory bandwidth. */
__attribute__((target("avx2"))) static int is_zero_avx2(const uint8_t *p, size_t n)
{
    size_t i = 0;
    for (; i + 256 <= n; i += 256) {
        __m256i o = _mm256_loadu_si256((const __m256i *)(p + i));
        for (int k = 1; k < 8; k++)
            o = _mm256_or_si256(o, _mm256_loadu_si256((const __m256i *)(p + i + 32 * k)));
        if (!_mm256_testz_si256(o, o))
            return 0;
    }
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(p + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(p + i + 96));
        __m256i o = _mm256_or_si256(_mm256_or_si256(a, b), _mm256_or_si256(c, d));
        if (!_mm256_testz_si256(o, o))
            return 0;
    }
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

static int have_avx2 = -1;
#endif

static int is_zero_portable(const uint8_t *p, size_t n)
{
    size_t i = 0;
    /* 128-byte strides OR-reduced without branches inside: gcc turns the
     * inner loop into SSE2 loads + por, one test per stride. */
    for (; i + 128 <= n; i += 128) {
        uint64_t acc = 0;
        for (size_t k = 0; k < 16; k++)
            acc |= load64(p + i + 8 * k);
        if (acc)
            return 0;
    }
    for (; i + 8 <= n; i += 8)
        if (load64(p + i))
            return 0;
    for (; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

int sms_is_zero(const uint8_t *p, size_t n)
{
    /* Early exit: real data almost always has a non-zero first word. */
    if (n >= 8 && load64(p) != 0)
        return 0;
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2 < 0)
        have_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (have_avx2)
        return is_zero_avx2(p, n);
#endif
    return is_zero_portable(p, n);
}

static inline uint64_t remap(uint64_t h)
{
    if (h == SMS_ZERO_DIGEST)
        return 1;
    if (h == SMS_UNKNOWN_DIGEST)
        return UINT64_C(0xFFFFFFFFFFFFFFFE);
    return h;
}

size_t sms_block_digests(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out)
{
    size_t nonzero = 0, i = 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        const uint8_t *p = buf + off;
        uint64_t d = SMS_ZERO_DIGEST;
        if (!sms_is_zero(p, n)) {
            d = remap(XXH3_64bits(p, n));
            nonzero++;
        }
        memcpy(out + 8 * i, &d, sizeof d);
    }
    return nonzero;
}

size_t sms_zero_map(const uint8_t *buf, size_t len, size_t block_size, uint8_t *out)
{
    size_t zeros = 0, i = 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        /* Non-zero blocks exit after one word, so the loop is a chain of cache
         * (and TLB) misses one block apart: start the next one early. */
        __builtin_prefetch(buf + off + 4 * block_size);
        int z = sms_is_zero(buf + off, n);
        out[i] = (uint8_t)z;
        zeros += (size_t)z;
    }
    return zeros;
}

void sms_group_digests(const uint8_t *buf, size_t len, size_t group_size, uint8_t *out)
{
    size_t i = 0;
    for (size_t off = 0; off < len; off += group_size, i++) {
        size_t n = len - off < group_size ? len - off : group_size;
        XXH128_canonical_t c;
        XXH128_canonicalFromHash(&c, XXH3_128bits(buf + off, n));
        memcpy(out + 16 * i, c.digest, 16);
    }
}
