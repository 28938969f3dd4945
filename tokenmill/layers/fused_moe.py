"""The Mixture-of-Experts feed-forward block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Routing (``FusedMoE.route``), per token: router logits ``gate(x)`` (a float router
computed in float64, so that a token's choice never depends on its neighbours in the
batch: ``_row_stable``) -> softmax over all experts (float32) -> the ``top_k`` largest
probabilities and their experts -> divided by their sum where ``norm_topk_prob``.
(Taking the softmax over the top-k logits only, as Mixtral's first release did, equals
the renormalized form.)

Experts (``FusedMoE.forward``): the (token, expert) pairs are sorted by expert, so each
expert runs once per step on all of its tokens: its weights are read once however many
tokens chose it, and an expert no token chose is not touched. Each expert is a gated MLP
of tokenmill's linear layers, so quantized weights (a GGUF file's, or a float
checkpoint's under ``--quantization``) stay packed and run on the CPU kernels. Outputs
are scaled by their routing weights and added into the result in expert order (as
transformers adds them); a lone token (a batch-1 decode step) runs its experts in that
order directly, skipping the sort and scatter. Qwen2-MoE then adds its shared expert,
scaled by sigmoid(``shared_expert_gate(x)``).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config import MoEConfig
from tokenmill.layers.activation import silu_and_mul
from tokenmill.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one matrix."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate] * 2)
        self.down_proj = RowParallelLinear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class FusedMoE(nn.Module):
    """Router, experts and optional shared expert. Parameter names follow the
    Qwen-MoE checkpoints: ``gate``, ``experts.E.{gate_up,down}_proj``,
    ``shared_expert.*``, ``shared_expert_gate``."""

    def __init__(self, hidden: int, moe: MoEConfig) -> None:
        super().__init__()
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.gate = ReplicatedLinear(hidden, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(hidden, moe.intermediate_size)
                                     for _ in range(moe.num_experts))
        if moe.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden, moe.shared_intermediate_size)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, top_k] float32, expert ids [T, top_k])."""
        probs = torch.softmax(_row_stable(self.gate, x).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        out = self._one_token(x, weights, ids) if x.shape[0] == 1 else self._grouped(
            x, weights, ids)
        if self.shared_expert is not None:
            gate = _row_stable(self.shared_expert_gate, x)
            shared = torch.sigmoid(gate) * self.shared_expert(x)
            out = out + shared
        return out

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                   ) -> torch.Tensor:
        """A single token (a batch-1 decode step): its experts in expert order, without
        the sorting and scattering (the same sums in the same order)."""
        out = torch.zeros_like(x)
        for e, w in sorted(zip(ids[0].tolist(), weights[0].tolist(), strict=True)):
            out += self.experts[e](x) * w
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // self.top_k
        scale = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        start = 0
        for expert, n in zip(self.experts, counts, strict=True):
            if n:
                rows = tokens[start:start + n]
                out.index_add_(0, rows, expert(x[rows]) * scale[start:start + n])
            start += n
        return out


def _row_stable(linear: ReplicatedLinear, x: torch.Tensor) -> torch.Tensor:
    """A small float linear layer (the router, the shared expert's gate) whose rows do
    not depend on the batch: a float32 GEMM sums in an order that depends on the row
    count (BLAS picks its kernel by shape), which could move a token's expert choice
    with its neighbours; in float64 the sums round to the same float32 value. Packed
    weights are row-independent already. The float64 copy of the weight is made once
    (E x H x 8 bytes per layer); the cost is E x H per token, next to the experts'
    top_k x 3 x I x H."""
    if linear.packed is not None:
        return linear(x)
    w64 = getattr(linear, "weight64", None)
    if w64 is None or w64.device != x.device:
        w64 = linear.weight64 = linear.weight.detach().double()
    return torch.nn.functional.linear(x.double(), w64).to(x.dtype)
