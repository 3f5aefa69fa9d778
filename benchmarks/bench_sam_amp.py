"""Eigen-SAM's training step over SAM's, in float32 and under bf16 autocast (CPU).

Run by hand from the repository root (about 5 minutes on a shared CPU)::

    python benchmarks/bench_sam_amp.py [--steps 100] [--repeats 3] [--out FILE]

Two workloads: the MLP 64-256-256-10 (relu) on a batch of 128 random digits-sized inputs, and the
small BatchNorm CNN of ``sharpscope.io.architectures.cnn`` (width 8) on 32 random 3x16x16 images.
Each optimizer (SAM; Eigen-SAM refreshing every 20 and every 50 steps with 5 Lanczos products,
so 5 and 2 refreshes in the default 100 timed steps) trains a fresh copy ``--steps`` steps after
5 warm-up steps with ``optimizer.step(micro_batch_closure(...))`` over 2 micro-batches, in
float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (Eigen-SAM's refresh runs
outside autocast, in float32). Runs are interleaved over ``--repeats`` rounds, one thread; the
fastest round's seconds per step (the least disturbed on a shared machine) is reported with its
ratio to SAM's at the same precision and to float32 for the same optimizer.
The Markdown table goes to stdout (and to ``--out``).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sharpscope.io.architectures import cnn, mlp
from sharpscope.io.atomic import write_text_atomic
from sharpscope.optim import SAM, EigenSAM, micro_batch_closure

CE = nn.functional.cross_entropy
OPTIMIZERS: dict[str, dict[str, int] | None] = {
    "SAM": None,
    "Eigen-SAM k=20": {"eig_every": 20, "eig_steps": 5},
    "Eigen-SAM k=50": {"eig_every": 50, "eig_steps": 5},
}
PRECISIONS = ("float32", "bf16 autocast")


def workloads() -> dict[str, tuple[Callable[[], nn.Module], torch.Tensor, torch.Tensor]]:
    """Model factories and one batch each (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    digits = torch.rand(128, 64, generator=gen)
    images = torch.randn(32, 3, 16, 16, generator=gen)
    return {
        "MLP 64-256-256-10, batch 128": (
            lambda: mlp(64, (256, 256)),
            digits,
            torch.randint(0, 10, (128,), generator=gen),
        ),
        "BatchNorm CNN (width 8), 32x3x16x16": (
            lambda: cnn(3, 10, 8),
            images,
            torch.randint(0, 10, (32,), generator=gen),
        ),
    }


def seconds_per_step(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    eigen: dict[str, int] | None,
    bf16: bool,
    steps: int,
) -> float:
    """The mean seconds per step over ``steps`` steps after 5 warm-up steps."""
    torch.manual_seed(0)
    model = build()
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if eigen is None:
        opt: SAM = SAM(base, rho=0.05, model=model)
    else:
        opt = EigenSAM(base, 0.05, 0.2, model=model, loss_fn=CE, **eigen)
    micro = list(zip(x.chunk(2), y.chunk(2), strict=True))

    def loss_of(batch: Any) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return CE(model(batch[0]), batch[1])

    closure = micro_batch_closure(loss_of, micro)
    model.train()
    start = 0.0
    for i in range(5 + steps):
        if i == 5:
            start = time.perf_counter()
        if isinstance(opt, EigenSAM):
            opt.refresh_batches(micro)
        opt.step(closure)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(1)
    times: dict[tuple[str, str, str], list[float]] = {}
    loads = workloads()
    for _ in range(args.repeats):
        for work, (build, x, y) in loads.items():
            for name, eigen in OPTIMIZERS.items():
                for precision in PRECISIONS:
                    t = seconds_per_step(build, x, y, eigen, precision != "float32", args.steps)
                    times.setdefault((work, name, precision), []).append(t)
    lines = [
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread; "
        f"{args.steps} steps after 5 warm-up, fastest of {args.repeats} interleaved rounds; "
        "2 micro-batches a step.",
        "",
        "| workload | optimizer | precision | ms/step | × SAM (same precision) | × float32 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for work, name, precision in times:
        med = min(times[work, name, precision])
        sam = min(times[work, "SAM", precision])
        fp32 = min(times[work, name, "float32"])
        lines.append(
            f"| {work} | {name} | {precision} | {1e3 * med:.2f} | {med / sam:.2f} | "
            f"{med / fp32:.2f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        write_text_atomic(args.out, report)


if __name__ == "__main__":
    main()
