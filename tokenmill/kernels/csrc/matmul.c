/* Matrix products with weights kept in llama.cpp's block formats: the driver for every
 * type (tm_gemm, tm_gemm_weight, tm_dequant, tm_dequant_rows, tm_pack_layout) and the
 * kernels of the three types kept in a regrouped layout, Q4_0, Q4_1 and Q8_0; the types
 * read as the file stores them (Q5_0, Q5_1, IQ4_NL, the K-quants, IQ4_XS) have their
 * kernels in matmul_stored.c.
 *
 * A weight matrix [N, K] is N rows of K/32 blocks; a block holds 32 weights as small
 * integers plus fp16 scale(s):
 *   Q4_0  d, 16 bytes of nibbles;          w = d * (q - 8)
 *   Q4_1  d, m, 16 bytes of nibbles;       w = d * q + m
 *   Q8_0  d, 32 signed bytes;              w = d * q
 * Nibble j of a Q4 block (low half of byte j) is weight j, the high half weight j + 16.
 * GGUF stores each block's scales next to its integers; the loader regroups each row as
 *   [integers of all its blocks][d of all its blocks][m of all its blocks (Q4_1)]
 * (same bytes, same size), so the kernel loads the scales of 8 blocks with one
 * instruction instead of converting two fp16 numbers per block. Builds with VNNI then
 * interleave matrices of N % 16 == 0 rows in groups of 16 (tm_pack_layout, below).
 *
 * The weights are used exactly as stored. The activations are rounded to 8 bits per
 * block of 32 (one float scale each, as llama.cpp does), so a block's product is an
 * exact integer dot product of 32 byte pairs. A decode step (one row) reads 0.56-1.06
 * bytes per weight instead of 4, and on a CPU that is what bounds its speed.
 *
 * Invariant: a row's result is computed by the same operations in the same order
 * whatever the other rows of the batch are (tiles of 1, 2 or 4 rows differ only in how
 * many rows share a pass over the weights), so outputs are batch-invariant.
 *
 *   tm_pack_layout(qtype, w, N, K): the row layout -> the layout tm_gemm reads, in place
 *       (nothing to do for the types read as stored).
 *   tm_gemm(qtype, x[M,K], w, N, y[M,N]):  y = x @ W^T, parallel over output rows (OpenMP,
 *       sharing the runtime torch loaded).
 *   tm_gemm_weight(tm_weight, x[M,K], y[M,N]): the same for a matrix stored as up to
 *       TM_MAX_SEGMENTS row ranges of their own types; the activations are rounded once.
 *   tm_round_activations(x[M,K], out): x rounded as tm_gemm rounds it (the reference
 *       of the tests).
 *   tm_dequant(qtype, w, N, K, out[N,K]), tm_dequant_rows(...): the weights as float32.
 */
#include "common.h"

/* Returns `call` (naming QT) with QT the constant type id: one inlined copy per type, so
 * the block decoding has constant offsets and no branches; -1 for another type. */
#define TM_BY_QTYPE(qtype, call)                                       \
    switch (qtype) {                                                   \
    case TM_Q4_0: { const int QT = TM_Q4_0; return call; }             \
    case TM_Q4_1: { const int QT = TM_Q4_1; return call; }             \
    case TM_Q8_0: { const int QT = TM_Q8_0; return call; }             \
    default: return -1;                                                \
    }

TM_INLINE int block_bytes(int qtype) {
    switch (qtype) {
    case TM_Q4_0: return 18;
    case TM_Q4_1: return 20;
    case TM_Q8_0: return 34;
    default: return 0;
    }
}

/* Bytes of integers per block. */
TM_INLINE int int_bytes(int qtype) { return qtype == TM_Q8_0 ? 32 : 16; }

/* A regrouped weight row of nb blocks. */
typedef struct {
    const uint8_t *ints;   /* nb * int_bytes */
    const uint16_t *d;     /* nb fp16 scales */
    const uint16_t *m;     /* nb fp16 offsets (Q4_1) */
} wrow;

TM_INLINE wrow row_at(int qtype, const uint8_t *w, int64_t n, int64_t nb) {
    const uint8_t *row = w + n * nb * block_bytes(qtype);
    wrow r;
    r.ints = row;
    r.d = (const uint16_t *)(row + nb * int_bytes(qtype));
    r.m = r.d + nb;
    return r;
}

