"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.embedding_engine import (
    EmbeddingEngine,
    EncoderInput,
    embedding_engine,
    resolve_task,
)
from tokenmill.engine.engine import Engine
from tokenmill.engine_args import EngineArgs
from tokenmill.loader.default_model import with_default_model
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.tool_calling.prompt import template_messages

Prompt = str | list[int]
Message = dict[str, Any]


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]


@dataclass(frozen=True)
class EmbeddingRequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput


@dataclass(frozen=True)
class ScoringOutput:
    score: float


@dataclass(frozen=True)
class ScoringRequestOutput:
    request_id: str
    outputs: ScoringOutput


def _embedder(args: EngineArgs) -> EmbeddingEngine | None:
    """The encoder engine when the model is served for embeddings (``task``)."""
    return embedding_engine(args) if resolve_task(args) == "embed" else None


class LLM:
    """An engine plus a loop that runs it until the submitted prompts are done.

    ``model`` is a Hugging Face folder or a .gguf file; None picks the embedded default
    (SmolLM2-135M-Instruct). Other keyword arguments are engine flags, by the names of
    ``tokenmill.engine_args.EngineArgs`` (those of the CLI flags): dtype, kv_cache_memory,
    max_num_seqs, max_model_len, ...
    """

    def __init__(self, model: str | None = None, show_progress: bool = True,
                 **engine_args) -> None:
        args = with_default_model(EngineArgs(model=model, **engine_args))
        self.embedder = _embedder(args)
        if self.embedder is None:
            self.engine = Engine(EngineConfig.from_args(args), show_progress)

    def get_tokenizer(self):
        return self.embedder.tokenizer if self.embedder else self.engine.tokenizer

    def embed(self, prompts: Prompt | Sequence[Prompt], use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None,
              dimensions: int | None = None) -> list[EmbeddingRequestOutput]:
        """Embeddings of every prompt (a string, strings, token ids or lists of them), in
        order, pooled and normalized as the model's config says (vLLM's shape:
        ``out.outputs.embedding``). Needs an encoder model (``task="embed"``)."""
        emb = self._need_embedder("embed")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = [emb.tokenize(p) if isinstance(p, str) else EncoderInput(tuple(p))
                 for p in prompts]
        for item in items:
            if any(not 0 <= t < emb.vocab_size for t in item.ids):
                raise ValueError(f"a token id is outside the vocabulary (0..{emb.vocab_size - 1})")
        if dimensions is not None and not emb.pooling.matryoshka:
            raise ValueError(f"{emb.architecture} does not support dimensions")
        items = emb.fit(items, truncate_prompt_tokens)
        vectors = emb.embed(items, dimensions)
        return [EmbeddingRequestOutput(str(i), list(x.ids), EmbeddingOutput(v.tolist()))
                for i, (x, v) in enumerate(zip(items, vectors, strict=True))]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str],
              use_tqdm: bool = True, truncate_prompt_tokens: int | None = None
              ) -> list[ScoringRequestOutput]:
        """Scores of ``text_1`` against each of ``text_2`` (or pairwise for two equal
        lists): the classifier's for a cross-encoder, cosine similarity for an embedder
        (vLLM's shape: ``out.outputs.score``)."""
        emb = self._need_embedder("score")
        a = [text_1] if isinstance(text_1, str) else list(text_1)
        b = [text_2] if isinstance(text_2, str) else list(text_2)
        if len(a) != 1 and len(a) != len(b):
            raise ValueError(f"text_1 has {len(a)} texts and text_2 {len(b)}")
        pairs = [(a[0], d) for d in b] if len(a) == 1 else list(zip(a, b, strict=True))
        scores = [float(emb.score(q, [d], truncate_prompt_tokens)[0]) for q, d in pairs] \
            if len(a) != 1 else emb.score(a[0], b, truncate_prompt_tokens).tolist()
        return [ScoringRequestOutput(str(i), ScoringOutput(s)) for i, s in enumerate(scores)]

    def _need_embedder(self, what: str) -> EmbeddingEngine:
        if self.embedder is None:
            raise ValueError(f"LLM.{what} needs an encoder model loaded with task='embed' "
                             "(or 'auto'); this one generates.")
        return self.embedder

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None,
                 ) -> list[RequestOutput]:
        """Generates for every prompt (a string, a list of strings, a list of token ids or
        a list of those) and returns the outputs in the order of the prompts."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} "
                                 "prompts; pass one, or one per prompt.")
        ids = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                ids.append(self.engine.add_request(
                    prompt, p, priority=priority[i] if priority else 0))
        except ValueError:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them and
        generates the assistant's replies. ``tools`` (OpenAI function tools) reach the
        template as transformers passes them, or, for a template that ignores tools, the
        system message (``tokenmill.tool_calling.prompt``); calls are not parsed here, the server
        does that (``tokenmill.tool_calling.parser`` parses a reply's text)."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ValueError("chat needs a tokenizer with a chat template.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            msgs, template_tools = template_messages(conv, tools, tok.chat_template_knows_tools)
            text = tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                           tools=template_tools, **(chat_template_kwargs or {}))
            # The template already holds any BOS token; do not add another.
            prompts.append(tok.encode(text, add_special_tokens=False))
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out, prompt_ids in zip(outputs, prompts, strict=True):
            out.prompt = tok.decode(prompt_ids, skip_special_tokens=False)
        return outputs

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req",
                   disable=not use_tqdm or len(ids) < 2)
        try:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                if rid not in done:
                    self.engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [done[i] for i in ids]
