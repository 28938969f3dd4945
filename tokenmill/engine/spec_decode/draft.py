"""Draft-model proposals: a small model sharing the target's vocabulary runs ahead.

The draft has its own ``ModelRunner`` (weights, paged KV pool, sampler) and its own
``BlockManager`` (no prefix cache). Each target sequence has a shadow ``Sequence`` in the
draft holding the tokens the draft has seen. To propose k tokens, the shadow is first
synced with the target's tokens: its computed positions are cut back to the prefix the
two agree on (drafts the target rejected are forgotten, their blocks trimmed), then the
draft catches up on the new tokens and decodes greedily, one token per call, k times;
the sequences proposing in a step are drafted together, one batch per draft token.

Greedy drafts are a deterministic proposal, so the target's verification (sample each
row, keep while equal) stays exact for sampled requests too: the ``min(1, p/q)`` rule
of a sampled draft is not needed (with q one-hot it reduces to accepting t with
probability p(t)).

A draft whose vocabulary differs from the target's (size, or the ids of a probe text) is
refused at load. A draft that cannot get blocks, or raises, proposes nothing.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.model_loading import load_model
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.layers.attention import attention_backend
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill")

PROBE = "def rename(old_name):\n    return old_name + 1  # héllo, 世界!"


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, block_size: int, max_len: int) -> None:
        self.runner = runner
        self.blocks = BlockManager(runner.num_blocks, block_size, enable_prefix_caching=False)
        self.max_len = max_len
        self.params = SamplingParams(temperature=0)

    @classmethod
    def load(cls, config: EngineConfig, target: ModelConfig, kv_dtype: torch.dtype,
             tokenizer: Tokenizer | None, show_progress: bool = False) -> DraftModelProposer:
        """Loads ``config.speculative.model`` like the target (same dtype, device,
        quantization and KV pool size); ValueError if its vocabulary differs."""
        path = config.speculative.model
        draft_cfg = dataclasses.replace(config, model=path, tokenizer=path, speculative=None)
        backend = attention_backend(config.device, config.dtype, kv_dtype)
        model, mc = load_model(draft_cfg, backend, show_progress)
        if mc.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model {path} has a vocabulary of {mc.vocab_size} "
                             f"tokens, the target {target.vocab_size}: they must share one.")
        if tokenizer is not None:
            draft_tok = Tokenizer.from_pretrained(path)
            if draft_tok.encode(PROBE) != tokenizer.encode(PROBE):
                raise ValueError(f"the draft model {path} tokenizes text differently from "
                                 "the target: they must share a tokenizer.")
        cache = config.cache
        runner = ModelRunner(model, mc, cache, kv_dtype, config.device, config.seed)
        return cls(runner, cache.block_size, mc.max_position_embeddings)

    def _sync(self, seq: Sequence) -> Sequence:
        """The sequence's shadow, holding the target's tokens, its computed positions
        cut back to those the draft saw with the same tokens, and never past the last
        one (whose logits propose the next token)."""
        tokens = seq.all_token_ids
        shadow = seq.spec_state
        if not isinstance(shadow, Sequence):
            shadow = seq.spec_state = Sequence(f"{seq.request_id}-draft", tokens, self.params)
            return shadow
        seen = shadow.all_token_ids
        agree = 0
        limit = min(len(seen), len(tokens) - 1, shadow.num_computed_tokens)
        while agree < limit and seen[agree] == tokens[agree]:
            agree += 1
        shadow.prompt_token_ids, shadow.output_token_ids = tokens, []
        shadow.num_computed_tokens = agree
        self.blocks.trim(shadow, agree)
        return shadow

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return self.propose_batch([(seq, k)]).get(id(seq), [])

    def propose_batch(self, wanted: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        """Proposals for several sequences (each with its k), drafted together: each
        draft step runs every shadow that still wants a token in one batch."""
        try:
            return self._propose_batch(wanted)
        except Exception:
            logger.exception("the draft model failed; this step decodes without proposals")
            return {}

    def _propose_batch(self, wanted: list[tuple[Sequence, int]]) -> dict[int, list[int]]:
        drafts: dict[int, list[int]] = {}
        live = []
        for seq, k in wanted:
            shadow = self._sync(seq)
            drafts[id(seq)] = []
            live.append((seq, shadow, k))
        while live:
            step = []
            for seq, shadow, k in live:
                new = shadow.num_tokens - shadow.num_computed_tokens
                if shadow.num_tokens < self.max_len and self.blocks.allocate_slots(shadow, new):
                    step.append((seq, shadow, k, new))
            if not step:
                break
            result = self.runner.execute(SchedulerOutput(
                [ScheduledSequence(shadow, new) for _, shadow, _, new in step]))
            live = []
            for (seq, shadow, k, new), token in zip(step, result.sampler_output.token_ids,
                                                    strict=True):
                shadow.num_computed_tokens += new
                shadow.output_token_ids.append(token)
                drafts[id(seq)].append(token)
                if len(drafts[id(seq)]) < k:
                    live.append((seq, shadow, k))
        return drafts

    def finished(self, seq: Sequence) -> None:
        """Frees the shadow's blocks."""
        if isinstance(seq.spec_state, Sequence):
            self.blocks.free(seq.spec_state)
            seq.spec_state = None