/* Scale and offset of block b: w = scale * q + offset, q as stored. */
TM_INLINE void block_affine(int qtype, wrow r, int64_t b, float *scale, float *offset) {
    const float d = f16_to_f32(r.d[b]);
    *scale = d;
    *offset = qtype == TM_Q4_1 ? f16_to_f32(r.m[b]) : qtype == TM_Q4_0 ? -8.0f * d : 0.0f;
}

/* ---- Weights for VNNI builds: groups of 16 rows, interleaved ----
 * vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 consecutive
 * products into one of 16 int32 lanes. With lane r holding 4 weights of row r, one
 * instruction advances 16 outputs by 4 steps of K against the same 4 activation bytes
 * (broadcast to every lane); a block takes 8 of them, and its 16 exact integer sums are
 * scaled by one conversion and one FMA, with no horizontal sums at the end.
 * So where the build has VNNI (AVX-512's, or AVX-VNNI: the same instruction on 256 bits,
 * two per 64-byte chunk) and N % 16 == 0, tm_pack_layout stores a matrix as N/16
 * groups of 16 rows, each group block after block. A block record holds the same bytes
 * as the 16 rows' blocks (16 * block_bytes):
 *   Q4_0, Q4_1: 4 chunks of 64 bytes (chunk c, lane r: bytes 4c..4c+3 of row r's block,
 *               i.e. weights 4c.. in the low nibbles and 16+4c.. in the high ones),
 *               then the 16 d (fp16), then the 16 m (Q4_1);
 *   Q8_0:       8 chunks of 64 bytes (chunk c, lane r: weights 4c..4c+3 of row r plus
 *               128, unsigned, so a product carries 128 * sum(y), subtracted exactly as
 *               an integer), then the 16 d.
 * Other matrices (and every matrix of a build without VNNI) keep the row layout. */
#define TM_GROUP 16

TM_INLINE int interleaved(int64_t N) { return TM_INTERLEAVE && N % TM_GROUP == 0; }
int tm_interleaved(int64_t N) { return interleaved(N); }

/* Block b of row n, in either layout: its integers as the row layout stores them (16
 * bytes of nibbles, or 32 signed bytes), its scale and offset (w = scale * q + offset). */
TM_INLINE void load_block(int qtype, const uint8_t *w, int64_t N, int64_t nb, int64_t n,
                          int64_t b, uint8_t raw[32], float *scale, float *offset) {
    const int ib = int_bytes(qtype);
    if (!interleaved(N)) {
        const wrow r = row_at(qtype, w, n, nb);
        memcpy(raw, r.ints + b * ib, (size_t)ib);
        block_affine(qtype, r, b, scale, offset);
        return;
    }
    const int64_t rec_bytes = TM_GROUP * block_bytes(qtype);
    const uint8_t *rec = w + (n / TM_GROUP) * nb * rec_bytes + b * rec_bytes;
    const int lane = (int)(n % TM_GROUP), flip = qtype == TM_Q8_0 ? 0x80 : 0;
    for (int j = 0; j < ib; j++) raw[j] = rec[(j / 4) * 64 + lane * 4 + j % 4] ^ flip;
    const uint16_t *d = (const uint16_t *)(rec + TM_GROUP * ib);
    const float dd = f16_to_f32(d[lane]);
    *scale = dd;
    *offset = qtype == TM_Q4_1 ? f16_to_f32(d[TM_GROUP + lane])
              : qtype == TM_Q4_0 ? -8.0f * dd : 0.0f;
}

/* The 32 integers of a block (bytes as the row layout stores them) as ints. */
TM_INLINE void block_ints_scalar(int qtype, const uint8_t *p, int q[32]) {
    if (qtype == TM_Q8_0) {
        for (int j = 0; j < 32; j++) q[j] = ((const int8_t *)p)[j];
        return;
    }
    for (int j = 0; j < 16; j++) {
        q[j] = p[j] & 0x0F;
        q[j + 16] = p[j] >> 4;
    }
}

