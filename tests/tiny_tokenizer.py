"""A tiny word-level BERT-style tokenizer built offline (no download), saved beside a tiny model
so that its save_pretrained folder tokenizes text data."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
WORDS = (
    *("the", "a", "cat", "dog", "sat", "ran", "on", "mat", "big", "small"),
    *("red", "blue", "is", "was", "and", "not", "very", "good", "bad", "."),
)
"""With :data:`SPECIAL`, 24 tokens: the vocabulary of ``tiny_hf``'s models."""


def save_tokenizer(folder: Path, model_max_length: int = 12) -> PreTrainedTokenizerFast:
    """Write the tokenizer's files into ``folder``; the tokenizer."""
    vocab = {token: i for i, token in enumerate((*SPECIAL, *WORDS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
