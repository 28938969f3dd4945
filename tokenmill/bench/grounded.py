"""The ``grounded`` dataset: input-grounded work whose answer copies much of its prompt,
built from text the project ships (its own Python source), where speculative decoding
by prompt lookup or suffix decoding pays.

Two kinds of task alternate, each over an excerpt of a source file (whole lines from
the top of a randomly chosen file, as many as fit the word budget):

* rename: "Rewrite this code with the identifier X renamed to Y" (X is a name defined in
  the excerpt), answered by the excerpt again with one name changed;
* quote: "Summarize this code, quoting each function's first line verbatim", answered
  by lines taken from the excerpt.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the tokenmill package
_DEFINED = re.compile(r"^\s*(?:def|class)\s+([A-Za-z_][A-Za-z0-9_]*)|^\s*([a-z_][a-z0-9_]*)\s*=",
                      re.MULTILINE)


def source_files() -> list[Path]:
    """The package's Python files of some substance, in a stable order."""
    return sorted(p for p in _SOURCE_ROOT.rglob("*.py") if p.stat().st_size > 2000)


def excerpt(path: Path, max_words: int) -> str:
    """The file's leading whole lines, at most ``max_words`` whitespace-separated words
    (at least one line)."""
    out, words = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        n = len(line.split())
        if out and words + n > max_words:
            break
        out.append(line)
        words += n
    return "\n".join(out)


def grounded_prompt(rng: random.Random, max_words: int, kind: int) -> str:
    """One task over an excerpt of a random source file; ``kind`` 0 renames, 1 quotes."""
    files = source_files()
    while True:
        code = excerpt(rng.choice(files), max_words)
        names = sorted({a or b for a, b in _DEFINED.findall(code)} - {"_"})
        if names:
            break
    if kind == 0:
        old = rng.choice(names)
        return (f"Rewrite the following Python code with the identifier `{old}` renamed to "
                f"`{old}_renamed` everywhere. Output only the complete rewritten code.\n\n"
                f"```python\n{code}\n```")
    return ("Summarize the following Python code. For each function or class, quote its "
            "first line verbatim, then explain it in one sentence.\n\n"
            f"```python\n{code}\n```")


def grounded_prompts(n: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [grounded_prompt(rng, max_words, i % 2) for i in range(n)]