/* Row n of W as float32. */
TM_INLINE void decode_row(int qtype, const uint8_t *w, int64_t N, int64_t nb, int64_t n,
                          float *out) {
    for (int64_t b = 0; b < nb; b++) {
        float s, o;
        uint8_t raw[32];
        int q[32];
        load_block(qtype, w, N, nb, n, b, raw, &s, &o);
        block_ints_scalar(qtype, raw, q);
        for (int j = 0; j < 32; j++) out[b * 32 + j] = (float)q[j] * s + o;
    }
}

/* Row layout -> the interleaved layout, in place, where interleaved(N); else nothing. */
TM_INLINE int pack_impl(int qtype, uint8_t *w, int64_t N, int64_t K) {
    if (!block_bytes(qtype) || K % 32) return -1;
    if (!interleaved(N)) return 0;
    const int64_t nb = K / 32, ib = int_bytes(qtype), rec_bytes = TM_GROUP * block_bytes(qtype);
    const int64_t group_bytes = nb * rec_bytes;
    const int flip = qtype == TM_Q8_0 ? 0x80 : 0;
    int failed = 0;
#pragma omp parallel
    {
        uint8_t *tmp = (uint8_t *)malloc((size_t)group_bytes);
        if (!tmp) failed = 1;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < N / TM_GROUP; g++) {
            if (!tmp) continue;
            uint8_t *grp = w + g * group_bytes;
            for (int64_t b = 0; b < nb; b++) {
                uint8_t *rec = tmp + b * rec_bytes;
                uint16_t *d = (uint16_t *)(rec + TM_GROUP * ib);
                for (int r = 0; r < TM_GROUP; r++) {
                    const wrow row = row_at(qtype, grp, r, nb);
                    for (int j = 0; j < ib; j++)
                        rec[(j / 4) * 64 + r * 4 + j % 4] = row.ints[b * ib + j] ^ flip;
                    d[r] = row.d[b];
                    if (qtype == TM_Q4_1) d[TM_GROUP + r] = row.m[b];
                }
            }
            memcpy(grp, tmp, (size_t)group_bytes);
        }
        free(tmp);
    }
    return failed ? -2 : 0;
}

/* Weights per block of a type read as stored, else 0. */
static int stored_weights(int qtype) {
    int weights, bytes;
    tm_stored_block(qtype, &weights, &bytes);
    return weights;
}

int tm_pack_layout(int qtype, uint8_t *w, int64_t N, int64_t K) {
    const int sw = stored_weights(qtype);
    if (sw) return K % sw ? -1 : 0;  /* used as stored */
    TM_BY_QTYPE(qtype, pack_impl(QT, w, N, K));
}

/* ---- Activations rounded to 8 bits per block of 32 ----
 * For block b of an activation row: dx = max|x| / 127, y = round(x / dx) in [-127, 127],
 * and sy = dx * sum(y). A weight block (scale d, offset m) then contributes
 *     sum_j (d q_j + m)(dx y_j) = (d dx) sum_j q_j y_j + m sy. */
TM_INLINE void quantize_act_row(const float *x, int64_t K, int8_t *y, float *dx, float *sy,
                                int32_t *ys) {
#if TM_VNNI
    /* The same operations 16 at a time: max is exact, x * id is the same product, the
     * conversion rounds to nearest even as nearbyintf does, the sum is of integers; so
     * the bytes and scales are identical to the loop below. */
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < K / 32; b++) {
        const __m512 x0 = _mm512_loadu_ps(x + b * 32), x1 = _mm512_loadu_ps(x + b * 32 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, x0),
                                                              _mm512_andnot_ps(sign, x1)));
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512 vid = _mm512_set1_ps(id);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, vid));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, vid));
        _mm_storeu_si128((__m128i *)(y + b * 32), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(y + b * 32 + 16), _mm512_cvtepi32_epi8(q1));
        const int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        dx[b] = d;
        sy[b] = d * (float)sum;
        if (ys) ys[b] = sum;
    }
    return;
#endif
    for (int64_t b = 0; b < K / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)nearbyintf(xb[j] * id);
            y[b * 32 + j] = (int8_t)q;
            sum += q;
        }
        dx[b] = d;
        sy[b] = d * (float)sum;
        if (ys) ys[b] = sum;
    }
}

