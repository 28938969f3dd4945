/* What the kernel sources share: the instruction-set selection, small helpers used in hot
 * loops (kept `static inline` here so every file inlines them), the layer record of a
 * decode step, and the prototypes of the functions one file calls in another.
 *
 * The sources are compiled together into one shared library by tokenmill/kernels/cpu.py
 * with the machine's C compiler (-O3 -march=native -fopenmp -std=c11; with GCC, -std=c11
 * also means -ffp-contract=off: no a * b + c is fused into an FMA unless written so, and
 * the results do not depend on what gets inlined where). Every exported function is
 * named tm_* and called from Python through ctypes.
 */
#ifndef TOKENMILL_KERNELS_COMMON_H
#define TOKENMILL_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- Instruction sets, chosen by what the compiler targets ----
 *   TM_AVX2     AVX2 + FMA + F16C: the vector kernels (256 bits).
 *   TM_VNNI     AVX-512 F/BW/VNNI as well: 512-bit kernels, vpdpbusd matrix products.
 *   TM_VNNI256  AVX-VNNI without AVX-512 (Intel client CPUs since Alder Lake): the same
 *               matrix layout and dot products, 256 bits wide.
 * Without AVX2 every kernel has a portable C path. */
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
#if !TM_VNNI && TM_AVX2 && defined(__AVXVNNI__)
#define TM_VNNI256 1
#else
#define TM_VNNI256 0
#endif
/* Builds with either kind of VNNI store matrices of N % 16 == 0 rows interleaved
 * (see matmul.c). */
#define TM_INTERLEAVE (TM_VNNI || TM_VNNI256)

/* Bumped whenever an exported signature or tm_layer changes; cpu.py checks it at load. */
#define TM_ABI_VERSION 10

#define TM_INLINE static inline __attribute__((always_inline))

/* ---- float16 -> float32 (exact: every float16 is a float32) ---- */
static inline float f16_to_f32(uint16_t h) {
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

#if TM_AVX2
/* The sum of the 8 lanes, in a fixed order (halves, then pairs, then the last two). */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- Vectorized e^x (softmax in attention.c, SiLU in elementwise.c) ----
 * Cephes' expf, ~1 ulp: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two
 * parts), e^r by a degree-5 polynomial. The AVX2 and AVX-512 versions share these
 * constants and take the same steps, so they give the same bits lane for lane. */
#define TM_LOG2E 1.44269504088896341f
#define TM_LN2_HI 0.693359375f
#define TM_LN2_LO -2.12194440e-4f
#define TM_EXP_P0 1.9875691500e-4f
#define TM_EXP_P1 1.3981999507e-3f
#define TM_EXP_P2 8.3334519073e-3f
#define TM_EXP_P3 4.1665795894e-2f
#define TM_EXP_P4 1.6666665459e-1f
#define TM_EXP_P5 5.0000001201e-1f

/* e^x for x <= 88 (callers clamp; softmax arguments are <= 0), 8 at a time; 0 below -87. */
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
#endif

#if TM_VNNI
/* exp_neg_ps 16 at a time (x <= 88): the same polynomial, the same steps. */
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
#endif

/* ---- Weight block types (ggml type ids) ----
 * matmul.c reads Q4_0, Q4_1 and Q8_0 in a regrouped layout (scales of a row together);
 * matmul_stored.c reads the others as the GGUF file stores them, so those matrices can
 * stay memory-mapped. */
enum {
    TM_Q4_0 = 2, TM_Q4_1 = 3, TM_Q5_0 = 6, TM_Q5_1 = 7, TM_Q8_0 = 8, TM_Q2_K = 10,
    TM_Q3_K = 11, TM_Q4_K = 12, TM_Q5_K = 13, TM_Q6_K = 14, TM_IQ4_NL = 20, TM_IQ4_XS = 23
};

/* ---- The layer record of a decode step (tm_decode_layers, decode_step.c) ----
 * One per decoder layer, filled by Python: tokenmill/kernels/cpu.py mirrors these
 * structs field for field as ctypes Structures (TmSegment, TmWeight, TmLayer) and checks
 * at load that its size equals tm_layer_size(). Change both sides together, and
 * TM_ABI_VERSION. Every field is 8 bytes, so there is no padding to keep in step. */
typedef struct tm_segment {
    int64_t qtype;         /* ggml type id (enum above) */
    const uint8_t *data;   /* [rows, K] in the layout tm_pack_layout leaves */
    int64_t rows;
} tm_segment;

/* A packed matrix: up to TM_MAX_SEGMENTS row ranges stacked in order, each of its own
 * type (a fused projection whose parts a GGUF file stores in different types, or keeps
 * as separate tensors that are used in place). */
#define TM_MAX_SEGMENTS 3
typedef struct tm_weight {
    int64_t nseg;
    tm_segment seg[TM_MAX_SEGMENTS];
} tm_weight;

typedef struct tm_layer {
    const float *ln1;      /* RMSNorm weight before attention [H] */
    const float *ln2;      /* RMSNorm weight before the MLP [H] */
    tm_weight qkv;         /* [(NH + 2 KVH) D, H]: q, k, v projections stacked */
    const float *qkv_bias; /* [(NH + 2 KVH) D] added to q, k, v (Qwen2), or NULL */
    tm_weight o;           /* [H, NH D] */
    tm_weight gate_up;     /* [2 I, H]: gate, then up */
    tm_weight down;        /* [H, I] */
    const float *cos;      /* rotary tables [max positions, D / 2] */
    const float *sin;
    void *k_cache;         /* this layer's paged caches [slots, KVH, D], float32 or float16 */
    void *v_cache;
} tm_layer;

/* ---- Functions called from another source file (all are also exported) ---- */

/* matmul.c: y[M, N] = x[M, K] @ W[N, K]^T, x rounded to 8 bits per block of 32; W one
 * matrix of one type, or (tm_gemm_weight) the stacked segments of a tm_weight. */
int tm_gemm(int qtype, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
            float *y);
int tm_gemm_weight(const tm_weight *w, const float *x, int64_t M, int64_t K, float *y);

/* matmul_stored.c: the types read as stored (all but Q4_0, Q4_1, Q8_0).
 * tm_stored_block: weights and bytes per block (0, 0 for a type it does not read).
 * tm_stored_rows: y[m, n] (row stride ldy) for the N rows of w, from activations already
 *   rounded (yq, dx, sy as in matmul.c); work-shares its loop, so every thread of the
 *   enclosing parallel region calls it (no barrier at the end).
 * tm_stored_decode_row: row n of w [., K] as float32, as gguf-py computes it. */
void tm_stored_block(int qtype, int *weights, int *bytes);
void tm_stored_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, int64_t M,
                    const int8_t *yq, const float *dx, const float *sy, float *y,
                    int64_t ldy);
void tm_stored_decode_row(int qtype, const uint8_t *w, int64_t K, int64_t n, float *out);

/* attention.c: one query token per row, over the paged KV cache. */
int tm_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                              const int64_t *block_table, int64_t max_blocks,
                              const int64_t *seq_lens, int64_t n, int64_t H, int64_t KVH,
                              int64_t D, int64_t block_size, float scale, float *out,
                              int kv_f16);

/* elementwise.c */
void tm_rms_norm(const float *x, float *residual, const float *w, int64_t T, int64_t N,
                 float eps, float *out);
void tm_rope(float *x, int64_t T, int64_t row_stride, int64_t heads, int64_t D,
             const int64_t *pos, const float *cos_table, const float *sin_table);
void tm_silu_and_mul(const float *x, int64_t T, int64_t I, float *out);

#endif
