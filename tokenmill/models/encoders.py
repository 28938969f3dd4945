"""Encoder registry: ``architectures`` name -> builder taking the config dict and the
attention backend (encoders read their own typed configs, not ``ModelConfig``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tokenmill.layers.attention import AttentionBackend
from tokenmill.models.bert import BertConfig, BertModel
from tokenmill.models.nomic_bert import NomicBertConfig, NomicBertModel


def _bert(hf: dict, backend: AttentionBackend) -> nn.Module:
    return BertModel(BertConfig.from_hf(hf), backend)


def _nomic(hf: dict, backend: AttentionBackend) -> nn.Module:
    return NomicBertModel(NomicBertConfig.from_hf(hf), backend)


ENCODER_REGISTRY: dict[str, Callable[[dict, AttentionBackend], nn.Module]] = {
    "BertModel": _bert,
    "BertForSequenceClassification": _bert,
    "NomicBertModel": _nomic,
}
