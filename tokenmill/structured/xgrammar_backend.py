"""The XGrammar backend (https://github.com/mlc-ai/xgrammar), as SGLang and vLLM use it.

XGrammar compiles a grammar into a pushdown automaton and precomputes, per automaton
state, which tokens are always or never allowed, so that filling a bitmask at run time
only walks the few context-dependent tokens (microseconds per sequence). Its compiler
releases the GIL, so compiling in a worker thread does not stall the engine loop.

The vocabulary is handed over as the tokenizer's raw token strings plus how they encode
bytes (byte-level BPE like GPT-2 and SmolLM, SentencePiece byte fallback like Llama 2, or
raw), detected by xgrammar from the ``tokenizers`` JSON the same way it does for
transformers tokenizers. Stop tokens are the tokenizer's EOS ids: a grammar that is
complete allows only them.

Importing xgrammar takes about two seconds (it imports transformers), so this module is
only imported when the first constrained request arrives (or when the server warms it
up at start-up).
"""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
import torch
import xgrammar as xgr

from tokenmill.kernels.cpu import kernels
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.structured.backend import GrammarBackend, GrammarMatcher
from tokenmill.tokenizer import Tokenizer

XGRAMMAR_CACHE_BYTES = 64 * 1024 * 1024

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; users need the rest.
_CPP_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")


# xgrammar 0.2.9 writes the characters of a length-bounded JSON string (maxLength /
# minLength) as [^"\\\r\n], which lets a raw tab or other control character into the string:
# invalid JSON (json.loads refuses it). Its unbounded strings exclude \0-\x1f, as JSON
# requires; the grammar text is patched to do the same for bounded ones.
_LAX_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def _strict_json_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    if _LAX_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR))


def _clean(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return _CPP_PREFIX.sub("", text).strip()


def ebnf_literal(text: str) -> str:
    """``text`` as a double-quoted EBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()


class XGrammarBackend(GrammarBackend):
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, compile_threads: int = 2) -> None:
        backend = tokenizer.backend
        encoded = [""] * vocab_size
        for token, idx in backend.get_vocab(with_added_tokens=True).items():
            if idx < vocab_size:
                encoded[idx] = token
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
        self.info = xgr.TokenizerInfo(
            encoded, vocab_type=meta["vocab_type"], vocab_size=vocab_size,
            stop_token_ids=sorted(tokenizer.eos_token_ids) or None,
            add_prefix_space=meta["add_prefix_space"])
        self.vocab_size = vocab_size
        # xgrammar's own cache (keyed by grammar) is unlimited by default; ours in
        # manager.py is the main one, this one is bounded in bytes too
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=compile_threads,
                                            cache_enabled=True,
                                            cache_limit_bytes=XGRAMMAR_CACHE_BYTES)

    # ---- parse and compile -------------------------------------------------------------
    def parse(self, params: StructuredOutputsParams) -> xgr.Grammar:
        kind = params.kind
        try:
            if kind == "json":
                jsonschema.validators.validator_for(params.json).check_schema(params.json)
                return _strict_json_strings(self._json(json.dumps(params.json), params,
                                                       strict=True))
            if kind == "json_object":
                return self._json('{"type": "object"}', params, strict=False)
            if kind == "regex":
                return xgr.Grammar.from_regex(params.regex)
            if kind == "choice":
                return xgr.Grammar.from_ebnf(
                    "root ::= " + " | ".join(ebnf_literal(c) for c in params.choice))
            if kind == "grammar":
                return xgr.Grammar.from_ebnf(params.grammar)
            return _strict_json_strings(xgr.Grammar.from_structural_tag(params.structural_tag))
        except jsonschema.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ValueError(f"invalid JSON schema at {where}: {e.message}") from e
        except Exception as e:  # xgrammar raises RuntimeError, ValueError, pydantic errors
            raise ValueError(f"invalid {kind.replace('_', ' ')}: {_clean(e)}") from e

    @staticmethod
    def _json(schema: str, params: StructuredOutputsParams, strict: bool) -> xgr.Grammar:
        if params.disable_any_whitespace:
            return xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                                strict_mode=strict)
        return xgr.Grammar.from_json_schema(schema, any_whitespace=True, strict_mode=strict,
                                            max_whitespace_cnt=params.max_whitespace)

    def compile(self, grammar: xgr.Grammar) -> xgr.CompiledGrammar:
        return self.compiler.compile_grammar(grammar)

    def new_matcher(self, compiled: Any) -> XGrammarMatcher:
        return XGrammarMatcher(compiled)

    # ---- bitmasks ----------------------------------------------------------------------
    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor,
                     rows: list[int]) -> None:
        # one by one: xgrammar's BatchGrammarMatcher (a thread pool) measured 2x slower
        # at batch 32 on 2 cores, where torch's threads already hold the cores
        for m, row in zip(matchers, rows, strict=True):
            m.matcher.fill_next_token_bitmask(bitmask, row)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor,
                      rows: list[int]) -> None:
        k = kernels()
        if (k is not None and logits.device.type == "cpu" and logits.dtype == torch.float32
                and logits.stride(1) == 1 and bitmask.is_contiguous()):
            # ~20x faster than xgrammar's CPU path on a 32 x 49k batch (3-5 ms -> 0.2 ms)
            k.apply_token_bitmask(logits, bitmask, torch.tensor(rows, dtype=torch.long),
                                  self.vocab_size)
            return
        xgr.apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]],
                                        vocab_size=self.vocab_size, indices=rows)
