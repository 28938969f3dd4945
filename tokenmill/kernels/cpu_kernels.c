/* tokenmill's CPU kernels: matrix products with weights kept in llama.cpp's block formats
 * (Q4_0, Q4_1, Q8_0), and decode attention over the paged KV cache.
 *
 * A weight matrix [N, K] is N rows of K/32 blocks; a block holds 32 weights as small
 * integers plus fp16 scale(s):
 *   Q4_0  18 bytes: d, 16 bytes of nibbles;          w = d * (q - 8)
 *   Q4_1  20 bytes: d, m, 16 bytes of nibbles;       w = d * q + m
 *   Q8_0  34 bytes: d, 32 signed bytes;              w = d * q
 * Nibble j of a Q4 block (low half of byte j) is weight j, the high half weight j + 16.
 *
 * The activations stay float32 and each weight is decoded to the same float32 value the
 * torch dequantizer produces, so the products differ from "dequantize, then F.linear"
 * only in summation order. Decoding happens in registers, block by block: a decode
 * step (batch of one row) reads 0.56-1.06 bytes per weight instead of 4, and on a CPU
 * that is what bounds its speed.
 *
 *   tm_gemm(qtype, x[M,K], w, N, y[M,N]):  y = x @ W^T, parallel over output rows (OpenMP,
 *       sharing the runtime torch loaded). M = 1 decodes and multiplies in registers;
 *       M > 1 decodes each weight row once into an L1 buffer and reuses it for 4 rows of
 *       x at a time.
 *   tm_dequant(qtype, w, N, K, out[N,K]): the dense float32 matrix (large batches use
 *       it, then a BLAS GEMM).
 *   tm_paged_decode_attention(...): see its comment at the end of the file.
 *
 * Built at run time by tokenmill/kernels/cpu.py with the machine's C compiler
 * (-O3 -march=native -fopenmp). AVX2+FMA+F16C code where the compiler targets them,
 * portable C otherwise.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TM_AVX2 1
#else
#define TM_AVX2 0
#endif

enum { TM_Q4_0 = 2, TM_Q4_1 = 3, TM_Q8_0 = 8 }; /* ggml type ids */

int tm_abi_version(void) { return 1; }
int tm_has_avx2(void) { return TM_AVX2; }

static int block_bytes(int qtype) {
    switch (qtype) {
    case TM_Q4_0: return 18;
    case TM_Q4_1: return 20;
    case TM_Q8_0: return 34;
    default: return 0;
    }
}

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

static uint16_t load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* Scale and offset of a block: w = scale * q + offset, q as stored (unsigned nibble or
 * signed byte). */
static void block_affine(int qtype, const uint8_t *b, float *scale, float *offset) {
    float d = f16_to_f32(load_u16(b));
    *scale = d;
    *offset = qtype == TM_Q4_1 ? f16_to_f32(load_u16(b + 2)) : qtype == TM_Q4_0 ? -8.0f * d : 0.0f;
}

/* Portable decode of one block into 32 floats. */
static void decode_block_scalar(int qtype, const uint8_t *b, float *out) {
    float s, o;
    block_affine(qtype, b, &s, &o);
    if (qtype == TM_Q8_0) {
        const int8_t *q = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) out[j] = (float)q[j] * s;
        return;
    }
    const uint8_t *q = b + (qtype == TM_Q4_1 ? 4 : 2);
    for (int j = 0; j < 16; j++) {
        out[j] = (float)(q[j] & 0x0F) * s + o;
        out[j + 16] = (float)(q[j] >> 4) * s + o;
    }
}

#if TM_AVX2
/* One block -> four vectors of 8 floats (weights 0-7, 8-15, 16-23, 24-31). */
static inline void decode_block_avx2(int qtype, const uint8_t *b, __m256 w[4]) {
    float s, o;
    block_affine(qtype, b, &s, &o);
    const __m256 vs = _mm256_set1_ps(s), vo = _mm256_set1_ps(o);
    if (qtype == TM_Q8_0) {
        const uint8_t *q = b + 2;
        for (int i = 0; i < 4; i++) {
            __m128i raw = _mm_loadl_epi64((const __m128i *)(q + 8 * i));
            w[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)), vs);
        }
        return;
    }
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadu_si128((const __m128i *)(b + (qtype == TM_Q4_1 ? 4 : 2)));
    __m128i lo = _mm_and_si128(raw, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
    __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; i++)
        w[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), vs, vo);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Decode a whole row of K weights into float32. */
static void decode_row(int qtype, const uint8_t *row, int64_t K, float *out) {
    const int bb = block_bytes(qtype);
    for (int64_t k = 0; k < K; k += 32, row += bb) {
#if TM_AVX2
        __m256 w[4];
        decode_block_avx2(qtype, row, w);
        for (int i = 0; i < 4; i++) _mm256_storeu_ps(out + k + 8 * i, w[i]);
#else
        decode_block_scalar(qtype, row, out + k);
#endif
    }
}

/* One weight row times one activation row, decoding in registers. */
static float dot_row(int qtype, const uint8_t *row, const float *x, int64_t K) {
    const int bb = block_bytes(qtype);
#if TM_AVX2
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t k = 0; k < K; k += 32, row += bb) {
        __m256 w[4];
        decode_block_avx2(qtype, row, w);
        for (int i = 0; i < 4; i++)
            acc[i] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + k + 8 * i), acc[i]);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#else
    float w[32], acc = 0.0f;
    for (int64_t k = 0; k < K; k += 32, row += bb) {
        decode_block_scalar(qtype, row, w);
        for (int j = 0; j < 32; j++) acc += w[j] * x[k + j];
    }
    return acc;
