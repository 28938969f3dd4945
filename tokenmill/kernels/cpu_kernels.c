/* tokenmill's CPU kernels: matrix products with weights kept in llama.cpp's block formats
 * (Q4_0, Q4_1, Q8_0), and decode attention over the paged KV cache.
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
 * instruction instead of converting two fp16 numbers per block.
 *
 * The weights are used exactly as stored. The activations are rounded to 8 bits per
 * block of 32 (one float scale each, as llama.cpp does), so a block's product is an
 * exact integer dot product of 32 byte pairs (vpmaddubsw + vpmaddwd). A decode step (one
 * row) reads 0.56-1.06 bytes per weight instead of 4, and on a CPU that is what bounds
 * its speed.
 *
 *   tm_gemm(qtype, x[M,K], w, N, y[M,N]):  y = x @ W^T, parallel over output rows (OpenMP,
 *       sharing the runtime torch loaded), 4 activation rows per pass over a weight row.
 *   tm_round_activations(x[M,K], out): x rounded as tm_gemm rounds it (the reference
 *       of the tests).
 *   tm_dequant(qtype, w, N, K, out[N,K]): the weights as float32.
 *   tm_paged_decode_attention(...), fused element-wise ops, tm_decode_layer (a whole
 *       decoder layer for decode steps), tm_apply_token_bitmask (structured outputs):
 *       see their comments below.
 *
 * Built at run time by tokenmill/kernels/cpu.py with the machine's C compiler
 * (-O3 -march=native -fopenmp). AVX2+FMA+F16C code where the compiler targets them,
 * portable C otherwise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TM_AVX2 1
#else
#define TM_AVX2 0
#endif
#if TM_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TM_VNNI 1
#else
#define TM_VNNI 0
#endif
/* AVX-VNNI without AVX-512 (Intel client CPUs since Alder Lake): the same layout, the
 * same dot products 256 bits wide. */
#if !TM_VNNI && TM_AVX2 && defined(__AVXVNNI__)
#define TM_VNNI256 1
#else
#define TM_VNNI256 0
#endif
#define TM_INTERLEAVE (TM_VNNI || TM_VNNI256)

#define TM_INLINE static inline __attribute__((always_inline))

enum { TM_Q4_0 = 2, TM_Q4_1 = 3, TM_Q8_0 = 8 }; /* ggml type ids */

/* return `call` (naming QT) with QT the constant type id: one inlined copy per type, so
 * the block decoding has constant offsets and no branches; -1 for an unknown type. */
#define TM_BY_QTYPE(qtype, call)                                       \
    switch (qtype) {                                                   \
    case TM_Q4_0: { const int QT = TM_Q4_0; return call; }             \
    case TM_Q4_1: { const int QT = TM_Q4_1; return call; }             \
    case TM_Q8_0: { const int QT = TM_Q8_0; return call; }             \
    default: return -1;                                                \
    }

int tm_abi_version(void) { return 7; }
int tm_has_avx2(void) { return TM_AVX2; }
int tm_has_vnni(void) { return TM_VNNI; }
int tm_has_avx_vnni(void) { return TM_VNNI256; }

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

