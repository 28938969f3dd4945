/* Structured outputs: logits[rows[i], t] = -inf where bit t of bitmask[rows[i]] is 0
 * (32 tokens per int32 word, lowest bit first: xgrammar's layout). Rows whose words are
 * all ones (everything allowed) cost one comparison per 32 tokens. Bits at or past
 * `vocab` are ignored, so a row of logits may be wider than the vocabulary.
 */
#include "common.h"

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
