"""Tiny random-init Hugging Face models built from configs (no download), as model factories
for ``--model tests/tiny_hf.py:NAME`` and for the tests' dense Hessians."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB, POSITIONS, WIDTH = 24, 12, 8
BERT = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=12,
    max_position_embeddings=POSITIONS,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


def bert(num_labels: int = 3, attn_implementation: str = "sdpa") -> BertForSequenceClassification:
    """A one-block BERT-style sequence classifier (about 1,300 parameters)."""
    torch.manual_seed(0)
    config = BertConfig(**BERT, num_labels=num_labels, attn_implementation=attn_implementation)
    return BertForSequenceClassification(config)


def bert_mlm() -> BertForMaskedLM:
    """A one-block BERT-style masked LM."""
    torch.manual_seed(0)
    return BertForMaskedLM(BertConfig(**BERT))


def gpt2(attn_implementation: str = "sdpa") -> GPT2LMHeadModel:
    """A one-block GPT-2-style causal LM (tied input and output embeddings)."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=POSITIONS,
        n_embd=WIDTH,
        n_layer=1,
        n_head=2,
        n_inner=12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        attn_implementation=attn_implementation,
    )
    return GPT2LMHeadModel(config)


def vit(num_labels: int = 3) -> ViTForImageClassification:
    """A one-block vision transformer on 8x8 single-channel images, 4x4 patches."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    return ViTForImageClassification(config)


def llama() -> LlamaForCausalLM:
    """A one-block Llama-style causal LM (RMSNorm, rotary positions, grouped-query attention,
    SiLU gate), random init from a config."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=POSITIONS,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def bert_run_inputs(folder: Path) -> dict[str, Path]:
    """:func:`bert` written by save_pretrained with a word-piece tokenizer into ``folder/bert``,
    and 64 token sequences (some padded) with 3-class labels as ``folder/tokens.pt``: what
    ``finetune`` trains on in the tests."""
    bert().save_pretrained(folder / "bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(chr(97 + i) for i in range(19))]
    (folder / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(folder / "bert" / "vocab.txt"))
    tokenizer.save_pretrained(folder / "bert")
    (folder / "bert" / "special_tokens_map.json").write_text('{"pad_token": "[PAD]"}\n')
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (64, 7), generator=g)
    mask = torch.ones(64, 7, dtype=torch.int64)
    mask[::3, 5:] = 0
    labels = torch.randint(0, 3, (64,), generator=g)
    torch.save({"input_ids": ids, "attention_mask": mask, "labels": labels}, folder / "tokens.pt")
    return {"checkpoint": folder / "bert", "data": folder / "tokens.pt"}
