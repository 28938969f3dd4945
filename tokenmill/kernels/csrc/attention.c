/* Decode attention straight from the paged KV cache, one query token per row:
 *   out[s, h] = softmax(scale * q[s, h] . K_s^T) V_s
 * over the seq_lens[s] cached positions of row s, found through its block table
 * (position t lives in slot table[t / block_size] * block_size + t % block_size). Query
 * heads h share KV head h / (H / KVH) (grouped-query attention). The cache is float32,
 * or float16 (kv_f16: converted as it is read, half the bytes to fetch).
 *
 * Work is split into one job per (row, KV head), so the query heads that share a KV head
 * read its K/V rows while they are in the core's caches: attention at decode is bound by
 * fetching the cache, which is far larger than the CPU's caches. Nothing is gathered or
 * padded, so a step costs what its rows' lengths cost. The next K/V rows are prefetched
 * by hand: a block's rows are strided and the blocks scattered, so the hardware
 * prefetcher misses them.
 *   AVX-512, D % 16 == 0, D <= 128: attend_group_512, all the job's query heads at once.
 *   AVX2, D % 8 == 0: attend_avx2, one query head after the other; dot products as 8-wide
 *       FMA chains in a fixed order, V accumulated in registers 64 dims at a time.
 *   Otherwise: attend_scalar, plain C.
 * Softmax subtracts the row maximum and takes e^x by the vectorized polynomial of
 * common.h (expf in plain C); the vector paths scale V's weighted sum by 1 / sum at the
 * end, the plain C one each weight.
 *
 * Invariant: each (row, head) is computed by the same code in the same order whatever
 * the other rows and heads are. Prefill rows use this kernel too (a row per position,
 * seq_lens = position + 1), so a position's output does not depend on how the prompt
 * was split into steps, nor on the batch around it.
 */
#include "common.h"

#if TM_AVX2
/* 8 cached K/V values at p as float32, from a float32 or (F16) a float16 cache. */
TM_INLINE __m256 kv_load8(const uint8_t *p, int F16) {
    return F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p))
               : _mm256_loadu_ps((const float *)p);
}

/* One (row, head): scores (len rounded up to 8, scratch) -> softmax -> o. */
TM_INLINE void attend_avx2(int F16, const float *qh, const uint8_t *k_cache,
                           const uint8_t *v_cache, const int64_t *table, int64_t len,
                           int64_t KVH, int64_t kvh, int64_t D, int64_t block_size,
                           float scale, float *scores, float *o) {
    const int64_t stride = KVH * D, ES = F16 ? 2 : 4;
    float mx = -INFINITY;
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const int64_t base = table[t0 / block_size] * block_size;
        const int64_t end = t0 + block_size < len ? t0 + block_size : len;
        if (end < len) {  /* the next block's K rows */
            const int64_t nbase = table[t0 / block_size + 1] * block_size;
            const int64_t n2 = end + block_size < len ? block_size : len - end;
            for (int64_t t = 0; t < n2; t++)
                for (int64_t c = 0; c < D * ES; c += 64)
                    _mm_prefetch((const char *)(k_cache + ((nbase + t) * stride + kvh * D) * ES + c),
                                 _MM_HINT_T0);
        }
        for (int64_t t = t0; t < end; t++) {
            const uint8_t *kv = k_cache + ((base + t - t0) * stride + kvh * D) * ES;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            int64_t d = 0;
            for (; d + 16 <= D; d += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), kv_load8(kv + d * ES, F16), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d + 8),
                                     kv_load8(kv + (d + 8) * ES, F16), a1);
            }
            if (d < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), kv_load8(kv + d * ES, F16), a0);
            const float sc = hsum(_mm256_add_ps(a0, a1)) * scale;
            scores[t] = sc;
            mx = sc > mx ? sc : mx;
        }
    }
    const int64_t padded = (len + 7) & ~(int64_t)7;
    for (int64_t t = len; t < padded; t++) scores[t] = -INFINITY;
    const __m256 vmx = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
        const __m256 e = exp_neg_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vmx));
        _mm256_storeu_ps(scores + t, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(vsum));
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
        const int64_t width = D - d0 < 64 ? D - d0 : 64;  /* a multiple of 8 */
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t t0 = 0; t0 < len; t0 += block_size) {
            const int64_t base = table[t0 / block_size] * block_size;
            const int64_t end = t0 + block_size < len ? t0 + block_size : len;
            if (end < len) {  /* the next block's V rows */
                const int64_t nbase = table[t0 / block_size + 1] * block_size;
                const int64_t n2 = end + block_size < len ? block_size : len - end;
                for (int64_t t = 0; t < n2; t++)
                    for (int64_t c = 0; c < width * ES; c += 64)
                        _mm_prefetch((const char *)(v_cache + ((nbase + t) * stride + kvh * D + d0) * ES + c),
                                     _MM_HINT_T0);
            }
            for (int64_t t = t0; t < end; t++) {
                const uint8_t *vv = v_cache + ((base + t - t0) * stride + kvh * D + d0) * ES;
                const __m256 p = _mm256_broadcast_ss(scores + t);
                for (int i = 0; i < width / 8; i++)
                    acc[i] = _mm256_fmadd_ps(p, kv_load8(vv + 8 * i * ES, F16), acc[i]);
            }
        }
        for (int i = 0; i < width / 8; i++)
            _mm256_storeu_ps(o + d0 + 8 * i, _mm256_mul_ps(acc[i], inv));
    }
}
#endif

