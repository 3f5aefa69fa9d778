"""The analyze pipeline: loss and accuracy, Hessian eigenpairs, trace, density, SAM alignment."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from sharpscope.analysis.alignment import Alignment, sam_alignment
from sharpscope.analysis.metrics import accuracy
from sharpscope.analysis.pyhessian_bridge import pyhessian_eigs, pyhessian_trace
from sharpscope.curvature import (
    BACKENDS,
    DensityResult,
    EigenResult,
    HessianOperator,
    Progress,
    TraceResult,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)
from sharpscope.curvature.hvp import Backend, LossFn
from sharpscope.curvature.lanczos import Which, lanczos_extremes
from sharpscope.errors import InputError

Method = Literal["lanczos", "power", "pyhessian"]
METHODS: tuple[str, ...] = ("lanczos", "power", "pyhessian")


@dataclass
class AnalyzeConfig:
    """What to compute, and how precisely."""

    k: int = 5
    method: Method = "lanczos"
    tol: float = 1e-4
    max_iter: int = 200
    max_basis: int | None = None
    """Lanczos: at most this many vectors in memory (thick restarts); None keeps them all."""
    seed: int = 0
    trace: bool = True
    trace_tol: float = 1e-2
    trace_samples: int = 100
    density: bool = False
    density_vectors: int = 4
    density_iter: int = 80
    per_layer: bool = False
    rho: float = 0.05
    alpha: float = 0.2
    backend: Backend = "double-backward"
    batch_stats: bool = False
    params: list[str] | None = None
    slices: bool = False
    """Also measure the loss along v₁ and along ĝ, at 21 points in ±2ρ (for plots)."""


@dataclass
class LayerEigen:
    """The top eigenvalue of the Hessian block of one module's parameters."""

    name: str
    size: int
    eigenvalue: float
    residual: float
    converged: bool


@dataclass
class Analysis:
    """Everything ``analyze`` measured; rendering and file formats live in ``sharpscope.report``."""

    loss: float
    accuracy: float | None
    grad_norm: float
    num_samples: int
    num_batches: int
    param_names: tuple[str, ...]
    num_params: int
    top: EigenResult
    bottom: EigenResult
    trace: TraceResult | None
    density: DensityResult | None
    alignment: Alignment | None
    per_layer: list[LayerEigen]
    timings: dict[str, float]
    n_products: int
    notes: list[str] = field(default_factory=list)
    slices: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """Direction name -> (step sizes t, loss at w + t·direction)."""

    @property
    def lambda_max(self) -> float:
        return float(self.top.eigenvalues[0])


class _Stopwatch:
    """Seconds spent per named stage."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _eigs(
    op: HessianOperator, config: AnalyzeConfig, k: int, which: Which, progress: Progress | None
) -> EigenResult:
    if config.method == "power":
        max_iter = config.max_iter * max(k, 1)
        return power_iteration(op, k, which, config.tol, max_iter, config.seed, progress=progress)
    return lanczos(
        op,
        k,
        which,
        config.tol,
        config.max_iter,
        config.seed,
        progress=progress,
        max_basis=config.max_basis,
    )


def _staged(progress: Progress | None, stage: str) -> Progress | None:
    """Forward an estimator's progress under the name of the pipeline stage."""
    if progress is None:
        return None
    return lambda _task, done, total: progress(stage, done, total)


