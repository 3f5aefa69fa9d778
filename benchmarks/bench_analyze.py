"""What a default `sharpscope analyze` costs: its stages, the spread's share, and the plan line.

Run by hand: ``python benchmarks/bench_analyze.py [--out FILE]``. Three workloads, each with the
analyze defaults (top-5 by Lanczos at tol 1e-4, λ_min, Hutch++ trace, SAM alignment, the spread
over 8 shards without the opt-in bias):

- the demo: the MLP ``sharpscope demo`` trains (300 Adam steps), on all 1,437 training digits;
- the digits MLP of ``bench_engine.py`` on 1024 digits in batches of 128;
- the CIFAR-shaped CNN of ``bench_engine.py`` on 1024 synthetic images in batches of 128.

For each: products and seconds per stage, the spread's share of both (target ≤ 30 % of the
products), and the plan line's typical and worst-case estimates against the actual time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_engine
import torch

from sharpscope.analysis.analyze import Analysis, AnalyzeConfig, analyze
from sharpscope.analysis.plan import Plan
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.data import load_data
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.report.plan_line import duration
from sharpscope.training.fit import fit

SAMPLES, BATCH = 1024, 128
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def demo() -> tuple[str, torch.nn.Module, Batches]:
    """The demo's model, trained as ``sharpscope demo`` trains it, and all 1,437 train digits."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", {}))
    train = load_data("digits", split="train")
    fit(model, train.inputs, train.targets, steps=300, seed=0)
    model.eval()
    batches = list(zip(train.inputs.split(BATCH), train.targets.split(BATCH), strict=True))
    return "the demo's MLP (`sharpscope demo`), 1,437 digits", model, batches


def batches_of(workload: bench_engine.Workload) -> Batches:
    """The analyze default's data: 1024 samples in batches of 128 (the CNN's are synthetic)."""
    if workload.key == "mlp":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data[:SAMPLES] / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target[:SAMPLES], dtype=torch.long)
    else:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(SAMPLES, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (SAMPLES,), generator=generator)
    return list(zip(x.split(BATCH), y.split(BATCH), strict=True))


def engine(build: Callable[[], bench_engine.Workload]) -> tuple[str, torch.nn.Module, Batches]:
    """A ``bench_engine`` workload on :func:`batches_of`'s data."""
    workload = build()
    return f"{workload.title}, {SAMPLES} samples", workload.model, batches_of(workload)


def cli_wall(model: torch.nn.Module) -> float:
    """Seconds of ``sharpscope analyze CKPT --data digits --samples 0 --json --quiet`` in a fresh
    process on the demo's model (imports, loading and report included)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "demo.safetensors"
        save_checkpoint(path, model, ModelSpec("mlp", {}))
        command = [sys.executable, "-m", "sharpscope", "analyze", str(path), "--data", "digits"]
        start = time.perf_counter()
        command += ["--samples", "0", "--json", "--quiet"]
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - start


def measure(title: str, model: torch.nn.Module, batches: Batches) -> tuple[list[str], Analysis]:
    """One Markdown section for a workload, and its analysis."""
    plans: list[Plan] = []
    start = time.perf_counter()
    result = analyze(
        model, torch.nn.functional.cross_entropy, batches, AnalyzeConfig(), on_plan=plans.append
    )
    total = time.perf_counter() - start
    (plan,) = plans
    after_plan = total - sum(result.timings[s] for s in ("gradient", "plan"))
    spread, spread_s = result.stage_products["sampling"], result.timings["sampling"]
    lines = [
        f"### {title}",
        "",
        f"- {result.num_params:,} parameters, {result.num_samples:,} samples in "
        f"{result.num_batches} batches; analyze (in process) {total:.2f} s, "
        f"{result.n_products} products",
        f"- **the spread: {100 * spread / result.n_products:.0f} % of the products** "
        f"({spread} of {result.n_products}), {100 * spread_s / total:.0f} % of the time "
        f"({spread_s:.2f} s of {total:.2f} s)",
        f"- plan line: ≈ {duration(plan.seconds_per_product)} per product, typically "
        f"≈ {duration(plan.typical_seconds)} ({plan.typical_products} products), at most "
        f"{duration(plan.most_seconds)} ({plan.most_products}); the stages after it took "
        f"{duration(after_plan)}: typical / actual = "
        f"**{plan.typical_seconds / after_plan:.2f}**, bound / actual = "
        f"{plan.most_seconds / after_plan:.1f}; in products (what the plan's logic states, apart "
        f"from the timing of one product) typical / actual = "
        f"{plan.typical_products / (result.n_products - result.stage_products['plan']):.2f}",
        "",
        "| stage | products | seconds | share of the time |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {stage} | {result.stage_products.get(stage, 0)} | {seconds:.3f} | "
        f"{100 * seconds / total:.1f} % |"
        for stage, seconds in result.timings.items()
    ]
    return [*lines, ""], result


def main() -> None:
    """Measure the workloads and print (or write) the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    command = "python benchmarks/bench_analyze.py" + (f" --out {args.out}" if args.out else "")
    lines: list[str] = []

    def add(new: list[str]) -> None:
        """Keep and print ``new`` at once: a workload's section appears when it is measured."""
        lines.extend(new)
        print("\n".join(new), flush=True)

    add(
        [
            f"- command: `{command}`",
            f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
            f"load average before: {os.getloadavg()[0]:.1f}",
            "",
        ]
    )
    title, model, batches = demo()
    add(measure(title, model, batches)[0])
    wall = cli_wall(model)
    add(
        [
            f"- the whole command `sharpscope analyze CKPT --data digits --samples 0 --json` on "
            f"the demo's model in a fresh process (imports, loading, report): {wall:.2f} s",
            "",
        ]
    )
    for build in (bench_engine.build_mlp, bench_engine.build_cnn):
        add(measure(*engine(build))[0])
    add([f"- load average after: {os.getloadavg()[0]:.1f}"])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