#if TM_VNNI
/* The 16 lane sums of 16 vectors in one vector, by a reduction tree of 4 levels (halves,
 * quarters, pairs, lanes) in a fixed order. Lane 4k + j of the result is the sum of
 * p[4j + k] (a 4x4 transpose: callers store position t at p[4 * (t % 4) + t / 4]). */
TM_INLINE __m512 sum16x16(__m512 p[16]) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)  /* 256-bit halves: x[i] = [p[2i] lo+hi | p[2i+1] lo+hi] */
        x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  /* 128-bit quarters: 4 positions of 4 partials */
        y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)  /* pairs within 128 bits */
        z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
}

/* 16 cached K/V values at p as float32, from a float32 or (F16) a float16 cache. */
TM_INLINE __m512 kv_load16(const uint8_t *p, int F16) {
    return F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p))
               : _mm512_loadu_ps((const float *)p);
}

/* Scores of NH heads (query rows qg[h * D..], ND = D / 16 vectors each) for 16 positions
 * whose K rows are kp[0..15] (NULL past the end): scores[h * ld + t] (-inf past the end). */
TM_INLINE void scores16(int NH, int ND, int F16, const float *qg, const uint8_t *const kp[16],
                        float scale, float *scores, int64_t ld, __m512 *vmx) {
    const int64_t ES = F16 ? 2 : 4;
    for (int h = 0; h < NH; h++) {
        __m512 q[8], p[16];
        for (int c = 0; c < ND; c++) q[c] = _mm512_loadu_ps(qg + h * ND * 16 + 16 * c);
        __mmask16 valid = 0;
        for (int t = 0; t < 16; t++) {
            __m512 a = _mm512_setzero_ps();
            if (kp[t]) {
                a = _mm512_mul_ps(q[0], kv_load16(kp[t], F16));
                for (int c = 1; c < ND; c++)
                    a = _mm512_fmadd_ps(q[c], kv_load16(kp[t] + 16 * c * ES, F16), a);
                valid |= (__mmask16)(1u << t);
            }
            p[4 * (t % 4) + t / 4] = a;
        }
        const __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY),
                                               _mm512_mul_ps(sum16x16(p), _mm512_set1_ps(scale)));
        _mm512_storeu_ps(scores + h * ld, sc);
        vmx[h] = _mm512_max_ps(vmx[h], sc);
    }
}

/* o[h] += sum_t p[h][t] V_t for NH heads sharing the V rows (ND vectors of 16 each). */
TM_INLINE void accumulate_v(int NH, int ND, int F16, const uint8_t *v_cache,
                            const int64_t *table, int64_t len, int64_t stride,
                            int64_t block_size, const float *probs, int64_t ld,
                            const float *inv, float *o) {
    const int64_t ES = F16 ? 2 : 4;
    __m512 acc[4][8];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < ND; c++) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const uint8_t *vb = v_cache + table[t0 / block_size] * block_size * stride * ES;
        const int64_t end = t0 + block_size < len ? block_size : len - t0;
        if (t0 + block_size < len) {  /* the next block's rows */
            const uint8_t *nb = v_cache + table[t0 / block_size + 1] * block_size * stride * ES;
            const int64_t n2 = t0 + 2 * block_size < len ? block_size : len - t0 - block_size;
            for (int64_t t = 0; t < n2; t++)
                for (int64_t c = 0; c < 16 * ND * ES; c += 64)
                    _mm_prefetch((const char *)(nb + t * stride * ES + c), _MM_HINT_T0);
        }
        for (int64_t t = 0; t < end; t++) {
            __m512 v[8];
            for (int c = 0; c < ND; c++) v[c] = kv_load16(vb + (t * stride + 16 * c) * ES, F16);
            for (int h = 0; h < NH; h++) {
                const __m512 pt = _mm512_set1_ps(probs[h * ld + t0 + t]);
                for (int c = 0; c < ND; c++) acc[h][c] = _mm512_fmadd_ps(pt, v[c], acc[h][c]);
            }
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < ND; c++)
            _mm512_storeu_ps(o + h * ND * 16 + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
}

