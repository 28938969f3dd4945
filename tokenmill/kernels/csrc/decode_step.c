/* A whole decode step of a Llama-family model in one call: every decoder layer for a
 * batch of decodes (one new token per sequence).
 *
 * Per layer, the same kernels in the same order as the Python layer code calls them, so
 * the hidden states are bit-identical to the Python path:
 *   residual += x (first layer: residual = x); h = rmsnorm(residual) * ln1
 *   qkv = h @ Wqkv^T (+ qkv bias, Qwen2); rotary on the q and k heads; k, v -> their
 *   cache slots
 *   a = paged decode attention(q); x = a @ Wo^T
 *   residual += x; h = rmsnorm(residual) * ln2
 *   x = silu_and_mul(h @ Wgate_up^T) @ Wdown^T
 * What differs is the cost around them: at batch 1 a layer is little arithmetic, and the
 * ~15 Python-level calls and tensor views per layer cost as much again; here a step is
 * one ctypes call. The layers are described by tm_layer records (common.h), filled once
 * by tokenmill/models/cpu_decode.py.
 */
#include "common.h"

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

/* One decoder layer (the sequence above). x [T, H] is read as the layer input and
 * overwritten with its output; `first` starts the residual stream. Returns 0, or a
 * negative code from a kernel (-2: out of memory). */
static int decode_layer(const tm_layer *ly, int first, int64_t T, int64_t H, int64_t NH,
                        int64_t KVH, int64_t D, int64_t I, float *x, float *residual,
                        float eps, const int64_t *positions, const int64_t *slots,
                        const int64_t *block_table, int64_t max_blocks,
                        const int64_t *seq_lens, int64_t block_size, float scale,
                        int kv_f16) {
    const int64_t W = (NH + 2 * KVH) * D, widest = W > 2 * I ? W : 2 * I;
    float *h = (float *)malloc((size_t)(T * H) * sizeof(float));
    float *big = (float *)malloc((size_t)(T * widest) * sizeof(float));
    float *q = (float *)malloc((size_t)(T * NH * D) * sizeof(float));
    float *att = (float *)malloc((size_t)(T * (NH * D > I ? NH * D : I)) * sizeof(float));
    int rc = -2;
    if (!h || !big || !q || !att) goto done;
    if (first) {
        memcpy(residual, x, (size_t)(T * H) * sizeof(float));
        tm_rms_norm(residual, NULL, ly->ln1, T, H, eps, h);
    } else {
        tm_rms_norm(x, residual, ly->ln1, T, H, eps, h);
    }
    if ((rc = tm_gemm_weight(&ly->qkv, h, T, H, big))) goto done;
    if (ly->qkv_bias)  /* y + b, one float32 add per element, as packed_linear adds it */
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < W; i++) big[t * W + i] += ly->qkv_bias[i];
    tm_rope(big, T, W, NH + KVH, D, positions, ly->cos, ly->sin);
    for (int64_t t = 0; t < T; t++) {
        const float *row = big + t * W;
        memcpy(q + t * NH * D, row, (size_t)(NH * D) * sizeof(float));
        store_kv_row(ly->k_cache, slots[t] * KVH * D, row + NH * D, KVH * D, kv_f16);
        store_kv_row(ly->v_cache, slots[t] * KVH * D, row + (NH + KVH) * D, KVH * D, kv_f16);
    }
    if ((rc = tm_paged_decode_attention(q, ly->k_cache, ly->v_cache, block_table, max_blocks,
                                        seq_lens, T, NH, KVH, D, block_size, scale, att,
                                        kv_f16)))
        goto done;
    if ((rc = tm_gemm_weight(&ly->o, att, T, NH * D, x))) goto done;
    tm_rms_norm(x, residual, ly->ln2, T, H, eps, h);
    if ((rc = tm_gemm_weight(&ly->gate_up, h, T, H, big))) goto done;
    tm_silu_and_mul(big, T, I, att);
    rc = tm_gemm_weight(&ly->down, att, T, I, x);
done:
    free(h), free(big), free(q), free(att);
    return rc;
}

/* Runs the L layers of `layers` in order on x [T, H] (float32; overwritten with the last
 * layer's output) and fills residual [T, H] with the residual stream. Model shape: H
 * hidden, NH query heads and KVH KV heads of D dims, I intermediate. The step: token t
 * of row t is at positions[t] and its K/V go to cache slot slots[t]; block_table
 * [T, max_blocks], seq_lens [T] and block_size locate each row's cached positions (see
 * attention.c). The KV caches are float32, or float16 with kv_f16 (AVX2 builds only).
 * Returns 0, -1 for a float16 cache without AVX2, or a negative code from a kernel. */
int tm_decode_layers(int64_t L, const tm_layer *layers, int64_t T, int64_t H, int64_t NH,
                     int64_t KVH, int64_t D, int64_t I, float *x, float *residual, float eps,
                     const int64_t *positions, const int64_t *slots,
                     const int64_t *block_table, int64_t max_blocks, const int64_t *seq_lens,
                     int64_t block_size, float scale, int kv_f16) {
    if (kv_f16 && !TM_AVX2) return -1;
    for (int64_t l = 0; l < L; l++) {
        const int rc = decode_layer(&layers[l], l == 0, T, H, NH, KVH, D, I, x, residual, eps,
                                    positions, slots, block_table, max_blocks, seq_lens,
                                    block_size, scale, kv_f16);
        if (rc) return rc;
    }
    return 0;
}
