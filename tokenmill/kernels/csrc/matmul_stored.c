/* Matrix products with weights in the block formats as a GGUF file stores them, read in
 * place (the loader can leave these matrices memory-mapped):
 *   blocks of 32:        Q5_0, Q5_1, IQ4_NL
 *   super-blocks of 256: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS (8 sub-blocks of 32, with
 *                        integer scales per sub-block of 32 or 16 under one fp16 d)
 * (Q4_0, Q4_1 and Q8_0 are regrouped at load and multiplied by matmul.c.)
 *
 * Block layouts (bytes), as ggml defines them; weight i of a block of 32 from nibbles is
 * the low half of byte i (i < 16) or the high half of byte i - 16:
 *   Q5_0   22: d, qh[4] (bit i: bit 4 of weight i), qs[16];        w = d (q - 16)
 *   Q5_1   24: d, m, qh[4], qs[16];                                w = d q + m
 *   IQ4_NL 18: d, qs[16];                                          w = d kvalues[q]
 *   Q2_K   84: sc[16] (scale | min << 4, per 16 weights), qs[64] (2-bit), d, dmin;
 *              w = (d sc) q - dmin m
 *   Q3_K  110: hmask[32], qs[64] (2-bit), scales[12] (16 x 6-bit, minus 32), d;
 *              w = (d sc) q, q = low 2 bits - 4 unless the hmask bit is set
 *   Q4_K  144: d, dmin, scales[12] (8 x 6-bit scales, 8 x 6-bit mins), qs[128];
 *              w = (d sc) q - dmin m, per sub-block of 32
 *   Q5_K  176: as Q4_K with qh[32] (bit j of byte i: bit 4 of weight i of sub-block j)
 *   Q6_K  210: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (per 16), d;
 *              w = (d sc) (q - 32)
 *   IQ4_XS 136: d, scales_h (u16), scales_l[4] (8 x 6-bit, minus 32), qs[128];
 *              w = (d sc) kvalues[q], per sub-block of 32
 * (which bytes hold the integers of sub-block j is spelled out in sub_ints below).
 *
 * Numerics: the same contract as matmul.c. Activations are rounded to 8 bits per block
 * of 32 (yq, dx, sy from matmul.c), so every weight type meets the same rounding. Each
 * sub-block of 32 gives an exact integer dot product I (Q2_K, Q3_K and Q6_K fold their
 * integer scales per 16 into it), and contributes
 *     A * dx * I  +  B * sy          (A, B: float factors of the weights, e.g. A = d sc,
 *                                     B = -dmin m for Q4_K; Q2_K: -dmin * dx * J, J the
 *                                     integer sum of its mins times y per 16)
 * accumulated per output in a fixed order: sub-blocks alternate between two accumulators
 * (8 float lanes each on AVX2), offsets go to a third, and the lanes are summed the same
 * way at the end. A row's operations do not depend on how many activation rows share a
 * pass over the weights (tiles of 4, then 1), so results are batch-invariant.
 *
 * Tiers: AVX2 + FMA + F16C (also what AVX-512 and AVX-VNNI builds run for these types)
 * and portable C.
 */
#include "common.h"

/* Weights and bytes per block; 0 for a type this file does not read. */
TM_INLINE int blk_weights(int qt) {
    switch (qt) {
    case TM_Q5_0: case TM_Q5_1: case TM_IQ4_NL: return 32;
    case TM_Q2_K: case TM_Q3_K: case TM_Q4_K: case TM_Q5_K: case TM_Q6_K: case TM_IQ4_XS:
        return 256;
    default: return 0;
    }
}

TM_INLINE int blk_bytes(int qt) {
    switch (qt) {
    case TM_Q5_0: return 22;
    case TM_Q5_1: return 24;
    case TM_IQ4_NL: return 18;
    case TM_Q2_K: return 84;
    case TM_Q3_K: return 110;
    case TM_Q4_K: return 144;
    case TM_Q5_K: return 176;
    case TM_Q6_K: return 210;
    case TM_IQ4_XS: return 136;
    default: return 0;
    }
}

