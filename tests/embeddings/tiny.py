"""Tiny random BERT checkpoints written the way transformers and sentence-transformers
write them (config.json, model.safetensors, a WordPiece tokenizer.json, and for
embedders modules.json + 1_Pooling + 2_Normalize), for fast tests without a download."""

from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

WORDS = ("the a cat dog sat on mat fish swims in sea sky is blue red green what where who "
         "animal water color ##s ##ing ##ed un ##known paris france city capital of").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: str) -> int:
    """A lower-casing WordPiece tokenizer with BERT's [CLS] a [SEP] b [SEP] template;
    returns the vocabulary size."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(SPECIAL + letters + list(WORDS)
                                                      + [f"##{c}" for c in letters]))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]",
                   "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}, f)
    return len(vocab)


def tiny_bert(folder: str, classifier: bool = False, pooling: str | None = "mean",
              seed: int = 0, max_positions: int = 64):
    """Writes a random BertModel (or a one-label BertForSequenceClassification) to
    ``folder`` and returns the transformers model, for reference outputs."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    os.makedirs(folder, exist_ok=True)
    vocab = write_tokenizer(folder)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=max_positions, num_labels=1,
                     initializer_range=0.2)
    torch.manual_seed(seed)
    model = (BertForSequenceClassification if classifier else BertModel)(cfg).eval()
    with torch.no_grad():  # LayerNorms and biases away from their init, so bugs show
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    if pooling is not None and not classifier:
        with open(os.path.join(folder, "modules.json"), "w") as f:
            json.dump([{"idx": 0, "name": "0", "path": "",
                        "type": "sentence_transformers.models.Transformer"},
                       {"idx": 1, "name": "1", "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling"},
                       {"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"}], f)
        os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
        with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
            json.dump({"word_embedding_dimension": 32,
                       "pooling_mode_cls_token": pooling == "cls",
                       "pooling_mode_mean_tokens": pooling == "mean"}, f)
    return model