static float f16_to_f32(uint16_t h) {
#if TM_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

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

/* ---- Weights for AVX-512 VNNI: groups of 16 rows, interleaved ----
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

int tm_pack_layout(int qtype, uint8_t *w, int64_t N, int64_t K) {
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
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* y[M, N] = x[M, K] @ W[N, K]^T with x rounded as above. Returns 0, or -1 for an unknown
 * type or K % 32 != 0, -2 when out of memory. */
TM_INLINE int gemm_impl(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w,
                        int64_t N, float *y) {
    if (!block_bytes(qtype) || K % 32) return -1;
    const int64_t nb = K / 32;
    int8_t *yq = (int8_t *)malloc((size_t)(M * K));
    float *dx = (float *)malloc((size_t)(M * nb) * sizeof(float));
    float *sy = (float *)malloc((size_t)(M * nb) * sizeof(float));
    int32_t *ys = (int32_t *)malloc((size_t)(M * nb) * sizeof(int32_t));
    if (!yq || !dx || !sy || !ys) {
        free(yq), free(dx), free(sy), free(ys);
        return -2;
    }
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_act_row(x + m * K, K, yq + m * K, dx + m * nb, sy + m * nb, ys + m * nb);
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
#pragma omp for schedule(static)
            for (int64_t g = 0; g < N / TM_GROUP; g++) {
                const uint8_t *grp = w + g * group_bytes;
                float *yg = y + g * TM_GROUP;
                int64_t m = 0;
                for (; m + tile <= M; m += tile)
                    TM_TILE(qtype, tile, grp, nb, yq + m * K, dx + m * nb, sy + m * nb,
                            ys + m * nb, yg + m * N, N);
                for (; m < M; m++)
                    TM_TILE(qtype, 1, grp, nb, yq + m * K, dx + m * nb, sy + m * nb,
                            ys + m * nb, yg + m * N, N);
            }
#undef TM_TILE
        } else
#endif
        {
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                const wrow row = row_at(qtype, w, n, nb);
                int64_t m = 0;
                for (; m + 4 <= M; m += 4)
                    dot_tile(qtype, 4, row, nb, yq + m * K, dx + m * nb, sy + m * nb,
                             y + m * N + n, N);
                for (; m < M; m++)
                    dot_tile(qtype, 1, row, nb, yq + m * K, dx + m * nb, sy + m * nb,
                             y + m * N + n, N);
            }
        }
    }
    free(yq), free(dx), free(sy), free(ys);
    return 0;
}

/* y[M, N] = x[M, K] @ W[N, K]^T. */
int tm_gemm(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
            float *y) {
    TM_BY_QTYPE(qtype, gemm_impl(QT, x, M, K, w, N, y));
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
    TM_BY_QTYPE(qtype, dequant_rows_impl(QT, w, N, K, ids, n, out));
}

/* Decode attention straight from the paged KV cache (float32), one query token per
 * row: out[s, h] = softmax(scale * q[s, h] . K_s^T) V_s over the seq_lens[s] cached
 * positions of row s, found through its block table (position t lives in slot
 * table[t / block_size] * block_size + t % block_size). Query heads h share KV head
 * h / (H / KVH) (grouped-query attention). Parallel over (row, query head); nothing is
 * gathered or padded, so a step costs what its rows' lengths cost. Prefill rows use it
 * too (a row per position, seq_lens = position + 1): each (row, head) is computed by the
 * same code in the same order whatever the other rows are, so a position's output does
 * not depend on how the prompt was split into steps.
 *
 * With AVX-512 and D % 16 == 0 (D <= 128): one job per (row, KV head), all the query
 * heads of the group at once, so each K/V row is fetched from memory once; see
 * attend_group_512. Measured (2 cores, 32 sequences x 160 positions, 9 heads over 3 KV
 * heads, D = 64, 30 layers' caches): 18.7-21 ms per step per (row, head) job, 8.7-9.2 ms
 * so; with the V prefetch 8.3-8.7 ms, float16 caches 6.5-6.9 ms.
 * The cache is float32, or float16 (kv_f16: converted as it is read, half the bytes).
 * Otherwise one job per (row, KV head) too, its query heads one after the other (the later
 * ones find the rows in the core's caches), the next block's K and V rows prefetched
 * (AVX2 build, same benchmark: 20.3-20.7 -> 12.5-14.1 ms; float16 16.4-17.7 -> 8.9-9.4).
 * With AVX2 and D % 8 == 0: dot products as 8-wide FMA chains in a fixed order, the
 * exponentials by a vectorized polynomial (Cephes' expf, ~1 ulp), V accumulated in
 * registers 64 dims at a time and scaled by 1/sum at the end. Otherwise plain C. */
