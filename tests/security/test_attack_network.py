"""Attack 7, the network: a save_pretrained folder whose config.json names a Hub attention kernel
(``kernels-community/flash-attn2``, ``<user>/<repo>``) or an implementation that is not installed
(``flash_attention_2``) made transformers look the kernel up on the Hub. Every Hugging Face path
(analyze, check, landscape and finetune of such a folder, on .jsonl, .csv and save_to_disk text
tokenized with the folder's tokenizer, and the save_pretrained step folders finetune writes) now
runs with no socket call at all (the autouse guard), and builds the model with torch's own
attention, saying so."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import pytest
import tiny_hf
import tiny_tokenizer
import transformers

from security.attack import NetworkGuard, Snapshot, cli, run_sharpscope
from sharpscope.io.checkpoints import load_model

KERNELS = ["kernels-community/flash-attn2", "someuser/somerepo", "flash_attention_2"]
ROWS = [
    {"text": text, "label": i % 3}
    for i, text in enumerate(
        ["the cat sat on the mat", "a dog ran", "the big red dog", "a small cat was bad"] * 2
    )
]
FAST = ["--samples", "8", "--top-k", "1", "--no-trace", "--quiet"]


def hostile_folder(where: Path, attention: str, key: str = "attn_implementation") -> Path:
    """The tiny BERT classifier and its tokenizer, whose config.json asks for ``attention``."""
    folder = where / "bert"
    tiny_hf.bert().save_pretrained(folder)
    tiny_tokenizer.save_tokenizer(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: attention}))
    return folder


def text_data(where: Path, layout: str) -> Path:
    """``ROWS`` as .jsonl, .csv or a datasets save_to_disk folder."""
    if layout == "jsonl":
        path = where / "d.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    elif layout == "csv":
        path = where / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        path = where / "dataset"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


def ok(result) -> None:
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("attention", KERNELS)
def test_a_kernel_in_the_config_is_not_looked_up(tmp_path, attention):
    folder = hostile_folder(tmp_path / "in", attention)
    data = text_data(tmp_path / "in", "jsonl")
    snapshot = Snapshot(tmp_path / "in")
    result = cli("analyze", folder, "--data", data, *FAST, "--out", tmp_path / "out")
    ok(result)
    said = f"warning: .* asks for the attention implementation {attention};.*torch's own attention"
    lines = [line for line in result.stderr.splitlines() if "attention implementation" in line]
    assert len(lines) == 1 and re.match(said, lines[0]), result.stderr  # one line, no source line
    snapshot.assert_unchanged()


@pytest.mark.parametrize("key", ["attn_implementation", "_attn_implementation"])
def test_the_model_is_built_with_torchs_attention(tmp_path, key):
    model, _ = load_model(hostile_folder(tmp_path, KERNELS[0], key))
    assert model.config._attn_implementation in ("sdpa", "eager")


def test_a_config_asking_for_eager_keeps_it_silently(tmp_path):
    folder = hostile_folder(tmp_path, "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_model(folder)
    assert model.config._attn_implementation == "eager"
    assert not [w for w in caught if "attention implementation" in str(w.message)]


@pytest.mark.parametrize("layout", ["csv", "dataset"])
def test_text_data_of_every_layout(tmp_path, layout):
    folder = hostile_folder(tmp_path / "in", KERNELS[1])
    data = text_data(tmp_path / "in", layout)
    snapshot = Snapshot(tmp_path / "in")
    ok(cli("analyze", folder, "--data", data, *FAST))
    snapshot.assert_unchanged()


def test_check_and_landscape(tmp_path):
    folder = hostile_folder(tmp_path / "in", KERNELS[0])
    data = text_data(tmp_path / "in", "dataset")
    snapshot = Snapshot(tmp_path / "in")
    ok(cli("check", folder, "--data", data, *FAST, "--max-eigenvalue", "1e9"))
    landscape = ["--points", "3", "--grid", "3", "--samples", "8", "--quiet"]
    ok(cli("landscape", folder, "--data", data, *landscape, "--out", tmp_path / "land"))
    snapshot.assert_unchanged()


def test_finetune_and_its_step_folders(tmp_path):
    folder = hostile_folder(tmp_path / "in", KERNELS[2])
    data = text_data(tmp_path / "in", "jsonl")
    snapshot = Snapshot(tmp_path / "in")
    run = tmp_path / "run"
    steps = ["--steps", "2", "--batch-size", "4", "--save-every", "1", "--probe-size", "4"]
    ok(cli("finetune", folder, "--data", data, "--out", run, *steps, "--device", "cpu", "-q"))
    step = run / json.loads((run / "latest").read_text())["dir"]
    assert (step / "config.json").is_file() and (step / "tokenizer.json").is_file()
    ok(cli("analyze", step, "--data", data, *FAST))
    snapshot.assert_unchanged()


@pytest.mark.integration
def test_a_fresh_process_sets_the_offline_switches_before_importing(tmp_path, no_network):
    """In a new process nothing imported the Hugging Face libraries before sharpscope."""
    guard: NetworkGuard = no_network
    folder = hostile_folder(tmp_path / "in", KERNELS[0])
    data = text_data(tmp_path / "in", "jsonl")
    done = run_sharpscope("analyze", folder, "--data", data, *FAST, guard=guard)
    assert done.returncode == 0, done.stderr
    assert guard.attempts() == []


def test_no_hub_kernel_replaces_a_layer(tmp_path):
    """A Llama-style model has layers (RMSNorm, MLP) that Hub kernels replace on GPUs."""
    config = transformers.LlamaConfig(
        vocab_size=24, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=12,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    assert model.use_kernels is False


@pytest.mark.integration
def test_the_hub_libraries_are_offline_in_a_fresh_process(tmp_path, no_network):
    """The switches are set before sharpscope first imports transformers (and so
    huggingface_hub, which reads them once, at import)."""
    folder = hostile_folder(tmp_path, KERNELS[0])
    script = (
        "import sys, pathlib\n"
        "from sharpscope.io.checkpoints import load_model\n"
        "assert 'huggingface_hub' not in sys.modules\n"
        f"load_model(pathlib.Path({str(folder)!r}))\n"
        "import huggingface_hub.constants as c\n"
        "print(c.HF_HUB_OFFLINE, c.is_offline_mode())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=no_network.env()
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_a_lora_adapter_on_a_hostile_base_and_its_finetune(tmp_path):
    """A PEFT adapter whose config names a Hub base, given a local base whose config names a Hub
    kernel: analyze, finetune and its adapter step folders, with no socket call."""
    pytest.importorskip("peft")
    import tiny_peft

    adapter, base = tiny_peft.write_adapter(tmp_path / "in", base_in_config=False)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "attn_implementation": KERNELS[0]}))
    data = tiny_peft.write_tokens(tmp_path / "in" / "tokens.safetensors")
    snapshot = Snapshot(tmp_path / "in")
    result = cli("analyze", adapter, "--base", base, "--data", data, *FAST)
    ok(result)
    assert "torch's own attention" in result.stderr
    run = tmp_path / "run"
    steps = ["--steps", "2", "--batch-size", "4", "--probe-size", "4", "--device", "cpu", "-q"]
    ok(cli("finetune", adapter, "--base", base, "--data", data, "--out", run, *steps))
    step = run / json.loads((run / "latest").read_text())["dir"]
    assert (step / "adapter_model.safetensors").is_file()
    ok(cli("analyze", step, "--data", data, *FAST))  # its config names the local base
    snapshot.assert_unchanged()
