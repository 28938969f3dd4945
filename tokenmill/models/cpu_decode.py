"""A decode step of the Llama family in one C call for all layers (``tm_decode_layers``
in ``tokenmill/kernels/csrc/decode_step.c``).

At batch 1 a layer is little arithmetic, and called from Python it costs as much again in
dispatch: about fifteen module calls, tensor views and ctypes calls. For steps made only
of decodes (one new token per sequence), this path hands every layer to C in a single
ctypes call: the same kernels in the same order as the Python layer code (packed matmuls,
fused RMSNorm, the q/k/v bias of Qwen2 added as ``packed_linear`` adds it, in-place
rotary, paged decode attention, SiLU-and-mul), so the hidden states are bit-identical to
it. Everything else (prefill chunks, float weights, a bias on another projection, q/k
norm, tensor parallelism) takes the Python path.

The layers are described to C by an array of ``TmLayer`` records (pointers to each
layer's weights, rotary tables and K/V caches), built once here; the cache pointers are
filled in when the caches are first seen.
"""

from __future__ import annotations

import torch

from tokenmill.distributed import tp_size
from tokenmill.kernels.cpu import TmLayer, TmWeight
from tokenmill.layers.attention import AttentionMetadata, CPUAttentionBackend


class CPUDecodePath:
    def __init__(self, model) -> None:
        cfg = model.config
        layer0 = model.model.layers[0]
        self.kernels = layer0.self_attn.backend.kernels
        self.dims = (cfg.hidden_size, layer0.self_attn.num_heads,
                     layer0.self_attn.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
        self.scale = layer0.self_attn.scale
        self.eps = cfg.rms_norm_eps
        # The records point into the model's tensors, which live as long as the model
        # (and so as long as this path). k_cache and v_cache stay NULL until
        # _point_at_caches sees the caches.
        self.layers = (TmLayer * len(model.model.layers))()
        for rec, layer in zip(self.layers, model.model.layers, strict=True):
            att, mlp = layer.self_attn, layer.mlp
            rec.ln1 = layer.input_layernorm.weight.data_ptr()
            rec.ln2 = layer.post_attention_layernorm.weight.data_ptr()
            rec.qkv = _weight(att.qkv_proj)
            bias = att.qkv_proj.bias
            rec.qkv_bias = None if bias is None else bias.data_ptr()
            rec.o = _weight(att.o_proj)
            rec.gate_up = _weight(mlp.gate_up_proj)
            rec.down = _weight(mlp.down_proj)
            rec.cos = att.rotary.cos.data_ptr()
            rec.sin = att.rotary.sin.data_ptr()
        self._caches_seen: tuple | None = None  # which caches the records point at

    def _point_at_caches(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Points each layer's record at its K/V caches, unless it already does."""
        key = (len(kv_caches), kv_caches[0][0].data_ptr(), kv_caches[-1][1].data_ptr())
        if self._caches_seen != key:
            for rec, (k, v) in zip(self.layers, kv_caches, strict=True):
                rec.k_cache, rec.v_cache = k.data_ptr(), v.data_ptr()
            self._caches_seen = key

    @staticmethod
    def build(model) -> CPUDecodePath | None:
        """The fast path, if every layer qualifies; else None."""
        cfg = model.config
        if tp_size() != 1 or cfg.qk_norm or cfg.layer_windows:
            return None
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            unbiased = (att.o_proj, mlp.gate_up_proj, mlp.down_proj)
            bias = att.qkv_proj.bias
            if not isinstance(att.backend, CPUAttentionBackend) or any(
                    lin.packed is None for lin in (att.qkv_proj, *unbiased)) or any(
                    lin.bias is not None for lin in unbiased):
                return None
            if bias is not None and not (bias.dtype == torch.float32
                                         and bias.is_contiguous()):
                return None
            if layer.input_layernorm.weight.dtype != torch.float32:
                return None
        return CPUDecodePath(model)

    def applies(self, x: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """A step of decodes only, float32, and a cache the C layer can write (float32,
        or float16 where the kernels have F16C)."""
        kv_dtype = kv_caches[0][0].dtype
        return (not meta.prefills and x.shape[0] > 0
                and meta.num_decodes == x.shape[0] and x.dtype == torch.float32
                and (kv_dtype == torch.float32
                     or (kv_dtype == torch.float16 and self.kernels.has_avx2)))

    def __call__(self, x: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs every layer; returns (last layer's output, residual stream)."""
        x = x.contiguous().clone()
        residual = torch.empty_like(x)
        t = x.shape[0]
        h, nh, kvh, d, inter = self.dims
        table = meta.decode_block_table.contiguous()
        lens = meta.decode_seq_lens.contiguous()
        step = (positions.contiguous(), meta.slot_mapping.contiguous(), table, lens)
        ptrs = [p.data_ptr() for p in step]
        self._point_at_caches(kv_caches)
        rc = self.kernels.lib.tm_decode_layers(
            len(self.layers), self.layers, t, h, nh, kvh, d, inter, x.data_ptr(),
            residual.data_ptr(), self.eps, ptrs[0], ptrs[1], ptrs[2], table.shape[1],
            ptrs[3], meta.block_size, self.scale, int(kv_caches[0][0].dtype == torch.float16))
        if rc:
            raise RuntimeError(f"tm_decode_layers failed ({rc})")
        return x, residual


def _weight(linear) -> TmWeight:
    """The packed weight of a quantized linear layer, as C reads it (its segments)."""
    return linear.packed.tm_weight()
