"""The analyze pipeline: loss and accuracy, Hessian eigenpairs, trace, density, SAM alignment."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from sharpscope import distributed
from sharpscope.analysis.adaptive_sharpness import (
    AdaptiveSharpnessResult,
    AdaptiveSharpnessSettings,
    adaptive_sharpness,
    sharpness_of,
)
from sharpscope.analysis.alignment import Alignment, sam_alignment
from sharpscope.analysis.config import AnalyzeConfig
from sharpscope.analysis.critical_sharpness import CriticalSharpness, critical_sharpness
from sharpscope.analysis.fsdp import require_ranks, shard_model
from sharpscope.analysis.intervals import Figures, SamplingErrors, rounded_outward
from sharpscope.analysis.metrics import accuracy
from sharpscope.analysis.plan import (
    TYPICAL_LANCZOS,
    BackendChoice,
    Plan,
    auto_backend,
    available_memory,
    basis_home,
    fitting_basis,
)
from sharpscope.analysis.sampling import SHARD_TOL, TRACE_PROBES, Resolve, sampling_errors
from sharpscope.batches import LossFn
from sharpscope.curvature import (
    CurvatureOperator,
    DensityResult,
    EigenResult,
    Progress,
    TraceResult,
    curvature_operator,
    slq,
)
from sharpscope.curvature.groups import param_groups
from sharpscope.curvature.hvp import refined
from sharpscope.curvature.objective import configured_objective
from sharpscope.curvature.operator import check_adds_to_a_run
from sharpscope.curvature.product_error import ProductError, error_products, product_error
from sharpscope.curvature.sharded import ShardedHessianOperator, reshard
from sharpscope.curvature.shards import dimension, over_of, shards_of
from sharpscope.curvature.solvers import (
    SOLVERS,
    TRACE_BUDGET_SHARE,
    Solver,
    SolveSettings,
    solver,
    trace_budget,
)
from sharpscope.curvature.vectors import dot, norm
from sharpscope.errors import InputError
from sharpscope.optim.perturbations import sam_perturbation
from sharpscope.stopwatch import Stopwatch

BATCH_STATS_NOTE = (
    "with `batch_stats` the figures depend on `batch_size` (BatchNorm normalises each batch by "
    "its own statistics); compare only runs with the same batch size"
)
"""The note of every run on batch statistics: its curvature is that of per-batch losses."""
MICRO_BATCH_NOTE = (
    "with `micro_batch` no gradient graph is kept between products: each product ran every "
    "chunk's forward and both backward passes again (one chunk's memory for that time)"
)
"""The note of a double-backward run in micro-batches: what its memory cost in time."""
BFLOAT16_NOTE = (
    "`dtype` bfloat16: its products err by about 5e-3 relative (the tests' tiny GPT-2 and Llama, "
    "docs/engine.md), which Lanczos cannot converge past: the figures are rough and their "
    "bounds wide; use `dtype` float32 (the default, which widens bfloat16 weights)"
)
"""The note of every run asked for bfloat16 products."""


@dataclass
class LayerEigen:
    """The top eigenvalue of the Hessian block of one module's parameters."""

    name: str
    size: int
    eigenvalue: float
    residual: float
    converged: bool
    module_type: str
    """The class name of the module that owns the parameters (``Linear``, ``Conv2d``; a scripted
    module's original one); a group of several modules' parameters lists each distinct type."""
    kind: str | None = None
    """A transformer group's kind (``attention.q``, ``mlp``: :mod:`sharpscope.curvature.groups`);
    None for one module's parameters."""
    params: tuple[str, ...] = ()
    """The names of the group's parameter tensors, in flat-vector order."""


