"""A decode step of the Llama family in one C call for all layers (``tm_decode_layers``,
which runs ``tm_decode_layer`` for each).

At batch 1 a layer is ~0.1 ms of arithmetic and, called from Python, as much again in
dispatch: about fifteen module calls, tensor views and ctypes calls; even one ctypes call
per layer (~30 arguments) cost ~9 us. For steps made only of decodes (one new token per
sequence), this path hands every layer to C: the same kernels in the same order as the
Python layer code
(packed matmuls, fused RMSNorm, in-place rotary, paged decode attention, SiLU-and-mul),
so the hidden states are bit-identical to it. Everything else (prefill chunks, float
weights, qkv bias, q/k norm, tensor parallelism) takes the Python path.
"""

from __future__ import annotations

import torch

from tokenmill.distributed import tp_size
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
        # per layer: ln1, ln2, (qtype, weight) x 4, cos, sin, then the K/V caches' pointers
        # (columns 12, 13: filled when the caches are first seen, see _table)
        rows = []
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            row = [layer.input_layernorm.weight.data_ptr(),
                   layer.post_attention_layernorm.weight.data_ptr()]
            for lin in (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj):
                row += [lin.packed.qtype, lin.packed.data.data_ptr()]
            rows.append(row + [att.rotary.cos.data_ptr(), att.rotary.sin.data_ptr(), 0, 0])
        self.table = torch.tensor(rows, dtype=torch.int64)
        self._caches_in_table: tuple | None = None  # which caches columns 12, 13 point at

    def _table(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        key = (len(kv_caches), kv_caches[0][0].data_ptr(), kv_caches[-1][1].data_ptr())
        if self._caches_in_table != key:
            self.table[:, 12] = torch.tensor([k.data_ptr() for k, _ in kv_caches])
            self.table[:, 13] = torch.tensor([v.data_ptr() for _, v in kv_caches])
            self._caches_in_table = key
        return self.table

    @staticmethod
    def build(model) -> CPUDecodePath | None:
        """The fast path, if every layer qualifies; else None."""
        cfg = model.config
        if tp_size() != 1 or cfg.qkv_bias or cfg.qk_norm:
            return None
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            linears = (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if not isinstance(att.backend, CPUAttentionBackend) or any(
                    lin.packed is None or lin.bias is not None for lin in linears):
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
        layers = self._table(kv_caches)
        rc = self.kernels.lib.tm_decode_layers(
            layers.shape[0], layers.data_ptr(), t, h, nh, kvh, d, inter, x.data_ptr(),
            residual.data_ptr(), self.eps, ptrs[0], ptrs[1], ptrs[2], table.shape[1],
            ptrs[3], meta.block_size, self.scale, int(kv_caches[0][0].dtype == torch.float16))
        if rc:
            raise RuntimeError(f"tm_decode_layers failed ({rc})")
        return x, residual
