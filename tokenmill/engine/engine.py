"""The engine loop: one ``step()`` schedules, runs the model, samples and updates.

Both fronts drive this loop: ``LLM.generate`` calls ``step()`` until every request is
done; the server's async engine calls it from a background task. A user request with
``n > 1`` becomes n sequences (``Sequence`` objects) that the scheduler treats
independently; their results are gathered back into one ``RequestOutput``.

A failure ends only the request whose data caused it. When running a step raises, its
sequences are preempted and retried one at a time (``Scheduler.isolate``); one that fails
alone, or whose own bookkeeping (grammar, detokenizer) raises, or whose grammar exceeds
its budgets, is ended with ``finish_reason`` "error" and the reason in ``stop_reason``,
with its siblings; its blocks are freed. ``step()`` itself raises only for what no
request can be blamed for (the scheduler's own state).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.model_loading import load_model
from tokenmill.engine.model_runner import ModelRunner
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence, SequenceStatus, logit_bias_tensors
from tokenmill.engine.spec_decode import SpecDecoder
from tokenmill.engine.spec_decode.draft import DraftModelProposer
from tokenmill.layers.attention import attention_backend
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured import StructuredOutputManager
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger("tokenmill")


@dataclass
class Request:
    """A request as the user sent it: its prompt and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Sequence]