@dataclass
class Analysis:
    """Everything ``analyze`` measured; rendering and file formats live in ``sharpscope.report``."""

    loss: float
    accuracy: float | None
    grad_norm: float
    num_samples: int
    num_batches: int
    curvature: str
    """The matrix whose eigenvalues, trace and density these are (:data:`CURVATURES`)."""
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    """The shape of each analysed parameter, in the order of ``param_names``."""
    num_params: int
    top: EigenResult
    bottom: EigenResult
    trace: TraceResult | None
    density: DensityResult | None
    alignment: Alignment | None
    sampling: SamplingErrors | None
    """The spread: how much the figures would move on other samples of this size (None: not
    estimated, `shards` 0); the figures themselves are of the data given."""
    per_layer: list[LayerEigen]
    timings: dict[str, float]
    n_products: int
    stage_products: dict[str, int] = field(default_factory=dict)
    """Products per stage of ``timings`` (the spread's in full-data products)."""
    notes: list[str] = field(default_factory=list)
    slices: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """Direction name -> (step sizes t, loss at w + t·direction)."""
    adaptive_sharpness: AdaptiveSharpnessResult | None = None
    """The worst- or average-case (adaptive) sharpness (None: not measured)."""
    product_error: ProductError | None = None
    """The products' own error, in ``top``'s and ``bottom``'s bounds (None: float64 double
    backward or forward-over-reverse, not measured)."""
    backend: BackendChoice | None = None
    """The Hessian backend ``auto`` chose, and why (None: the config named one)."""
    critical_sharpness: CriticalSharpness | None = None
    """The critical sharpness 2/η_c along −g, with the quadratic model's ĝᵀHĝ (None: not
    measured)."""
    interrupted: str | None = None
    """The stage an interrupt stopped (the later ones did not run); None: the analysis is
    complete."""

    @property
    def lambda_max(self) -> float:
        return float(self.top.eigenvalues[0])


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or a signal raised as it) during :func:`analyze`, with the :class:`Analysis` of the
    stages that finished (``partial``; None before the eigenvalues were) and the ``stage`` it
    stopped."""

    def __init__(self, partial: Analysis | None, stage: str | None) -> None:
        super().__init__(stage)
        self.partial = partial
        self.stage = stage


def _staged(progress: Progress | None, stage: str) -> Progress | None:
    """Forward an estimator's progress under the name of the pipeline stage."""
    if progress is None:
        return None
    return lambda _task, done, total: progress(stage, done, total)


@contextlib.contextmanager
def _one_step(progress: Progress | None, stage: str) -> Iterator[None]:
    """Progress for a stage without steps of its own: begun, then done."""
    if progress is not None:
        progress(stage, 0, 1)
    yield
    if progress is not None:
        progress(stage, 1, 1)


def _module_types(model: nn.Module) -> dict[str, str]:
    """Module name -> class name (a scripted module's original one)."""
    return {
        name: module.original_name
        if isinstance(module, torch.jit.ScriptModule)
        else type(module).__name__
        for name, module in model.named_modules()  # get_submodule refuses TorchScript models
    }


def _per_layer(
    op: CurvatureOperator,
    config: AnalyzeConfig,
    method: Solver,
    settings: SolveSettings,
    progress: Progress | None,
) -> list[LayerEigen]:
    """The top eigenpair of each group's diagonal block of the operator's matrix (one module's
    parameters, or a transformer block's parameters of one kind)."""
    layers = []
    types = _module_types(op.model)
    groups = param_groups(op.space.names, types)
    for group in groups:
        block = op.replace(op.objective.replace(params=group.params))
        result = method.eigs(block, 1, "largest", settings, None)
        owners = dict.fromkeys(types[n.rpartition(".")[0]] for n in group.params)
        layers.append(
            LayerEigen(
                name=group.name,
                size=dimension(block),
                eigenvalue=float(result.eigenvalues[0]),
                residual=float(result.residuals[0]),
                converged=bool(result.converged[0]),
                module_type=", ".join(owners),
                kind=group.kind,
                params=group.params,
            )
        )
        op.n_products += block.n_products
        if progress is not None:
            progress("per-layer", len(layers), len(groups))
    return layers


