/* rsync-style delta search. See delta.h for the checksum definitions.
 *
 * Algorithm (mirrored exactly by smsrepl/_pure/__init__.py:delta_search):
 *  nfull = old_len / bs full old blocks; a short last block (old_len % bs) exists
 *  when last_len > 0 and is index nfull.
 *  Table: tsize = smallest power of two >= max(16, 2*nfull); bucket(h) =
 *  ((h * SMS_BUCKET_MULT) mod 2^32) >> (32 - log2(tsize)). Full blocks are inserted
 *  from the highest index down to 0, each pushed on the front of its bucket's
 *  chain, except that a block whose (weak, strong) equal those of the chain's
 *  current head just replaces the head's block index (runs of identical blocks
 *  collapse to one entry holding the lowest index).
 *  Scan: pos = 0, lit = 0, prev = -1. While pos + bs <= n:
 *    if (pos >> 20) changed: fails = 0;
 *    jump check (only at the first position after a match, if fails < FAIL_BUDGET
 *      and prev+1 < nfull): s = XXH3(window); s == strong[prev+1] is a match
 *      (no weak check); otherwise prev+1 counts as a tried candidate here.
 *    h = W(data[pos:pos+bs]) (rolled, or recomputed after a jump);
 *    if fails < FAIL_BUDGET:
 *      candidates, in order: prev+1 (if not jump-checked, prev >= 0,
 *      prev+1 < nfull and weak[prev+1] == h); then the first MAX_CHAIN entries of bucket(h)'s chain
 *      whose weak == h (entries with another weak still count toward MAX_CHAIN),
 *      skipping prev+1. If there is any candidate, s = XXH3(window) once; the
 *      first candidate with strong == s matches. If candidates existed (or the
 *      jump check failed) and none matched: fails += 1.
 *    On a match j: emit literal [lit, pos) if non-empty, emit copy of block j,
 *    pos += bs, lit = pos, prev = j. Otherwise roll and pos += 1.
 *  End: if last_len > 0 and n - last_len >= pos (n >= last_len) and the window
 *  data[n-last_len:n] has weak == weak[nfull] and strong == strong[nfull]:
 *  literal [lit, n-last_len), copy nfull. Else literal [lit, n).
 *  Rows: (0, offset, length) literal; (1, first_block, count) copy; a copy of
 *  block j directly after a copy row (1, s, c) with s + c == j extends it.
 */
#define XXH_INLINE_ALL
#include "xxhash.h"

#include <stdlib.h>
#include <string.h>

#include "delta.h"

#define MiB_SHIFT 20

uint32_t sms_weak(const uint8_t *p, size_t n)
{
    /* Horner, 4 bytes per step so the serial multiply chain is 4x shorter. */
    const uint32_t m1 = SMS_WEAK_MULT, m2 = m1 * m1, m3 = m2 * m1, m4 = m2 * m2;
    uint32_t h = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        h = h * m4 + (uint32_t)(p[i] + 1) * m3 + (uint32_t)(p[i + 1] + 1) * m2 +
            (uint32_t)(p[i + 2] + 1) * m1 + (uint32_t)(p[i + 3] + 1);
    for (; i < n; i++)
        h = h * m1 + (uint32_t)(p[i] + 1);
    return h;
}

size_t sms_file_signature(const uint8_t *buf, size_t len, size_t block_size,
                          uint8_t *weak_out, uint8_t *strong_out)
{
    size_t i = 0;
    for (size_t off = 0; off < len; off += block_size, i++) {
        size_t n = len - off < block_size ? len - off : block_size;
        uint32_t w = sms_weak(buf + off, n);
        uint64_t s = XXH3_64bits(buf + off, n);
        memcpy(weak_out + 4 * i, &w, 4);
        memcpy(strong_out + 8 * i, &s, 8);
    }
    return i;
}