/* One inlined copy per type (QT a constant), as TM_BY_QTYPE in matmul.c. */
#define TM_BY_STORED_QTYPE(qtype, stmt)                                \
    switch (qtype) {                                                   \
    case TM_Q5_0: { const int QT = TM_Q5_0; stmt; break; }             \
    case TM_Q5_1: { const int QT = TM_Q5_1; stmt; break; }             \
    case TM_IQ4_NL: { const int QT = TM_IQ4_NL; stmt; break; }         \
    case TM_Q2_K: { const int QT = TM_Q2_K; stmt; break; }             \
    case TM_Q3_K: { const int QT = TM_Q3_K; stmt; break; }             \
    case TM_Q4_K: { const int QT = TM_Q4_K; stmt; break; }             \
    case TM_Q5_K: { const int QT = TM_Q5_K; stmt; break; }             \
    case TM_Q6_K: { const int QT = TM_Q6_K; stmt; break; }             \
    case TM_IQ4_XS: { const int QT = TM_IQ4_XS; stmt; break; }         \
    default: break;                                                    \
    }

void tm_stored_block(int qtype, int *weights, int *bytes) {
    *weights = blk_weights(qtype);
    *bytes = blk_bytes(qtype);
}

static const int8_t kvalues_iq4[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                       1,    13,   25,  38,  53,  69,  89,  113};

/* Integers used signed (dot products by the sign trick); the others are unsigned. (Q6_K's
 * are signed, q - 32; its AVX2 kernel takes them unsigned and subtracts 32 y.) */
TM_INLINE int is_signed(int qt) {
    return qt == TM_Q3_K || qt == TM_Q6_K || qt == TM_IQ4_NL || qt == TM_IQ4_XS;
}
/* A float offset per sub-block of 32 (B * sy). */
TM_INLINE int has_offset(int qt) {
    return qt == TM_Q5_0 || qt == TM_Q5_1 || qt == TM_Q4_K || qt == TM_Q5_K;
}
/* Integer scales per 16 weights, folded into the integer dot product. */
TM_INLINE int has_scales16(int qt) { return qt == TM_Q2_K || qt == TM_Q3_K || qt == TM_Q6_K; }

TM_INLINE uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* The factors of a group of 8 sub-blocks of 32: one super-block (K-quants), or blocks
 * 8g .. 8g + ns - 1 (types with blocks of 32). Sub-block j contributes
 * A[j] * dx * I + B[j] * sy (+ C * dx * J for Q2_K); sc16/mn16: per 16 weights. */
typedef struct {
    float A[8], B[8], C;
    int16_t sc16[16];
    uint8_t mn16[16];
} factors;

TM_INLINE void group_factors(int qt, const uint8_t *row, int64_t g, int ns, factors *f) {
    const int bb = blk_bytes(qt);
    if (blk_weights(qt) == 32) {
        for (int j = 0; j < ns; j++) {
            const uint8_t *blk = row + (g * 8 + j) * bb;
            const float d = f16_to_f32(rd16(blk));
            f->A[j] = d;
            f->B[j] = qt == TM_Q5_0 ? -16.0f * d : qt == TM_Q5_1 ? f16_to_f32(rd16(blk + 2)) : 0.0f;
        }
        return;
    }
    const uint8_t *blk = row + g * bb;
    switch (qt) {
    case TM_Q4_K:
    case TM_Q5_K: {
        const float d = f16_to_f32(rd16(blk)), dmin = f16_to_f32(rd16(blk + 2));
        const uint8_t *s = blk + 4;
        for (int j = 0; j < 8; j++) {
            const int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            const int mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
            f->A[j] = d * (float)sc;
            f->B[j] = -(dmin * (float)mn);
        }
        break;
    }
    case TM_Q6_K: {
        const float d = f16_to_f32(rd16(blk + 208));
        for (int j = 0; j < 8; j++) f->A[j] = d;
        for (int k = 0; k < 16; k++) f->sc16[k] = (int8_t)blk[192 + k];
        break;
    }
    case TM_Q3_K: {
        const float d = f16_to_f32(rd16(blk + 108));
        const uint8_t *s = blk + 96;
        for (int j = 0; j < 8; j++) f->A[j] = d;
        for (int k = 0; k < 16; k++) {
            const int lo = k < 8 ? s[k] & 0xF : s[k - 8] >> 4;
            const int hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
            f->sc16[k] = (int16_t)((lo | (hi << 4)) - 32);
        }
        break;
    }
    case TM_Q2_K: {
        const float d = f16_to_f32(rd16(blk + 80));
        for (int j = 0; j < 8; j++) f->A[j] = d;
        f->C = -f16_to_f32(rd16(blk + 82));
        for (int k = 0; k < 16; k++) {
            f->sc16[k] = blk[k] & 0xF;
            f->mn16[k] = blk[k] >> 4;
        }
        break;
    }
    case TM_IQ4_XS: {
        const float d = f16_to_f32(rd16(blk));
        const int sh = rd16(blk + 2);
        for (int j = 0; j < 8; j++) {
            const int lo = (blk[4 + j / 2] >> (4 * (j % 2))) & 0xF, hi = (sh >> (2 * j)) & 3;
            f->A[j] = d * (float)((lo | (hi << 4)) - 32);
        }
        break;
    }
    default: break;
    }
}

