"""Tokenization: HF ``tokenizers`` wrapper, GGUF tokenizers, chat templates, detokenization."""

from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