def _operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[tuple[Any, Any]],
    config: AnalyzeConfig,
    checked: bool,
) -> tuple[CurvatureOperator, BackendChoice | None]:
    """The chosen curvature matrix of the mean loss over ``batches`` for the chosen parameters,
    and the Hessian backend ``auto`` chose (None: none was to choose); its first batch is run
    again only where that checks more than ``checked`` did."""
    hessian = config.curvature == "hessian"
    if (
        hessian
        and config.backend == "forward-over-reverse"
        and isinstance(model, torch.jit.ScriptModule)
    ):
        raise InputError(
            "`backend` forward-over-reverse cannot differentiate a TorchScript model "
            "(torch.func does not run scripted modules); use `backend` double-backward"
        )
    if config.fsdp:
        objective = configured_objective(shard_model(model), loss_fn, batches, config)
        validate = not checked or check_adds_to_a_run(objective)
        return ShardedHessianOperator(objective, validate=validate), None
    objective = configured_objective(model, loss_fn, batches, config)
    auto = config.backend == "auto"
    try:
        op = curvature_operator(
            config.curvature,
            objective,
            backend="double-backward" if auto else config.backend,
            seed=config.seed,
            validate=not checked or check_adds_to_a_run(objective),
        )
    except ValueError as exc:
        raise InputError(f"{exc} (parameter names: see docs/engine.md)") from None
    if not (hessian and auto):
        return op, None
    choice = auto_backend([op], available_memory(op.device))
    if choice.backend != "double-backward":
        op = op.replace(backend=choice.backend)
    return op, choice


def _finite_loss(op: CurvatureOperator) -> float:
    """The loss at the current weights; an :class:`InputError` when it is not finite."""
    loss = op.loss()
    if not math.isfinite(loss):
        raise InputError(
            f"the loss is {loss} at these weights on this data: check that the checkpoint, "
            "the data scaling and the loss match (a NaN/inf loss has no Hessian)"
        )
    return loss


def _alignment(
    op: CurvatureOperator,
    top: EigenResult,
    grad_norm: float,
    config: AnalyzeConfig,
    h_g_hat: torch.Tensor | None,
) -> tuple[Alignment | None, list[str]]:
    """The SAM alignment figures, or a note saying why there are none."""
    if grad_norm > 0:
        return sam_alignment(op, top.eigenvectors, config.rho, config.alpha, h_g_hat), []
    return None, ["the gradient is exactly zero: the SAM direction and its alignment are undefined"]


def _critical(
    op: CurvatureOperator,
    gradient: torch.Tensor,
    h_g_hat: torch.Tensor | None,
    loss: float,
    lambda_max: float,
) -> CriticalSharpness:
    """The critical sharpness along −g (SGD's update), its search started at 2/λ_max (on a
    quadratic λ_c ≤ λ_max, so the loss still falls there), with ĝᵀHĝ from the plan's product:
    the quadratic model's λ_c along −g."""
    eta = 2 / lambda_max if lambda_max > 0 else 1.0
    found = critical_sharpness(op, -gradient, eta=eta, base_loss=loss)
    if h_g_hat is None:
        return found
    over = over_of(op)
    return replace(found, quadratic=dot(h_g_hat, gradient, over) / norm(gradient, over))


def _adaptive(
    op: CurvatureOperator,
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[tuple[Any, Any]],
    config: AnalyzeConfig,
    wanted: AdaptiveSharpnessSettings,
    progress: Progress | None,
) -> AdaptiveSharpnessResult:
    """The adaptive sharpness ``wanted``: of the Hessian operator's loss on its own (sharded)
    vectors under ``fsdp``, else of the model's whole parameters (whatever the curvature)."""
    if config.fsdp:
        return sharpness_of(op, wanted, config.shards, progress=progress)
    objective = configured_objective(model, loss_fn, batches, config)
    return adaptive_sharpness(objective, wanted, shards=config.shards, progress=progress)


def _slices(
    op: CurvatureOperator, top: EigenResult, gradient: torch.Tensor, grad_norm: float, rho: float
) -> dict[str, tuple[list[float], list[float]]]:
    """The loss along v₁ and along ĝ (when the gradient is not zero), within ±2ρ."""
    directions = {"v1": top.eigenvectors[0]}
    if grad_norm > 0:
        directions["gradient"] = gradient / grad_norm
    return {name: loss_slice(op, d, 2 * rho) for name, d in directions.items()}