#if TM_AVX2
/* Cephes' expf: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts),
 * e^r by a degree-5 polynomial; the AVX2 and AVX-512 versions below share these. */
#define TM_LOG2E 1.44269504088896341f
#define TM_LN2_HI 0.693359375f
#define TM_LN2_LO -2.12194440e-4f
#define TM_EXP_P0 1.9875691500e-4f
#define TM_EXP_P1 1.3981999507e-3f
#define TM_EXP_P2 8.3334519073e-3f
#define TM_EXP_P3 4.1665795894e-2f
#define TM_EXP_P4 1.6666665459e-1f
#define TM_EXP_P5 5.0000001201e-1f

/* e^x for x <= 88 (softmax arguments are <= 0), 8 at a time; 0 below -87. */
TM_INLINE __m256 exp_neg_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(TM_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(TM_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(TM_LN2_LO), r);
    __m256 y = _mm256_set1_ps(TM_EXP_P0);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(TM_EXP_P1));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(TM_EXP_P2));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(TM_EXP_P3));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(TM_EXP_P4));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(TM_EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

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
            if (end < len) {  /* the next block's V rows (see attend_group_512) */
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
/* The AVX-512 version of exp_neg_ps (x <= 88): 16 at a time, the same polynomial. */
TM_INLINE __m512 exp_neg_512(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(TM_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(TM_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(TM_LN2_LO), r);
    __m512 y = _mm512_set1_ps(TM_EXP_P0);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(TM_EXP_P1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(TM_EXP_P2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(TM_EXP_P3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(TM_EXP_P4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(TM_EXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n),
                                                         _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps((__mmask16)~under, y, _mm512_castsi512_ps(e));
}

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
 * (the rows of a block are strided and the blocks scattered, so the hardware prefetcher
 * misses them: 30 layers x 32 sequences x 160 positions took 9.1-10.3 ms with the K
 * prefetch alone, 8.3-8.7 with both; float16 caches 8.7-9.0 and 6.5-6.9 ms). Each
 * head's numbers take the same operations whatever G, the row and the batch are.
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

/* ---- Small fused element-wise ops of a decoder layer (float32, rows of a flat batch).
 * Each replaces 3-8 separate torch ops, which at batch 1 cost more in dispatch than in
 * arithmetic. ---- */

/* RMSNorm, optionally after the residual add: with residual != NULL, residual += x (in
 * place) and out = norm(residual) * w; else out = norm(x) * w.
 * norm(v) = v / sqrt(mean(v^2) + eps). */
void tm_rms_norm(const float *x, float *residual, const float *w, int64_t T, int64_t N,
                 float eps, float *out) {
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * N;
        float *src = (float *)xr;
        if (residual) {
            src = residual + t * N;
#pragma omp simd
            for (int64_t i = 0; i < N; i++) src[i] += xr[i];
        }
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < N; i++) ss += src[i] * src[i];
        const float r = 1.0f / sqrtf(ss / (float)N + eps);
        float *o = out + t * N;
#pragma omp simd
        for (int64_t i = 0; i < N; i++) o[i] = w[i] * (src[i] * r);
    }
}

/* Rotary embedding in place, rotate-half layout: for each of the first `heads` heads
 * (D wide) of row t of x (rows `row_stride` apart), dims (i, i + D/2) are rotated by the
 * angle whose cos/sin are cos_table[pos[t] * D/2 + i], sin_table[...]. */
void tm_rope(float *x, int64_t T, int64_t row_stride, int64_t heads, int64_t D,
             const int64_t *pos, const float *cos_table, const float *sin_table) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_table + pos[t] * half, *s = sin_table + pos[t] * half;
        for (int64_t h = 0; h < heads; h++) {
            float *a = x + t * row_stride + h * D, *b = a + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* out[t, i] = silu(x[t, i]) * x[t, I + i] for x = [gate | up] of width 2I; silu(g) =
 * g / (1 + e^-g), e^-g by the vectorized polynomial (its argument clamped at 88, where
 * silu is ~0 anyway). */
void tm_silu_and_mul(const float *x, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        int64_t i = 0;
#if TM_VNNI
        for (; i + 16 <= I; i += 16) {
            const __m512 gi = _mm512_loadu_ps(g + i);
            const __m512 e = exp_neg_512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gi),
                                                       _mm512_set1_ps(88.0f)));
            _mm512_storeu_ps(o + i, _mm512_mul_ps(_mm512_div_ps(gi, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                                  _mm512_loadu_ps(u + i)));
        }
#endif
#if TM_AVX2
        for (; i + 8 <= I; i += 8) {
            const __m256 gi = _mm256_loadu_ps(g + i);
            const __m256 e = exp_neg_ps(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), gi),
                                                      _mm256_set1_ps(88.0f)));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gi, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                  _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* cache[at .. at + n) = src, as float32 or (f16) float16 rounded to nearest even (as
 * torch's .half() rounds, so the Python path and this one store the same bits). */
static void store_kv_row(void *cache, int64_t at, const float *src, int64_t n, int f16) {
    if (!f16) {
        memcpy((float *)cache + at, src, (size_t)n * sizeof(float));
        return;
    }
#if TM_AVX2
    uint16_t *dst = (uint16_t *)cache + at;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
#endif
}

/* ---- One whole decoder layer for a step of decodes (one new token per sequence) ----
 * The same kernels in the same order as the Python layer code calls them (so the
 * results are bit-identical), without ~15 Python-level calls per layer, which at batch 1
 * cost as much as the arithmetic:
 *   residual += x (first layer: residual = x); h = rmsnorm(residual) * ln1
 *   qkv = h @ Wqkv^T; rotary on the q and k heads; k, v -> cache slots
 *   a = paged decode attention(q); residual += a @ Wo^T; h = rmsnorm(residual) * ln2
 *   x = silu_and_mul(h @ Wgate_up^T) @ Wdown^T
 * x [T, H] is read as the layer input and overwritten with its output; the KV cache is
 * float32, or float16 with kv_f16 (AVX2 builds). Returns 0, or a negative code from a
 * kernel. */
int tm_decode_layer(int64_t T, int64_t H, int64_t NH, int64_t KVH, int64_t D, int64_t I,
                    float *x, float *residual, int first, const float *ln1,
                    const float *ln2, float eps, int qt_qkv, const uint8_t *w_qkv, int qt_o,
                    const uint8_t *w_o, int qt_gu, const uint8_t *w_gu, int qt_down,
                    const uint8_t *w_down, const int64_t *positions, const float *cos_table,
                    const float *sin_table, void *k_cache, void *v_cache,
                    const int64_t *slots, const int64_t *block_table, int64_t max_blocks,
                    const int64_t *seq_lens, int64_t block_size, float scale, int kv_f16) {
    if (kv_f16 && !TM_AVX2) return -1;
    const int64_t W = (NH + 2 * KVH) * D, widest = W > 2 * I ? W : 2 * I;
    float *h = (float *)malloc((size_t)(T * H) * sizeof(float));
    float *big = (float *)malloc((size_t)(T * widest) * sizeof(float));
    float *q = (float *)malloc((size_t)(T * NH * D) * sizeof(float));
    float *att = (float *)malloc((size_t)(T * (NH * D > I ? NH * D : I)) * sizeof(float));
    int rc = -2;
    if (!h || !big || !q || !att) goto done;
    if (first) {
        memcpy(residual, x, (size_t)(T * H) * sizeof(float));
        tm_rms_norm(residual, NULL, ln1, T, H, eps, h);
    } else {
        tm_rms_norm(x, residual, ln1, T, H, eps, h);
    }
    if ((rc = tm_gemm(qt_qkv, h, T, H, w_qkv, W, big))) goto done;
    tm_rope(big, T, W, NH + KVH, D, positions, cos_table, sin_table);
    for (int64_t t = 0; t < T; t++) {
        const float *row = big + t * W;
        memcpy(q + t * NH * D, row, (size_t)(NH * D) * sizeof(float));
        store_kv_row(k_cache, slots[t] * KVH * D, row + NH * D, KVH * D, kv_f16);
        store_kv_row(v_cache, slots[t] * KVH * D, row + (NH + KVH) * D, KVH * D, kv_f16);
    }
    if ((rc = tm_paged_decode_attention(q, k_cache, v_cache, block_table, max_blocks, seq_lens,
                                        T, NH, KVH, D, block_size, scale, att, kv_f16)))
        goto done;
    if ((rc = tm_gemm(qt_o, att, T, NH * D, w_o, H, x))) goto done;
    tm_rms_norm(x, residual, ln2, T, H, eps, h);
    if ((rc = tm_gemm(qt_gu, h, T, H, w_gu, 2 * I, big))) goto done;
    tm_silu_and_mul(big, T, I, att);
    rc = tm_gemm(qt_down, att, T, I, w_down, H, x);
done:
    free(h), free(big), free(q), free(att);
    return rc;
}

/* Every layer of a decode step in one call (a ctypes call with ~30 arguments costs ~9 us,
 * a tenth of a layer at batch 1). Row l of `layers` [L, 14] holds layer l's pointers
 * and types: ln1, ln2, (qtype, weight) for qkv, o, gate_up, down, cos, sin, k/v cache.
 * Each layer is exactly tm_decode_layer's; the first gets first = 1. */
int tm_decode_layers(int64_t L, const int64_t *layers, int64_t T, int64_t H, int64_t NH,
                     int64_t KVH, int64_t D, int64_t I, float *x, float *residual, float eps,
                     const int64_t *positions, const int64_t *slots,
                     const int64_t *block_table, int64_t max_blocks, const int64_t *seq_lens,
                     int64_t block_size, float scale, int kv_f16) {
    for (int64_t l = 0; l < L; l++) {
        const int64_t *p = layers + 14 * l;
#define TM_PTR(i) ((void *)(intptr_t)p[i])
        const int rc = tm_decode_layer(
            T, H, NH, KVH, D, I, x, residual, l == 0, TM_PTR(0), TM_PTR(1), eps,
            (int)p[2], TM_PTR(3), (int)p[4], TM_PTR(5), (int)p[6], TM_PTR(7), (int)p[8],
            TM_PTR(9), positions, TM_PTR(10), TM_PTR(11), TM_PTR(12), TM_PTR(13), slots,
            block_table, max_blocks, seq_lens, block_size, scale, kv_f16);
#undef TM_PTR
        if (rc) return rc;
    }
    return 0;
}

/* ---- Structured outputs: logits[rows[i], t] = -inf where bit t of bitmask[rows[i]] is 0
 * (32 tokens per int32 word, lowest bit first: xgrammar's layout). Rows whose words are
 * all ones (everything allowed) cost one comparison per 32 tokens. ---- */
void tm_apply_token_bitmask(float *logits, int64_t logits_stride, const int32_t *bitmask,
                            int64_t words, const int64_t *rows, int64_t n, int64_t vocab) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *row = logits + rows[i] * logits_stride;
        const int32_t *mask = bitmask + rows[i] * words;
        for (int64_t w = 0; w < words && w * 32 < vocab; w++) {
            const uint32_t bits = (uint32_t)mask[w];
            if (bits == 0xFFFFFFFFu) continue;
            const int64_t end = w * 32 + 32 < vocab ? 32 : vocab - w * 32;
            for (int64_t b = 0; b < end; b++)
                if (!((bits >> b) & 1u)) row[w * 32 + b] = -INFINITY;
        }
    }
}