/* The block holding sub-block j of group g, and j's index within it. */
TM_INLINE const uint8_t *sub_block(int qt, const uint8_t *row, int64_t g, int j, int *jj) {
    if (blk_weights(qt) == 32) {
        *jj = 0;
        return row + (g * 8 + j) * blk_bytes(qt);
    }
    *jj = j;
    return row + g * blk_bytes(qt);
}

/* The 32 integers of sub-block j of a block, as the dot products use them: unsigned
 * 0..31 (Q5_0, Q5_1, Q5_K), 0..15 (Q4_K), 0..3 (Q2_K); signed: q - 32 (Q6_K), -4..3
 * (Q3_K), kvalues (IQ4_NL, IQ4_XS). */
TM_INLINE void sub_ints(int qt, const uint8_t *blk, int j, int q[32]) {
    switch (qt) {
    case TM_Q5_0:
    case TM_Q5_1: {
        const uint8_t *qs = blk + (qt == TM_Q5_0 ? 6 : 8), *qhp = blk + (qt == TM_Q5_0 ? 2 : 4);
        uint32_t qh;
        memcpy(&qh, qhp, 4);
        for (int i = 0; i < 16; i++) {
            q[i] = (qs[i] & 0xF) | (int)(((qh >> i) & 1) << 4);
            q[i + 16] = (qs[i] >> 4) | (int)(((qh >> (i + 16)) & 1) << 4);
        }
        break;
    }
    case TM_IQ4_NL:
    case TM_IQ4_XS: {
        const uint8_t *qs = qt == TM_IQ4_NL ? blk + 2 : blk + 8 + 16 * j;
        for (int i = 0; i < 16; i++) {
            q[i] = kvalues_iq4[qs[i] & 0xF];
            q[i + 16] = kvalues_iq4[qs[i] >> 4];
        }
        break;
    }
    case TM_Q4_K:
    case TM_Q5_K: {
        const uint8_t *qs = blk + (qt == TM_Q4_K ? 16 : 48) + 32 * (j / 2);
        for (int i = 0; i < 32; i++) {
            q[i] = (qs[i] >> (4 * (j % 2))) & 0xF;
            if (qt == TM_Q5_K) q[i] |= ((blk[16 + i] >> j) & 1) << 4;
        }
        break;
    }
    case TM_Q6_K: {
        const int h = j / 4, t = j % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (t % 2), *qh = blk + 128 + 32 * h;
        for (int i = 0; i < 32; i++)
            q[i] = (((ql[i] >> (4 * (t / 2))) & 0xF) | (((qh[i] >> (2 * t)) & 3) << 4)) - 32;
        break;
    }
    case TM_Q3_K: {
        const uint8_t *qs = blk + 32 + 32 * (j / 4);
        for (int i = 0; i < 32; i++)
            q[i] = (((qs[i] >> (2 * (j % 4))) & 3) | (((blk[i] >> j) & 1) << 2)) - 4;
        break;
    }
    case TM_Q2_K: {
        const uint8_t *qs = blk + 16 + 32 * (j / 4);
        for (int i = 0; i < 32; i++) q[i] = (qs[i] >> (2 * (j % 4))) & 3;
        break;
    }
    default: break;
    }
}

