"""Structured outputs: constraining generation to a JSON schema, regex, choice or grammar
with token bitmasks (see ``backend.py`` for how it works)."""

from tokenmill.sampling_params import DEFAULT_MAX_WHITESPACE, StructuredOutputsParams
from tokenmill.structured.manager import RequestGrammar, StructuredOutputManager

__all__ = ["DEFAULT_MAX_WHITESPACE", "RequestGrammar", "StructuredOutputManager",
           "StructuredOutputsParams"]