/* One row and one KV head with AVX-512, D = 16 * ND (ND <= 8): the G query heads that
 * share the KV head together, so each K and V row is fetched from memory once (the
 * cache is far larger than the CPU's caches: attention is bound by fetching it). Scores
 * 16 positions at a time (one FMA chain per position, the 16 chains summed by one
 * reduction tree); softmax with exp_neg_512; V accumulated in registers, up to 4 heads
 * per pass. The next 16 positions' K rows and the next block's V rows are prefetched
 * (see the note at the top). Each head's numbers take the same operations whatever G,
 * the row and the batch are.
 * qg, o: [G, D]; scores: scratch of G * ld floats, ld = len rounded up to 16. */
TM_INLINE void attend_group_512(int ND, int F16, const float *qg, const uint8_t *k_cache,
                                const uint8_t *v_cache, const int64_t *table, int64_t len,
                                int64_t KVH, int64_t kvh, int64_t G, int64_t block_size,
                                float scale, float *scores, float *o) {
    const int64_t D = 16 * ND, stride = KVH * D, ld = (len + 15) & ~(int64_t)15;
    const int64_t ES = F16 ? 2 : 4;
    k_cache += kvh * D * ES;
    v_cache += kvh * D * ES;
    __m512 vmx[16];
    for (int64_t h = 0; h < G; h++) vmx[h] = _mm512_set1_ps(-INFINITY);
    int64_t blk = 0, off = 0;  /* position t is slot table[blk] * block_size + off */
    const uint8_t *kp[16];
    for (int64_t t0 = 0; t0 < len; t0 += 16) {
        for (int t = 0; t < 16; t++) {
            kp[t] = NULL;
            if (t0 + t < len) {
                kp[t] = k_cache + (table[blk] * block_size + off) * stride * ES;
                if (++off == block_size) blk++, off = 0;
            }
        }
        for (int64_t t = 0, b2 = blk, o2 = off; t < 16 && t0 + 16 + t < len; t++) {
            const uint8_t *next = k_cache + (table[b2] * block_size + o2) * stride * ES;
            for (int64_t c = 0; c < D * ES; c += 64) _mm_prefetch((const char *)(next + c), _MM_HINT_T0);
            if (++o2 == block_size) b2++, o2 = 0;
        }
        int64_t h = 0;
        for (; h + 4 <= G; h += 4)
            scores16(4, ND, F16, qg + h * D, kp, scale, scores + h * ld + t0, ld, vmx + h);
        for (; h < G; h++)
            scores16(1, ND, F16, qg + h * D, kp, scale, scores + h * ld + t0, ld, vmx + h);
    }
    float inv[16];
    for (int64_t h = 0; h < G; h++) {
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmx[h]));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t t = 0; t < ld; t += 16) {
            const __m512 e = exp_neg_512(_mm512_sub_ps(_mm512_loadu_ps(scores + h * ld + t), mx));
            _mm512_storeu_ps(scores + h * ld + t, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        inv[h] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
    const int per_pass = ND <= 4 ? 4 : 2;  /* accumulators stay in registers */
    int64_t h = 0;
    for (; h + per_pass <= G; h += per_pass)
        accumulate_v(per_pass, ND, F16, v_cache, table, len, stride, block_size,
                     scores + h * ld, ld, inv + h, o + h * D);
    for (; h < G; h++)
        accumulate_v(1, ND, F16, v_cache, table, len, stride, block_size, scores + h * ld, ld,
                     inv + h, o + h * D);
}
#endif

/* Cached K/V value i of row p, from a float32 or (F16) a float16 cache. */
TM_INLINE float kv_load1(const uint8_t *p, int64_t i, int F16) {
    return F16 ? f16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* One (row, head) in plain C: scores (len floats of scratch) -> softmax -> o. */
TM_INLINE void attend_scalar(int F16, const float *qh, const uint8_t *k_cache,
                             const uint8_t *v_cache, const int64_t *table, int64_t len,
                             int64_t KVH, int64_t kvh, int64_t D, int64_t block_size,
                             float scale, float *scores, float *o) {
    const int64_t ES = F16 ? 2 : 4;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const uint8_t *kv = k_cache + (slot * KVH + kvh) * D * ES;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; d++) dot += qh[d] * kv_load1(kv, d, F16);
        scores[t] = dot * scale;
        mx = scores[t] > mx ? scores[t] : mx;
    }
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - mx);
        sum += scores[t];
    }
    const float inv = 1.0f / sum;
    memset(o, 0, (size_t)D * sizeof(float));
    for (int64_t t = 0; t < len; t++) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const uint8_t *vv = v_cache + (slot * KVH + kvh) * D * ES;
        const float p = scores[t] * inv;
        for (int64_t d = 0; d < D; d++) o[d] += p * kv_load1(vv, d, F16);
    }
}