/* Row n of W as float32: the same float operations as gguf-py's dequantization (so
 * bit-identical to it: -std=c11 keeps GCC from fusing them; one per statement for
 * compilers that fuse within an expression). */
TM_INLINE void decode_row(int qt, const uint8_t *w, int64_t K, int64_t n, float *out) {
    const int64_t nb = K / 32, ngroups = (nb + 7) / 8;
    const uint8_t *row = w + n * (K / blk_weights(qt)) * blk_bytes(qt);
    for (int64_t g = 0; g < ngroups; g++) {
        const int ns = nb - g * 8 < 8 ? (int)(nb - g * 8) : 8;
        factors f;
        group_factors(qt, row, g, ns, &f);
        for (int j = 0; j < ns; j++) {
            int jj = 0, q[32];
            const uint8_t *blk = sub_block(qt, row, g, j, &jj);
            sub_ints(qt, blk, jj, q);
            float *o = out + (g * 8 + j) * 32;
            for (int i = 0; i < 32; i++) {
                float v;
                if (qt == TM_Q5_0) {
                    v = f.A[j] * (float)(q[i] - 16);
                } else if (has_offset(qt)) {  /* Q5_1: d q + m; Q4_K, Q5_K: (d sc) q - dmin m */
                    const float t = f.A[j] * (float)q[i];
                    v = t + f.B[j];
                } else if (has_scales16(qt)) {
                    const float dl = f.A[j] * (float)f.sc16[2 * j + i / 16];
                    v = dl * (float)q[i];
                    if (qt == TM_Q2_K) {
                        const float ml = f.C * (float)f.mn16[2 * j + i / 16];
                        v = v + ml;
                    }
                } else {  /* IQ4_NL, IQ4_XS */
                    v = f.A[j] * (float)q[i];
                }
                o[i] = v;
            }
        }
    }
}

void tm_stored_decode_row(int qtype, const uint8_t *w, int64_t K, int64_t n, float *out) {
    TM_BY_STORED_QTYPE(qtype, decode_row(QT, w, K, n, out));
}

#if TM_AVX2
/* 16 bytes of nibbles -> 32 bytes: the low halves, then the high halves. */
TM_INLINE __m256i nibbles(const uint8_t *p) {
    /* the 16 bytes in both halves, the upper half shifted right by 4 (per 32 bits: no bits
     * cross into a byte that keeps them, after the mask) */
    const __m256i raw = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                            _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set. */
TM_INLINE __m256i bit_bytes(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL,
                                           0x0101010101010101LL, 0);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfeLL));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

/* Bits s.. of every byte, masked (16-bit shifts: the mask keeps only a byte's own bits). */
TM_INLINE __m256i field(__m256i v, int s, int mask) {
    return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s)), _mm256_set1_epi8((char)mask));
}

/* sub_ints, 32 at a time, as bytes. */
TM_INLINE __m256i sub_ints_avx2(int qt, const uint8_t *blk, int j) {
    switch (qt) {
    case TM_Q5_0:
    case TM_Q5_1: {
        const int qs = qt == TM_Q5_0 ? 6 : 8, qh = qt == TM_Q5_0 ? 2 : 4;
        return _mm256_or_si256(nibbles(blk + qs),
                               _mm256_and_si256(bit_bytes(blk + qh), _mm256_set1_epi8(0x10)));
    }
    case TM_IQ4_NL:
    case TM_IQ4_XS: {
        const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)kvalues_iq4));
        return _mm256_shuffle_epi8(table, nibbles(qt == TM_IQ4_NL ? blk + 2 : blk + 8 + 16 * j));
    }
    case TM_Q4_K:
    case TM_Q5_K: {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk + (qt == TM_Q4_K ? 16 : 48) + 32 * (j / 2)));
        __m256i q = field(raw, 4 * (j % 2), 0x0F);
        if (qt == TM_Q5_K) {
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
            q = _mm256_or_si256(q, _mm256_slli_epi16(field(qh, j, 1), 4));
        }
        return q;
    }
    case TM_Q6_K: {
        const int h = j / 4, t = j % 4;
        const __m256i ql = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32 * (t % 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        /* 0..63: the dot product takes q - 32 as q y - 32 y (see stored_tile) */
        return _mm256_or_si256(field(ql, 4 * (t / 2), 0x0F),
                               _mm256_slli_epi16(field(qh, 2 * t, 3), 4));
    }
    case TM_Q3_K: {
        const __m256i qs = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * (j / 4)));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
        const __m256i q = _mm256_or_si256(field(qs, 2 * (j % 4), 3),
                                          _mm256_slli_epi16(field(hm, j, 1), 2));
        return _mm256_sub_epi8(q, _mm256_set1_epi8(4));
    }
    case TM_Q2_K:
        return field(_mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (j / 4))), 2 * (j % 4), 3);
    default:
        return _mm256_setzero_si256();
    }
}

