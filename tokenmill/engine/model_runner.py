"""Turns a SchedulerOutput into flat tensors, runs the model and samples.

Per step it builds, for the concatenated new tokens of all scheduled requests:
``input_ids`` and ``positions`` [T], ``slot_mapping`` [T] (where each token's K/V goes in
the paged cache), the prefill segments and the padded decode block tables that the
attention backend reads (``AttentionMetadata``), and the rows whose logits are needed:
the last row of each request that samples, plus prompt rows for prompt_logprobs. Logits
are computed for those rows only: the LM head is a big matmul and a prefill chunk
samples at most one token.

A speculative decode (a decode with proposed tokens) is laid out as k + 1 decode rows,
each attending to the paged cache up to its own position, so each row's arithmetic is
that of a plain one-token decode at its position (bit-identical logits; the fused CPU
decode path runs them), and each row samples.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass

import torch

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.engine.kv_pool_sizing import KVPoolSize, size_kv_pool
from tokenmill.engine.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    SamplingRow,
    top_logprobs,
)
from tokenmill.engine.scheduler_output import SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.layers.attention import AttentionMetadata, PrefillSegment
from tokenmill.outputs import PositionLogprobs

logger = logging.getLogger("tokenmill")


@dataclass
class ModelInput:
    """One step's flat batch, as ``ModelRunner.prepare`` builds it for the model."""

    input_ids: torch.Tensor          # [T] the new tokens of every scheduled sequence
    positions: torch.Tensor          # [T]
    attention: AttentionMetadata
    logit_rows: list[int]            # rows of the batch whose logits are computed
    sampled: list[Sequence]          # the sequences that sample a token this step (a
    # speculative decode once per row: its last token's and each proposal's)
    sample_idx: list[int]            # their rows within ``logit_rows``
    # per sampled row: None for a plain one, else how many proposals precede its position
    spec_offsets: list[int | None]
    # prompt logprobs wanted: (sequence, first prompt position, first logit row, count)
    prompt_logprobs: list[tuple[Sequence, int, int, int]]


@dataclass
class ModelRunnerOutput:
    sampled_requests: list[Sequence]
    sampler_output: SamplerOutput | None
    # request -> (first prompt position covered, its logprobs entries in order)
    prompt_logprobs: dict[int, tuple[int, list[PositionLogprobs]]]


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Zeros that take memory only where they are written. On the CPU the tensor lives in
    an anonymous mmap, whose pages the OS hands out zero-filled on first touch, so a 2 GiB
    KV pool costs the resident memory of the blocks actually used, not 2 GiB at start-up
    (``torch.zeros`` writes every page)."""
    if device != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)


def sampling_metadata(seqs: list[Sequence], spec_offsets: list[int | None] | None = None
                      ) -> SamplingMetadata:
    """The sampler's view of the sequences that sample this step. ``spec_offsets[i]``
    (speculative rows): how many proposed tokens precede row i's position, which
    ``min_tokens`` counts as output; those rows keep their generator's state after their
    draw, for the engine to rewind to the last kept row."""
    spec_offsets = spec_offsets or [None] * len(seqs)
    rows = []
    for seq, offset in zip(seqs, spec_offsets, strict=True):
        p = seq.sampling_params
        banned: frozenset[int] = frozenset()
        if seq.num_output_tokens + (offset or 0) < p.min_tokens:
            banned = frozenset(p.all_stop_token_ids)
            if not p.ignore_eos:
                banned |= seq.eos_token_ids
        rows.append(SamplingRow(
            params=p, generator=seq.generator, grammar=seq.grammar, banned_token_ids=banned,
            output_token_ids=seq.output_token_ids,
            token_ids=seq.all_token_ids if p.repetition_penalty != 1.0 else None,
            logit_bias=seq.logit_bias, keep_state=offset is not None))
    return SamplingMetadata(rows)


class KVCache:
    """The K/V tensors: one flat K and one flat V tensor per layer,
    [num_blocks * block_size, KVH, D]; slot = block id * block_size + offset."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: str) -> None:
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [(lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device))
                       for _ in range(cfg.num_layers)]


