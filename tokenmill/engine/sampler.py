"""From logits to next tokens, one row per sampling request.

Order of operations (vLLM's): logprobs are taken from the raw model distribution; then
the logits are processed: ``min_tokens`` bans stop tokens, ``logit_bias`` is added,
repetition/presence/frequency penalties are applied; rows with a grammar (structured
outputs) get their token bitmask, which sets every token the grammar forbids to -inf (if
the other processing left a grammar row with no token at all, e.g. min_tokens banning the
EOS that a finished grammar requires, the grammar wins). Greedy rows take the argmax of that.
Random rows are divided by their temperature, filtered by min_p, top-k and top-p, and
sampled by the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` draws a token with
probability ``p``. A request with a seed draws its ``E`` from its own generator, so its
tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.outputs import Logprob, PositionLogprobs
from tokenmill.sampling_params import SamplingParams, SamplingType


@dataclass
class SamplingRow:
    """What the sampler needs to know about one row of logits."""

    params: SamplingParams
    generator: torch.Generator | None  # the request's own, if it has a seed
    grammar: Any | None                # a ``RequestGrammar`` (backend, matcher, fill), if any
    banned_token_ids: frozenset[int]   # stop/EOS tokens ``min_tokens`` bans at this step
    output_token_ids: list[int]
    # prompt + output token ids, given only when the repetition penalty needs them
    token_ids: list[int] | None
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None  # (token ids, values)
    keep_state: bool = False  # report the generator's state after this row's draw


@dataclass
class SamplingMetadata:
    """One step's sampling rows, in the order of the logits' rows."""

    rows: list[SamplingRow]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    sampled_logprobs: list[float | None]   # raw logprob of each sampled token, if asked
    logprobs: list[PositionLogprobs | None]
    # per row with ``keep_state`` and a generator that drew: its state after the draw
    generator_states: dict[int, torch.Tensor] | None = None


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, k: int) -> list[PositionLogprobs]:
    """For each row: the k most likely tokens plus the chosen one, with their ranks."""
    rows: list[PositionLogprobs] = []
    chosen_lp = logprobs.gather(1, chosen.view(-1, 1))
    ranks = (logprobs > chosen_lp).sum(dim=1) + 1
    top_vals, top_ids = logprobs.topk(k, dim=1) if k > 0 else (None, None)
    chosen_l, chosen_lp_l, ranks_l = chosen.tolist(), chosen_lp.view(-1).tolist(), ranks.tolist()
    for i in range(logprobs.shape[0]):
        entry: PositionLogprobs = {chosen_l[i]: Logprob(chosen_lp_l[i], ranks_l[i])}
        if k > 0:
            for r, (tok, lp) in enumerate(zip(top_ids[i].tolist(), top_vals[i].tolist(),
                                              strict=True)):
                entry.setdefault(tok, Logprob(lp, r + 1))
        rows.append(entry)
    return rows


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self._bitmask: torch.Tensor | None = None  # reused across steps, grown as needed

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [R, V] float32, row i sampled as ``meta.rows[i]`` says."""
        logits = logits[:, : self.vocab_size].float()
        rows = meta.rows
        n = len(rows)
        want_lp = [r.params.logprobs for r in rows]
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if any(k is not None for k in want_lp) else None)
        raw = logits
        logits = self._process(logits.clone(), rows)
        grammar_rows = [i for i, r in enumerate(rows) if r.grammar is not None]
        if grammar_rows:
            self._apply_grammars(logits, raw, rows, grammar_rows)

        greedy = [r.params.sampling_type == SamplingType.GREEDY for r in rows]
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i in range(n) if not greedy[i]]
        states: dict[int, torch.Tensor] = {}
        if random_rows:
            idx = torch.tensor(random_rows)
            sampled, states = self._sample(logits[idx], [rows[i] for i in random_rows])
            tokens[idx] = sampled

        token_list = tokens.tolist()
        sampled_lp: list[float | None] = [None] * n
        pos_lp: list[PositionLogprobs | None] = [None] * n
        lp_rows = [i for i in range(n) if want_lp[i] is not None]
        if lp_rows:
            idx = torch.tensor(lp_rows)
            k = max(want_lp[i] for i in lp_rows)
            entries = top_logprobs(raw_logprobs[idx], tokens[idx], k)
            for i, entry in zip(lp_rows, entries, strict=True):
                keep = want_lp[i]
                chosen = token_list[i]
                entry = {t: lp for t, lp in entry.items()
                         if t == chosen or (lp.rank is not None and lp.rank <= keep)}
                pos_lp[i] = entry
                sampled_lp[i] = entry[chosen].logprob
        generator_states = None
        if states:
            generator_states = {random_rows[j]: st for j, st in states.items()}
        return SamplerOutput(token_list, sampled_lp, pos_lp, generator_states)

    # ---- logits processing ------------------------------------------------------------
    def _apply_grammars(self, logits: torch.Tensor, raw: torch.Tensor,
                        rows: list[SamplingRow], grammar_rows: list[int]) -> None:
        backend = rows[grammar_rows[0]].grammar.backend
        if self._bitmask is None or self._bitmask.shape[0] < logits.shape[0]:
            self._bitmask = backend.allocate_bitmask(max(logits.shape[0], 8))
        for i in grammar_rows:  # each fill timed against the grammar's budget
            rows[i].grammar.fill_bitmask(self._bitmask, i)
        backend.apply_bitmask(logits, self._bitmask, grammar_rows)
        # only the min_tokens ban sets -inf before this point, so only its rows can have
        # lost every token the grammar allows
        banned = [i for i in grammar_rows if rows[i].banned_token_ids]
        dead = [i for i in banned if torch.isneginf(logits[i]).all()]
        if dead:
            for i in dead:
                logits[i] = raw[i]
            backend.apply_bitmask(logits, self._bitmask, dead)

    def _process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        for i, r in enumerate(rows):
            p = r.params
            if r.banned_token_ids:
                logits[i, list(r.banned_token_ids)] = float("-inf")
            if r.logit_bias is not None:
                ids, values = r.logit_bias
                logits[i, ids] += values
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                self._apply_penalties(logits[i], r)
        return logits

    def _apply_penalties(self, row: torch.Tensor, r: SamplingRow) -> None:
        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                    vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and r.output_token_ids:
            counts = torch.bincount(torch.tensor(r.output_token_ids),
                                    minlength=row.shape[0])[: row.shape[0]].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Samples each row; returns the tokens and, for rows with ``keep_state`` and a
        generator, that generator's state right after the row's draw."""
        temps = torch.tensor([r.params.temperature for r in rows])
        logits = logits / temps.unsqueeze(1)
        min_ps = torch.tensor([r.params.min_p for r in rows])
        if (min_ps > 0).any():
            probs = logits.softmax(dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        top_ks = [r.params.top_k for r in rows]
        top_ps = [r.params.top_p for r in rows]
        if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
            logits = _top_k_top_p(logits, top_ks, top_ps)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        states: dict[int, torch.Tensor] = {}
        for i, r in enumerate(rows):
            noise[i].exponential_(generator=r.generator or self.generator)
            if r.keep_state and r.generator is not None:
                states[i] = r.generator.get_state()
        return (probs / noise).argmax(dim=-1), states


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Keeps, per row, the k largest logits and the smallest set whose probability reaches
    top_p (the most likely token always survives)."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # clamped in Python: a tensor cannot hold every int a user may send
    ks = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks])
    positions = torch.arange(vocab).unsqueeze(0)
    drop = positions >= ks.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before > torch.tensor(top_ps).unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
