"""A fine-tuning run's folder: its settings, checkpoints and the ``latest`` pointer.

```
DIR/config.json                    the run's settings (RunConfig)
DIR/step-000120/model.safetensors  weights, with the model spec in the metadata
DIR/step-000120/trainer.pt         optimizer, scheduler, step, data order, RNG states
DIR/latest                         {"step": 120, "dir": "step-000120"}
DIR/metrics.jsonl, metrics.csv, training.png, tensorboard/
```
In the ``pretrained`` layout a step folder is also a save_pretrained folder (config.json,
model.safetensors, the tokenizer files). A checkpoint folder is written under a temporary name
and renamed; ``latest`` moves only after that, so a process killed at any moment leaves
``latest`` on a whole checkpoint. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sharpscope.errors import InputError
from sharpscope.io.atomic import atomic_folder, write_text_atomic
from sharpscope.training.run_config import RunConfig
from sharpscope.training.state import save_trainer_state

CONFIG = "config.json"
LATEST = "latest"
MODEL = "model.safetensors"
TRAINER = "trainer.pt"
STEP_KEY = "sharpscope.step"
_STEP_DIR = re.compile(r"step-(\d+)")
_PARTIAL = re.compile(r"\.step-\d+\..*\.tmp")
"""A checkpoint folder still being written (:func:`atomic_folder`), or left by a killed run."""


def step_dir_name(step: int) -> str:
    """``step-000120``."""
    return f"step-{step:06d}"


def model_path(step_dir: Path, layout: str) -> Path:
    """What ``analyze`` reads in a checkpoint folder: its model.safetensors, or in the
    ``pretrained`` layout the folder itself."""
    return step_dir if layout == "pretrained" else step_dir / MODEL


class RunDir:
    """The folder of one fine-tuning run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    # --- settings -------------------------------------------------------------------------------

    def write_config(self, config: RunConfig) -> None:
        """Store the run's settings."""
        write_text_atomic(self.path / CONFIG, config.to_json())

    def read_config(self) -> RunConfig:
        """The stored settings; an :class:`InputError` when this is no run folder."""
        file = self.path / CONFIG
        if not file.is_file():
            raise InputError(
                f"{self.path} holds no {CONFIG}, so it is not the folder of a sharpscope "
                "finetune run"
            )
        return RunConfig.from_json(file.read_text(encoding="utf-8"), str(file))

    # --- checkpoints ----------------------------------------------------------------------------

    def latest(self) -> tuple[int, Path] | None:
        """The step and folder of the last complete checkpoint, or None before the first."""
        file = self.path / LATEST
        if not file.is_file():
            return None
        try:
            pointer = json.loads(file.read_text(encoding="utf-8"))
            step, name = int(pointer["step"]), str(pointer["dir"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{file} is corrupt; it should name the last checkpoint") from None
        return step, self.path / name

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        trainer_state: Mapping[str, Any],
        keep: int,
    ) -> Path:
        """Write the checkpoint of ``step`` (``write_model(folder)`` writes the model's files),
        point ``latest`` at it, keep the last ``keep``."""
        folder = self.path / step_dir_name(step)
        with atomic_folder(folder) as tmp:
            write_model(tmp)
            save_trainer_state(tmp / TRAINER, trainer_state)
        pointer = {"step": step, "dir": folder.name}
        write_text_atomic(self.path / LATEST, json.dumps(pointer) + "\n")
        for _, old in self._step_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def discard_after(self, step: int) -> None:
        """Delete checkpoint folders of later steps and half-written ones (left by a run killed
        while writing one)."""
        for s, folder in self._step_dirs():
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if _PARTIAL.fullmatch(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)

    def _step_dirs(self) -> list[tuple[int, Path]]:
        found = []
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            match = _STEP_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match[1]), entry))
        return sorted(found)

    # --- a new run ------------------------------------------------------------------------------

    def prepare_new(self) -> None:
        """Make the folder ready for a new run: it must be new, empty, or a run that never wrote
        a checkpoint (its leftovers are removed); a run with checkpoints or other files is
        refused, so nothing is overwritten."""
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"`out` {self.path} is a file, not a folder; choose a folder path")
        found = self.latest()
        if found is not None:
            raise InputError(
                f"`out` {self.path} already holds a run (checkpoint at step {found[0]}); "
                f"continue it with `resume` {self.path}, or choose a new folder"
            )
        if self.path.is_dir() and any(self.path.iterdir()):
            if not (self.path / CONFIG).is_file():
                raise InputError(
                    f"`out` {self.path} already holds files that are not a sharpscope finetune "
                    "run; choose a new or empty folder"
                )
            self.discard_after(-1)
        self.path.mkdir(parents=True, exist_ok=True)