class ModelRunner:
    """Owns the device side of the engine: the model, the KV tensors and the sampler.

    It sizes the KV pool (``kv_pool_sizing``: ``cache.kv_cache_memory``, or a share of
    the memory free once the model is loaded; ``num_blocks``, which the engine's block
    manager then hands out), turns each ``SchedulerOutput`` into a ``ModelInput``, runs
    the model and samples."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, cache: CacheConfig,
                 kv_dtype: torch.dtype, device: str, seed: int) -> None:
        self.model = model
        self.cfg = cfg
        self.block_size = cache.block_size
        self.device = device
        self.kv_dtype = kv_dtype
        per_token = cfg.kv_bytes_per_token(kv_dtype)
        per_block = per_token * cache.block_size
        longest = min(cache.max_model_len or cfg.max_position_embeddings,
                      cfg.max_position_embeddings)
        self.kv_pool: KVPoolSize = size_kv_pool(
            cache.kv_cache_memory, model, device, per_token,
            max_tokens=cache.max_num_seqs * -(-longest // cache.block_size) * cache.block_size)
        self.num_blocks = self.kv_pool.nbytes // per_block
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory {self.kv_pool.nbytes} B holds no KV block ({per_block} B "
                "each); " + ("too little memory is free: set --kv-cache-memory."
                             if self.kv_pool.auto else "increase it."))
        self.kv_cache_bytes = self.num_blocks * per_block
        logger.info("KV pool: %s", self.kv_cache_line(
            min(longest, self.num_blocks * cache.block_size), cache.max_num_seqs))
        self.kv_cache = KVCache(cfg, self.num_blocks, cache.block_size, kv_dtype, device)
        self.sampler = Sampler(cfg.vocab_size, seed)

    def kv_cache_line(self, max_model_len: int, max_num_seqs: int) -> str:
        """The pool in one line: size, how it was sized, how many requests of
        ``max_model_len`` fit and the maximum concurrency at the model's context (what
        ``tokenmill serve`` prints at start-up)."""
        return self.kv_pool.describe(self.kv_cache_bytes, self.num_blocks * self.block_size,
                                     self.kv_dtype, max_model_len,
                                     self.cfg.max_position_embeddings, max_num_seqs)

    def _slots(self, req: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of a request, from its block table."""
        bs, table = self.block_size, req.block_ids
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, out: SchedulerOutput) -> ModelInput:
        # Plain Python lists, turned into tensors once per step: at batch 1 a decode step
        # is a few ms, and per-request tensor ops were a tenth of it.
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_reqs: list[tuple[Sequence, int]] = []  # (sequence, positions attended)
        logit_rows: list[int] = []
        sampled: list[Sequence] = []
        sample_idx: list[int] = []  # which logit rows belong to the sampling requests
        spec_offsets: list[int | None] = []
        prompt_lp: list[tuple[Sequence, int, int, int]] = []  # req, first pos, row0, count
        row = 0
        for s in out.scheduled:
            req, c, q = s.request, s.request.num_computed_tokens, s.num_new_tokens
            if s.spec_token_ids:  # k + 1 decode rows, each sampling
                ids.append(req.token_at(c))
                ids.extend(s.spec_token_ids)
                positions.extend(range(c, c + q))
                slot_mapping.extend(self._slots(req, c, c + q))
                for j in range(q):
                    decode_rows.append(row + j)
                    decode_reqs.append((req, c + j + 1))
                    sampled.append(req)
                    sample_idx.append(len(logit_rows))
                    spec_offsets.append(j)
                    logit_rows.append(row + j)
                row += q
                continue
            if q == 1:
                ids.append(req.token_at(c))
            elif c + q > req.num_prompt_tokens:
                ids.extend(req.all_token_ids[c: c + q])
            else:
                ids.extend(req.prompt_token_ids[c: c + q])
            positions.extend(range(c, c + q))
            slot_mapping.extend(self._slots(req, c, c + q))
            if q == 1:
                decode_rows.append(row)
                decode_reqs.append((req, c + 1))
            elif c == 0:
                prefills.append(PrefillSegment(row, q, 0, None, None))
            else:
                mask = torch.ones(q, c + q, dtype=torch.bool).tril(diagonal=c)
                prefills.append(PrefillSegment(row, q, c, torch.tensor(self._slots(req, 0, c + q)),
                                               mask))
            if req.wants_prompt_logprobs:
                # logits at position p predict prompt token p + 1
                first = max(c, len(req.prompt_logprobs) - 1)
                last = min(c + q, req.num_prompt_tokens - 1)
                if last > first:
                    prompt_lp.append((req, first, len(logit_rows), last - first))
                    logit_rows.extend(range(row + first - c, row + last - c))
            if s.samples:
                sampled.append(req)
                sample_idx.append(len(logit_rows))
                spec_offsets.append(None)
                logit_rows.append(row + q - 1)
            row += q

        decode_table, decode_mask, decode_lens = self._decode_tables(decode_reqs)
        seg_table, prefill_rows, row_seg, prefill_lens = self._prefill_tables(out, prefills)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=self.device),
            decode_block_table=decode_table,
            decode_mask=decode_mask,
            decode_seq_lens=decode_lens,
            num_decodes=len(decode_rows),
            block_size=self.block_size,
            prefill_seg_table=seg_table,
            prefill_rows=prefill_rows,
            prefill_row_seg=row_seg,
            prefill_seq_lens=prefill_lens,
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            attention=meta, logit_rows=logit_rows, sampled=sampled, sample_idx=sample_idx,
            spec_offsets=spec_offsets, prompt_logprobs=prompt_lp)

    def _prefill_tables(self, out: SchedulerOutput, prefills: list[PrefillSegment]):
        """The prefill segments' block tables (padded), and for each prefill row: its row
        in the batch, its segment, and the number of positions it attends to."""
        if not prefills:
            return None, None, None, None
        segs = [(s.request, s.request.num_computed_tokens, s.num_new_tokens)
                for s in out.scheduled if s.num_new_tokens > 1 and not s.spec_token_ids]
        max_blocks = -(-max(c + q for _, c, q in segs) // self.block_size)
        tables, rows, row_seg, lens = [], [], [], []
        for i, ((req, c, q), seg) in enumerate(zip(segs, prefills, strict=True)):
            n = -(-(c + q) // self.block_size)
            tables.append(req.block_ids[:n] + [0] * (max_blocks - n))
            rows.extend(range(seg.start, seg.start + q))
            row_seg.extend([i] * q)
            lens.extend(range(c + 1, c + q + 1))

        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        return tensor(tables), tensor(rows), tensor(row_seg), tensor(lens)

    def _decode_tables(self, reqs: list[tuple[Sequence, int]]
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded [n, max_blocks] block table of the decode rows (sequence, positions it
        attends to), the mask of their [n, 1, 1, max_blocks * block_size] gathered
        positions, and their lengths [n]."""
        if not reqs:
            empty = torch.empty(0, 0, dtype=torch.long)
            return empty, empty.bool(), torch.empty(0, dtype=torch.long)
        lens = [n for _, n in reqs]
        max_blocks = -(-max(lens) // self.block_size)
        rows = []
        for (r, _), n_tokens in zip(reqs, lens, strict=True):
            n = -(-n_tokens // self.block_size)
            rows.append(r.block_ids[:n] + [0] * (max_blocks - n))
        table = torch.tensor(rows, dtype=torch.long)
        width = max_blocks * self.block_size
        lens_t = torch.tensor(lens, dtype=torch.long)
        mask = torch.arange(width).unsqueeze(0) < lens_t.unsqueeze(1)
        return (table.to(self.device), mask.view(len(reqs), 1, 1, width).to(self.device),
                lens_t.to(self.device))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        inp = self.prepare(out)
        hidden = self.model(inp.input_ids, inp.positions, self.kv_cache.layers, inp.attention)
        logits = self.model.compute_logits(
            hidden[torch.tensor(inp.logit_rows, dtype=torch.long)])
        logits = logits.float()

        prompt_entries: dict[int, tuple[int, list[PositionLogprobs]]] = {}
        for req, first, row0, count in inp.prompt_logprobs:
            lp = torch.log_softmax(logits[row0: row0 + count], dim=-1)
            nxt = torch.tensor(req.prompt_token_ids[first + 1: first + 1 + count])
            entries = top_logprobs(lp, nxt, req.sampling_params.prompt_logprobs)
            prompt_entries[id(req)] = (first + 1, entries)

        sampler_output = None
        if inp.sampled:
            sampler_output = self.sampler(logits[torch.tensor(inp.sample_idx)],
                                          sampling_metadata(inp.sampled, inp.spec_offsets))
        return ModelRunnerOutput(inp.sampled, sampler_output, prompt_entries)