def _planned(
    op: CurvatureOperator,
    config: AnalyzeConfig,
    method: Solver,
    gradient: torch.Tensor,
    grad_norm: float,
) -> tuple[Plan, SolveSettings, torch.Tensor | None]:
    """The run's cost, the solver settings (the Lanczos basis on the host when ``basis_device``
    says so, bounded when the whole basis would not fit where it lies), and H·ĝ, which the
    alignment reuses (None when ĝ is undefined). Costs two
    products: the first also builds what later ones reuse, so the second is the one timed."""
    if grad_norm > 0:
        direction = gradient / grad_norm
    else:
        direction = torch.ones_like(gradient) / dimension(op) ** 0.5
    image = op.matvec(direction)  # the first product also builds what later ones reuse
    start = time.perf_counter()
    op.matvec(direction)
    seconds = time.perf_counter() - start
    settings = config.settings()
    vector_bytes = op.size * op.dtype.itemsize
    available = distributed.main_value(available_memory(op.device))
    cost = method.cost(config.k, 1, settings)
    host = available  # on the CPU the host's memory is the device's
    if op.device.type != "cpu":
        host = distributed.main_value(available_memory(torch.device("cpu")))
    home = basis_home(config.basis_device, op.device, vector_bytes, cost.vectors, available, host)
    if home == "host":
        settings = replace(settings, basis_device="host")
    fitting = fitting_basis(vector_bytes, host if home == "host" else available, cost.vectors)
    chosen = None
    if fitting is not None and settings.max_basis is None:
        bounded = replace(settings, max_basis=max(fitting, config.k + 3))
        bounded_cost = method.cost(config.k, 1, bounded)
        if bounded_cost.vectors < cost.vectors:  # the solver keeps the bound
            settings, cost, chosen = bounded, bounded_cost, bounded.max_basis
    products = {"eigenpairs": cost.products}
    if measured := error_products(op, config.k + 1):  # (product_error)
        products["product-error"] = measured
    if config.trace:
        budget = trace_budget(config.trace_samples, cost.products)
        products["trace"] = method.trace_products(budget)
    if config.density:
        products["density"] = config.density_vectors * config.density_iter
    if config.shards:  # one per eigenvector and trace probe, spread over the shards
        products["sampling"] = config.k + 1 + (TRACE_PROBES if config.trace else 0)
        if config.bias:
            products["bias"] = settings.max_iter  # a Lanczos run per shard, spread over them
    if config.per_layer:
        blocks = len(param_groups(op.space.names, _module_types(op.model)))
        products["per-layer"] = blocks * method.cost(1, 0, settings).products
    plan = Plan(
        num_params=dimension(op),
        num_samples=op.num_samples,
        num_batches=op.num_batches,
        products=products,
        typical=typical_products(products, method, config.trace_samples),
        seconds_per_product=seconds,
        vector_bytes=vector_bytes,
        vectors=cost.vectors,
        available_bytes=available,
        chosen_max_basis=chosen,
        threads=torch.get_num_threads(),
        host_bytes=host if home == "host" else None,
        shard_bytes=_shard_bytes(op.model) if shards_of(op) is not None else None,
        lean_search=getattr(op, "fd_lean", None) is True,
    )
    return plan, settings, image if grad_norm > 0 else None


def _shard_bytes(model: nn.Module) -> int:
    """Bytes of this rank's shards of the model's parameters (FSDP2's DTensors' local parts)."""
    return sum(p.to_local().nbytes for p in model.parameters())


