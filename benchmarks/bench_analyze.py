"""What a default `sharpscope analyze` costs, and how much of it is the eigen-solve.

Run by hand: ``python benchmarks/bench_analyze.py [--out FILE]``. Uses the two workloads of
``bench_engine.py`` (the digits MLP and the CIFAR-shaped CNN), each with the analyze defaults:
1024 samples in batches of 128, top-5 by Lanczos (tol 1e-4), λ_min, Hutch++ trace, SAM alignment.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_engine
import torch

from sharpscope import HessianOperator, lanczos
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec, build_model

SAMPLES, BATCH = 1024, 128
SOLVE_STAGES = ("eigenvalues", "lambda_min", "trace")


def batches_of(workload: bench_engine.Workload) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def bare_solve(workload: bench_engine.Workload, batches: list) -> tuple[float, int]:
    """Wall time and products of operator construction plus top-5 Lanczos alone."""
    start = time.perf_counter()
    op = HessianOperator(workload.model, torch.nn.functional.cross_entropy, batches)
    result = lanczos(op, k=5, tol=1e-4)
    return time.perf_counter() - start, result.n_products


def cli_wall(workload: bench_engine.Workload) -> float:
    """Wall time of ``sharpscope analyze CKPT --data digits --json`` in a fresh process."""
    spec = ModelSpec("mlp", {"activation": "tanh"})
    model = build_model(spec)
    values = workload.model.state_dict().values()
    model.load_state_dict(dict(zip(model.state_dict(), values, strict=True)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mlp.safetensors"
        save_checkpoint(path, model, spec)
        command = [sys.executable, "-m", "sharpscope", "analyze", str(path), "--data", "digits"]
        start = time.perf_counter()
        subprocess.run([*command, "--json", "--quiet"], check=True, capture_output=True)
        return time.perf_counter() - start


def measure(workload: bench_engine.Workload) -> list[str]:
    """One Markdown section for a workload."""
    batches = batches_of(workload)
    bare, bare_products = bare_solve(workload, batches)
    start = time.perf_counter()
    result = analyze(workload.model, torch.nn.functional.cross_entropy, batches, AnalyzeConfig())
    total = time.perf_counter() - start
    solve = sum(result.timings.get(stage, 0.0) for stage in SOLVE_STAGES)
    lines = [
        f"## {workload.title}",
        "",
        f"- {workload.n_params:,} parameters, {SAMPLES} samples in {len(batches)} batches",
        f"- bare eigen-solve (operator + top-5 Lanczos): {bare:.2f} s, {bare_products} products",
        f"- default analyze (in process): {total:.2f} s, {result.n_products} products; "
        f"eigen-solve stages ({', '.join(SOLVE_STAGES)}) {solve:.2f} s = "
        f"**{100 * solve / total:.0f} %** of it",
        "",
        "| stage | seconds | share |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {stage} | {seconds:.3f} | {100 * seconds / total:.1f} % |"
        for stage, seconds in result.timings.items()
    ]
    if workload.key == "mlp":
        wall = cli_wall(workload)
        lines += [
            "",
            f"- whole command `sharpscope analyze CKPT --data digits --json` in a fresh process "
            f"(imports, loading, report): {wall:.2f} s; the eigen-solve stages are "
            f"{100 * solve / wall:.0f} % of that (Python and torch start-up dominate the rest)",
        ]
    return [*lines, ""]


def main() -> None:
    """Measure both workloads and print (or write) the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    command = "python benchmarks/bench_analyze.py" + (f" --out {args.out}" if args.out else "")
    lines = [
        "# Cost of a default `sharpscope analyze`",
        "",
        f"- command: `{command}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        "",
    ]
    for build in (bench_engine.build_mlp, bench_engine.build_cnn):
        lines += measure(build())
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
