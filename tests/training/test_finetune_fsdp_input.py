"""``finetune --fsdp``'s bad input, in one process: each refused in one line, exit 2, before the
model loads (the sharded runs themselves are in tests/distributed/test_fsdp_finetune.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_cli import one_error_line
from typer.testing import CliRunner

from sharpscope.cli.app import app


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (
            ("--backend", "finite-difference"),
            ("`torchrun --nproc-per-node N -m sharpscope finetune ...`", "--fsdp"),
        ),
        (("--backend", "auto"), ("`torchrun --nproc-per-node N -m sharpscope finetune ...`",)),
        (
            ("--track-measure", "critical"),
            ("`torchrun --nproc-per-node N -m sharpscope finetune ...`",),
        ),
        ((), ("--fsdp takes the Hessian's products", "not --backend double-backward", "pass")),
        (
            ("--optimizer", "eigen-sam", "--track-measure", "critical"),
            ("not --backend double-backward", "pass --backend finite-difference"),
        ),
        (
            ("--track-measure", "both", "--backend", "forward-over-reverse"),
            ("not --backend forward-over-reverse",),
        ),
        (
            ("--curvature", "ggn", "--backend", "finite-difference"),
            ("--fsdp tracks the Hessian's λ_max only, not --curvature ggn",),
        ),
        (
            ("--optimizer", "sam", "--per-rank-sam", "--backend", "finite-difference"),
            ("--per-rank-sam does not run under --fsdp",),
        ),
    ],
)
def test_fsdp_outside_torchrun_or_with_what_it_cannot_run_is_one_line(
    finetune_files: dict[str, Path], tmp_path: Path, extra: tuple[str, ...], words: tuple[str]
):
    args = ["finetune", str(finetune_files["checkpoint"]), "--data", str(finetune_files["data"])]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run"), "--fsdp", *extra])
    one_error_line(result, *words)
    assert not (tmp_path / "run").exists()


def test_backend_auto_under_fsdp_chooses_finite_differences_and_says_why():
    """Without measuring a graph (a sharded model's double backward is not taken at all)."""
    from test_run_settings import run_config

    from sharpscope.cli.flags import as_flags
    from sharpscope.report.plan_line import backend_clause
    from sharpscope.training.run import auto_choice

    choice = auto_choice(run_config(fsdp=True, backend="auto"), None, 8)  # type: ignore[arg-type]
    assert choice.backend == "finite-difference"
    assert as_flags(f"plan: {backend_clause(choice)}") == (
        "plan: --backend finite-difference: --fsdp shards the gradients, whose products are "
        "finite differences only"
    )
