"""Does Eigen-SAM do what the paper says? Fine-tune digits MLPs with SGD, SAM and Eigen-SAM.

Run by hand from the repository root (about 5 minutes on 2 cores)::

    python benchmarks/bench_eigen_sam.py [--seeds 3] [--steps N] [--hidden 128,128 512,512]
        [--out docs/benchmarks_finetune.md]

Each starting point is an MLP after 300 Adam steps on digits (with hidden widths (128, 128),
the demo's model). Each optimizer fine-tunes it with ``sharpscope finetune`` (one subprocess per
run, one thread each, runs interleaved across optimizers so that load changes on a shared
machine hit all of them), over several seeds (the seed picks the data order and the probe
batch). Reported per optimizer, as mean ± standard deviation over seeds: the final λ_max on the
probe batch (also over SAM's, paired by seed), the mean |cos(ĝ, v₁)| over the run, the test
accuracy, the wall time per training step (the fastest logged window, tracking
excluded) and that time over SAM's. The Markdown report goes to stdout (and to ``--out``, with
a PNG of the curves beside it); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from sharpscope.io.atomic import atomic_path, write_text_atomic
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.training.fit import fit
from sharpscope.training.metrics import read_rows

VARIANTS: dict[str, list[str]] = {
    "SGD": ["--optimizer", "sgd"],
    "SAM": ["--optimizer", "sam"],
    "Eigen-SAM k=100": ["--optimizer", "eigen-sam", "--eig-every", "100"],
    "Eigen-SAM k=20": ["--optimizer", "eigen-sam", "--eig-every", "20"],
}
SETTINGS = [
    *("--data", "digits", "--batch-size", "128", "--lr", "0.05", "--momentum", "0.9"),
    *("--weight-decay", "5e-4", "--schedule", "cosine", "--rho", "0.1", "--alpha", "0.2"),
    *("--eig-steps", "5", "--track-every", "100", "--probe-size", "512", "--track-iters", "30"),
    *("--device", "cpu", "--quiet"),
]
"""Shared by every run (``--rho`` is ignored by SGD)."""
PRETRAIN_STEPS = 300


def log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def starting_checkpoint(folder: Path, hidden: tuple[int, ...]) -> Path:
    """An MLP of these hidden widths after 300 Adam steps on digits (seed 0): for (128, 128),
    the demo's model."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"hidden": hidden})
    model = build_model(spec)
    train = load_data("digits", split="train")
    fit(model, train.inputs, train.targets, steps=PRETRAIN_STEPS, seed=0)
    path = folder / f"start-{'x'.join(map(str, hidden))}.safetensors"
    save_checkpoint(path, model, spec)
    return path


@dataclass
class Run:
    """One fine-tuning run's results."""

    hidden: tuple[int, ...]
    variant: str
    seed: int
    rows: list[dict[str, Any]]

    @property
    def final_lambda(self) -> float:
        return self.rows[-1]["lambda_max"]

    @property
    def mean_alignment(self) -> float:
        return statistics.fmean(r["alignment"] for r in self.rows[1:])

    @property
    def test_accuracy(self) -> float:
        return self.rows[-1]["val_accuracy"]

    @property
    def step_seconds(self) -> float:
        """The fastest of the logged 100-step windows but the first (warm-up, and no Eigen-SAM
        refresh yet), by mean step time: the least disturbed by other work on a shared
        machine, and every window holds the same number of refreshes."""
        return min(r["step_seconds"] for r in self.rows[2:])


def finetune(checkpoint: Path, variant: str, seed: int, steps: int, out: Path) -> list[dict]:
    """Run ``sharpscope finetune`` in a one-thread subprocess; its metric rows."""
    args = [str(checkpoint), *VARIANTS[variant], *SETTINGS, "--steps", str(steps)]
    args += ["--seed", str(seed), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "sharpscope", "finetune", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"{variant}, seed {seed} failed:\n{result.stderr}")
    return read_rows(out / "metrics.jsonl")


