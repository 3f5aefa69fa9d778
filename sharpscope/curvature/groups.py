"""Per-layer parameter groups: one per module, or, for a transformer, one per block and kind.

A transformer is a model with repeated blocks (``encoder.layer.N``, ``h.N``, ``layers.N``,
``blocks.N``, ``block.N``, ``resblocks.N``) that hold attention parameters. Its groups are each
block's parameters of one kind (``bert.encoder.layer.0 · attention.q``), and, outside the blocks,
``embeddings``, ``norm``, ``head`` and ``other``. Any other model keeps one group per module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_BLOCK = re.compile(r"^(?:.*?\.)?(?:layer|layers|h|block|blocks|resblocks)\.\d+(?=\.)")
"""The path of the outermost block a parameter belongs to, up to its index
(``bert.encoder.layer.0``; T5's ``encoder.block.0``, not ``encoder.block.0.layer.0``)."""

_ATTENTION = re.compile(r"attn|attention")
_PROJECTIONS: tuple[tuple[str, frozenset[str]], ...] = (
    ("attention.qkv", frozenset({"c_attn", "qkv", "qkv_proj", "wqkv", "query_key_value"})),
    ("attention.q", frozenset({"query", "q", "q_proj", "q_lin", "wq", "to_q"})),
    ("attention.k", frozenset({"key", "k", "k_proj", "k_lin", "wk", "to_k"})),
    ("attention.v", frozenset({"value", "v", "v_proj", "v_lin", "wv", "to_v"})),
    ("attention.o", frozenset({"output", "o", "o_proj", "out_proj", "out_lin", "wo", "c_proj"})),
)
"""Attention kinds by the name of a module under the attention module (GPT-2's fused c_attn is
q, k and v at once)."""
_FUSED = {"in_proj_weight": "attention.qkv", "in_proj_bias": "attention.qkv"}
"""``nn.MultiheadAttention`` holds its fused input projection itself."""
_MLP = re.compile(
    r"mlp|ffn|feed_?forward|intermediate|output|dense|^fc\d*$|^c_fc$|^c_proj$|"
    r"^(gate|up|down)_proj$|^w[123io]$|^linear\d$"
)
_NORM = re.compile(r"norm|^ln(_\w+)?$")
_HEAD = re.compile(r"^(classifier|lm_head|pooler|cls|score|qa_outputs|head)$")
_EMBEDDING = re.compile(r"embed|^wte$|^wpe$|cls_token")


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose diagonal block of the Hessian is analysed on its own."""

    name: str
    kind: str | None
    """The transformer kind (``attention.q``, ``mlp``, ``norm``, ``embeddings``, ``head``,
    ``other``); None for a group of one module's parameters."""
    params: tuple[str, ...]


def _owner(name: str) -> str:
    """The name of the module that owns parameter ``name`` (``""``: the model itself)."""
    return name.rpartition(".")[0]


def _is_norm(parts: Sequence[str], module_type: str) -> bool:
    return "norm" in module_type.lower() or any(_NORM.search(p.lower()) for p in parts)


def _block_kind(relative: str, module_type: str) -> str:
    """The kind of a parameter of a block, from its path inside the block and its module's type."""
    *parts, leaf = relative.split(".")
    if _is_norm(parts, module_type):
        return "norm"
    at = next((i for i, p in enumerate(parts) if _ATTENTION.search(p.lower())), None)
    if at is not None:
        if leaf in _FUSED and at == len(parts) - 1:
            return _FUSED[leaf]
        below = [p.lower() for p in parts[at + 1 :]]
        return next((kind for kind, names in _PROJECTIONS if names & set(below)), "attention")
    if any(_MLP.search(p.lower()) for p in parts):
        return "mlp"
    return "other"


def _outer_kind(name: str, module_type: str) -> str:
    """The kind of a parameter outside the blocks."""
    parts = [p.lower() for p in name.split(".")]
    if any(_HEAD.match(p) for p in parts[:-1]):
        return "head"
    if _is_norm(parts[:-1], module_type):
        return "norm"
    if module_type == "Embedding" or any(_EMBEDDING.search(p) for p in parts):
        return "embeddings"
    return "other"


def _grouped(keys: Sequence[tuple[str, str | None]], names: Sequence[str]) -> list[ParamGroup]:
    """One group per distinct (name, kind) key, in the order of first appearance."""
    members: dict[tuple[str, str | None], list[str]] = {}
    for key, name in zip(keys, names, strict=True):
        members.setdefault(key, []).append(name)
    return [ParamGroup(group, kind, tuple(params)) for (group, kind), params in members.items()]


def param_groups(names: Sequence[str], module_types: Mapping[str, str]) -> list[ParamGroup]:
    """The per-layer groups of the parameters ``names`` (in flat-vector order); ``module_types``
    maps each owning module's name (``""``: the model) to its class name (``Linear``)."""
    blocks = [_BLOCK.match(n) for n in names]
    types = [module_types.get(_owner(n), "") for n in names]
    kinds = [
        _block_kind(n[b.end() + 1 :], t) if b else _outer_kind(n, t)
        for n, b, t in zip(names, blocks, types, strict=True)
    ]
    if not any(b and k.startswith("attention") for b, k in zip(blocks, kinds, strict=True)):
        return _grouped([(_owner(n) or n, None) for n in names], names)
    keys = [(f"{b[0]} · {k}" if b else k, k) for b, k in zip(blocks, kinds, strict=True)]
    return _grouped(keys, names)