/* The float factors A and B of a group of 8 sub-blocks (see group_factors), built in
 * registers: a vector loaded from 8 scalar stores just made would wait for them (a
 * failed store-to-load forward). The same values as group_factors, bit for bit. For
 * Q2_K, Q3_K and Q6_K (A = d for all 8) the integer scales per 16 go to f. */
TM_INLINE void group_vectors(int qt, const uint8_t *row, int64_t g, __m256 *a8, __m256 *b8,
                             factors *f) {
    const int bb = blk_bytes(qt);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    *b8 = _mm256_setzero_ps();
    if (blk_weights(qt) == 32) {
        const uint8_t *p = row + g * 8 * bb;
        const __m128i d = _mm_set_epi16((short)rd16(p + 7 * bb), (short)rd16(p + 6 * bb),
                                        (short)rd16(p + 5 * bb), (short)rd16(p + 4 * bb),
                                        (short)rd16(p + 3 * bb), (short)rd16(p + 2 * bb),
                                        (short)rd16(p + bb), (short)rd16(p));
        *a8 = _mm256_cvtph_ps(d);
        if (qt == TM_Q5_0) *b8 = _mm256_mul_ps(*a8, _mm256_set1_ps(-16.0f));
        if (qt == TM_Q5_1) {
            const uint8_t *m = p + 2;
            *b8 = _mm256_cvtph_ps(_mm_set_epi16(
                (short)rd16(m + 7 * bb), (short)rd16(m + 6 * bb), (short)rd16(m + 5 * bb),
                (short)rd16(m + 4 * bb), (short)rd16(m + 3 * bb), (short)rd16(m + 2 * bb),
                (short)rd16(m + bb), (short)rd16(m)));
        }
        return;
    }
    const uint8_t *blk = row + g * bb;
    if (qt == TM_Q4_K || qt == TM_Q5_K) {
        /* the 12 bytes -> 8 scales (bytes 0-7) and 8 mins (bytes 8-15), as llama.cpp does */
        uint32_t u[3];
        memcpy(u, blk + 4, 12);
        const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
        const uint32_t sc_lo = u[0] & k1, sc_hi = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
        const uint32_t mn_lo = u[1] & k1, mn_hi = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
        const __m128i v = _mm_set_epi32((int)mn_hi, (int)mn_lo, (int)sc_hi, (int)sc_lo);
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
        *a8 = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(rd16(blk))), sc);
        *b8 = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(f16_to_f32(rd16(blk + 2))), mn), sign);
        return;
    }
    if (qt == TM_IQ4_XS) {
        uint32_t sl;
        memcpy(&sl, blk + 4, 4);
        const __m128i l4 = _mm_cvtsi32_si128((int)sl), m4 = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_unpacklo_epi8(_mm_and_si128(l4, m4),
                                             _mm_and_si128(_mm_srli_epi16(l4, 4), m4));
        const __m256i hi = _mm256_and_si256(
            _mm256_srlv_epi32(_mm256_set1_epi32(rd16(blk + 2)), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)),
            _mm256_set1_epi32(3));
        const __m256i sc = _mm256_sub_epi32(
            _mm256_or_si256(_mm256_cvtepu8_epi32(lo), _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
        *a8 = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(rd16(blk))), _mm256_cvtepi32_ps(sc));
        return;
    }
    if (qt == TM_Q6_K) {  /* A = d; the int8 scales per 16 are read by scales16_q6k */
        *a8 = _mm256_set1_ps(f16_to_f32(rd16(blk + 208)));
        return;
    }
    group_factors(qt, row, g, 8, f);  /* Q2_K, Q3_K: A = d */
    *a8 = _mm256_set1_ps(f->A[0]);
}

