"""What does tracking sharpness cost a training run? SharpnessTracker at every = 100 steps.

Run by hand from the repository root (about 5 minutes on 2 cores)::

    python benchmarks/bench_tracker.py [--steps 400] [--repeats 2] [--workload mlp|cnn|all]

Two workloads, as in bench_engine.py: the tanh MLP 64-128-128-10 on digits (probe set: 512
training samples in 4 batches) and the ResNet-style CNN with BatchNorm on synthetic 3x32x32
images (probe set: one batch of 128), both trained by SGD with batch 128, one thread. Each
trains ``--steps`` steps without the tracker and, interleaved, with it in each of
:data:`VARIANTS` (λ_max and |cos(ĝ, v₁)| only). Reported per variant: the products and the
relative residual of the first (cold) and the later (warm-started) measurements, the last
λ_max with its residual and its error against a Lanczos solve to 1e-6, the tracker's own
seconds over the training's in the same run (the overhead), and the ``every`` at which that
overhead would be 3 %. Two rows are no tracker but the floor beside it: the same one-product
measurement written inline in plain torch (:class:`BarePower`). The script checks that the weights
are bit-identical with and without the tracker. Markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import build_cnn

from sharpscope import HessianOperator, SharpnessTracker, lanczos
from sharpscope.curvature import Objective, SolveSettings

LOSS = nn.functional.cross_entropy
EVERY = 100
BATCH = 128


@dataclass
class Setup:
    """A model factory, its training data and its probe batches."""

    title: str
    model: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    probe: list[tuple[torch.Tensor, torch.Tensor]]


def mlp_setup() -> Setup:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        )

    probe = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, 512, BATCH)]
    return Setup("MLP 64-128-128-10 (tanh) on digits", model, x, y, probe)


def cnn_setup() -> Setup:
    workload = build_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (1024,), generator=g)

    def model() -> nn.Module:
        return build_cnn().model.train()

    return Setup(workload.title, model, x, y, [(x[:BATCH], y[:BATCH])])


SETUPS = {"mlp": mlp_setup, "cnn": cnn_setup}


VARIANTS: dict[str, dict[str, Any]] = {
    "floor: plain torch, 1 product": {"probe_batches": 1, "floor": True},
    "floor, half a probe batch": {"probe_samples": BATCH // 2, "floor": True},
    "solve to tol 1e-3 (≤ 20 products)": {"products": None},
    "solve, one probe batch": {"probe_batches": 1, "products": None},
    "one probe batch, 1 product": {"probe_batches": 1, "products": 1},
    "one probe batch, 2 products": {"probe_batches": 1, "products": 2},
    "one probe batch, 3 products": {"probe_batches": 1, "products": 3},
    "half a probe batch, 1 product": {"probe_samples": BATCH // 2, "products": 1},
}
"""Tracker settings compared: the probe set (all of the setup's, its first batch, or that
batch's first ``probe_samples``) and the
products per measurement (None: Lanczos to ``tol``; a number: that budget, refined across
measurements). Every pair is checked by the products the solve kept, none more. The ``floor``
rows are no tracker: :class:`BarePower`, the least any exact measurement can cost."""
REFERENCE_TOL = 1e-6
"""The tolerance of the solve that the last measurement's λ_max is compared with."""


class BarePower:
    """The floor: the tracker's one-product measurement written inline in plain torch, with no
    sharpscope: a double-backward Hessian-vector product on the probe batch in eval mode (no
    BatchNorm update), the Rayleigh quotient and residual of its vector, the next vector Hv/‖Hv‖."""

    def __init__(self, model: nn.Module, probe: list) -> None:
        self.model = model
        (self.x, self.y), *_ = probe
        self.params = list(model.parameters())
        seeded = torch.Generator().manual_seed(0)
        self.v = [torch.randn(p.shape, generator=seeded) for p in self.params]

    def __call__(self, step: int) -> SimpleNamespace | None:
        """At every :data:`EVERY` th step, one product; its figures and seconds."""
        if step % EVERY:
            return None
        start = time.perf_counter()
        self.model.eval()
        grads = torch.autograd.grad(
            LOSS(self.model(self.x), self.y), self.params, create_graph=True
        )
        images = torch.autograd.grad(grads, self.params, grad_outputs=self.v)
        self.model.train()
        v = torch.cat([t.reshape(-1) for t in self.v])
        w = torch.cat([t.reshape(-1) for t in images])
        length = float(v.norm())
        value = float(v @ w) / length**2
        residual = float((w - value * v).norm()) / length
        scale = float(w.norm())
        self.v = [t / scale for t in images]
        return SimpleNamespace(
            seconds=time.perf_counter() - start,
            eigen_products=1,
            lambda_max=value,
            lambda_max_residual=residual,
        )


def probe_set(setup: Setup, batches: int | None, samples: int | None) -> list:
    """The setup's probe batches: all, the first ``batches``, or the first batch's first
    ``samples``."""
    if samples is not None:
        x, y = setup.probe[0]
        return [(x[:samples], y[:samples])]
    return setup.probe[:batches]


def train(
    setup: Setup, steps: int, options: dict[str, Any] | None
) -> tuple[float, list, nn.Module]:
    """SGD for ``steps`` steps (seeded order), tracked with ``options`` unless None; the training
    seconds (tracking excluded), the measurements and the model."""
    model = setup.model()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = None
    if options is not None:
        settings = dict(options)
        probe = probe_set(
            setup, settings.pop("probe_batches", None), settings.pop("probe_samples", None)
        )
        if settings.pop("floor", False):
            tracker = BarePower(model, probe)
        else:
            tracker = SharpnessTracker(Objective(model, LOSS, probe), every=EVERY, **settings)
    order = torch.Generator().manual_seed(0)
    measured, seconds = [], 0.0
    for step in range(1, steps + 1):
        start = time.perf_counter()
        index = torch.randint(0, len(setup.y), (BATCH,), generator=order)
        optimizer.zero_grad()
        LOSS(model(setup.x[index]), setup.y[index]).backward()
        optimizer.step()
        seconds += time.perf_counter() - start
        if tracker is not None and (m := tracker(step)) is not None:
            measured.append(m)
    return seconds, measured, model


def relative_error(model: nn.Module, probe: list, value: float) -> float:
    """|λ − λ_max| / λ_max against a Lanczos solve to :data:`REFERENCE_TOL` on ``probe``."""
    reference = lanczos(
        HessianOperator(Objective(model, LOSS, probe)),
        1,
        settings=SolveSettings(tol=REFERENCE_TOL, max_iter=200),
    ).eigenvalues[0]
    return abs(value - float(reference)) / abs(float(reference))


def report(key: str, steps: int, repeats: int) -> list[str]:
    """One workload's table: every variant's cost and accuracy against plain training."""
    setup = SETUPS[key]()
    plain_s: list[float] = []
    runs: dict[str, list[tuple[float, list]]] = {name: [] for name in VARIANTS}
    same = True
    errors: dict[str, float] = {}
    for _ in range(repeats):  # interleaved, so that load changes hit every variant
        seconds, _, plain = train(setup, steps, None)
        plain_s.append(seconds)
        for name, options in VARIANTS.items():
            print(f"{key}: {name}", file=sys.stderr, flush=True)
            seconds, measured, model = train(setup, steps, options)
            runs[name].append((seconds, measured))
            probe = probe_set(setup, options.get("probe_batches"), options.get("probe_samples"))
            errors[name] = relative_error(model, probe, measured[-1].lambda_max)
            pairs = zip(plain.state_dict().values(), model.state_dict().values(), strict=True)
            same = same and all(torch.equal(a, b) for a, b in pairs)
    step_ms = 1000 * statistics.median(plain_s) / steps
    n = sum(p.numel() for p in plain.parameters())
    lines = [
        f"### {setup.title}",
        "",
        f"{n:,} parameters; {steps} SGD steps of batch {BATCH}, {step_ms:.1f} ms each without "
        f"the tracker (median of {repeats}); the tracker every {EVERY} steps; weights "
        f"bit-identical with and without it in every run: {same}",
        "",
        "| tracker | probe samples | products: cold, then warm | residual / λ_max, each "
        "| final λ_max ± residual | its error | tracker s / training s | every for ≤ 3 % |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, options in VARIANTS.items():
        train_s = statistics.median(s for s, _ in runs[name])
        track_s = statistics.median(sum(m.seconds for m in ms) for _, ms in runs[name])
        measured = runs[name][0][1]
        probe = probe_set(setup, options.get("probe_batches"), options.get("probe_samples"))
        products = f"{measured[0].eigen_products}, then " + ", ".join(
            str(m.eigen_products) for m in measured[1:]
        )
        residuals = ", ".join(f"{m.lambda_max_residual / abs(m.lambda_max):.0e}" for m in measured)
        last = measured[-1]
        overhead = track_s / train_s
        lines.append(
            f"| {name} | {sum(len(y) for _, y in probe)} | {products} | {residuals} "
            f"| {last.lambda_max:.5g} ± {last.lambda_max_residual:.1e} | {errors[name]:.0e} "
            f"| **{100 * overhead:.1f} %** | {math.ceil(EVERY * overhead / 0.03)} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workload", choices=[*SETUPS, "all"], default="all")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keys = list(SETUPS) if args.workload == "all" else [args.workload]
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, 1 thread; "
        f"`python benchmarks/bench_tracker.py --steps {args.steps} --repeats {args.repeats}"
        f"{'' if args.workload == 'all' else ' --workload ' + args.workload}`",
        "",
    ]
    for key in keys:
        lines += report(key, args.steps, args.repeats)
        print("\n".join(lines), flush=True)
        lines = []


if __name__ == "__main__":
    main()