def typical_products(
    products: dict[str, int], method: Solver, trace_samples: int
) -> dict[str, int]:
    """The products each stage typically takes, given the most each may (``products``): a
    Lanczos solve :data:`TYPICAL_LANCZOS` (the eigen stage, the bias's re-solves), the trace its
    budget of that; the rest, and every stage of the other solvers, their bound."""
    typical = dict(products)
    if method.name != "lanczos":
        return typical
    for stage in ("eigenpairs", "bias"):
        if stage in typical:
            typical[stage] = min(typical[stage], TYPICAL_LANCZOS)
    if "trace" in typical:
        budget = method.trace_products(trace_budget(trace_samples, typical["eigenpairs"]))
        typical["trace"] = min(typical["trace"], budget)
    return typical


def _trace_notes(trace: TraceResult, tol: float) -> list[str]:
    """A note when the trace stopped at its product budget before its standard-error target."""
    if trace.converged:
        return []
    low, high = rounded_outward(*trace.interval, 4)
    return [
        f"trace: not converged; its standard error is {trace.std_error:.2g}, above "
        f"{tol:g}·|trace|, after {trace.n_products} products (the budget: "
        f"{TRACE_BUDGET_SHARE:g} × the eigen stage's); 95 % interval [{low:.4g}, {high:.4g}]"
    ]


def _convergence_notes(top: EigenResult, bottom: EigenResult, tol: float) -> list[str]:
    """One note per eigen-solve that left pairs short of the tolerance."""
    return [
        f"{name}: {int((~result.converged).sum())} eigenpair(s) did not reach "
        f"tol={tol} in {result.n_iterations} iterations; raise `max_iter` or `tol`"
        for name, result in (("top", top), ("lambda_min", bottom))
        if not result.all_converged
    ]


def _sampling(
    op: CurvatureOperator,
    config: AnalyzeConfig,
    settings: SolveSettings,
    top: EigenResult,
    bottom: EigenResult,
    gradient: torch.Tensor,
    alignment: Alignment | None,
    progress: Progress | None,
) -> SamplingErrors | None:
    """The figures' data uncertainty over ``config.shards`` shards, with the trace's when it is
    estimated and the figures' sample-size bias when ``config.bias`` (the shards' re-solves
    warm-started from the full-data extreme vectors, whatever the solver)."""
    epsilon = sam_perturbation(gradient, config.rho, over_of(op)) if alignment is not None else None
    full = Figures(
        eigenvalues=top.eigenvalues.tolist(),
        lambda_min=float(bottom.eigenvalues[0]),
        cos_full=None if alignment is None else alignment.cos_full,
        topk_share=None if alignment is None else alignment.topk_share,
        sam_sharpness=None if alignment is None else alignment.sam_sharpness,
    )
    resolve = None
    if config.bias:
        resolve = Resolve(
            start=top.eigenvectors[0] + bottom.eigenvectors[0],
            rho=config.rho,
            tol=max(settings.tol, SHARD_TOL),
            max_iter=settings.max_iter,
            max_basis=settings.max_basis,
            basis_device=settings.basis_device,
        )
    return sampling_errors(
        op,
        config.shards,
        top.eigenvectors,
        bottom.eigenvectors[0],
        gradient,
        epsilon,
        full,
        resolve,
        TRACE_PROBES if config.trace else 0,
        config.seed,
        progress,
    )


