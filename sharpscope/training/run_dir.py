"""A fine-tuning run's folder: its settings, checkpoints and the ``latest`` pointer.

```
DIR/.sharpscope-run                {"run_id": ..., "version": ...}: the folder is a sharpscope run
DIR/config.json                    the run's settings (RunConfig)
DIR/step-000120/model.safetensors  weights, with the model spec in the metadata
DIR/step-000120/trainer.pt         optimizer, scheduler, step, data order, RNG states
DIR/step-000120/.sharpscope-run    the run id again: this run wrote the folder
DIR/step-000120/sharded/           under ``fsdp``: every rank's shards of the model and optimizer
                                   state (torch.distributed.checkpoint)
DIR/latest                         {"step": 120, "dir": "step-000120"}
DIR/metrics.jsonl, metrics.csv, training.png, tensorboard/
```
In the ``pretrained`` layout a step folder is also a save_pretrained folder (config.json,
model.safetensors, the tokenizer files). A checkpoint folder is written under a temporary name
and renamed; ``latest`` moves only after that, so a process killed at any moment leaves
``latest`` on a whole checkpoint. The last ``keep`` checkpoints are kept.

The marker ``.sharpscope-run`` is written before anything else: only a folder holding it is
continued or resumed, and only checkpoint folders stamped with its run id (or listed in it as
adopted from a run of an older sharpscope, which wrote no marker) are ever deleted.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from sharpscope.errors import InputError
from sharpscope.io.atomic import atomic_folder, check_can_create, write_text_atomic
from sharpscope.training.metrics import CSV, JSONL, TENSORBOARD
from sharpscope.training.options import MARKER
from sharpscope.training.run_config import RunConfig
from sharpscope.training.state import save_trainer_state
from sharpscope.version import __version__

CONFIG = "config.json"
LATEST = "latest"
MODEL = "model.safetensors"
TRAINER = "trainer.pt"
PLOT = "training.png"
STEP_KEY = "sharpscope.step"
WRITTEN = (MARKER, CONFIG, LATEST, JSONL, CSV, TENSORBOARD, PLOT)
"""The names a run writes in its folder, besides its checkpoint folders."""
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

    # --- ownership ------------------------------------------------------------------------------

    def marker(self) -> dict[str, Any] | None:
        """The run's marker (``run_id``, ``version``, ``adopted``), or None where there is none."""
        file = self.path / MARKER
        if file.is_symlink() or not file.is_file():
            return None
        try:
            marker = json.loads(file.read_text(encoding="utf-8"))
            if not isinstance(marker, dict) or not isinstance(marker.get("run_id"), str):
                raise ValueError("no run id")
        except (OSError, ValueError) as exc:
            raise InputError(f"{file} is corrupt ({exc}); it should name the run") from None
        return marker

    def _mark(self, adopted: list[str]) -> None:
        marker = {"run_id": uuid.uuid4().hex, "version": __version__, "adopted": adopted}
        write_text_atomic(self.path / MARKER, json.dumps(marker) + "\n")

    def _owns(self, folder: Path) -> bool:
        """Whether this run wrote the checkpoint folder (stamped with its id, or adopted)."""
        marker = self.marker()
        if marker is None or folder.is_symlink():
            return False
        adopted = marker.get("adopted")
        if isinstance(adopted, list) and folder.name in adopted:
            return True
        stamp = folder / MARKER
        try:
            return json.loads(stamp.read_text(encoding="utf-8")).get("run_id") == marker["run_id"]
        except (OSError, ValueError, AttributeError):
            return False

    def check_resumable(self, what: str) -> None:
        """Refuse a folder that is not a sharpscope run (``what`` names the option); a run of an
        older sharpscope (no marker, but its settings, ``latest`` and checkpoint folders as
        sharpscope writes them) is adopted: marked, with its checkpoint folders listed as its."""
        if self.marker() is not None:
            return
        if not (self.path / LATEST).is_file():
            raise InputError(
                f"{what} {self.path} is not the folder of a sharpscope finetune run (it holds "
                f"no {MARKER} and no {LATEST}); choose the run's folder"
            )
        config = self.read_config()
        _, folder = self.latest()  # type: ignore[misc]  # LATEST is a file
        steps = self._old_checkpoints(config.layout)
        if folder.name not in steps:
            raise InputError(
                f"{what} {self.path} holds no {MARKER}, and its checkpoint {folder.name} is not "
                "one sharpscope wrote; choose the run's folder"
            )
        self._mark(steps)

    def _old_checkpoints(self, layout: str) -> list[str]:
        """The checkpoint folders of a run without a marker that sharpscope wrote: a trainer.pt,
        and in the safetensors layout weights whose metadata names the folder's step."""
        found = []
        for step, folder in self._step_dirs(owned=False):
            if folder.is_symlink() or not (folder / TRAINER).is_file():
                continue
            if layout != "pretrained" and _stored_step(folder / MODEL) != str(step):
                continue
            found.append(folder.name)
        return found

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
        """The step and folder of the last complete checkpoint, or None before the first; a
        pointer to anything but a checkpoint folder of this run folder is refused."""
        file = self.path / LATEST
        if not file.is_file() and not file.is_symlink():
            return None
        try:
            if file.is_symlink():
                raise ValueError("a link")
            pointer = json.loads(file.read_text(encoding="utf-8"))
            step, name = int(pointer["step"]), str(pointer["dir"])
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{file} is corrupt; it should name the last checkpoint") from None
        folder = self.path / name
        if name != step_dir_name(step) or folder.is_symlink():
            raise InputError(
                f"{file} points at {name!r}, which is not the run's checkpoint folder "
                f"{step_dir_name(step)}; a run is only resumed from a folder inside it"
            )
        return step, folder

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        trainer_state: Mapping[str, Any],
        keep: int,
    ) -> Path:
        """Write the checkpoint of ``step`` (``write_model(folder)`` writes the model's files),
        point ``latest`` at it, keep the last ``keep`` (of those this run wrote)."""
        folder = self.path / step_dir_name(step)
        stamp = (self.path / MARKER).read_text(encoding="utf-8")
        with atomic_folder(folder) as tmp:
            (tmp / MARKER).write_text(stamp, encoding="utf-8")  # first: the run owns the folder
            write_model(tmp)
            save_trainer_state(tmp / TRAINER, trainer_state)
        pointer = {"step": step, "dir": folder.name}
        write_text_atomic(self.path / LATEST, json.dumps(pointer) + "\n")
        for _, old in self._step_dirs()[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    def staging(self, step: int) -> Path:
        """A new folder ``.step-NNNNNN.*.tmp``, stamped as this run's, where every rank of a
        sharded run writes its shards of ``step``'s checkpoint before :meth:`save` moves them in;
        one left by a killed run is removed as a half-written checkpoint is."""
        folder = Path(
            tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".tmp", dir=self.path)
        )
        shutil.copyfile(self.path / MARKER, folder / MARKER)
        return folder

    def discard_after(self, step: int) -> None:
        """Delete this run's checkpoint folders of later steps and its half-written ones (left by
        a run killed while writing one)."""
        for s, folder in self._step_dirs():
            if s > step:
                shutil.rmtree(folder, ignore_errors=True)
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            if _PARTIAL.fullmatch(entry.name) and entry.is_dir() and self._owns(entry):
                shutil.rmtree(entry, ignore_errors=True)

    def _step_dirs(self, owned: bool = True) -> list[tuple[int, Path]]:
        """The checkpoint folders by step: those this run wrote, or with ``owned=False`` all
        that are named so."""
        found = []
        for entry in self.path.iterdir() if self.path.is_dir() else ():
            match = _STEP_DIR.fullmatch(entry.name)
            if match and entry.is_dir() and (not owned or self._owns(entry)):
                found.append((int(match[1]), entry))
        return sorted(found)

    # --- a new run ------------------------------------------------------------------------------

    def prepare_new(self, force: bool = False) -> None:
        """Make the folder ready for a new run and mark it: it must be new, empty, or a run of
        this marker that never wrote a checkpoint (its leftovers are removed); with ``force``, a
        folder of other files where none of the run's names exists. Nothing sharpscope did not
        write is overwritten or deleted."""
        check_can_create(self.path, "`out`", folder=True)
        marked = self.marker() is not None
        found = self.latest() if marked or (self.path / LATEST).exists() else None
        if found is not None:
            raise InputError(
                f"`out` {self.path} already holds a run (checkpoint at step {found[0]}); "
                f"continue it with `resume` {self.path}, or choose a new folder"
            )
        if marked:
            self.discard_after(-1)
            return
        present = sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []
        clashes = [
            n for n in present if n in WRITTEN or _STEP_DIR.fullmatch(n) or _PARTIAL.fullmatch(n)
        ]
        if clashes or (present and not force):
            held = (
                f"files the run would overwrite ({', '.join(clashes[:4])})" if clashes else "files"
            )
            raise InputError(
                f"`out` {self.path} already holds {held} and is not a sharpscope run "
                f"(no {MARKER}); choose a new or empty folder"
                + ("" if clashes else ", or pass `force` to write the run beside those files")
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._mark([])
        except OSError as exc:
            raise InputError(f"`out` {self.path}: cannot write there ({exc.strerror})") from None


def _stored_step(file: Path) -> str | None:
    """The step a checkpoint's metadata names, or None."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get(STEP_KEY)
    except (OSError, SafetensorError):
        return None
