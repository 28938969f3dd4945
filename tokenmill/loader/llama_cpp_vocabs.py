"""llama.cpp's tokenizer test vocabularies, fetched from the llama-cpp-python sdist on PyPI.

llama.cpp checks its tokenizers against ``models/ggml-vocab-NAME.gguf`` (vocabulary-only GGUF
files: the ``tokenizer.ggml.*`` metadata of a real model, no weights) with
``ggml-vocab-NAME.gguf.inp`` (test texts separated by ``"\\n__ggml_vocab_test__\\n"``) and
``ggml-vocab-NAME.gguf.out`` (per text, one line of the expected token ids, generated from the
model's original Hugging Face tokenizer). The llama-cpp-python sdist vendors llama.cpp and so
carries these files.

``vocab_dir()`` downloads the pinned sdist (``pip download --no-deps --no-binary :all:`` into
a temporary folder), checks its sha256, extracts only the ``ggml-vocab-*`` members (streamed
with ``tarfile``; ~60 MB of the 77 MB archive) into ``<models cache>/llama-cpp-vocabs-0.3.36``
and marks the folder complete. Later calls return the folder at once.

    python -m tokenmill.loader.llama_cpp_vocabs        # -> the folder
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tokenmill.loader.pypi_models import (
    ModelChecksumError,
    ModelFetchError,
    _locked,
    cache_dir,
    sha256_file,
)

__all__ = ["SDIST_VERSION", "VocabTest", "list_vocabs", "read_vocab_test", "vocab_dir"]

SDIST_VERSION = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
_MEMBER = re.compile(r"^[^/]+/vendor/llama\.cpp/models/(ggml-vocab-[A-Za-z0-9._-]+)$")
_DONE = ".complete"
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"


@dataclass(frozen=True)
class VocabTest:
    """One vocabulary's test: the GGUF path and (text, expected ids) pairs in file order."""

    name: str
    gguf: Path
    cases: tuple[tuple[str, tuple[int, ...]], ...]


def _download_sdist(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "30", "-d", str(dest), f"llama-cpp-python=={SDIST_VERSION}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise ModelFetchError(f"pip download of llama-cpp-python=={SDIST_VERSION} failed "
                              f"(exit {proc.returncode}):\n{tail}")
    return found[0]


def _extract_vocabs(tarball: Path, out: Path) -> None:
    """Stream through ``tarball`` and write each ``models/ggml-vocab-*`` file into ``out``."""
    with tarfile.open(tarball, mode="r|gz") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if not match or not member.isfile():
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with open(out / match.group(1), "wb") as f:
                shutil.copyfileobj(src, f)


def vocab_dir() -> Path:
    """The folder holding llama.cpp's ``ggml-vocab-*`` test files, fetched on first use.

    Raises:
        ModelFetchError: pip could not download the sdist (e.g. no network).
        ModelChecksumError: the downloaded sdist is not the pinned one.
    """
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"llama-cpp-vocabs-{SDIST_VERSION}"
    if (out / _DONE).is_file():
        return out
    with _locked(out):
        if (out / _DONE).is_file():
            return out
        work = Path(tempfile.mkdtemp(prefix=".fetch-llama-cpp-vocabs-", dir=cache))
        try:
            tarball = _download_sdist(work)
            digest = sha256_file(tarball)
            if digest != SDIST_SHA256:
                raise ModelChecksumError(f"{tarball.name}: sha256 {digest}, expected "
                                         f"{SDIST_SHA256}; refusing it")
            part = work / "vocabs"
            part.mkdir()
            _extract_vocabs(tarball, part)
            (part / _DONE).write_text(f"{SDIST_SHA256}\n")
            shutil.rmtree(out, ignore_errors=True)
            os.replace(part, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


def list_vocabs(folder: Path) -> list[str]:
    """Names (``"llama-spm"``, ...) of the vocabularies in ``folder`` that have a test."""
    return sorted(p.name[len("ggml-vocab-"):-len(".gguf.inp")]
                  for p in folder.glob("ggml-vocab-*.gguf.inp"))


def read_vocab_test(folder: Path, name: str) -> VocabTest:
    """Parse ``ggml-vocab-NAME.gguf.inp``/``.out`` as llama.cpp's test-tokenizer-0 does.

    The texts are the ``.inp`` file split at the separator line (the file also ends with
    one); line i of ``.out`` holds text i's ids, space-separated (empty for an empty text).
    """
    gguf = folder / f"ggml-vocab-{name}.gguf"
    raw = (folder / f"{gguf.name}.inp").read_text(encoding="utf-8")
    end = TEST_SEPARATOR.rstrip("\n")
    if raw.endswith(end + "\n"):
        raw = raw[: -len(end) - 1]
    texts = raw.split(TEST_SEPARATOR)
    lines = (folder / f"{gguf.name}.out").read_text(encoding="utf-8").split("\n")
    if len(lines) < len(texts) or any(line.strip() for line in lines[len(texts):]):
        raise ValueError(f"{gguf.name}: {len(texts)} texts but {len(lines)} lines of ids")
    cases = tuple((text, tuple(int(t) for t in line.split()))
                  for text, line in zip(texts, lines, strict=False))
    return VocabTest(name=name, gguf=gguf, cases=cases)


if __name__ == "__main__":
    print(vocab_dir())
