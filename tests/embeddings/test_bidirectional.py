"""``AttentionBackend.forward_bidirectional``: every token attends to all tokens of its own
sequence and to none of the others', on both of its paths (one padded, masked call; one
call per sequence for long inputs), against a plain softmax written here."""

from __future__ import annotations

import pytest
import torch

import tokenmill.layers.attention.base as base
from tokenmill.layers.attention import TorchSDPABackend


def _reference(q, k, v, seq_lens, scale):
    out, at = [], 0
    for n in seq_lens:
        qs, ks, vs = (t[at:at + n].transpose(0, 1) for t in (q, k, v))
        out.append((torch.softmax(qs @ ks.transpose(1, 2) * scale, -1) @ vs).transpose(0, 1))
        at += n
    return torch.cat(out)


@pytest.mark.parametrize("max_scores", [base._MAX_SCORES, 1])
def test_bidirectional_attention(monkeypatch, max_scores):
    monkeypatch.setattr(base, "_MAX_SCORES", max_scores)
    gen = torch.Generator().manual_seed(0)
    lens = [5, 9, 1, 3]
    q, k, v = (torch.randn(sum(lens), 4, 8, generator=gen) for _ in range(3))
    got = TorchSDPABackend().forward_bidirectional(q, k, v, lens, 0.3)
    assert torch.allclose(got, _reference(q, k, v, lens, 0.3), atol=1e-5)
    # the first token sees the tokens after it (not causal) ...
    causal = torch.nn.functional.scaled_dot_product_attention(
        q[:5].transpose(0, 1), k[:5].transpose(0, 1), v[:5].transpose(0, 1),
        is_causal=True, scale=0.3).transpose(0, 1)
    assert not torch.allclose(got[:5], causal, atol=1e-3)
    # ... and nothing of the next sequence
    k2 = k.clone()
    k2[5:] += 10
    assert torch.allclose(TorchSDPABackend().forward_bidirectional(q, k2, v, lens, 0.3)[:5],
                          got[:5], atol=1e-5)