/* Q6_K's scales of sub-block j (int8, per 16 weights) as pair16 gives them: scale 2j in
 * the int16 lanes 0-7, 2j + 1 in lanes 8-15; sc: the block's 16 scales. */
TM_INLINE __m256i scales16_q6k(__m128i sc, int j) {
    const __m128i pick = _mm_set_epi64x(0x0101010101010101LL * (2 * j + 1),
                                        0x0101010101010101LL * (2 * j));
    return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, pick));
}

/* Two int16 values per sub-block of 32: a in lanes 0-7 (weights 0-15), b in 8-15. */
TM_INLINE __m256i pair16(int a, int b) {
    return _mm256_set_m128i(_mm_set1_epi16((short)b), _mm_set1_epi16((short)a));
}

/* y[m, n] for ROWS consecutive activation rows (ROWS a constant in each inlined copy);
 * nb blocks of 32 per row. See the numerics above: a row's operations do not depend on
 * ROWS. */
TM_INLINE void stored_tile(int qt, int ROWS, const uint8_t *row, int64_t nb, const int8_t *y,
                           const float *dx, const float *sy, float *out, int64_t ldo) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 even[4], odd[4], off[4];
    float off_tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float sc[4][8] __attribute__((aligned(32))), mc[4][8] __attribute__((aligned(32)));
    for (int r = 0; r < ROWS; r++) even[r] = odd[r] = off[r] = _mm256_setzero_ps();
    const int64_t ngroups = (nb + 7) / 8;
    for (int64_t g = 0; g < ngroups; g++) {
        const int ns = nb - g * 8 < 8 ? (int)(nb - g * 8) : 8;  /* < 8: the last blocks of 32 */
        factors f;
        if (ns == 8) {
            __m256 a8, b8;
            group_vectors(qt, row, g, &a8, &b8, &f);
            for (int r = 0; r < ROWS; r++) {
                const int64_t i = r * nb + g * 8;
                const __m256 dx8 = _mm256_loadu_ps(dx + i);
                _mm256_store_ps(sc[r], _mm256_mul_ps(a8, dx8));
                if (has_offset(qt)) off[r] = _mm256_fmadd_ps(b8, _mm256_loadu_ps(sy + i), off[r]);
                if (qt == TM_Q2_K) _mm256_store_ps(mc[r], _mm256_mul_ps(_mm256_set1_ps(f.C), dx8));
            }
        } else {  /* the same products, one at a time */
            group_factors(qt, row, g, ns, &f);
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < ns; j++) {
                    const int64_t i = r * nb + g * 8 + j;
                    sc[r][j] = f.A[j] * dx[i];
                    if (has_offset(qt)) off_tail[r] += f.B[j] * sy[i];
                }
        }
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            if (j >= ns) break;
            int jj = 0;
            const uint8_t *blk = sub_block(qt, row, g, j, &jj);
            const __m256i q = sub_ints_avx2(qt, blk, jj);
            const int sign_trick = is_signed(qt) && qt != TM_Q6_K;
            const __m256i qa = sign_trick ? _mm256_abs_epi8(q) : q;
            const __m256i s16 =
                qt == TM_Q6_K ? scales16_q6k(_mm_loadu_si128((const __m128i *)(blk + 192)), j)
                : has_scales16(qt) ? pair16(f.sc16[2 * j], f.sc16[2 * j + 1]) : ones;
            __m256i mv = _mm256_setzero_si256();
            if (qt == TM_Q2_K)
                mv = _mm256_set_m128i(_mm_set1_epi8((char)f.mn16[2 * j + 1]),
                                      _mm_set1_epi8((char)f.mn16[2 * j]));
            for (int r = 0; r < ROWS; r++) {
                const int8_t *yy = y + (r * nb + g * 8 + j) * 32;
                __m256i yv = _mm256_loadu_si256((const __m256i *)yy);
                if (qt == TM_Q2_K) {
                    const __m256i J = _mm256_madd_epi16(_mm256_maddubs_epi16(mv, yv), ones);
                    off[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&mc[r][j]), _mm256_cvtepi32_ps(J),
                                             off[r]);
                }
                if (sign_trick) yv = _mm256_sign_epi8(yv, q);
                __m256i p16 = _mm256_maddubs_epi16(qa, yv);
                if (qt == TM_Q6_K)  /* (q - 32) y, exactly: |q y| <= 63 * 127 per byte */
                    p16 = _mm256_sub_epi16(p16, _mm256_maddubs_epi16(_mm256_set1_epi8(32), yv));
                const __m256i I = _mm256_madd_epi16(p16, s16);
                const __m256 p = _mm256_cvtepi32_ps(I), s = _mm256_broadcast_ss(&sc[r][j]);
                if (j & 1)
                    odd[r] = _mm256_fmadd_ps(s, p, odd[r]);
                else
                    even[r] = _mm256_fmadd_ps(s, p, even[r]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++)
        out[r * ldo] = hsum(_mm256_add_ps(even[r], odd[r])) + (hsum(off[r]) + off_tail[r]);
}
#else
/* Portable: one sub-block of 32 at a time, exact integer dot products, one float
 * accumulator for the products and one for the offsets. */