#if TM_AVX2
/* The 32 integers of block b as bytes (unsigned nibbles, or signed for Q8_0). */
TM_INLINE __m256i block_ints(int qtype, wrow r, int64_t b) {
    if (qtype == TM_Q8_0) return _mm256_loadu_si256((const __m256i *)(r.ints + b * 32));
    const __m128i raw = _mm_loadu_si128((const __m128i *)(r.ints + b * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

/* sum_j q_j y_j of one block, as 8 int32 partial sums converted to float. */
TM_INLINE __m256 block_int_dot(int qtype, __m256i q, const int8_t *y) {
    const __m256i yv = _mm256_loadu_si256((const __m256i *)y);
    __m256i p16;
    if (qtype == TM_Q8_0)  /* signed x signed: move q's sign onto y */
        p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(yv, q));
    else
        p16 = _mm256_maddubs_epi16(q, yv);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}
#endif

/* y[m, n] for ROWS consecutive activation rows (ROWS is a constant in each inlined copy).
 * A row's result is computed by the same operations in the same order whatever ROWS is
 * (blocks alternate between two accumulators; offsets are summed 8 blocks at a time),
 * so a result never depends on the batch around it. */
TM_INLINE void dot_tile(int qtype, int ROWS, wrow w, int64_t nb, const int8_t *y,
                        const float *dx, const float *sy, float *out, int64_t ldo) {
#if TM_AVX2
    __m256 even[4], odd[4], off[4];
    float off_tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float sc[4][8] __attribute__((aligned(32)));
    for (int r = 0; r < ROWS; r++) even[r] = odd[r] = off[r] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) {  /* 8 blocks: their scales in one vector */
        const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.d + b)));
        __m256 m8 = _mm256_setzero_ps();
        if (qtype == TM_Q4_1) m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w.m + b)));
        if (qtype == TM_Q4_0) m8 = _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));
        for (int r = 0; r < ROWS; r++) {
            const int64_t i = r * nb + b;
            _mm256_store_ps(sc[r], _mm256_mul_ps(d8, _mm256_loadu_ps(dx + i)));
            if (qtype != TM_Q8_0) off[r] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(sy + i), off[r]);
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i q = block_ints(qtype, w, b + j);
            for (int r = 0; r < ROWS; r++) {
                const __m256 p = block_int_dot(qtype, q, y + (r * nb + b + j) * 32);
                const __m256 s = _mm256_broadcast_ss(&sc[r][j]);
                if (j & 1)
                    odd[r] = _mm256_fmadd_ps(s, p, odd[r]);
                else
                    even[r] = _mm256_fmadd_ps(s, p, even[r]);
            }
        }
    }
    for (; b < nb; b++) {  /* the last nb % 8 blocks */
        float d, m;
        block_affine(qtype, w, b, &d, &m);
        const __m256i q = block_ints(qtype, w, b);
        for (int r = 0; r < ROWS; r++) {
            const int64_t i = r * nb + b;
            const __m256 p = block_int_dot(qtype, q, y + i * 32);
            const __m256 s = _mm256_set1_ps(d * dx[i]);
            if (b & 1)
                odd[r] = _mm256_fmadd_ps(s, p, odd[r]);
            else
                even[r] = _mm256_fmadd_ps(s, p, even[r]);
            off_tail[r] += m * sy[i];
        }
    }
    for (int r = 0; r < ROWS; r++)
        out[r * ldo] = hsum(_mm256_add_ps(even[r], odd[r])) + (hsum(off[r]) + off_tail[r]);
#else
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, off[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < nb; b++) {
        float d, m;
        int q[32];
        block_affine(qtype, w, b, &d, &m);
        block_ints_scalar(qtype, w.ints + b * int_bytes(qtype), q);
        for (int r = 0; r < ROWS; r++) {
            const int64_t i = r * nb + b;
            int dot = 0;
            for (int j = 0; j < 32; j++) dot += q[j] * y[i * 32 + j];
            acc[r] += d * dx[i] * (float)dot;
            off[r] += m * sy[i];
        }
    }
    for (int r = 0; r < ROWS; r++) out[r * ldo] = acc[r] + off[r];
#endif
}

#if TM_VNNI
/* y[m, n0..n0+15] for ROWS consecutive activation rows and one group of 16 weight rows
 * (interleaved layout). Each row's numbers take the same operations in the same order
 * whatever ROWS is, so a result never depends on the batch around it. Per block and
 * row: two chains of 4 vpdpbusd (weight chunks against broadcast activation dwords),
 * their sum converted to float, times d * dx; offsets m * sy in a second accumulator. */
