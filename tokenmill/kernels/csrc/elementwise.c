/* Small fused element-wise ops of a decoder layer: float32, rows of a flat batch [T, N].
 *
 * Each replaces 3-8 separate torch ops, which at batch 1 cost more in dispatch than in
 * arithmetic. Rows are independent (parallel over rows when there are more than 4), and
 * a row's numbers never depend on the other rows: the reductions in tm_rms_norm run in
 * an order fixed by the build, not by T.
 *
 *   tm_rms_norm      RMSNorm, optionally after the residual add.
 *   tm_rope          rotary embedding in place, rotate-half layout.
 *   tm_silu_and_mul  SiLU(gate) * up.
 */
#include "common.h"

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
