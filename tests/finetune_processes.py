"""Interrupted runs for the finetune tests: ``sharpscope`` in subprocesses (run one, start one
to stop or kill, wait for a run's checkpoint), in-process runs that stop after a few steps, and
the comparison of the weights two runs wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sharpscope.training import run as training_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sharpscope(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m sharpscope ARGS`` in a subprocess, one thread."""
    return subprocess.run(
        [sys.executable, "-m", "sharpscope", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def started(args: list[str]) -> subprocess.Popen[str]:
    """``python -m sharpscope ARGS`` started in a subprocess, one thread, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "sharpscope", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    """Poll ``condition`` until it holds; fail when ``process`` ends first or after 2 minutes."""
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def latest_step(run: Path) -> int | None:
    """The step of the run's last checkpoint, None before the first."""
    pointer = run / "latest"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else None


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """The same tensors under the same names, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    """``result``, asserting that it exited 0."""
    assert result.returncode == 0, result.stderr
    return result


def stopping_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Until ``monkeypatch`` undoes it, each in-process run stops after ``steps`` steps, as a
    signal stops it (a checkpoint, exit 128)."""
    finetune = training_run.finetune

    def stopped(folder, config, inputs, resume_from, watch):
        asked = iter([False] * steps)  # asked before every step
        watch.should_stop = lambda: next(asked, True)
        return finetune(folder, config, inputs, resume_from, watch)

    monkeypatch.setattr(training_run, "finetune", stopped)