#endif
}

/* A decoded weight row (float32) times up to 4 activation rows: y[r * ldy] = w . x_r. */
static void dot_decoded(const float *w, const float *x, int64_t K, int rows, float *y,
                        int64_t ldy) {
#if TM_AVX2
    if (rows == 4) {
        const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < K; k += 8) {
            __m256 wv = _mm256_loadu_ps(w + k);
            a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), a0);
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + k), a1);
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + k), a2);
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + k), a3);
        }
        y[0] = hsum(a0);
        y[ldy] = hsum(a1);
        y[2 * ldy] = hsum(a2);
        y[3 * ldy] = hsum(a3);
        return;
    }
    for (int r = 0; r < rows; r++) {
        const float *xr = x + r * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int64_t k = 0; k < K; k += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(xr + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
        }
        y[r * ldy] = hsum(_mm256_add_ps(a0, a1));
    }
#else
    for (int r = 0; r < rows; r++) {
        float acc = 0.0f;
        for (int64_t k = 0; k < K; k++) acc += w[k] * x[r * K + k];
        y[r * ldy] = acc;
    }
#endif
}

/* y[M, N] = x[M, K] @ W[N, K]^T. Returns 0, or -1 for an unknown type or K % 32 != 0. */
int tm_gemm(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
            float *y) {
    const int bb = block_bytes(qtype);
    if (!bb || K % 32) return -1;
    const int64_t row_bytes = K / 32 * bb;
    if (M == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) y[n] = dot_row(qtype, w + n * row_bytes, x, K);
        return 0;
    }
    int failed = 0;
#pragma omp parallel
    {
        float *buf = (float *)malloc((size_t)K * sizeof(float));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!buf) continue;
            decode_row(qtype, w + n * row_bytes, K, buf);
            for (int64_t m = 0; m < M; m += 4) {
                int rows = M - m < 4 ? (int)(M - m) : 4;
                dot_decoded(buf, x + m * K, K, rows, y + m * N + n, N);
            }
        }
        free(buf);
    }
    return failed ? -2 : 0;
}

/* out[N, K] = W as float32. */
int tm_dequant(int qtype, const uint8_t *w, int64_t N, int64_t K, float *out) {
    const int bb = block_bytes(qtype);
    if (!bb || K % 32) return -1;
    const int64_t row_bytes = K / 32 * bb;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) decode_row(qtype, w + n * row_bytes, K, out + n * K);
    return 0;
}

/* Decode attention straight from the paged KV cache (float32), one query token per
 * sequence: out[s, h] = softmax(scale * q[s, h] . K_s^T) V_s over the seq_lens[s] cached
 * positions of sequence s, found through its block table (position t lives in slot
 * table[t / block_size] * block_size + t % block_size). Query heads h share KV head
 * h / (H / KVH) (grouped-query attention). Parallel over (sequence, KV head); nothing is
 * gathered or padded, so a step costs what its sequences' lengths cost. */
int tm_paged_decode_attention(const float *q, const float *k_cache, const float *v_cache,
                              const int64_t *block_table, int64_t max_blocks,
                              const int64_t *seq_lens, int64_t n, int64_t H, int64_t KVH,
                              int64_t D, int64_t block_size, float scale, float *out) {
    if (KVH <= 0 || H % KVH) return -1;
    const int64_t group = H / KVH;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < n * KVH; job++) {
            const int64_t s = job / KVH, kvh = job % KVH, len = seq_lens[s];
            if (len > cap) {
                free(scores);
                cap = len;
                scores = (float *)malloc((size_t)(cap * group) * sizeof(float));
            }
            if (!scores) {
#pragma omp atomic write
                failed = 1;
                cap = 0;
                continue;
            }
            const int64_t *table = block_table + s * max_blocks;
            const float *qs = q + (s * H + kvh * group) * D;
            float *os = out + (s * H + kvh * group) * D;
            for (int64_t t = 0; t < len; t++) {
                const int64_t slot = table[t / block_size] * block_size + t % block_size;
                const float *kv = k_cache + (slot * KVH + kvh) * D;
                for (int64_t g = 0; g < group; g++) {
                    const float *qh = qs + g * D;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qh[d] * kv[d];
                    scores[g * len + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *sc = scores + g * len, mx = sc[0], sum = 0.0f;
                for (int64_t t = 1; t < len; t++) mx = sc[t] > mx ? sc[t] : mx;
                for (int64_t t = 0; t < len; t++) {
                    sc[t] = expf(sc[t] - mx);
                    sum += sc[t];
                }
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < len; t++) sc[t] *= inv;
            }
            memset(os, 0, (size_t)(group * D) * sizeof(float));
            for (int64_t t = 0; t < len; t++) {
                const int64_t slot = table[t / block_size] * block_size + t % block_size;
                const float *vv = v_cache + (slot * KVH + kvh) * D;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * len + t];
                    float *o = os + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) o[d] += p * vv[d];
                }
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

/* out[t, i] = silu(x[t, i]) * x[t, I + i] for x = [gate | up] of width 2I. */
void tm_silu_and_mul(const float *x, int64_t T, int64_t I, float *out) {
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float *g = x + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}
