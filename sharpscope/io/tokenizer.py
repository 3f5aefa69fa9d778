"""The text side of a Hugging Face ``save_pretrained`` folder: its tokenizer, the longest input its
model takes, and the ids of its named labels. Read from local files only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharpscope.errors import InputError
from sharpscope.io.load_errors import first_line
from sharpscope.io.optional import require_offline
from sharpscope.io.pretrained import CONFIG

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
"""Files of which a folder holding a tokenizer has at least one."""
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_positions")
UNBOUNDED = 1_000_000
"""transformers' ``model_max_length`` for a tokenizer that declares none is about 1e30."""


@dataclass(frozen=True)
class TextSpec:
    """How text data becomes model inputs: the save_pretrained folder whose tokenizer (and
    config.json) to use, the text field or pair of fields, the label field and the longest
    sequence in tokens (None: the model's positions)."""

    tokenizer: Path | None = None
    text_field: str = "text"
    label_field: str = "label"
    """An empty name: no labels, the language-modelling labels (the input ids)."""
    max_length: int | None = None

    def text_fields(self) -> tuple[str, ...]:
        """The one or two text fields ``text_field`` names (``sentence1,sentence2``)."""
        names = tuple(name.strip() for name in self.text_field.split(","))
        if not 1 <= len(names) <= 2 or not all(names):
            raise InputError(
                f"`text_field` {self.text_field!r} must name one field or a pair, like text or "
                "sentence1,sentence2"
            )
        return names


def load_tokenizer(folder: Path | None, data: str) -> Any:
    """The tokenizer of ``folder`` for the text data ``data``; an :class:`InputError` when there
    is none."""
    if folder is None or not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{data} holds text, which is tokenized with the model's own tokenizer: pass "
            "`checkpoint` a Hugging Face save_pretrained folder with its tokenizer files "
            "(tokenizer.json, vocab.txt, ...), or pre-tokenize the data (input_ids, "
            "attention_mask, labels)"
        )
    transformers = require_offline("transformers", f"tokenizing {data}")
    try:
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise InputError(
            f"transformers cannot load the tokenizer in {folder} ({first_line(exc)}); save it "
            "with tokenizer.save_pretrained(folder)"
        ) from exc


def max_length(spec: TextSpec, tokenizer: Any) -> int | None:
    """``spec.max_length``, else the fewest of the model's positions (config.json) and the
    tokenizer's ``model_max_length``; None when neither says."""
    if spec.max_length is not None:
        if spec.max_length < 1:
            raise InputError(f"`max_length` must be at least 1, got {spec.max_length}")
        return spec.max_length
    config = model_config(spec.tokenizer)
    limits = [config[key] for key in POSITION_KEYS if isinstance(config.get(key), int)]
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < UNBOUNDED:
        limits.append(declared)
    return min(limits, default=None)


def label_ids(folder: Path | None) -> dict[str, int]:
    """The config's ``label2id`` (class name -> id); empty without one."""
    mapping = model_config(folder).get("label2id")
    if not isinstance(mapping, dict):
        return {}
    return {str(k): v for k, v in mapping.items() if isinstance(v, int)}


def model_config(folder: Path | None) -> dict[str, Any]:
    """``folder/config.json`` as a dict; empty when there is none or it cannot be read."""
    path = None if folder is None else folder / CONFIG
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
