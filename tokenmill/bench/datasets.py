"""Workloads for ``tokenmill bench serve``: what each simulated user sends.

Prompts are plain English words, not token ids, so the same workload can be sent to any
OpenAI-compatible server whatever its tokenizer. Their length in tokens is calibrated
against the server itself (see ``Calibration``), and the real count each request used
is read back from the response's ``usage.prompt_tokens``.

Every workload is a list of ``Session`` objects. A session is a conversation: an
optional system prompt and one or more user turns. The runner sends a session's turns
one after another, each carrying every earlier turn and the model's earlier answers;
sessions run concurrently. This one shape covers the three datasets:

``random``
    ``num_prompts`` sessions of one turn of about ``input_len`` tokens of random words.
``shared-prefix``
    ``num_prompts`` sessions of one turn; session ``i`` belongs to group ``i % G`` and
    starts with that group's system prompt of about ``prefix_len`` tokens, followed by
    its own question of about ``input_len`` tokens. A prefix cache computes each group's
    system prompt once.
``multi-turn``
    ``C`` sessions of ``T`` turns of about ``input_len`` tokens each; turn ``k``'s
    request holds turns ``1..k`` and answers ``1..k-1``, so conversations grow and
    every request repeats the previous request as its prefix.
``grounded``
    ``num_prompts`` sessions of one turn: a task over an excerpt of about ``input_len``
    words of the project's own source whose answer copies much of it (``grounded``),
    for speculative decoding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenmill.bench.grounded import grounded_prompts

DATASETS = ("random", "shared-prefix", "multi-turn", "grounded")

# Common English words that most BPE vocabularies hold as one token with a leading space.
WORDS = tuple("""
time person year way day thing man world life hand part child eye woman place work week
case point government company number group problem fact river stone light music garden
window morning answer story letter mountain ocean city country family school water money
night house book friend question side kind head word business service power end area
reason door table minute idea body history market field road paper evening voice forest
bridge island summer winter autumn spring rain snow wind cloud street train doctor teacher
student animal horse bird tree flower apple bread coffee kitchen chair dinner song picture
color office car ship plane village language science nature sister brother mother
father game heart moment energy health culture memory dream season valley desert lake
""".split())


@dataclass(frozen=True)
class Calibration:
    """Prompt tokens as an affine function of words: ``tokens = intercept + slope*words``.

    ``intercept`` is what the server adds to every prompt (a BOS token, the chat
    template's markup); ``slope`` is tokens per word. ``measured`` says whether the
    numbers came from probing the server or are the fallback of one token per word.
    """

    intercept: float = 0.0
    slope: float = 1.0
    measured: bool = False

    def words_for(self, tokens: int, with_overhead: bool = True) -> int:
        """How many words make about ``tokens`` tokens, counting the per-prompt overhead
        (BOS, chat markup) when ``with_overhead``; at least one word."""
        budget = tokens - (self.intercept if with_overhead else 0.0)
        return max(1, round(budget / self.slope))

    def tokens_for(self, words: int, with_overhead: bool = True) -> int:
        return round((self.intercept if with_overhead else 0.0) + self.slope * words)

    @classmethod
    def fit(cls, words: tuple[int, int], tokens: tuple[int, int]) -> Calibration:
        """The line through two probes (``words[i]`` words gave ``tokens[i]`` tokens).
        Raises ValueError when the probes cannot define a line of positive slope."""
        (w1, w2), (t1, t2) = words, tokens
        if w1 == w2 or t2 <= t1:
            raise ValueError(f"probes of {w1} and {w2} words gave {t1} and {t2} prompt "
                             "tokens; cannot calibrate words to tokens.")
        slope = (t2 - t1) / (w2 - w1)
        return cls(intercept=t1 - slope * w1, slope=slope, measured=True)


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@dataclass(frozen=True)
class Session:
    """A conversation to replay: an optional system prompt and user turns sent in order.

    ``expected_tokens[k]`` is the calibrated estimate of turn ``k``'s new prompt tokens
    (its user text, plus the system prompt and overhead on the first turn); the runner
    adds the earlier answers' lengths to estimate a whole request."""

    session_id: int
    user_turns: tuple[str, ...]
    expected_tokens: tuple[int, ...]
    system: str | None = None
    group: int | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """The dataset flags of ``bench serve``, validated."""

    name: str = "random"
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    prefix_len: int = 1000
    num_groups: int = 4
    num_conversations: int = 8
    turns: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}; "
                             f"got {self.name!r}.")
        for flag, value in (("--num-prompts", self.num_prompts),
                            ("--input-len", self.input_len),
                            ("--output-len", self.output_len),
                            ("--prefix-len", self.prefix_len),
                            ("--num-groups", self.num_groups),
                            ("--num-conversations", self.num_conversations),
                            ("--turns", self.turns)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}.")

    @property
    def num_requests(self) -> int:
        if self.name == "multi-turn":
            return self.num_conversations * self.turns
        return self.num_prompts


def build_sessions(spec: DatasetSpec, calib: Calibration) -> list[Session]:
    """The sessions of one benchmark run; the same ``spec`` and calibration always give
    the same words."""
    rng = random.Random(spec.seed)
    if spec.name == "random":
        n = calib.words_for(spec.input_len)
        return [Session(i, (random_words(rng, n),), (calib.tokens_for(n),))
                for i in range(spec.num_prompts)]
    if spec.name == "grounded":
        prompts = grounded_prompts(spec.num_prompts, spec.input_len, spec.seed)
        return [Session(i, (text,), (calib.tokens_for(len(text.split())),))
                for i, text in enumerate(prompts)]
    if spec.name == "shared-prefix":
        # The per-prompt overhead is counted in the prefix, so prefix + question is
        # about prefix_len + input_len tokens.
        n_prefix = calib.words_for(spec.prefix_len)
        n_question = calib.words_for(spec.input_len, with_overhead=False)
        prefixes = [random_words(rng, n_prefix) for _ in range(spec.num_groups)]
        expected = calib.tokens_for(n_prefix) + calib.tokens_for(n_question, False)
        return [Session(i, (random_words(rng, n_question),), (expected,),
                        system=prefixes[i % spec.num_groups], group=i % spec.num_groups)
                for i in range(spec.num_prompts)]
    n_first = calib.words_for(spec.input_len)
    n_next = calib.words_for(spec.input_len, with_overhead=False)
    sessions = []
    for i in range(spec.num_conversations):
        counts = [n_first] + [n_next] * (spec.turns - 1)
        turns = tuple(random_words(rng, n) for n in counts)
        expected = tuple(calib.tokens_for(n, k == 0) for k, n in enumerate(counts))
        sessions.append(Session(i, turns, expected))
    return sessions


def session_messages(session: Session, turn: int, answers: list[str]) -> list[dict[str, str]]:
    """The chat messages of ``session``'s request for ``turn`` (0-based): the system
    prompt, then user and assistant turns alternating, ending with user turn ``turn``."""
    messages = [{"role": "system", "content": session.system}] if session.system else []
    for k in range(turn + 1):
        messages.append({"role": "user", "content": session.user_turns[k]})
        if k < turn:
            messages.append({"role": "assistant", "content": answers[k]})
    return messages


def messages_to_prompt(messages: list[dict[str, str]]) -> str:
    """A plain transcript for /v1/completions: the contents joined by blank lines, so a
    conversation's earlier requests are exact text prefixes of its later ones."""
    return "\n\n".join(m["content"] for m in messages)
