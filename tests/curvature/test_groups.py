"""Per-layer groups from parameter names: transformers by block and kind, anything else by module
(sharpscope.curvature.groups), on the tiny Hugging Face models of tests/tiny_hf.py."""

from __future__ import annotations

import tiny_hf
from torch import nn

from sharpscope.curvature.groups import param_groups


def grouped(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Group name -> its tensors, for all of ``model``'s parameters."""
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    names = [name for name, _ in model.named_parameters()]
    groups = param_groups(names, types)
    assert sorted(n for g in groups for n in g.params) == sorted(names)  # each tensor once
    return {g.name: g.params for g in groups}


def pair(module: str) -> tuple[str, str]:
    return f"{module}.weight", f"{module}.bias"


def test_bert_by_block_and_kind():
    block = "bert.encoder.layer.0"
    assert grouped(tiny_hf.bert()) == {
        "embeddings": tuple(
            f"bert.embeddings.{kind}_embeddings.weight"
            for kind in ("word", "position", "token_type")
        ),
        "norm": pair("bert.embeddings.LayerNorm"),
        f"{block} · attention.q": pair(f"{block}.attention.self.query"),
        f"{block} · attention.k": pair(f"{block}.attention.self.key"),
        f"{block} · attention.v": pair(f"{block}.attention.self.value"),
        f"{block} · attention.o": pair(f"{block}.attention.output.dense"),
        f"{block} · norm": pair(f"{block}.attention.output.LayerNorm")
        + pair(f"{block}.output.LayerNorm"),
        f"{block} · mlp": pair(f"{block}.intermediate.dense") + pair(f"{block}.output.dense"),
        "head": pair("bert.pooler.dense") + pair("classifier"),
    }


def test_gpt2_fused_attention_is_qkv():
    block = "transformer.h.0"
    assert grouped(tiny_hf.gpt2()) == {
        "embeddings": ("transformer.wte.weight", "transformer.wpe.weight"),
        f"{block} · norm": pair(f"{block}.ln_1") + pair(f"{block}.ln_2"),
        f"{block} · attention.qkv": pair(f"{block}.attn.c_attn"),
        f"{block} · attention.o": pair(f"{block}.attn.c_proj"),
        f"{block} · mlp": pair(f"{block}.mlp.c_fc") + pair(f"{block}.mlp.c_proj"),
        "norm": pair("transformer.ln_f"),
    }


def test_vit_and_the_masked_lm_head():
    groups = grouped(tiny_hf.vit())
    assert groups["embeddings"] == (
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        *pair("vit.embeddings.patch_embeddings.projection"),
    )
    assert groups["vit.layers.0 · attention.v"] == pair("vit.layers.0.attention.v_proj")
    assert groups["vit.layers.0 · mlp"] == pair("vit.layers.0.mlp.fc1") + pair(
        "vit.layers.0.mlp.fc2"
    )
    assert groups["head"] == pair("classifier")
    head = grouped(tiny_hf.bert_mlm())["head"]
    assert head[0] == "cls.predictions.bias" and len(head) == 5  # its dense and LayerNorm too


def test_blocks_are_the_outermost_and_torch_attention_is_fused():
    names = [
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi.weight",
        "layers.1.self_attn.in_proj_weight",
        "layers.1.self_attn.out_proj.bias",
        "layers.1.linear2.weight",
        "layers.1.norm1.weight",
    ]
    types = {"layers.1.norm1": "LayerNorm"}
    assert [(g.name, g.kind) for g in param_groups(names, types)] == [
        ("encoder.block.0 · attention.q", "attention.q"),
        ("encoder.block.0 · mlp", "mlp"),
        ("layers.1 · attention.qkv", "attention.qkv"),
        ("layers.1 · attention.o", "attention.o"),
        ("layers.1 · mlp", "mlp"),
        ("layers.1 · norm", "norm"),
    ]


def test_models_without_attention_blocks_keep_one_group_per_module():
    names = ["layers.0.weight", "layers.0.bias", "layer1.0.conv1.weight", "fc.weight", "scale"]
    groups = param_groups(names, {"layers.0": "Linear", "": "Net"})
    assert [(g.name, g.kind, g.params) for g in groups] == [
        ("layers.0", None, ("layers.0.weight", "layers.0.bias")),
        ("layer1.0.conv1", None, ("layer1.0.conv1.weight",)),
        ("fc", None, ("fc.weight",)),
        ("scale", None, ("scale",)),
    ]
