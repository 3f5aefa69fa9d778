"""PEFT LoRA adapter folders as checkpoints: the adapter-block eigenvalues against a dense float64
Hessian by double backward, a merged adapter as its plain base architecture, and the refusals
(each one line, exit 2)."""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import tiny_peft
import torch
from ground_truth import dense_hessian
from peft import PeftModel
from safetensors.torch import load_file
from tiny_cli import one_error_line
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import HessianOperator, Objective

QUIET = ["--samples", "8", "--batch-size", "8", "--no-trace", "--shards", "0", "--quiet"]


def _analyze(checkpoint, data, *extra):
    result = CliRunner().invoke(
        app, ["analyze", str(checkpoint), "--data", str(data), *QUIET, *extra, "--json"]
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _peft(adapter, base, dtype=torch.float64):
    """The adapter as peft itself loads it (not sharpscope's loader)."""
    eager = LlamaForCausalLM.from_pretrained(base, attn_implementation="eager")
    model = PeftModel.from_pretrained(eager, adapter)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model.to(dtype).eval()


def test_adapter_eigenvalues_match_a_dense_float64_hessian(tmp_path):
    adapter, base = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    report = _analyze(adapter, data, "--dtype", "float64", "--top-k", "2")
    names = [p["name"] for p in report["results"]["parameters"]]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)  # the default
    stated = report["inputs"]["checkpoint"]
    assert stated["format"] == "adapter"
    assert stated["adapter"]["rank"] == tiny_peft.RANK
    assert stated["adapter"]["target_modules"] == tiny_peft.TARGETS
    model = _peft(adapter, base)
    ids = load_file(str(data))["input_ids"]
    hf_loss = {"input_ids": ids, "labels": ids}  # the model's own causal-LM loss
    dense = dense_hessian(model, lambda outputs, _: outputs.loss, hf_loss, ids)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == dense.shape[0]
    want = torch.linalg.eigvalsh(dense).flip(0)[:2]
    got = torch.tensor(report["results"]["eigenvalues"]["values"], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=0, atol=1e-8), (got, want)


def test_lora_options_are_read_as_peft_reads_them(tmp_path):
    """rsLoRA scaling, rank and alpha patterns and a layer selection: the analysed model's loss
    is the loss of the adapter as peft itself loads it."""
    options = dict(
        use_rslora=True,
        rank_pattern={"v_proj": 1},
        alpha_pattern={"q_proj": 3},
        layers_to_transform=[0],
    )
    adapter, base = tiny_peft.write_adapter(tmp_path, **options)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    report = _analyze(adapter, data, "--dtype", "float64", "--top-k", "1")
    ids = load_file(str(data))["input_ids"]
    with torch.no_grad():
        want = _peft(adapter, base)(input_ids=ids, labels=ids).loss
    assert report["results"]["loss"] == pytest.approx(float(want), rel=1e-6)
    shapes = {p["name"]: p["shape"] for p in report["results"]["parameters"]}
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight"] == [
        1,
        8,
    ]


def test_params_still_override_the_adapter_default(tmp_path):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    report = _analyze(adapter, data, "--top-k", "1", "--params", "*q_proj.lora_B*")
    names = [p["name"] for p in report["results"]["parameters"]]
    assert names == ["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]


def test_a_merged_adapter_is_its_base_architecture(tmp_path):
    """merge_and_unload's folder analyses as a plain Llama, to the λ_max of the adapter model over
    its base weights (``--params``), and their Hessian products are equal (the function depends
    on W + BA)."""
    adapter, base = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    model = _peft(adapter, base)
    merged = tmp_path / "merged"
    copy.deepcopy(model).merge_and_unload().save_pretrained(merged)  # float64 weights
    top = ["--dtype", "float64", "--top-k", "1"]
    report = _analyze(merged, data, *top)
    assert report["inputs"]["checkpoint"]["format"] == "pretrained"
    assert "adapter" not in report["inputs"]["checkpoint"]
    wide = _analyze(adapter, data, *top, "--params", "*", "--exclude", "*lora_*")
    assert wide["results"]["num_params"] == report["results"]["num_params"]
    lam, want = (r["results"]["eigenvalues"]["values"][0] for r in (wide, report))
    assert abs(lam - want) <= 1e-6 * abs(want)
    ids = load_file(str(data))["input_ids"]

    def loss(out, y):
        return torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), y[:, 1:].reshape(-1)
        )

    plain = copy.deepcopy(model).merge_and_unload()
    plain.requires_grad_(True)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" not in name)
    wide_op = HessianOperator(Objective(model, loss, [({"input_ids": ids}, ids)]))
    flat_op = HessianOperator(Objective(plain, loss, [({"input_ids": ids}, ids)]))
    v = torch.randn(wide_op.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, b = wide_op @ v, flat_op @ v
    assert (a - b).norm() <= 1e-10 * b.norm(), ((a - b).norm(), b.norm())


def test_check_gates_an_adapter(tmp_path):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    lam = _analyze(adapter, data, "--top-k", "1")["results"]["eigenvalues"]["values"][0]
    for limit, code in ((2 * lam, 0), (lam / 2, 1)):
        args = ["check", str(adapter), "--data", str(data), *QUIET, "--max-eigenvalue", limit]
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == code, result.output


def _refused(tmp_path, *words, args=()):
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    result = CliRunner().invoke(
        app, ["analyze", str(tmp_path / "adapter"), "--data", str(data), *QUIET, *args]
    )
    one_error_line(result, *words)


def _edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_hub_id_base_needs_base(tmp_path):
    adapter, base = tiny_peft.write_adapter(tmp_path, base_in_config=False)
    _refused(tmp_path, "meta-llama/Llama-3.2-1B", "not a local folder", "--base")
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    assert _analyze(adapter, data, "--top-k", "1", "--base", str(base))["results"]["eigenvalues"]


def test_no_base_is_refused(tmp_path):
    adapter, base = tiny_peft.write_adapter(tmp_path)
    shutil.rmtree(base)
    _refused(tmp_path, "not a local folder", "--base")
    _edit_config(adapter, base_model_name_or_path=None)
    _refused(tmp_path, "names no base", "--base")
    _refused(tmp_path, "--base", "not found", args=("--base", str(tmp_path / "nowhere")))


def test_a_pickled_adapter_is_refused(tmp_path):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(weights)), adapter / "adapter_model.bin")
    weights.unlink()
    _refused(tmp_path, "adapter_model.bin", "pickle", "--trust-pickle")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"peft_type": "IA3"}, ("'IA3' adapter", "LoRA")),
        ({"use_dora": True}, ("use_dora", "plain LoRA")),
        ({"megatron_config": {"x": 1}, "megatron_core": "os"}, ("megatron", "plain LoRA")),
        ({"init_lora_weights": "pissa"}, ("pissa", "plain LoRA")),
    ],
)
def test_untested_adapter_types_are_refused(tmp_path, change, words):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    _edit_config(adapter, **change)
    _refused(tmp_path, *words)


def test_peft_missing_says_how_to_install(tmp_path, monkeypatch):
    tiny_peft.write_adapter(tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft raises ImportError
    _refused(tmp_path, "peft", "sharpscope[peft]")
