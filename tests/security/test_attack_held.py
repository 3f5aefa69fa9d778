"""Attacks the probe tried that held: a test each, so that they keep holding."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tiny_cli import FAST, make_checkpoint, refused

from security.attack import Snapshot, cli


class Payload:
    """Unpickling this runs ``touch PATH``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.path}",)


@pytest.fixture
def bert_folder(tmp_path):
    """A tiny BERT classifier saved with save_pretrained."""
    from tiny_hf import bert

    folder = tmp_path / "bert"
    bert().save_pretrained(folder)
    return folder


def test_remote_code_in_a_model_folder_never_runs(tmp_path, bert_folder, marker):
    (bert_folder / "modeling_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import BertForSequenceClassification as EvilModel\n"
    )
    config = json.loads((bert_folder / "config.json").read_text())
    config["architectures"] = ["EvilModel"]
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (bert_folder / "config.json").write_text(json.dumps(config))
    snap = Snapshot(tmp_path)
    result = cli("analyze", bert_folder, *FAST)
    refused(result.exit_code, result.stderr, "EvilModel", "--model")
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin"])
def test_a_pickle_that_runs_code_is_refused(tmp_path, bert_folder, marker, name):
    weights = {"weight": torch.zeros(2), "evil": Payload(str(marker))}
    if name == "pytorch_model.bin":
        (bert_folder / "model.safetensors").unlink()
        target = bert_folder / name
    else:
        target = tmp_path / name
    torch.save(weights, target)
    snap = Snapshot(tmp_path)
    result = cli("analyze", target.parent if name == "pytorch_model.bin" else target, *FAST)
    refused(result.exit_code, result.stderr, "--trust-pickle", "posix.system")
    snap.assert_unchanged()


def test_a_shard_index_cannot_leave_its_folder(tmp_path, bert_folder):
    (bert_folder / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"bert.pooler.dense.bias": "../outside.safetensors"}}
    (bert_folder / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("analyze", bert_folder, *FAST)
    refused(result.exit_code, result.stderr, "weight_map")


def test_object_arrays_in_an_npz_are_refused(tmp_path, marker):
    path = tmp_path / "data.npz"
    inputs = np.empty(2, dtype=object)
    inputs[:] = [Payload(str(marker)), Payload(str(marker))]
    np.savez(path, inputs=inputs, targets=np.zeros(2, dtype=np.int64))
    result = cli("analyze", make_checkpoint(tmp_path), "--data", path, "--quiet")
    refused(result.exit_code, result.stderr, "Python objects")


@pytest.mark.parametrize(
    "header",
    [
        struct.pack("<Q", 2**62) + b'{"a":',  # a header longer than the file
        None,  # a tensor whose offsets run past the end of the file
    ],
)
def test_a_lying_safetensors_header_is_refused(tmp_path, header):
    path = tmp_path / "model.safetensors"
    if header is None:
        save_file({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:-400])
    else:
        path.write_bytes(header)
    result = cli("analyze", path, "--model", "mlp", *FAST)
    refused(result.exit_code, result.stderr, str(path))


def test_an_image_decompression_bomb_is_refused(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "images" / label / "small.png")
    Image.new("1", (14_000, 14_000)).save(tmp_path / "images" / "a" / "bomb.png")
    assert (tmp_path / "images" / "a" / "bomb.png").stat().st_size < 1_000_000
    result = cli("analyze", make_checkpoint(tmp_path), "--data", tmp_path / "images", "--quiet")
    refused(result.exit_code, result.stderr, "bomb.png", "decompression bomb")