class Engine:
    def __init__(self, config: EngineConfig, show_progress: bool = True) -> None:
        self.config = config
        self.tokenizer = self._load_tokenizer(config)
        cc = config.cache
        self.kv_dtype = cc.dtype or config.dtype
        backend = attention_backend(config.device, config.dtype, self.kv_dtype)
        model, self.model_config = load_model(config, backend, show_progress)
        mc = self.model_config
        self.runner = ModelRunner(model, mc, cc, self.kv_dtype, config.device, config.seed)
        num_blocks = self.runner.num_blocks
        self.max_model_len = self._resolve_max_model_len(num_blocks * cc.block_size)
        self.block_manager = BlockManager(num_blocks, cc.block_size, cc.enable_prefix_caching)
        self.spec = self._spec_decoder(config, show_progress)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   self.spec)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer
                                       else mc.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.structured = StructuredOutputManager(self.tokenizer, mc.vocab_size)
        self._compiling: list[Sequence] = []  # queued sequences whose grammar is not ready

    def _spec_decoder(self, config: EngineConfig, show_progress: bool) -> SpecDecoder | None:
        spec = config.speculative
        if spec is None:
            return None
        draft = None
        if spec.method == "draft_model":
            draft = DraftModelProposer.load(config, self.model_config, self.kv_dtype,
                                            self.tokenizer, show_progress)
        return SpecDecoder(spec, self.max_model_len, draft)

    @staticmethod
    def _load_tokenizer(config: EngineConfig) -> Tokenizer | None:
        if config.skip_tokenizer_init:
            return None
        try:
            return Tokenizer.from_pretrained(config.tokenizer)
        except (ValueError, OSError):
            if config.load_format == "dummy":
                logger.warning("No tokenizer at %s: outputs will carry token ids only.",
                               config.tokenizer)
                return None
            raise

    def _resolve_max_model_len(self, pool_tokens: int) -> int:
        model_max = self.model_config.max_position_embeddings
        wanted = self.config.scheduler.max_model_len
        if wanted is None:
            return min(model_max, pool_tokens)
        if wanted > model_max:
            raise ValueError(f"max_model_len {wanted} exceeds the model's context length "
                             f"{model_max}.")
        if wanted > pool_tokens:
            raise ValueError(f"max_model_len {wanted} does not fit in the KV cache "
                             f"({pool_tokens} tokens); raise kv_cache_memory.")
        return wanted

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> str:
        """Validates and queues a request; returns its id. Raises ValueError for a prompt
        that is empty, out of vocabulary or longer than the context, before it takes any
        KV block."""
        user = self.make_request(prompt, params, request_id, priority, arrival_time)
        self.enqueue(user)
        return user.request_id

    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                     request_id: str | None = None, priority: int = 0,
                     arrival_time: float | None = None) -> Request:
        """Tokenizes and validates a request without touching engine state, so another
        thread (the server's) may call it while the engine steps."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        text, ids = self._tokenize(prompt)
        self._validate(ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        bias = logit_bias_tensors(params)  # built once, shared by the n sequences
        seqs = []
        for i in range(params.n):
            p = params.clone()  # shallow: the big fields are shared, never mutated
            p.n = 1
            if params.seed is not None:
                p.seed = params.seed + i  # distinct but reproducible draws per sequence
            seq = Sequence(f"{request_id}-{i}", ids, p, self.eos_token_ids, priority, arrival,
                           parent_id=request_id, index=i, logit_bias=bias)
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(
                    self.tokenizer, ids, skip_special_tokens=p.skip_special_tokens,
                    stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output)
            if p.structured_outputs is not None:
                # parsed here (ValueError if invalid), compiled once in the background
                seq.grammar = self.structured.grammar_for(p.structured_outputs)
            seq.first_sibling = seqs[0] if seqs else None
            seqs.append(seq)
        return Request(request_id, text, ids, seqs)

    def enqueue(self, user: Request) -> None:
        """Hands a validated request to the scheduler."""
        if user.request_id in self.requests:
            raise ValueError(f"request id {user.request_id!r} is already in use.")
        self.requests[user.request_id] = user
        for seq in user.sequences:
            self.scheduler.add_request(seq)
            if seq.grammar is not None and not seq.grammar.ready():
                self._compiling.append(seq)

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer; pass token ids.")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty.")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}).")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long, but this model's "
                             f"context (max_model_len) is {self.max_model_len} tokens, "
                             f"which leaves no room to generate.")
        params.verify_vocab(vocab)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.")

    def abort_request(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its blocks at once."""
        user = self.requests.pop(request_id, None)
        if user is None:
            return
        for seq in user.sequences:
            self.scheduler.finish_request(seq, SequenceStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step; returns the outputs of the user requests that made
        progress (new tokens or finished)."""
        failed = self._check_compiling() if self._compiling else []
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty():
            if self._compiling:  # nothing else to do: wait (briefly) for a grammar
                concurrent.futures.wait([r.grammar.future for r in self._compiling],
                                        timeout=0.05, return_when="FIRST_COMPLETED")
            elif self.scheduler.num_unfinished:
                raise RuntimeError("the scheduler could not place any waiting request")
            return failed
        now = time.monotonic()
        for s in sched.scheduled:
            if s.request.metrics.first_scheduled_time is None:
                s.request.metrics.first_scheduled_time = now
        # seeded generators are rewound if the step fails, so a retried neighbour draws
        # what it would have drawn
        generators = [(s.request.generator, s.request.generator.get_state())
                      for s in sched.scheduled if s.request.generator is not None]
        try:
            result = self.runner.execute(sched)
        except Exception as e:
            for generator, state in generators:
                generator.set_state(state)
            return failed + self._step_failed(sched, e)
        self.scheduler.update_after_step(sched)

        touched: dict[str, Request] = {}
        for s in sched.scheduled:
            req = s.request
            entry = result.prompt_logprobs.get(id(req))
            if entry is not None:
                first, entries = entry
                try:
                    if first == len(req.prompt_logprobs):
                        req.prompt_logprobs.extend(self._decode_logprobs(entries))
                except Exception as e:
                    self._fail(req, "prompt logprobs", e)
                    touched[req.parent_id] = self.requests[req.parent_id]
        so = result.sampler_output
        drafts = {id(s.request): s.spec_token_ids for s in sched.scheduled
                  if s.spec_token_ids}
        rows = result.sampled_requests
        i = 0
        while i < len(rows):
            req = rows[i]
            k = len(drafts.get(id(req), ()))
            if req.is_finished:  # failed above
                i += k + 1
                continue
            try:
                if k:
                    self._append_speculative(req, drafts[id(req)], so, i)
                else:
                    self._append_token(req, so.token_ids[i], so.sampled_logprobs[i],
                                       so.logprobs[i])
            except Exception as e:
                self._fail(req, "handling its new token", e)
            i += k + 1
            if req.grammar is not None and req.grammar.failure and not req.is_finished:
                self._fail(req, None, req.grammar.failure)
            touched[req.parent_id] = self.requests[req.parent_id]
        if self.spec is not None:
            self._record_step_cost(sched, time.perf_counter() - start, drafts)
        return failed + [self._make_output(u) for u in touched.values()]

    def _record_step_cost(self, sched, seconds: float, drafts: dict[int, list[int]]) -> None:
        """Tells the step-cost switch what a decode-only step cost per produced token
        (a step with prefill rows says nothing about decoding)."""
        accepted, self.spec.last_accepted = self.spec.last_accepted, {}
        if any(s.num_new_tokens - len(s.spec_token_ids) != 1 for s in sched.scheduled):
            return
        produced = sum(1 + accepted.get(id(s.request), 0) for s in sched.scheduled)
        self.spec.cost.record(seconds, produced, bool(drafts))

    def _step_failed(self, sched, error: Exception) -> list[RequestOutput]:
        """A step raised: a sequence that ran alone caused it and ends with an error;
        otherwise every sequence of the step is retried alone, to find which."""
        seqs = [s.request for s in sched.scheduled]
        if len(seqs) == 1:
            seq = seqs[0]
            self._fail(seq, "running its step", error)
            return [self._make_output(self.requests[seq.parent_id])]
        logger.warning("a step of %d sequences raised %s: %s; retrying them one at a time",
                       len(seqs), type(error).__name__, error)
        self.scheduler.isolate(seqs)
        return []

    def _fail(self, seq: Sequence, during: str | None, error: BaseException | str) -> None:
        """Ends a sequence and its siblings with finish_reason "error" (their blocks
        freed); the output is made by the caller."""
        if isinstance(error, BaseException):
            message = f"{type(error).__name__}: {error}"
            if during:
                message = f"internal error while {during}: {message}"
            logger.error("request %s failed while %s", seq.parent_id, during or "stepping",
                         exc_info=error)
        else:
            message = error
            logger.error("request %s failed: %s", seq.parent_id, message)
        user = self.requests.get(seq.parent_id)
        for s in (user.sequences if user is not None else [seq]):
            if not s.is_finished:
                s.stop_reason = message
                s.metrics.finished_time = time.monotonic()
                self.scheduler.finish_request(s, SequenceStatus.FINISHED_ERROR)

    def _check_compiling(self) -> list[RequestOutput]:
        """Forgets sequences whose grammar is now compiled; ends (with an error, the reason
        in stop_reason) those whose grammar failed to compile or timed out."""
        failed: dict[str, Request] = {}
        still = []
        for seq in self._compiling:
            if seq.is_finished or seq.grammar.ready():
                continue
            error = seq.grammar.error()
            if error is None:
                still.append(seq)
                continue
            self._fail(seq, None, f"grammar compilation failed: {error}")
            if seq.parent_id in self.requests:
                failed[seq.parent_id] = self.requests[seq.parent_id]
        self._compiling = still
        return [self._make_output(u) for u in failed.values()]

    def _decode_logprobs(self, entries):
        if self.tokenizer is not None:
            for entry in entries:
                for tok, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tok], skip_special_tokens=False)
        return entries

    def _append_speculative(self, req: Sequence, drafts: list[int], so, first: int) -> None:
        """A speculative decode's k + 1 sampled rows (from row ``first``): appends the
        sampled tokens while they confirm the proposals, and the first that does not (or
        the one after the last proposal), stopping early if the sequence finishes; marks
        the accepted proposals computed and rewinds a seeded generator to its state after
        the last kept row, as if each kept token had been sampled in a step of its own."""
        sampled = so.token_ids[first: first + len(drafts) + 1]
        accepted = self.spec.accept(req, drafts, sampled)
        for j in range(accepted + 1):
            i = first + j
            self._append_token(req, sampled[j], so.sampled_logprobs[i], so.logprobs[i])
            if req.is_finished:
                return
        states = so.generator_states
        if states and first + accepted in states:
            req.generator.set_state(states[first + accepted])
        self.scheduler.accept_spec(req, accepted)

    def _append_token(self, req: Sequence, token: int, logprob: float | None,
                      entry) -> None:
        req.output_token_ids.append(token)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = time.monotonic()
        if entry is not None:
            req.logprobs.extend(self._decode_logprobs([entry]))
            req.cumulative_logprob += logprob
        p = req.sampling_params
        status = None
        stopped_by_token = req.num_output_tokens > p.min_tokens and (
            token in p.all_stop_token_ids or (not p.ignore_eos and token in req.eos_token_ids))
        if stopped_by_token:
            status, req.stop_reason = SequenceStatus.FINISHED_STOPPED, (
                token if token in p.all_stop_token_ids else None)
        elif req.grammar is not None and (not req.grammar.accept(token)
                                          or req.grammar.is_terminated()):
            # the grammar is complete (it accepted a stop token); a refused token cannot
            # follow a masked step, but if it did, the output could only go wrong from here
            status = SequenceStatus.FINISHED_STOPPED
            if req.detokenizer is not None:
                req.detokenizer.add_token(token)
        elif req.detokenizer is not None:
            stop = req.detokenizer.add_token(token)
            if stop is not None:
                status, req.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        if status is None and (
                (p.max_tokens is not None and req.num_output_tokens >= p.max_tokens)
                or req.num_tokens >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            req.metrics.finished_time = time.monotonic()
            self.scheduler.finish_request(req, status)

    def _make_output(self, user: Request) -> RequestOutput:
        try:
            texts = [s.detokenizer.text(s.is_finished) if s.detokenizer is not None else ""
                     for s in user.sequences]
        except Exception as e:
            self._fail(user.sequences[0], "detokenizing", e)
            texts = [""] * len(user.sequences)
        finished = all(s.is_finished for s in user.sequences)
        outs = []
        for s, text in zip(user.sequences, texts, strict=True):
            outs.append(CompletionOutput(
                index=s.index, text=text, token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=s.logprobs, finish_reason=s.status.finish_reason,
                stop_reason=s.stop_reason))
        first = user.sequences[0]
        if finished:
            del self.requests[user.request_id]
        return RequestOutput(
            request_id=user.request_id, prompt=user.prompt,
            prompt_token_ids=user.prompt_token_ids, outputs=outs, finished=finished,
            prompt_logprobs=first.prompt_logprobs, metrics=first.metrics,
            num_cached_tokens=first.num_cached_tokens or 0)
