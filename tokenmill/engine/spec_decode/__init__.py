"""Speculative decoding: cheap proposals of the next tokens, verified by the target model
in the same step as everything else.

A running decode with k proposed tokens is scheduled as k + 1 query rows (its last real
token and the k proposals), each run as a decode row attending to the paged cache up to
its own position, so the logits of every row are bit-identical to a plain one-token step
at that position. The sampler samples every row as it would sample a plain step; the
engine keeps the sampled tokens while each one equals the next proposal, plus the first
that differs (or the bonus token after the last proposal). Each kept token is thus a
sample of the target's distribution given the tokens before it, which is standard
rejection sampling for a deterministic proposal (accept t with probability p(t); on a
rejection draw from p without t, renormalized): greedy and sampled outputs are exactly
those of speculation off, and a seeded request's generator is rewound to the state after
the last kept row, so its tokens are bit-identical too.

Modules: ``ngram`` and ``suffix`` propose; ``decoder`` (``SpecDecoder``) picks who
proposes (per-request acceptance estimate, batch-size off-switch), judges the sampled
rows and keeps the counters.
"""

from tokenmill.engine.spec_decode.decoder import SpecDecoder, SpecDecodeStats

__all__ = ["SpecDecoder", "SpecDecodeStats"]