TM_INLINE void vnni_tile(int qtype, int ROWS, const uint8_t *grp, int64_t nb, const int8_t *y,
                         const float *dx, const float *sy, const int32_t *ys, float *out,
                         int64_t ldo) {
    const int64_t rec_bytes = TM_GROUP * block_bytes(qtype);
    const int chunks = int_bytes(qtype) / 4;  /* 64-byte chunks of integers: 4 or 8 */
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[4], off[4];
    for (int r = 0; r < ROWS; r++) acc[r] = off[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *rec = grp + b * rec_bytes;
        __m512i wq[8];
        if (qtype == TM_Q8_0) {
            for (int c = 0; c < 8; c++) wq[c] = _mm512_loadu_si512(rec + 64 * c);
        } else {
            for (int c = 0; c < 4; c++) {
                const __m512i raw = _mm512_loadu_si512(rec + 64 * c);
                wq[c] = _mm512_and_si512(raw, low);
                wq[c + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
            }
        }
        const uint16_t *dm = (const uint16_t *)(rec + 64 * chunks);
        const __m512 d16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)dm));
        __m512 m16 = _mm512_setzero_ps();
        if (qtype == TM_Q4_1)
            m16 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dm + TM_GROUP)));
        if (qtype == TM_Q4_0) m16 = _mm512_mul_ps(d16, _mm512_set1_ps(-8.0f));
        for (int r = 0; r < ROWS; r++) {
            const int64_t i = r * nb + b;
            const int32_t *ya = (const int32_t *)(y + i * 32);
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[0], _mm512_set1_epi32(ya[0]));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[4], _mm512_set1_epi32(ya[4]));
            for (int c = 1; c < 4; c++) {
                s0 = _mm512_dpbusd_epi32(s0, wq[c], _mm512_set1_epi32(ya[c]));
                s1 = _mm512_dpbusd_epi32(s1, wq[c + 4], _mm512_set1_epi32(ya[c + 4]));
            }
            __m512i s = _mm512_add_epi32(s0, s1);
            if (qtype == TM_Q8_0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(128 * ys[i]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d16, _mm512_set1_ps(dx[i])),
                                     acc[r]);
            if (qtype != TM_Q8_0) off[r] = _mm512_fmadd_ps(m16, _mm512_set1_ps(sy[i]), off[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) _mm512_storeu_ps(out + r * ldo, _mm512_add_ps(acc[r], off[r]));
}
#endif

#if TM_VNNI256
/* vnni_tile with AVX-VNNI: each 64-byte chunk as two halves of 8 rows (lanes), one half
 * after the other so that 16 registers suffice; per row and half, the offsets go into the
 * same accumulator after the block's product. ROWS <= 2. Like vnni_tile, a row's numbers
 * do not depend on ROWS. */
TM_INLINE void vnni_tile_256(int qtype, int ROWS, const uint8_t *grp, int64_t nb,
                             const int8_t *y, const float *dx, const float *sy,
                             const int32_t *ys, float *out, int64_t ldo) {
    const int64_t rec_bytes = TM_GROUP * block_bytes(qtype);
    const int chunks = int_bytes(qtype) / 4;
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[2][2];
    for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *rec = grp + b * rec_bytes;
        const uint16_t *dm = (const uint16_t *)(rec + 64 * chunks);
        for (int half = 0; half < 2; half++) {
            __m256i wq[8];
            if (qtype == TM_Q8_0) {
                for (int c = 0; c < 8; c++)
                    wq[c] = _mm256_loadu_si256((const __m256i *)(rec + 64 * c + 32 * half));
            } else {
                for (int c = 0; c < 4; c++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(rec + 64 * c + 32 * half));
                    wq[c] = _mm256_and_si256(raw, low);
                    wq[c + 4] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                }
            }
            const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + 8 * half)));
            __m256 m8 = _mm256_setzero_ps();
            if (qtype == TM_Q4_1)
                m8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + TM_GROUP + 8 * half)));
            if (qtype == TM_Q4_0) m8 = _mm256_mul_ps(d8, _mm256_set1_ps(-8.0f));
            for (int r = 0; r < ROWS; r++) {
                const int64_t i = r * nb + b;
                const int32_t *ya = (const int32_t *)(y + i * 32);
                __m256i s0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wq[0], _mm256_set1_epi32(ya[0]));
                __m256i s1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), wq[4], _mm256_set1_epi32(ya[4]));
                for (int c = 1; c < 4; c++) {
                    s0 = _mm256_dpbusd_avx_epi32(s0, wq[c], _mm256_set1_epi32(ya[c]));
                    s1 = _mm256_dpbusd_avx_epi32(s1, wq[c + 4], _mm256_set1_epi32(ya[c + 4]));
                }
                __m256i sum = _mm256_add_epi32(s0, s1);
                if (qtype == TM_Q8_0) sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(128 * ys[i]));
                __m256 a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                           _mm256_mul_ps(d8, _mm256_set1_ps(dx[i])), acc[r][half]);
                if (qtype != TM_Q8_0) a = _mm256_fmadd_ps(m8, _mm256_set1_ps(sy[i]), a);
                acc[r][half] = a;
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        _mm256_storeu_ps(out + r * ldo, acc[r][0]);
        _mm256_storeu_ps(out + r * ldo + 8, acc[r][1]);
    }
}
#endif

