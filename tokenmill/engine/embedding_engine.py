"""The encoder execution path: embeddings and cross-encoder scores, apart from the
paged-KV decode engine.

An encoder forward keeps nothing between steps (no KV cache, no sampling), so its runner
is a plain loop: the inputs are sorted by length and cut into batches of at most
``max_num_batched_tokens`` tokens (like prefills: many short inputs share one step, a
long one fills a step alone), each batch is one forward over the flat token batch with
bidirectional attention, and the hidden states are pooled (``pooling``) per input.
Sorting by length keeps the attention's padding (``forward_bidirectional``) small.

``EmbeddingEngine`` is synchronous (``LLM.embed``/``LLM.score`` call it);
``AsyncEmbeddingEngine`` gives the server one worker thread that takes every request
queued at that moment and runs their inputs together in the same batches.

Length contract: an input longer than ``max_model_len`` is refused (``InputTooLongError``
naming the limit) unless the caller asks for truncation: ``truncate`` k keeps the first
k - 1 tokens and the input's last token (the closing ``[SEP]``/EOS the tokenizer added).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import QueueFullError
from tokenmill.engine.decoder_embedder import DecoderEmbedder
from tokenmill.engine.pooling import (
    PoolingConfig,
    finish,
    pool,
    pooling_from_folder,
    pooling_from_gguf,
)
from tokenmill.engine_args import EngineArgs
from tokenmill.layers.attention import TorchSDPABackend
from tokenmill.layers.quantization import packable
from tokenmill.loader import open_checkpoint
from tokenmill.loader.quantize_at_load import SCHEMES, quantize_encoder_linears
from tokenmill.models import build_encoder, is_encoder
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger("tokenmill")

# Models trained with Matryoshka representation learning (a prefix of the vector is an
# embedding too): the OpenAI ``dimensions`` parameter is accepted for them only.
_MATRYOSHKA_ARCHS = frozenset({"nomic-bert", "NomicBertModel"})


class InputTooLongError(ValueError):
    """An input has more tokens than the model takes, and truncation was not asked for."""

    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(f"input {index} has {length} tokens; this model takes at most "
                         f"{limit} tokens per input (set truncate_prompt_tokens to truncate)")
        self.index, self.length, self.limit = index, length, limit


@dataclass(frozen=True)
class EncoderInput:
    """One input: token ids and their token types (0 for single texts; 1 for the second
    text of a cross-encoder pair)."""

    ids: tuple[int, ...]
    token_types: tuple[int, ...] | None = None


@dataclass(frozen=True)
class EmbeddingEngineConfig:
    """model: HF folder or GGUF file; max_num_batched_tokens: tokens per forward;
    max_model_len: tokens per input (None: the model's own limit); decoder: the engine config
    of a decoder to run as an embedder (last-token pooling unless the folder says)."""

    model: str
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    # set for a decoder served as an embedder: its engine config (model_loading loads it)
    decoder: EngineConfig | None = None
    # "auto" | "none" | "q8_0" | "q4_0" | "q4_k": as --quantization (an encoder's float
    # layer matrices, HF folder or F16/F32 GGUF, quantized at load: quantize_encoder_linears)
    quantization: str = "auto"


def resolve_task(flags: EngineArgs) -> str:
    """``--task auto``: embed for an encoder checkpoint, else generate."""
    if flags.task != "auto":
        return flags.task
    if flags.model is None or flags.load_format == "dummy":
        return "generate"
    try:
        return "embed" if is_encoder(open_checkpoint(flags.model).hf_config) else "generate"
    except ValueError:  # the engine's own loading says what is wrong with the path
        return "generate"


def embedding_engine(flags: EngineArgs) -> EmbeddingEngine:
    """The engine for ``--task embed`` from the engine flags (model, dtype, device,
    max_num_batched_tokens, max_model_len)."""
    if flags.model is None:
        raise ValueError("--task embed needs a model (an encoder such as BERT).")
    hf = open_checkpoint(flags.model).hf_config
    decoder = None if is_encoder(hf) else EngineConfig.from_args(flags)
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(flags.dtype)
    if dtype is None:
        raise ValueError(f"dtype {flags.dtype!r}; expected auto, float32, bfloat16, float16")
    return EmbeddingEngine(EmbeddingEngineConfig(
        model=flags.model, dtype=dtype, device=flags.device,
        # the decoders' default prefill chunk is small for encoder batches: 8192 unless set
        max_num_batched_tokens=(8192 if flags.max_num_batched_tokens
                                == EngineArgs.max_num_batched_tokens
                                else flags.max_num_batched_tokens),
        max_model_len=flags.max_model_len, decoder=decoder,
        quantization=flags.quantization))


def _st_max_seq_length(folder: str) -> int | None:
    path = os.path.join(folder, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        value = json.load(f).get("max_seq_length")
    return int(value) if value else None


class EmbeddingEngine:
    """An encoder model with its tokenizer and pooling, run on whole batches of inputs."""

    def __init__(self, config: EmbeddingEngineConfig) -> None:
        start = time.perf_counter()
        self.config = config
        ckpt = open_checkpoint(config.model)
        self.architecture = ckpt.hf_config.get("architectures", ["?"])[0]
        if config.decoder is not None:  # a decoder served with --task embed
            self.model: nn.Module = DecoderEmbedder.load(config.decoder)
        else:
            self.model = self._load_encoder(ckpt, config)
        self.model.eval()
        self.tokenizer = Tokenizer.from_pretrained(config.model)
        self.tokenizer.backend.no_truncation()
        self.tokenizer.backend.no_padding()
        self.is_cross_encoder = bool(getattr(self.model.config, "num_labels", 0))
        mode = "cls" if self.is_cross_encoder else "mean"
        default = PoolingConfig(mode="last" if config.decoder is not None else mode,
                                matryoshka=self.architecture in _MATRYOSHKA_ARCHS)
        limit = self.model.max_position_embeddings
        if ckpt.format == "hf":
            self.pooling = pooling_from_folder(config.model, default)
            limit = min(limit, _st_max_seq_length(config.model) or limit)
        else:
            self.pooling = pooling_from_gguf(ckpt.hf_config.get("gguf_metadata", {}),
                                             ckpt.hf_config.get("gguf_arch", ""), default)
        if config.max_model_len is not None:
            limit = min(limit, config.max_model_len)
        self.max_model_len = limit
        self.vocab_size = self.model.config.vocab_size
        self.hidden_size = self.model.config.hidden_size
        logger.info("Loaded encoder %s (%s) in %.1f s; pooling %s%s, %d tokens per input",
                    config.model, self.architecture, time.perf_counter() - start,
                    self.pooling.mode, " + normalize" if self.pooling.normalize else "",
                    limit)

    @staticmethod
    def _load_encoder(ckpt, config: EmbeddingEngineConfig) -> nn.Module:
        with torch.device(config.device):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(config.dtype)
            try:
                model = build_encoder(ckpt.hf_config, TorchSDPABackend())
            finally:
                torch.set_default_dtype(prev)
        # quantized GGUF matrices stay packed for the CPU kernels (float32 on the CPU)
        cpu32 = config.device == "cpu" and config.dtype == torch.float32
        keep = packable if cpu32 and config.quantization == "auto" else None
        tensors = ckpt.tensors(keep)
        if config.quantization in SCHEMES:
            if cpu32 and packable(SCHEMES[config.quantization]):
                tensors = quantize_encoder_linears(tensors, config.quantization)
            else:
                logger.warning("--quantization %s: no packed CPU kernels here (or not "
                               "float32 on CPU); weights stay float.", config.quantization)
        loaded = model.load_weights(tensors)
        missing = model.required_parameters() - loaded
        if missing:
            raise ValueError(f"checkpoint {config.model} lacks weights: "
                             f"{', '.join(sorted(missing)[:5])}")
        return model

    # ------------------------------------------------------------------ inputs

    def tokenize(self, text: str, add_special_tokens: bool = True) -> EncoderInput:
        return EncoderInput(tuple(self.tokenizer.encode(text, add_special_tokens)))

    def tokenize_pair(self, first: str, second: str) -> EncoderInput:
        """``[CLS] first [SEP] second [SEP]`` with token types 0 then 1."""
        enc = self.tokenizer.backend.encode(first, second)
        return EncoderInput(tuple(enc.ids), tuple(enc.type_ids))

    def fit(self, inputs: Sequence[EncoderInput], truncate: int | None) -> list[EncoderInput]:
        """Each input checked against ``max_model_len`` (``InputTooLongError``), or
        truncated to ``truncate`` tokens (-1: to ``max_model_len``)."""
        limit = self.max_model_len
        keep = limit if truncate in (None, -1) else min(truncate, limit)
        out = []
        for i, item in enumerate(inputs):
            n = len(item.ids)
            if n > keep and (truncate is not None or n > limit):
                if truncate is None:
                    raise InputTooLongError(i, n, limit)
                types = item.token_types
                item = EncoderInput(
                    item.ids[:keep - 1] + item.ids[-1:],
                    None if types is None else types[:keep - 1] + types[-1:])
            out.append(item)
        return out

    # ------------------------------------------------------------------ running

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Input indices, sorted by length, cut into batches under the token budget."""
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        budget = max(self.config.max_num_batched_tokens, self.max_model_len)
        batches, current, tokens = [], [], 0
        for i in order:
            if current and tokens + lengths[i] > budget:
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += lengths[i]
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def _forward(self, items: list[EncoderInput], mode: str) -> torch.Tensor:
        dev = self.config.device
        seq_lens = [len(x.ids) for x in items]
        ids = torch.tensor([t for x in items for t in x.ids], device=dev)
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(dev)
        types = torch.tensor([t for x in items for t in (x.token_types or [0] * len(x.ids))],
                             device=dev)
        hidden = self.model(ids, positions, types, seq_lens)
        return pool(hidden, seq_lens, mode)

    def pooled(self, inputs: Sequence[EncoderInput], mode: str | None = None) -> torch.Tensor:
        """[len(inputs), hidden] pooled states (not normalized), in the inputs' order."""
        if not inputs:
            return torch.empty(0, self.hidden_size)
        for item in inputs:
            if not item.ids:
                raise ValueError("an input has no tokens")
        out = torch.empty(len(inputs), self.hidden_size, dtype=torch.float32)
        for batch in self._batches([len(x.ids) for x in inputs]):
            vectors = self._forward([inputs[i] for i in batch], mode or self.pooling.mode)
            out[torch.tensor(batch)] = vectors.float().cpu()
        return out

    def embed(self, inputs: Sequence[EncoderInput],
              dimensions: int | None = None) -> torch.Tensor:
        """[len(inputs), dimensions or hidden] embeddings, pooled and normalized as the
        model says."""
        if dimensions is not None and not 0 < dimensions <= self.hidden_size:
            raise ValueError(f"dimensions must be between 1 and {self.hidden_size}")
        return finish(self.pooled(inputs), self.pooling.normalize, dimensions)

    def classify(self, inputs: Sequence[EncoderInput]) -> torch.Tensor:
        """Cross-encoder scores, one per input (a query/document pair): the classifier's
        logit through a sigmoid for one label (as sentence-transformers' CrossEncoder),
        else the softmax probability of the last label."""
        if not self.is_cross_encoder:
            raise ValueError(f"{self.architecture} has no classifier head")
        with torch.inference_mode():
            logits = self.model.classify(self.pooled(inputs, "cls"))
        if logits.shape[1] == 1:
            return torch.sigmoid(logits[:, 0])
        return torch.softmax(logits, dim=-1)[:, -1]

    def score(self, query: str, documents: Sequence[str],
              truncate: int | None = None) -> torch.Tensor:
        """One relevance score per document: the classifier's for a cross-encoder, else
        the cosine similarity of the query's and the document's embeddings."""
        if self.is_cross_encoder:
            pairs = [self.tokenize_pair(query, d) for d in documents]
            return self.classify(self.fit(pairs, truncate))
        items = self.fit([self.tokenize(query), *(self.tokenize(d) for d in documents)],
                         truncate)
        vectors = torch.nn.functional.normalize(self.pooled(items), dim=-1)
        return vectors[1:] @ vectors[0]


@dataclass
class _Job:
    kind: str  # "embed" | "classify"
    inputs: list[EncoderInput]
    future: Future


class AsyncEmbeddingEngine:
    """The server's handle: one worker thread runs every queued request's inputs
    together (same-kind jobs merged into the same length-sorted batches)."""

    def __init__(self, engine: EmbeddingEngine, max_queued_inputs: int | None = None) -> None:
        """``max_queued_inputs``: inputs waiting or running beyond which a request is
        refused (``QueueFullError``, a 429); None: no bound."""
        self.engine = engine
        self.max_queued_inputs = max_queued_inputs
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._queued = 0  # inputs of the requests not yet answered
        self._lock = threading.Lock()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tokenmill-encoder",
                                            daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def run(self, kind: str, inputs: list[EncoderInput]) -> torch.Tensor:
        """Pooled vectors (``embed``, not yet normalized) or scores (``classify``)."""
        if not self.is_running:
            raise RuntimeError("the encoder worker is not running")
        with self._lock:
            if (self.max_queued_inputs is not None
                    and self._queued + len(inputs) > self.max_queued_inputs):
                raise QueueFullError(f"{self._queued} inputs are waiting; this server queues "
                                     f"at most {self.max_queued_inputs}")
            self._queued += len(inputs)
        job = _Job(kind, inputs, Future())
        try:
            self._queue.put(job)
            return await asyncio.wrap_future(job.future)
        finally:
            with self._lock:
                self._queued -= len(inputs)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            while True:  # everything queued meanwhile runs in the same batches
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                jobs.append(more)
            for kind in ("embed", "classify"):
                self._run_merged([j for j in jobs if j.kind == kind], kind)

    def _run_merged(self, jobs: list[_Job], kind: str) -> None:
        if not jobs:
            return
        merged = [x for j in jobs for x in j.inputs]
        try:
            out = (self.engine.pooled(merged) if kind == "embed"
                   else self.engine.classify(merged))
        except Exception as e:  # noqa: BLE001 - handed to each waiting request
            for j in jobs:
                j.future.set_exception(e)
            return
        at = 0
        for j in jobs:
            j.future.set_result(out[at:at + len(j.inputs)])
            at += len(j.inputs)