TM_INLINE void stored_tile(int qt, int ROWS, const uint8_t *row, int64_t nb, const int8_t *y,
                           const float *dx, const float *sy, float *out, int64_t ldo) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, off[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t ngroups = (nb + 7) / 8;
    for (int64_t g = 0; g < ngroups; g++) {
        const int ns = nb - g * 8 < 8 ? (int)(nb - g * 8) : 8;
        factors f;
        group_factors(qt, row, g, ns, &f);
        for (int j = 0; j < ns; j++) {
            int jj = 0, q[32];
            const uint8_t *blk = sub_block(qt, row, g, j, &jj);
            sub_ints(qt, blk, jj, q);
            for (int r = 0; r < ROWS; r++) {
                const int64_t i = r * nb + g * 8 + j;
                const int8_t *yy = y + i * 32;
                int dot[2] = {0, 0}, ysum[2] = {0, 0};
                for (int k = 0; k < 32; k++) {
                    dot[k / 16] += q[k] * yy[k];
                    ysum[k / 16] += yy[k];
                }
                int I = dot[0] + dot[1];
                if (has_scales16(qt)) I = f.sc16[2 * j] * dot[0] + f.sc16[2 * j + 1] * dot[1];
                acc[r] += f.A[j] * dx[i] * (float)I;
                if (has_offset(qt)) off[r] += f.B[j] * sy[i];
                if (qt == TM_Q2_K) {
                    const int J = f.mn16[2 * j] * ysum[0] + f.mn16[2 * j + 1] * ysum[1];
                    off[r] += f.C * dx[i] * (float)J;
                }
            }
        }
    }
    for (int r = 0; r < ROWS; r++) out[r * ldo] = acc[r] + off[r];
}
#endif

/* Rows 0..N-1 of W against the M rounded activation rows: tiles of 4 rows, then 1. */
TM_INLINE void rows_impl(int qt, const uint8_t *w, int64_t N, int64_t K, int64_t M,
                         const int8_t *yq, const float *dx, const float *sy, float *y,
                         int64_t ldy) {
    const int64_t nb = K / 32, row_bytes = K / blk_weights(qt) * blk_bytes(qt);
#pragma omp for schedule(static) nowait
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        int64_t m = 0;
        for (; m + 4 <= M; m += 4)
            stored_tile(qt, 4, row, nb, yq + m * K, dx + m * nb, sy + m * nb, y + m * ldy + n, ldy);
        for (; m < M; m++)
            stored_tile(qt, 1, row, nb, yq + m * K, dx + m * nb, sy + m * nb, y + m * ldy + n, ldy);
    }
}

void tm_stored_rows(int qtype, const uint8_t *w, int64_t N, int64_t K, int64_t M,
                    const int8_t *yq, const float *dx, const float *sy, float *y,
                    int64_t ldy) {
    TM_BY_STORED_QTYPE(qtype, rows_impl(QT, w, N, K, M, yq, dx, sy, y, ldy));
}