def _module_blocks(names: tuple[str, ...]) -> dict[str, list[str]]:
    """Parameter names grouped by the module that owns them (``layer1.0.conv1``)."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(name.rpartition(".")[0] or name, []).append(name)
    return blocks


def _per_layer(
    op: HessianOperator, config: AnalyzeConfig, progress: Progress | None
) -> list[LayerEigen]:
    layers = []
    blocks = _module_blocks(op.space.names)
    for module, names in blocks.items():
        block = HessianOperator(
            op.model,
            op.loss_fn,
            op.batches,
            names,
            backend=config.backend,
            batch_stats=config.batch_stats,
        )
        result = _eigs(block, config, 1, "largest", None)
        layers.append(
            LayerEigen(
                name=module,
                size=block.size,
                eigenvalue=float(result.eigenvalues[0]),
                residual=float(result.residuals[0]),
                converged=bool(result.converged[0]),
            )
        )
        op.n_products += block.n_products
        if progress is not None:
            progress("per-layer", len(layers), len(blocks))
    return layers


def validate(config: AnalyzeConfig) -> None:
    """Refuse settings no solver can run with, naming the command-line option."""
    if config.method not in METHODS:
        raise InputError(f"unknown --method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.backend not in BACKENDS:
        raise InputError(
            f"unknown --backend {config.backend!r}; choose one of {', '.join(BACKENDS)}"
        )
    if config.k < 1 or config.max_iter < 1:
        raise InputError("--top-k and --max-iter must be at least 1")
    if not config.tol > 0:
        raise InputError(f"--tol must be positive, got {config.tol}")
    if config.max_basis is not None and config.max_basis < config.k + 3:
        raise InputError(
            f"--max-basis must be at least --top-k + 3 = {config.k + 3} (the top-k, λ_min and "
            f"two more), got {config.max_basis}"
        )
    if config.rho <= 0 or config.alpha < 0:
        raise InputError("--rho must be positive and --alpha not negative")


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[tuple[Any, Any]],
    config: AnalyzeConfig | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Measure the sharpness of ``model`` on ``batches`` (the Hessian of their mean loss); under
    torch.distributed, ``batches`` is this rank's share and every rank gets all ranks' results."""
    config = config or AnalyzeConfig()
    validate(config)
    watch = _Stopwatch()
    notes: list[str] = []
    try:
        op = HessianOperator(
            model,
            loss_fn,
            batches,
            config.params,
            backend=config.backend,
            batch_stats=config.batch_stats,
        )
    except ValueError as exc:
        raise InputError(f"{exc}; check --params (parameter names: see docs/engine.md)") from None
    if config.method == "pyhessian" and op.distributed:
        raise InputError("--method pyhessian runs in one process only; use lanczos or power")
    with watch.stage("gradient"):
        loss = op.loss()
        if not math.isfinite(loss):
            raise InputError(
                f"the loss is {loss} at these weights on this data: check that the checkpoint, "
                "the data scaling and the loss match (a NaN/inf loss has no Hessian)"
            )
        gradient = op.gradient()
        acc = accuracy(model, batches, op.dtype, op.device, config.batch_stats, op.distributed)
    if config.method == "lanczos":
        with watch.stage("eigenvalues"):  # λ_min from the same run
            top, bottom = lanczos_extremes(
                op,
                config.k,
                1,
                config.tol,
                config.max_iter,
                config.seed,
                progress=_staged(progress, "top-k and λ_min"),
                max_basis=config.max_basis,
            )
    else:
        with watch.stage("eigenvalues"):
            if config.method == "pyhessian":
                top = pyhessian_eigs(op, config.k, config.tol, config.max_iter, config.seed)
            else:
                top = _eigs(op, config, config.k, "largest", _staged(progress, "top-k"))
        with watch.stage("lambda_min"):
            bottom = _eigs(
                op,
                config if config.method != "pyhessian" else _lanczos_of(config),
                1,
                "smallest",
                _staged(progress, "λ_min"),
            )
    trace = None
    if config.trace:
        with watch.stage("trace"):
            if config.method == "pyhessian":
                trace = pyhessian_trace(op, config.trace_tol, config.trace_samples, config.seed)
            else:
                trace = hutchpp(
                    op,
                    tol=config.trace_tol,
                    max_samples=config.trace_samples,
                    seed=config.seed,
                    progress=_staged(progress, "trace"),
                )
    density = None
    if config.density:
        with watch.stage("density"):
            if config.method == "pyhessian":
                notes.append(
                    "PyHessian 0.1's density calls torch.eig, which torch 2 removed; "
                    "the density shown is sharpscope's SLQ"
                )
            density = slq(
                op,
                config.density_vectors,
                config.density_iter,
                config.seed,
                _staged(progress, "density"),
            )
    alignment = None
    grad_norm = float(torch.linalg.vector_norm(gradient))
    with watch.stage("alignment"):
        if grad_norm > 0:
            alignment = sam_alignment(op, top.eigenvectors, config.rho, config.alpha)
        else:
            notes.append(
                "the gradient is exactly zero: the SAM direction and its alignment are undefined"
            )
    slices: dict[str, tuple[list[float], list[float]]] = {}
    if config.slices:
        with watch.stage("slices"):
            directions = {"v1": top.eigenvectors[0]}
            if grad_norm > 0:
                directions["gradient"] = gradient / grad_norm
            slices = {name: loss_slice(op, d, 2 * config.rho) for name, d in directions.items()}
    per_layer: list[LayerEigen] = []
    if config.per_layer:
        with watch.stage("per_layer"):
            per_layer = _per_layer(op, config, progress)
    for name, result in (("top", top), ("lambda_min", bottom)):
        if not result.all_converged:
            notes.append(
                f"{name}: {int((~result.converged).sum())} eigenpair(s) did not reach "
                f"tol={config.tol} in {result.n_iterations} iterations; raise --max-iter or --tol"
            )
    return Analysis(
        loss=loss,
        accuracy=acc,
        grad_norm=grad_norm,
        num_samples=op.num_samples,
        num_batches=op.num_batches,
        param_names=op.space.names,
        num_params=op.size,
        top=top,
        bottom=bottom,
        trace=trace,
        density=density,
        alignment=alignment,
        per_layer=per_layer,
        timings=watch.timings,
        n_products=op.n_products,
        notes=notes,
        slices=slices,
    )


def loss_slice(
    op: HessianOperator, direction: torch.Tensor, radius: float, points: int = 21
) -> tuple[list[float], list[float]]:
    """The loss at w + t·direction for ``points`` values of t evenly spaced in [−radius, radius]."""
    steps = torch.linspace(-radius, radius, points, dtype=torch.float64).tolist()
    return steps, [op.loss(t * direction) for t in steps]


def _lanczos_of(config: AnalyzeConfig) -> AnalyzeConfig:
    """The same settings with sharpscope's Lanczos (PyHessian has no smallest-eigenvalue solver)."""
    return AnalyzeConfig(**{**config.__dict__, "method": "lanczos"})
