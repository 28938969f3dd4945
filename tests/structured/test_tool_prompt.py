"""Tools reach the chat template: as transformers passes them to a template that knows
tools, and through the system message for a template that does not (SmolLM2's)."""

from __future__ import annotations

import json

import pytest

from tests.tokenizer.helpers import smollm2_gguf_path
from tokenmill.tokenizer import Tokenizer
from tokenmill.tool_calling.prompt import template_messages

# A tool-aware template in the Hermes style (tools listed in the system turn, calls and
# tool results as tagged text), written for this test.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}

{% endif %}Functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% if message.content %}{{ message.content }}
{% endif %}{% for call in message.tool_calls %}<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city (°C).",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ARGS = {"city": "Zürich"}


def conversation(arguments) -> list[dict]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_gguf_path())


def test_a_tool_aware_template_renders_as_in_transformers(smollm):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=smollm.backend, eos_token="<|im_end|>")
    reference.chat_template = TOOL_TEMPLATE
    ours = Tokenizer(smollm.backend, eos_token_id=smollm.eos_token_id,
                     chat_template=TOOL_TEMPLATE)
    assert ours.chat_template_knows_tools
    # OpenAI sends arguments as JSON text; transformers users pass them as objects
    msgs, tools = template_messages(conversation(json.dumps(ARGS)), TOOLS, True)
    got = ours.apply_chat_template(msgs, tools=tools)
    expected = reference.apply_chat_template(conversation(ARGS), tools=TOOLS, tokenize=False,
                                             add_generation_prompt=True)
    assert got == expected
    assert '"arguments": {"city": "Zürich"}' in got and '"name": "get_weather"' in got


def test_a_template_without_tools_gets_them_in_the_system_message(smollm):
    assert not smollm.chat_template_knows_tools
    msgs, tools = template_messages(conversation(json.dumps(ARGS)), TOOLS, False)
    assert tools is None
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    text = smollm.apply_chat_template(msgs)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in system and "<tool_call>" in system
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
            "</tool_call>") in text
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>" in text
    # no system message: one is added (in place of the template's default one)
    msgs, _ = template_messages([{"role": "user", "content": "hi"}], TOOLS, False)
    assert msgs[0]["role"] == "system" and "get_weather" in msgs[0]["content"]


def test_no_tools_no_change(smollm):
    plain = [{"role": "user", "content": "hi"}]
    assert template_messages(plain, None, False) == (plain, None)
    assert template_messages(plain, None, True) == (plain, None)
