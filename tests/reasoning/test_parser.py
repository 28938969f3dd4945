"""The reasoning split: the cases each parser must get right, and the streaming property
(the pieces of any split of the text add up to the non-streamed result)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.reasoning import ReasoningStream, reasoning_mode, split_reasoning
from tokenmill.reasoning.parser import thinking_disabled


@pytest.mark.parametrize("text, mode, reasoning, content, closed", [
    ("<think>\nplan it\n</think>\n\nThe answer.", "outside", "plan it", "The answer.", True),
    ("  <think>a</think>b", "outside", "a", "b", True),
    ("No thoughts here.", "outside", "", "No thoughts here.", False),
    ("Text <think>x</think> after", "outside", "", "Text <think>x</think> after", False),
    ("\nplan</think>answer", "inside", "plan", "answer", True),
    ("<think>plan</think>answer", "inside", "plan", "answer", True),
    ("</think>answer", "inside", "", "answer", True),
    ("<think>never closed, max_tokens hit", "outside", "never closed, max_tokens hit", "",
     False),
    ("never closed </thi", "inside", "never closed </thi", "", False),
    ("a</think>b</think>c", "inside", "a", "b</think>c", True),
    ("<think>a</think>", "off", "", "<think>a</think>", False),
])
def test_split_cases(text, mode, reasoning, content, closed):
    split = split_reasoning(text, True, mode)
    assert (split.reasoning, split.content, split.closed) == (reasoning, content, closed)


def test_modes_from_parser_prompt_and_template_kwargs():
    assert reasoning_mode(None, "<think>\n") == "off"
    assert reasoning_mode("qwen3", "<|im_start|>assistant\n") == "outside"
    assert reasoning_mode("qwen3", "<|im_start|>assistant\n<think>\n") == "inside"
    assert reasoning_mode("qwen3", "assistant\n<think>\n\n</think>\n\n") == "outside"
    assert reasoning_mode("deepseek_r1", "<|Assistant|>") == "inside"
    assert reasoning_mode("qwen3", "x", {"enable_thinking": False}) == "off"
    assert reasoning_mode("deepseek_r1", "x", {"thinking": False}) == "off"
    assert not thinking_disabled({"enable_thinking": True})
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_mode("nope", "")


def test_partial_tags_are_held_back():
    assert split_reasoning("<thi", False, "outside").content == ""
    assert split_reasoning("<thi", True, "outside").content == "<thi"
    assert split_reasoning("<think>abc </th", False, "outside").reasoning == "abc"
    assert split_reasoning("<think>abc </th", True, "outside").reasoning == "abc </th"


# pieces that make tags, partial tags and whitespace likely
_PIECES = st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", "th", "ink>",
                           " ", "\n", "\n\n", "a", "b c", "x", "é", "<tool_call>"])


def _stream(text: str, cuts: list[int], mode) -> tuple[str, str]:
    stream = ReasoningStream(mode)
    reasoning, content = "", ""
    ends = sorted({c for c in cuts if 0 < c < len(text)}) + [len(text)]
    for end in ends:
        new, content_so_far = stream.update(text[:end], end == len(text))
        reasoning += new
        assert content_so_far.startswith(content), (text[:end], content, content_so_far)
        content = content_so_far
    return reasoning, content


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=14).map("".join),
       st.lists(st.integers(0, 40), max_size=12),
       st.sampled_from(["outside", "inside", "off"]))
def test_streamed_pieces_add_up_to_the_split(text, cuts, mode):
    whole = split_reasoning(text, True, mode)
    assert _stream(text, cuts, mode) == (whole.reasoning, whole.content)
    # every prefix's settled split is a prefix of the whole one
    for end in range(len(text) + 1):
        part = split_reasoning(text[:end], False, mode)
        assert whole.reasoning.startswith(part.reasoning)
        assert whole.content.startswith(part.content)