def mean_std(values: Sequence[float], form: str) -> str:
    """``mean ± std`` of ``values`` in format ``form``."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{form.format(statistics.fmean(values))} ± {form.format(spread)}"


def table(runs: list[Run]) -> str:
    """The Markdown results table of one model, one line per variant; the ratios pair each run
    with SAM's run of the same seed."""
    sam = {r.seed: r for r in runs if r.variant == "SAM"}
    lines = [
        "| optimizer | final λ_max (probe) | λ_max / SAM's | mean \\|cos(ĝ, v₁)\\| | "
        "test accuracy | ms / step | time / SAM's |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        mine = [r for r in runs if r.variant == variant]
        cells = [
            mean_std([r.final_lambda for r in mine], "{:.3f}"),
            mean_std([r.final_lambda / sam[r.seed].final_lambda for r in mine], "{:.3f}"),
            mean_std([r.mean_alignment for r in mine], "{:.3f}"),
            mean_std([100 * r.test_accuracy for r in mine], "{:.2f}") + " %",
            mean_std([1000 * r.step_seconds for r in mine], "{:.3f}"),
            mean_std([r.step_seconds / sam[r.seed].step_seconds for r in mine], "{:.3f}"),
        ]
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(runs: list[Run], widths: Sequence[tuple[int, ...]], path: Path) -> None:
    """Per model, λ_max and |cos(ĝ, v₁)| on the probe batch over the steps: the mean over seeds
    and the min-max band."""
    fig = Figure(figsize=(11, 4 * len(widths)), layout="constrained")
    grid = fig.subplots(len(widths), 2, squeeze=False)
    for axes, hidden in zip(grid, widths, strict=True):
        for variant in VARIANTS:
            mine = [r for r in runs if r.variant == variant and r.hidden == hidden]
            steps = [row["step"] for row in mine[0].rows]
            for ax, key in zip(axes, ("lambda_max", "alignment"), strict=True):
                curves = torch.tensor([[row[key] for row in r.rows] for r in mine])
                ax.plot(steps, curves.mean(0).numpy(), label=variant)
                low, high = curves.min(0).values.numpy(), curves.max(0).values.numpy()
                ax.fill_between(steps, low, high, alpha=0.15)
        labels = ("λ_max (probe batch)", "|cos(ĝ, v₁)| (probe batch)")
        for ax, label in zip(axes, labels, strict=True):
            ax.set_title(f"mlp, hidden {hidden}")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def report(
    runs: list[Run],
    widths: Sequence[tuple[int, ...]],
    command: str,
    loads: tuple[str, str],
    minutes: float,
    png: str,
) -> str:
    """The Markdown report."""
    steps = runs[0].rows[-1]["step"]
    seeds = sorted({r.seed for r in runs})
    tables = "\n\n".join(
        f"**mlp, hidden {hidden}**\n\n{table([r for r in runs if r.hidden == hidden])}"
        for hidden in widths
    )
    return f"""# Benchmark: does Eigen-SAM do what the paper says? (fine-tuning on digits)

Command (from the repository root, {minutes:.1f} minutes):

```bash
{command}
```

An `mlp` on digits (hidden widths below; (128, 128) is the default and the demo's model) after
{PRETRAIN_STEPS} Adam steps is fine-tuned for {steps} steps by each optimizer, seeds {seeds}
(the seed picks the data order and the probe batch): batch 128, SGD lr 0.05 with momentum 0.9
and weight decay 5e-4, cosine schedule, ρ = 0.1, α = 0.2, 5 Hessian-vector products per Eigen-SAM
refresh every k steps. λ_max and |cos(ĝ, v₁)| are measured every 100 steps on a fixed probe
batch of 512 training samples (Lanczos, eval mode); test accuracy on the 360 held-out digits.
Mean ± standard deviation over seeds; "/ SAM's" divides by SAM's run of the same seed. Time per
step is that of the fastest logged 100-step window after the first (the least disturbed by other
work; tracking excluded; each window holds one refresh at k = 100, five at k = 20).

{tables}

![λ_max and alignment over the steps]({png})

Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work, one thread per run
(`OMP_NUM_THREADS=1`); load average {loads[0]} at the start and {loads[1]} at the end
(`uptime`). torch {torch.__version__}, Python {platform.python_version()}.
"""


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def widths_arg(text: str) -> tuple[int, ...]:
    """``128,128`` -> (128, 128)."""
    return tuple(int(w) for w in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--steps", type=int, default=1000, help="fine-tuning steps per run")
    parser.add_argument(
        "--hidden",
        type=widths_arg,
        nargs="+",
        default=[(128, 128), (512, 512)],
        help="the MLPs' hidden widths, e.g. 128,128 512,512",
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/bench_eigen_sam.py", *sys.argv[1:]])
    start, loads = time.perf_counter(), [load_average()]
    runs = []
    with tempfile.TemporaryDirectory() as work:
        for hidden in args.hidden:
            checkpoint = starting_checkpoint(Path(work), hidden)
            for seed in range(args.seeds):
                for variant in VARIANTS:
                    log(f"hidden {hidden}, {variant}, seed {seed} (load {load_average()})")
                    folder = Path(work) / f"{hidden}-{variant.replace(' ', '-')}-{seed}"
                    rows = finetune(checkpoint, variant, seed, args.steps, folder)
                    runs.append(Run(hidden, variant, seed, rows))
    loads.append(load_average())
    png = args.out.with_suffix(".png") if args.out else Path("bench_eigen_sam.png")
    plot(runs, args.hidden, png)
    minutes = (time.perf_counter() - start) / 60
    text = report(runs, args.hidden, command, (loads[0], loads[1]), minutes, png.name)
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
        log(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