/* y[m, n] (row stride ldy) for the N rows of W, from activations rounded as above. Every
 * thread of the enclosing parallel region calls it; it shares the rows among them and
 * does not wait for the others at the end. */
TM_INLINE int rows_impl(int qtype, const uint8_t *w, int64_t N, int64_t K, int64_t M,
                        const int8_t *yq, const float *dx, const float *sy,
                        const int32_t *ys, float *y, int64_t ldy) {
    const int64_t nb = K / 32;
#if TM_INTERLEAVE
    if (interleaved(N)) {
        const int64_t group_bytes = nb * TM_GROUP * block_bytes(qtype);
#if TM_VNNI
#define TM_TILE vnni_tile
        const int tile = 4;
#else
#define TM_TILE vnni_tile_256
        const int tile = 2;
#endif
#pragma omp for schedule(static) nowait
        for (int64_t g = 0; g < N / TM_GROUP; g++) {
            const uint8_t *grp = w + g * group_bytes;
            float *yg = y + g * TM_GROUP;
            int64_t m = 0;
            for (; m + tile <= M; m += tile)
                TM_TILE(qtype, tile, grp, nb, yq + m * K, dx + m * nb, sy + m * nb,
                        ys + m * nb, yg + m * ldy, ldy);
            for (; m < M; m++)
                TM_TILE(qtype, 1, grp, nb, yq + m * K, dx + m * nb, sy + m * nb,
                        ys + m * nb, yg + m * ldy, ldy);
        }
#undef TM_TILE
        return 0;
    }
#else
    (void)ys;
#endif
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        const wrow row = row_at(qtype, w, n, nb);
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            dot_tile(qtype, 4, row, nb, yq + m * K, dx + m * nb, sy + m * nb,
                     y + m * ldy + n, ldy);
        for (; m < M; m++)
            dot_tile(qtype, 1, row, nb, yq + m * K, dx + m * nb, sy + m * nb,
                     y + m * ldy + n, ldy);
    }
    return 0;
}

/* One segment: its type's kernel, here or in matmul_stored.c. */
static void segment_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, int64_t M,
                         const int8_t *yq, const float *dx, const float *sy,
                         const int32_t *ys, float *y, int64_t ldy) {
    if (stored_weights(qtype)) {
        tm_stored_rows(qtype, w, N, K, M, yq, dx, sy, y, ldy);
        return;
    }
    switch (qtype) {  /* TM_BY_QTYPE without its return */
    case TM_Q4_0: rows_impl(TM_Q4_0, w, N, K, M, yq, dx, sy, ys, y, ldy); break;
    case TM_Q4_1: rows_impl(TM_Q4_1, w, N, K, M, yq, dx, sy, ys, y, ldy); break;
    case TM_Q8_0: rows_impl(TM_Q8_0, w, N, K, M, yq, dx, sy, ys, y, ldy); break;
    default: break;
    }
}

/* Can this build multiply a [., K] matrix of this type? */
static int known_type(int qtype, int64_t K) {
    const int sw = stored_weights(qtype);
    if (sw) return K % sw == 0;
    return block_bytes(qtype) && K % 32 == 0;
}

