"""finetune on a PEFT LoRA adapter folder: it trains only the adapter, writes adapter folders that
peft loads and that analyze reads to the in-memory model's λ_max, and resumes bit-identically."""

from __future__ import annotations

import json
import signal

import pytest
import tiny_peft
import torch
from finetune_processes import (
    assert_same,
    latest_step,
    ok,
    sharpscope,
    started,
    stopping_after,
    wait_for,
)
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM
from typer.testing import CliRunner

from sharpscope.cli.app import app
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos
from sharpscope.io.losses import resolve_loss
from sharpscope.training import run as training_run

ESAM = ("--optimizer", "eigen-sam", "--lr", "0.05", "--batch-size", "4", "--dtype", "float64")


def _args(adapter, data, out, *extra):
    return ["finetune", str(adapter), "--data", str(data), "--out", str(out), *ESAM, *extra]


def _finetune(adapter, data, out, *extra):
    result = CliRunner().invoke(app, [*_args(adapter, data, out, *extra), "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def test_eigen_sam_writes_adapters_that_peft_loads_and_analyze_reads(tmp_path, monkeypatch):
    adapter, base = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    trained = []
    finetune = training_run.finetune

    def keep_model(folder, config, inputs, resume_from, watch):
        trained.append(inputs.model)
        return finetune(folder, config, inputs, resume_from, watch)

    monkeypatch.setattr(training_run, "finetune", keep_model)
    _finetune(adapter, data, tmp_path / "run", "--steps", "4")
    out = tmp_path / "run" / "step-000004"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    model = trained[0]
    moved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert moved and all("lora_" in n for n in moved)  # only the adapter trains
    start = load_file(str(adapter / "adapter_model.safetensors"))
    written = load_file(str(out / "adapter_model.safetensors"))
    assert any(not torch.equal(start[k].double(), written[k]) for k in start)
    float64 = LlamaForCausalLM.from_pretrained(base, dtype=torch.float64)
    loaded = PeftModel.from_pretrained(float64, out)
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p.detach().double(), moved[name].detach()), name

    analyze = ["analyze", str(out), "--data", str(data), "--dtype", "float64", "--samples", "0"]
    exact = ["-k", "1", "--tol", "1e-10", "--no-trace", "--shards", "0", "--quiet", "--json"]
    result = CliRunner().invoke(app, [*analyze, "--batch-size", "8", *exact])
    assert result.exit_code == 0, result.output
    analyzed = json.loads(result.stdout)["results"]["eigenvalues"]["values"][0]
    ids = load_file(str(data))["input_ids"]
    op = HessianOperator(
        Objective(model.eval(), resolve_loss("causal-lm"), [({"input_ids": ids}, ids)])
    )
    settings = SolveSettings(tol=1e-10, max_iter=200, seed=0)
    in_memory = lanczos(op, 1, which="largest", settings=settings).eigenvalues[0]
    assert analyzed == pytest.approx(float(in_memory), rel=1e-8)


def test_an_interrupted_adapter_run_resumes_bit_identically(tmp_path, monkeypatch):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    _finetune(adapter, data, tmp_path / "straight", "--steps", "4", "--eig-every", "3")
    stopping_after(monkeypatch, 2)
    args = ["finetune", str(adapter), "--data", str(data), "--out", str(tmp_path / "parts")]
    result = CliRunner().invoke(app, [*args, *ESAM, "--steps", "4", "--eig-every", "3", "--quiet"])
    assert result.exit_code == 128, result.output
    assert json.loads((tmp_path / "parts" / "latest").read_text())["step"] == 2
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["finetune", "--resume", str(tmp_path / "parts"), "--quiet"])
    assert result.exit_code == 0, result.output
    straight, resumed = (
        load_file(str(tmp_path / run / "step-000004" / "adapter_model.safetensors"))
        for run in ("straight", "parts")
    )
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.integration
def test_after_a_kill_an_adapter_run_resumes_bit_identically_from_its_folder(tmp_path):
    adapter, _ = tiny_peft.write_adapter(tmp_path)
    data = tiny_peft.write_tokens(tmp_path / "tokens.safetensors")
    steps = ("--steps", "12", "--eig-every", "3", "--save-every", "1", "--keep", "2")
    slow = ("--track-every", "1", "--track-iters", "40", "--device", "cpu")  # killed mid-run
    _finetune(adapter, data, tmp_path / "straight", *steps, *slow)
    run = tmp_path / "run"
    process = started([*_args(adapter, data, run, *steps, *slow), "--quiet"])
    wait_for(lambda: (latest_step(run) or 0) >= 4, process)  # after a refresh: v is saved
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = latest_step(run)
    assert killed_at is not None and 4 <= killed_at < 12
    away = adapter.rename(adapter.with_name("away"))  # the resume needs only the run's folder
    try:
        ok(sharpscope(["finetune", "--resume", str(run), "--quiet"]))
    finally:
        away.rename(adapter)
    straight, resumed = (
        load_file(str(tmp_path / name / "step-000012" / "adapter_model.safetensors"))
        for name in ("straight", "run")
    )
    assert_same(resumed, straight)
