"""Rendering chat templates: the Jinja2 programs that turn a list of messages into a prompt.

A model's chat template ships with its tokenizer (``tokenizer_config.json``,
``chat_template.jinja`` or the GGUF key ``tokenizer.chat_template``). It is untrusted code from
the internet, so it runs in Jinja2's ``ImmutableSandboxedEnvironment``, which refuses attribute
access to Python internals and mutation of the objects we pass in.

To produce byte-identical prompts to ``transformers.apply_chat_template`` we configure the
environment the same way:

* ``trim_blocks=True, lstrip_blocks=True``: a newline after a ``{% ... %}`` tag and the
  whitespace before it on the same line are removed, so templates can be indented readably;
* the ``loopcontrols`` extension (``{% break %}`` / ``{% continue %}``);
* a ``{% generation %}...{% endgeneration %}`` block, which transformers uses to mark assistant
  tokens for training masks; here it simply renders its body;
* globals ``raise_exception(msg)`` (a template's way to reject a conversation) and
  ``strftime_now(fmt)`` (templates that print today's date), and a ``tojson`` filter that does
  not HTML-escape and keeps non-ASCII characters (``ensure_ascii=False``), with ``indent``,
  ``separators`` and ``sort_keys`` options.

Values handed to the template are first rebuilt from plain JSON types (see ``_plain``): objects
with methods (pydantic models, enums, ...) could otherwise give a template a way out of the
sandbox. Each distinct template string is compiled once and cached.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template",
           "template_variables"]


class ChatTemplateError(ValueError):
    """The template failed to compile, or rejected the conversation via ``raise_exception``."""


class _GenerationBlock(jinja2.ext.Extension):
    """Parses ``{% generation %}...{% endgeneration %}`` and renders the body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace ({name!r})"
            )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """The variables ``template`` reads from its context (``messages``, ``tools``, ...)."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(template)))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


@lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
    """Compile ``template`` in the sandbox (cached per template string)."""
    env = _environment()
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e} (line {e.lineno})") from e


def _plain(value: Any) -> Any:
    """A copy of ``value`` built only from JSON-like Python types (dict, list, str, numbers)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    /,
    *,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """Render ``template`` for one conversation.

    ``variables`` become template variables as well (``bos_token``, ``eos_token``, and model
    specific switches such as ``enable_thinking``). Raises ``ChatTemplateError`` (a ValueError)
    when the template does not compile or rejects the conversation.
    """
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError(
            "a conversation must be a list of message dicts like {'role': 'user', 'content': ...}"
        )
    compiled = compile_chat_template(template)
    variables.setdefault("documents", None)  # transformers always defines it
    try:
        context = {name: _plain(value) for name, value in variables.items()}
        # the call's own values win over same-named extra variables
        context.update(messages=_plain(messages), tools=_plain(tools),
                       add_generation_prompt=add_generation_prompt)
        return compiled.render(context)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template rejected the conversation: {e}") from e
    except RecursionError:
        raise ChatTemplateError("chat template rejected the conversation: its values are "
                                "nested too deeply") from None
    except (TypeError, AttributeError, LookupError, ArithmeticError, ValueError) as e:
        # the template choked on a value of an unexpected type or shape (the Python error,
        # kept as the cause, is not for the client)
        raise ChatTemplateError("chat template could not render the conversation: a value "
                                "in it has a type or shape the template does not expect") from e