static int push_row(sms_rows *r, int64_t kind, int64_t a, int64_t b)
{
    if (r->n) {
        int64_t *last = r->rows + 3 * (r->n - 1);
        if (kind == 0 && last[0] == 0 && last[1] + last[2] == a) {
            last[2] += b;
            return 0;
        }
        if (kind == 1 && last[0] == 1 && last[1] + last[2] == a) {
            last[2] += b;
            return 0;
        }
    }
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 64;
        int64_t *p = realloc(r->rows, cap * 3 * sizeof(int64_t));
        if (!p)
            return -1;
        r->rows = p;
        r->cap = cap;
    }
    int64_t *row = r->rows + 3 * r->n++;
    row[0] = kind;
    row[1] = a;
    row[2] = b;
    return 0;
}

int sms_delta_search(const uint8_t *weak_raw, const uint8_t *strong_raw, size_t bs,
                     uint64_t old_len, const uint8_t *data, size_t n, sms_rows *out)
{
    int rc = -1;
    size_t nfull = (size_t)(old_len / bs), last_len = (size_t)(old_len % bs);
    size_t nb = nfull + (last_len != 0);
    uint32_t *weak = NULL, *blk = NULL;
    uint64_t *strong = NULL, *filter = NULL;
    int32_t *heads = NULL, *next = NULL;
    unsigned tbits = 4, fbits;

    while (((size_t)1 << tbits) < 2 * nfull)
        tbits++;
    fbits = tbits + 4 > 30 ? 30 : tbits + 4;

    weak = malloc((nb ? nb : 1) * sizeof *weak);
    strong = malloc((nb ? nb : 1) * sizeof *strong);
    blk = malloc((nfull ? nfull : 1) * sizeof *blk);
    next = malloc((nfull ? nfull : 1) * sizeof *next);
    heads = malloc(((size_t)1 << tbits) * sizeof *heads);
    filter = calloc(((size_t)1 << fbits) / 64, sizeof *filter);
    if (!weak || !strong || !blk || !next || !heads || !filter)
        goto done;
    memcpy(weak, weak_raw, nb * sizeof *weak);
    memcpy(strong, strong_raw, nb * sizeof *strong);
    memset(heads, 0xff, ((size_t)1 << tbits) * sizeof *heads);

#define BUCKET(h) ((uint32_t)((h) * SMS_BUCKET_MULT) >> (32 - tbits))
#define FIDX(h) ((uint32_t)((h) * SMS_WEAK_MULT) >> (32 - fbits))
#define FTEST(h) ((filter[FIDX(h) >> 6] >> (FIDX(h) & 63)) & 1)

    int32_t nodes = 0;
    for (size_t jj = nfull; jj-- > 0;) {
        uint32_t b = BUCKET(weak[jj]);
        int32_t hd = heads[b];
        if (hd >= 0 && weak[blk[hd]] == weak[jj] && strong[blk[hd]] == strong[jj]) {
            blk[hd] = (uint32_t)jj;
            continue;
        }
        blk[nodes] = (uint32_t)jj;
        next[nodes] = hd;
        heads[b] = nodes++;
        filter[FIDX(weak[jj]) >> 6] |= UINT64_C(1) << (FIDX(weak[jj]) & 63);
    }

    /* T[b] = (b+1) * M^bs: removes the outgoing byte when rolling. */
    uint32_t T[256], mn = 1, mpow = SMS_WEAK_MULT;
    for (size_t e = bs; e; e >>= 1, mpow *= mpow)
        if (e & 1)
            mn *= mpow;
    for (int b = 0; b < 256; b++)
        T[b] = (uint32_t)(b + 1) * mn;

    size_t pos = 0, lit = 0;
    int64_t prev = -1;
    uint32_t h = 0;
    int need = 1;
    size_t cur_mib = (size_t)-1;
    unsigned fails = 0;

    if (nfull > 0) {
        while (pos + bs <= n) {
            size_t mib = pos >> MiB_SHIFT;
            if (mib != cur_mib) {
                cur_mib = mib;
                fails = 0;
            }
            int64_t match = -1;
            int jtried = 0;
            uint64_t js = 0;
            if (need) {
                need = 0;
                /* Jump check: right after a match, the next old block is tried
                 * by its strong sum alone, so unchanged runs cost one XXH3 per
                 * block and no weak sum. */
                if (fails < SMS_DELTA_FAIL_BUDGET && prev + 1 < (int64_t)nfull) {
                    js = XXH3_64bits(data + pos, bs);
                    jtried = 1;
                    if (js == strong[prev + 1])
                        match = prev + 1;
                }
                if (match < 0)
                    h = sms_weak(data + pos, bs);
            }
            if (match < 0 && fails < SMS_DELTA_FAIL_BUDGET) {
                size_t nx = (size_t)(prev + 1);
                int have_fast = prev >= 0 && nx < nfull;
                /* Fast rolling loop: nothing to verify at most positions. */
                while (!jtried && !FTEST(h) && !(have_fast && weak[nx] == h)) {
                    if (pos + bs >= n || ((pos + 1) >> MiB_SHIFT) != cur_mib)
                        break;
                    h = h * SMS_WEAK_MULT + (uint32_t)(data[pos + bs] + 1) - T[data[pos]];
                    pos++;
                }
                int tried = jtried, have_s = jtried;
                uint64_t s = js;
                if (!jtried && have_fast && weak[nx] == h) {
                    s = XXH3_64bits(data + pos, bs);
                    have_s = tried = 1;
                    if (s == strong[nx])
                        match = (int64_t)nx;
                }
                if (match < 0 && FTEST(h)) {
                    int32_t node = heads[BUCKET(h)];
                    for (int steps = 0; node >= 0 && steps < SMS_DELTA_MAX_CHAIN;
                         steps++, node = next[node]) {
                        uint32_t j = blk[node];
                        if (weak[j] != h || (have_fast && j == nx))
                            continue;
                        if (!have_s) {
                            s = XXH3_64bits(data + pos, bs);
                            have_s = 1;
                        }
                        tried = 1;
                        if (s == strong[j]) {
                            match = (int64_t)j;
                            break;
                        }
                    }
                }
                if (match < 0 && tried)
                    fails++;
            } else if (match < 0) {
                /* Budget spent: just roll to the next MiB (or the end). */
                while (pos + bs < n && ((pos + 1) >> MiB_SHIFT) == cur_mib) {
                    h = h * SMS_WEAK_MULT + (uint32_t)(data[pos + bs] + 1) - T[data[pos]];
                    pos++;
                }
            }
            if (match >= 0) {
                if (pos > lit && push_row(out, 0, (int64_t)lit, (int64_t)(pos - lit)))
                    goto done;
                if (push_row(out, 1, match, 1))
                    goto done;
                pos += bs;
                lit = pos;
                prev = match;
                need = 1;
            } else {
                if (pos + bs < n)
                    h = h * SMS_WEAK_MULT + (uint32_t)(data[pos + bs] + 1) - T[data[pos]];
                pos++;
            }
        }
    }
    if (last_len > 0 && n >= last_len && n - last_len >= pos) {
        const uint8_t *w = data + (n - last_len);
        if (sms_weak(w, last_len) == weak[nfull] && XXH3_64bits(w, last_len) == strong[nfull]) {
            size_t start = n - last_len;
            if (start > lit && push_row(out, 0, (int64_t)lit, (int64_t)(start - lit)))
                goto done;
            if (push_row(out, 1, (int64_t)nfull, 1))
                goto done;
            lit = n;
        }
    }
    if (n > lit && push_row(out, 0, (int64_t)lit, (int64_t)(n - lit)))
        goto done;
    rc = 0;
done:
    free(weak);
    free(strong);
    free(blk);
    free(next);
    free(heads);
    free(filter);
    return rc;
#undef BUCKET
#undef FIDX
#undef FTEST
}
