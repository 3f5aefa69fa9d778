"""What adaptive sharpness costs at the paper's defaults (1024 samples, 20 ascent steps or draws)
on the benchmark CNN, against one full-data gradient and, when given, Andriushchenko et al.'s
own functions (tml-epfl/sharpness-vs-generalization) on the same model and batches.

Run by hand: ``python benchmarks/bench_adaptive_sharpness.py [--reference DIR] [--out FILE]``,
where DIR holds that repository's ``sharpness.py`` and ``utils.py`` (run on the CPU with their
``.cuda()`` calls made no-ops). Their worst case is per batch (each batch of 128 its own δ, the
mean of the batches' maxima: m-sharpness with m = 128, their ``eval_APGD_sharpness``); ours one δ
for all 1024 samples, so theirs is the larger figure. Counts of gradients and losses do not
depend on the machine; times are ratios within this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bench_analyze
import bench_engine
import torch
from torch import nn

from sharpscope import HessianOperator
from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings, adaptive_sharpness
from sharpscope.curvature import Objective

LOSS = nn.functional.cross_entropy
MEASURES = (
    ("worst", "l2", 0.1),
    ("worst", "linf", 0.001),
    ("average", "l2", 0.1),
)
"""(kind, norm, ρ): their eval script's default radius for ℓ2, their README's for adaptive ℓ∞."""


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median wall time of ``repeats`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Their code calls ``.cuda()`` on tensors: make it a no-op, and send their prints away."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def reference_run(
    module: Any, model: nn.Module, batches: list, kind: str, norm: str, rho: float
) -> float:
    """Their sharpness on the same batches (their loaders yield 5-tuples)."""
    five = [(x, None, y, None, None) for x, y in batches]
    with on_cpu():
        if kind == "worst":
            value = module.eval_APGD_sharpness(
                model,
                five,
                LOSS,
                None,
                None,
                rho=rho,
                n_iters=20,
                adaptive=True,
                norm=norm,
                rand_init=False,  # their eval script's default (--sharpness_rand_init off)
            )[0]
        else:
            value = module.eval_average_sharpness(
                model, five, LOSS, n_iters=20, rho=rho, adaptive=True, norm=norm
            )[0]
    return float(value)


def main() -> None:
    """Measure and print (or write) the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, help="folder with their sharpness.py")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()
    reference = None
    if args.reference is not None:
        sys.path.insert(0, str(args.reference))
        reference = importlib.import_module("sharpness")
    workload = bench_engine.build_cnn()
    batches = bench_analyze.batches_of(workload)
    op = HessianOperator(Objective(workload.model, LOSS, batches), cache_graph=False)
    gradient, _ = timed(op.loss_and_gradient, 1)
    command = "python benchmarks/bench_adaptive_sharpness.py" + (
        " --reference DIR" if reference else ""
    )
    lines = [
        f"- command: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        f"- {workload.title}: {op.size:,} parameters, {op.num_samples} samples in "
        f"{op.num_batches} batches; one full-data loss and gradient: {gradient:.2f} s",
        "",
        "| measure (adaptive) | ρ | value | data 95 % interval | gradients + losses | seconds "
        "| × one gradient |"
        + (" theirs: value | theirs: seconds | ours / theirs |" if reference else ""),
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |"
        + (" ---: | ---: | ---: |" if reference else ""),
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)
    objective = Objective(workload.model, LOSS, batches)
    for kind, norm, rho in MEASURES:
        settings = AdaptiveSharpnessSettings(kind, norm, rho)  # type: ignore[arg-type]
        print(f"{kind} {norm} ρ={rho}", file=sys.stderr, flush=True)
        seconds, found = timed(lambda s=settings: adaptive_sharpness(objective, s), args.repeats)
        low, high = found.interval
        row = (
            f"| {kind} {norm} | {rho:g} | {found.value:.4g} | [{low:.3g}, {high:.3g}] "
            f"| {found.n_gradients} + {found.n_losses} | {seconds:.2f} | {seconds / gradient:.1f} |"
        )
        if reference is not None:
            theirs, value = timed(
                lambda k=kind, n=norm, r=rho: reference_run(
                    reference, workload.model, batches, k, n, r
                ),
                args.repeats,
            )
            row += f" {value:.4g} | {theirs:.2f} | {seconds / theirs:.2f} |"
        lines.append(row)
        print(row, file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