/* `call` (naming F16) with F16 the constant 1 for a float16 cache, 0 for float32: each
 * kernel is inlined once per cache type, with the conversions decided at compile time. */
#define TM_BY_CACHE_TYPE(call)     \
    do {                           \
        if (kv_f16) {              \
            const int F16 = 1;     \
            call;                  \
        } else {                   \
            const int F16 = 0;     \
            call;                  \
        }                          \
    } while (0)

/* Scratch of at least `need` floats in *buf (capacity *cap); 0, or -1 out of memory. */
TM_INLINE int scratch(float **buf, int64_t *cap, int64_t need) {
    if (need <= *cap) return 0;
    free(*buf);
    *buf = (float *)malloc((size_t)need * sizeof(float));
    *cap = *buf ? need : 0;
    return *buf ? 0 : -1;
}

int tm_paged_decode_attention(const float *q, const void *k_cache_, const void *v_cache_,
                              const int64_t *block_table, int64_t max_blocks,
                              const int64_t *seq_lens, int64_t n, int64_t H, int64_t KVH,
                              int64_t D, int64_t block_size, float scale, float *out,
                              int kv_f16) {
    if (KVH <= 0 || H % KVH) return -1;
    const uint8_t *k_cache = (const uint8_t *)k_cache_, *v_cache = (const uint8_t *)v_cache_;
    const int64_t group = H / KVH;
    int failed = 0;
#if TM_VNNI
    if (D % 16 == 0 && D <= 128 && group <= 16) {
        /* one job per (row, KV head): its query heads read each K/V row once */
#pragma omp parallel
        {
            float *scores = NULL;
            int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
            for (int64_t job = 0; job < n * KVH; job++) {
                const int64_t s = job / KVH, kvh = job % KVH, len = seq_lens[s];
                if (scratch(&scores, &cap, group * ((len + 15) & ~(int64_t)15))) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                const int64_t *table = block_table + s * max_blocks;
                const float *qg = q + (s * H + kvh * group) * D;
                float *o = out + (s * H + kvh * group) * D;
                switch (D / 16) {  /* one inlined copy per head size */
#define TM_ATTEND(ND) case ND:                                                             \
                    TM_BY_CACHE_TYPE(attend_group_512(ND, F16, qg, k_cache, v_cache, table,   \
                                                      len, KVH, kvh, group, block_size, scale, \
                                                      scores, o));                             \
                    break;
                TM_ATTEND(1) TM_ATTEND(2) TM_ATTEND(3) TM_ATTEND(4)
                TM_ATTEND(5) TM_ATTEND(6) TM_ATTEND(7) TM_ATTEND(8)
#undef TM_ATTEND
                }
            }
            free(scores);
        }
        return failed ? -2 : 0;
    }
#endif
#pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
        /* one job per (row, KV head), its query heads one after the other: the second and
         * later heads find the K/V rows in the core's caches */
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < n * KVH; job++) {
            const int64_t s = job / KVH, kvh = job % KVH, len = seq_lens[s];
            if (scratch(&scores, &cap, (len + 15) & ~(int64_t)15)) {
#pragma omp atomic write
                failed = 1;
                continue;
            }
            const int64_t *table = block_table + s * max_blocks;
            for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                const float *qh = q + (s * H + h) * D;
                float *o = out + (s * H + h) * D;
#if TM_AVX2
                if (D % 8 == 0) {
                    TM_BY_CACHE_TYPE(attend_avx2(F16, qh, k_cache, v_cache, table, len, KVH, kvh,
                                                 D, block_size, scale, scores, o));
                    continue;
                }
#endif
                TM_BY_CACHE_TYPE(attend_scalar(F16, qh, k_cache, v_cache, table, len, KVH, kvh,
                                               D, block_size, scale, scores, o));
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