def analyze(
    model: nn.Module,
    loss_fn: LossFn,
    batches: list[tuple[Any, Any]],
    config: AnalyzeConfig | None = None,
    progress: Progress | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    *,
    checked: bool = False,
) -> Analysis:
    """Measure the sharpness of ``model`` on ``batches`` (the Hessian of their mean loss, or the
    ``curvature`` the config names); under
    torch.distributed, ``batches`` is this rank's share and every rank gets all ranks' results.

    Args:
        model: The network.
        loss_fn: ``loss_fn(model(inputs), targets)``, a batch's loss.
        batches: The ``(inputs, targets)`` pairs (this rank's share under torch.distributed).
        config: What to compute and how precisely (:class:`AnalyzeConfig`; default: its
            defaults, as ``sharpscope analyze`` without options).
        progress: Called as ``progress(task, done, total)`` through the stages.
        on_plan: Receives the run's cost once one product has been timed, before the eigen
            stage.
        checked: The first batch already ran through the model and the loss in eval mode
            (:func:`~sharpscope.cli.loading.load_inputs` runs it): the operator does not run it
            again unless that checks more (``batch_stats``, or a loss that does not state
            ``reduction``).

    Returns:
        The :class:`Analysis`: eigenvalues, trace, density, alignment, spread and notes.

    Raises:
        InputError: Settings that do not fit the model or the data (one line, naming the
            parameter).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> data = [(torch.randn(32, 4), torch.randint(0, 3, (32,)))]
        >>> config = AnalyzeConfig(k=2, density=False, shards=0)
        >>> result = analyze(model, nn.functional.cross_entropy, data, config)
        >>> result.top.all_converged, result.num_params, result.trace is not None
        (True, 67, True)
    """
    config, notes = config or AnalyzeConfig(), []
    if config.fsdp:
        require_ranks()
    method = solver(config.method)
    op, backend = _operator(model, loss_fn, batches, config, checked)
    watch = Stopwatch(lambda: op.n_products)
    if config.batch_stats:
        notes.append(BATCH_STATS_NOTE)
    if config.micro_batch is not None and getattr(op, "backend", None) == "double-backward":
        notes.append(MICRO_BATCH_NOTE)  # the backend run, which `auto` may have chosen
    if op.dtype == torch.bfloat16:
        notes.append(BFLOAT16_NOTE)
    if config.curvature != "hessian" and config.backend not in ("double-backward", "auto"):
        notes.append(
            f"`backend` {config.backend} applies to the Hessian only, not the {op.curvature}"
        )
    if method.single_process and op.distributed:
        raise InputError(
            f"`method` {method.name} runs in one process only; use "
            + " or ".join(name for name, s in SOLVERS.items() if not s.single_process)
        )
    top = bottom = None
    error: ProductError | None = None
    trace: TraceResult | None = None
    density: DensityResult | None = None
    alignment: Alignment | None = None
    sampling: SamplingErrors | None = None
    slices: dict[str, tuple[list[float], list[float]]] = {}
    sharpness: AdaptiveSharpnessResult | None = None
    critical: CriticalSharpness | None = None
    per_layer: list[LayerEigen] = []

    def result(interrupted: str | None = None) -> Analysis:
        """The analysis of the stages run so far (``interrupted``: the one stopped)."""
        return Analysis(
            loss=loss,
            accuracy=acc,
            grad_norm=grad_norm,
            num_samples=op.num_samples,
            num_batches=op.num_batches,
            curvature=op.curvature,
            param_names=op.space.names,
            param_shapes=tuple(tuple(shape) for shape in op.space.shapes),
            num_params=dimension(op),
            top=top,
            bottom=bottom,
            trace=trace,
            density=density,
            alignment=alignment,
            sampling=sampling,
            per_layer=per_layer,
            timings=watch.timings,
            n_products=op.n_products + (sampling.n_products if sampling else 0),
            stage_products={
                **watch.counts,
                **({"sampling": sampling.n_products} if sampling else {}),
            },
            notes=notes + _convergence_notes(top, bottom, config.tol),
            slices=slices,
            adaptive_sharpness=sharpness,
            critical_sharpness=critical,
            product_error=error,
            backend=backend,
            interrupted=interrupted,
        )

    try:
        with watch.stage("gradient"), _one_step(progress, "loss and gradient"):
            loss = _finite_loss(op)
            gradient = op.gradient()
            # a sharded model's forwards gather over the ranks: every rank runs as many
            rounds = max(distributed.all_gather(len(batches))) if config.fsdp else 0
            acc = accuracy(
                model, batches, op.dtype, op.device, config.batch_stats, op.distributed, rounds
            )
        grad_norm = norm(gradient, over_of(op))
        with watch.stage("plan"):
            plan, settings, h_g_hat = _planned(op, config, method, gradient, grad_norm)
        plan = replace(plan, backend=backend)
        if plan.chosen_max_basis is not None:
            notes.append(
                "the whole Lanczos basis would not fit in memory: `max_basis` "
                f"{settings.max_basis} was chosen (thick restarts)"
            )
        if plan.host_bytes is not None and config.basis_device == "auto":
            notes.append(
                "the whole Lanczos basis would not fit in the device's memory: it was kept in "
                "the host's (pinned, streamed to the device; set `basis_device` to choose)"
            )
        if on_plan is not None:
            on_plan(plan)
        before = op.n_products
        with watch.stage("eigenvalues"):
            top, bottom = refined(  # a finite-difference step chosen again on v₁
                op,
                lambda: method.extremes(
                    op, config.k, 1, settings, _staged(progress, "top-k and λ_min")
                ),
                config.tol,
            )
        eigen_products = op.n_products - before  # the trace's budget: not the error stage's
        notes += [str(r.multiplicity) for r in (top, bottom) if r.multiplicity is not None]
        subspace, top, bottom = (
            top.subspace,
            replace(top, subspace=None),
            replace(bottom, subspace=None),
        )
        if "product-error" in plan.products:  # the products' own error, on v₁
            with watch.stage("product-error"):
                others = [*top.eigenvectors[1:], bottom.eigenvectors[0]]
                error = product_error(op, top.eigenvectors[0], plan.available_bytes, others)
        if error is not None:
            scale = float(torch.cat([top.eigenvalues, bottom.eigenvalues]).abs().max())
            top, bottom = (
                error.widened(top, config.tol, scale),
                error.widened(bottom, config.tol, scale),
            )
            notes += error.notes(config.tol, scale)
        if config.trace:
            with watch.stage("trace"):
                budget = trace_budget(config.trace_samples, eigen_products)
                staged = _staged(progress, "trace")
                traced = SolveSettings(config.trace_tol, budget, config.seed)
                trace = method.trace(op, traced, staged, subspace)
            notes += _trace_notes(trace, config.trace_tol)
        del subspace  # the Krylov basis: free it before the later stages
        if config.density:
            with watch.stage("density"):
                if method.density_note is not None:
                    notes.append(method.density_note)
                density = slq(
                    op,
                    n_vectors=config.density_vectors,
                    n_iter=config.density_iter,
                    seed=config.seed,
                    progress=_staged(progress, "density"),
                )
        with watch.stage("alignment"), _one_step(progress, "alignment"):
            alignment, why = _alignment(op, top, grad_norm, config, h_g_hat)
            notes += why
        if config.critical_sharpness:
            with watch.stage("critical_sharpness"), _one_step(progress, "critical sharpness"):
                critical = _critical(op, gradient, h_g_hat, loss, float(top.eigenvalues[0]))
        if config.shards:
            with watch.stage("sampling"):
                sampling = _sampling(
                    op, config, settings, top, bottom, gradient, alignment, progress
                )
            if sampling is None:
                notes.append(
                    "the spread over other samples was not estimated: the samples make fewer "
                    "than 2 shards (with `batch_stats`, or a model exported for one batch size, "
                    "a shard is a whole batch); analyze more samples"
                )
        if config.slices:
            with watch.stage("slices"):
                slices = _slices(op, top, gradient, grad_norm, config.rho)
        wanted = config.sharpness_settings()
        if wanted is not None:
            with watch.stage("adaptive_sharpness"):
                sharpness = _adaptive(op, model, loss_fn, batches, config, wanted, progress)
        if config.per_layer:
            with watch.stage("per_layer"):
                per_layer = _per_layer(op, config, method, settings, progress)
    except KeyboardInterrupt:
        stage = watch.running
        raise Interrupted(None if bottom is None else result(stage), stage) from None
    finally:
        if config.fsdp:  # the shards its parameters again: a forward leaves the root's gathered
            reshard(model)
    return result()


def loss_slice(
    op: CurvatureOperator, direction: torch.Tensor, radius: float, points: int = 21
) -> tuple[list[float], list[float]]:
    """The loss at w + t·direction for ``points`` values of t evenly spaced in [−radius, radius]."""
    steps = torch.linspace(-radius, radius, points, dtype=torch.float64).tolist()
    return steps, [op.loss(t * direction) for t in steps]
