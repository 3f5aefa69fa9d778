"""A ``finetune --fsdp`` checkpoint's sharded part (torch.distributed.checkpoint) from a stranger:
DCP's own reader unpickles ``.metadata`` and ``torch.load``s non-tensor items with
``weights_only=False``, so a crafted folder runs code; sharpscope's reader and planner refuse it.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from security.attack import cli
from sharpscope.errors import InputError
from sharpscope.training.sharded_state import SafePlanner, SafeReader


class Payload:
    """Unpickled, it creates the file ``path`` (with ``open``, pickled as ``io.open``: a global
    no DCP metadata names)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (builtins.open, (str(self.path), "w"))


def _saved(folder: Path) -> None:
    """A real DCP checkpoint of a tensor and a number (a non-tensor item), in this process."""
    dcp.save({"w": torch.arange(4.0), "lr": 0.5}, storage_writer=dcp.FileSystemWriter(folder))


def _read_item(fqn: str) -> ReadItem:
    index = MetadataIndex(fqn)
    return ReadItem(LoadItemType.BYTE_IO, index, torch.Size(), index, torch.Size(), torch.Size())


def test_a_real_checkpoint_reads_back(tmp_path: Path):
    _saved(tmp_path)
    state = {"w": torch.zeros(4), "lr": 0.0}
    dcp.load(state, storage_reader=SafeReader(tmp_path), planner=SafePlanner())
    assert torch.equal(state["w"], torch.arange(4.0)) and state["lr"] == 0.5


def test_metadata_that_runs_code_is_refused(tmp_path: Path, marker: Path):
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "ran")))
    FileSystemReader(str(tmp_path)).read_metadata()  # DCP's reader runs it: the payload is live
    assert (tmp_path / "ran").exists()
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(InputError, match=r"io\.open, which a DCP checkpoint's metadata"):
        SafeReader(tmp_path).read_metadata()


def test_metadata_naming_a_file_outside_the_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "sharded"
    _saved(folder)
    metadata = SafeReader(folder).read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(InputError, match=r"'\.\./elsewhere\.distcp' outside the folder"):
        SafeReader(folder).read_metadata()


def test_a_non_tensor_item_that_runs_code_is_refused(tmp_path: Path, marker: Path):
    stock = DefaultLoadPlanner(flatten_state_dict=False)
    stock.state_dict = {}
    buffer = io.BytesIO()
    torch.save(Payload(tmp_path / "ran"), buffer)
    stock.load_bytes(_read_item("lr"), io.BytesIO(buffer.getvalue()))  # DCP's planner runs it
    assert (tmp_path / "ran").exists()
    safe = SafePlanner(flatten_state_dict=False)
    safe.state_dict = {}
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    with pytest.raises(pickle.UnpicklingError):
        safe.load_bytes(_read_item("lr"), io.BytesIO(buffer.getvalue()))


@pytest.mark.integration  # torchrun
def test_resuming_a_run_whose_shards_run_code_is_one_line(
    finetune_files: dict[str, Path], tmp_path: Path, marker: Path
):
    """A run folder from a stranger, its config saying ``fsdp`` and its last checkpoint's
    ``sharded/.metadata`` a payload: the resume on 2 ranks stops with one line, exit 2."""
    run = tmp_path / "run"
    args = ["finetune", finetune_files["checkpoint"], "--data", finetune_files["data"]]
    made = cli(*args, "--steps", 2, "--batch-size", 32, "--out", run, "--quiet")
    assert made.exit_code == 0, made.output
    config = json.loads((run / "config.json").read_text())
    sharded = {"fsdp": True, "backend": "finite-difference"}  # a run --fsdp accepts
    (run / "config.json").write_text(json.dumps({**config, **sharded}))
    (run / "step-000002" / "sharded").mkdir()
    (run / "step-000002" / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    done = subprocess.run(
        [*torchrun, "-m", "sharpscope", "finetune", "--resume", str(run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert "refusing the sharded checkpoint" in errors[0] and "io.open" in errors[0]
    assert "exitcode  : 2" in done.stderr, done.stderr