/* y[M, N] = x[M, K] @ W[N, K]^T, W the segments of w stacked (N = their rows), x rounded
 * as above (once for all segments). Returns 0, or -1 for an unknown type, a K that is not
 * whole blocks or a bad segment count, -2 when out of memory. */
int tm_gemm_weight(const tm_weight *w, const float *x, int64_t M, int64_t K, float *y) {
    if (w->nseg < 1 || w->nseg > TM_MAX_SEGMENTS || K % 32) return -1;
    int64_t N = 0;
    for (int64_t s = 0; s < w->nseg; s++) {
        if (!known_type((int)w->seg[s].qtype, K) || w->seg[s].rows < 0) return -1;
        N += w->seg[s].rows;
    }
    const int64_t nb = K / 32;
    int8_t *yq = (int8_t *)malloc((size_t)(M * K) + 1);
    float *dx = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
    float *sy = (float *)malloc((size_t)(M * nb + 1) * sizeof(float));
    int32_t *ys = (int32_t *)malloc((size_t)(M * nb + 1) * sizeof(int32_t));
    if (!yq || !dx || !sy || !ys) {
        free(yq), free(dx), free(sy), free(ys);
        return -2;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_act_row(x + m * K, K, yq + m * K, dx + m * nb, sy + m * nb, ys + m * nb);
        int64_t first = 0;
        for (int64_t s = 0; s < w->nseg; s++) {
            segment_rows((int)w->seg[s].qtype, w->seg[s].data, w->seg[s].rows, K, M, yq, dx,
                         sy, ys, y + first, N);
            first += w->seg[s].rows;
        }
    }
    free(yq), free(dx), free(sy), free(ys);
    return 0;
}

/* y[M, N] = x[M, K] @ W[N, K]^T for one matrix of one type. */
int tm_gemm(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
            float *y) {
    tm_weight one;
    memset(&one, 0, sizeof one);
    one.nseg = 1;
    one.seg[0].qtype = qtype;
    one.seg[0].data = w;
    one.seg[0].rows = N;
    return tm_gemm_weight(&one, x, M, K, y);
}

/* x rounded to 8 bits per block exactly as tm_gemm rounds it, back in float32. */
int tm_round_activations(const float *x, int64_t M, int64_t K, float *out) {
    if (K % 32) return -1;
#pragma omp parallel
    {
        int8_t yq[32];
        float dx, sy;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * (K / 32); i++) {
            quantize_act_row(x + i * 32, 32, yq, &dx, &sy, NULL);
            for (int j = 0; j < 32; j++) out[i * 32 + j] = dx * (float)yq[j];
        }
    }
    return 0;
}

/* out[N, K] = W as float32. */
TM_INLINE int dequant_impl(int qtype, const uint8_t *w, int64_t N, int64_t K, float *out) {
    if (!block_bytes(qtype) || K % 32) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) decode_row(qtype, w, N, K / 32, n, out + n * K);
    return 0;
}

int tm_dequant(int qtype, const uint8_t *w, int64_t N, int64_t K, float *out) {
    const int sw = stored_weights(qtype);
    if (sw) {
        if (K % sw) return -1;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) tm_stored_decode_row(qtype, w, K, n, out + n * K);
        return 0;
    }
    TM_BY_QTYPE(qtype, dequant_impl(QT, w, N, K, out));
}

/* out[i, :] = row ids[i] of W [N, K] as float32 (an embedding lookup). Returns -3 for
 * an id outside [0, N). */
TM_INLINE int dequant_rows_impl(int qtype, const uint8_t *w, int64_t N, int64_t K,
                                const int64_t *ids, int64_t n, float *out) {
    if (!block_bytes(qtype) || K % 32) return -1;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N) return -3;
    for (int64_t i = 0; i < n; i++) decode_row(qtype, w, N, K / 32, ids[i], out + i * K);
    return 0;
}

int tm_dequant_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, const int64_t *ids,
                    int64_t n, float *out) {
    const int sw = stored_weights(qtype);
    if (sw) {
        if (K % sw) return -1;
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= N) return -3;
        for (int64_t i = 0; i < n; i++) tm_stored_decode_row(qtype, w, K, ids[i], out + i * K);
        return 0;
    }
    TM_BY_QTYPE(qtype, dequant_rows_impl(QT, w, N, K, ids, n, out));
}
