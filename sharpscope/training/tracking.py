"""Sharpness across training: :class:`SharpnessTracker` measures λ_max (and, if asked, λ_min,
the trace and alignments) on a fixed probe set, refined from its last eigenvector, or the
forward-only critical sharpness along the last update, or both, without touching the training's
state; :class:`Tracker` adds the probe and validation figures of a
``sharpscope finetune`` row."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharpscope import distributed
from sharpscope.analysis.critical_sharpness import CriticalSharpness, critical_sharpness
from sharpscope.batches import LossFn, correct_count, loss_weight
from sharpscope.choices import BACKENDS
from sharpscope.curvature import (
    CURVATURES,
    CurvatureOperator,
    Objective,
    SolveSettings,
    curvature_mode,
    curvature_operator,
    hutchpp,
    lanczos,
)
from sharpscope.curvature.hvp import Backend, refined
from sharpscope.curvature.lanczos import lanczos_extremes, start_vector
from sharpscope.curvature.params import ParamSpace, select_params
from sharpscope.curvature.power import rayleigh
from sharpscope.curvature.results import EigenResult
from sharpscope.curvature.sharded import ShardedHessianOperator, placed
from sharpscope.curvature.shards import over_of
from sharpscope.curvature.vectors import Over, abs_cosine, norm
from sharpscope.errors import InputError, check_choice
from sharpscope.optim.pieces import flat, local, reduction, split
from sharpscope.structures import call_model
from sharpscope.training.run_config import TRACK_MEASURES
from sharpscope.training.sinks import Sink, as_sinks, close_all

Batch = tuple[Any, Any]
TRACK_TOL = 1e-3
"""Relative residual at which the tracked λ_max counts as converged."""
TRACK_PRODUCTS: int | None = 1
"""Products per measurement by default: one, the cheapest with a true residual; every 100 steps
that is 1.8-3.9 % of the training with a probe set of half to one training batch
(docs/benchmarks.md, section 11)."""
TRACE_SKETCH = 4
"""Hutch++'s sketch size for a tracked trace: 2 × 4 products for its exactly traced part."""


def evaluate(
    model: nn.Module, loss_fn: LossFn, batches: Sequence[Batch]
) -> tuple[float, float | None]:
    """Mean loss (batches weighted by :func:`~sharpscope.batches.loss_weight`) and accuracy
    (None for regression) over ``batches``, in eval mode; the model's modes are restored. Under
    torch.distributed, over all ranks' batches."""
    loss_sum, samples, correct, counted = 0.0, 0, 0, 0
    with torch.no_grad(), curvature_mode(model):
        for inputs, targets in batches:
            outputs = call_model(model, inputs)
            n = loss_weight(loss_fn, (inputs, targets))
            loss_sum += float(loss_fn(outputs, targets)) * n
            samples += n
            hits = correct_count(outputs, targets)
            if hits is not None:
                correct += hits[0]
                counted += hits[1]
    loss_sum, samples, correct, counted = distributed.sum_floats(
        [loss_sum, samples, correct, counted]
    )
    return loss_sum / samples, (correct / counted if counted else None)


@dataclass(frozen=True)
class Measurement:
    """One measurement of the probe set's curvature matrix (``curvature``, a name of
    :data:`~sharpscope.curvature.CURVATURES`: the Hessian unless asked) at training step ``step``.

    Every eigenvalue comes with its residual ‖Hv − λv‖ (it lies within that of an eigenvalue) and
    whether that met the tolerance, the trace with its standard error; a figure not asked for is
    None. It took ``n_products`` matrix-vector products in ``product_dtype``, ``eigen_products``
    of them for the eigenvalues (the rest for the trace); ``warm_start``: whether the eigen-solve
    started from the previous measurement's (see :class:`SharpnessTracker`).
    """

    step: int | None
    lambda_max: float | None
    """None with the ``critical`` measure alone, as its residual, convergence and warm start."""
    lambda_max_residual: float | None
    lambda_max_converged: bool | None
    probe_loss: float
    n_products: int
    eigen_products: int
    warm_start: bool | None
    product_dtype: str
    seconds: float
    lambda_min: float | None = None
    lambda_min_residual: float | None = None
    lambda_min_converged: bool | None = None
    trace: float | None = None
    trace_error: float | None = None
    alignment: float | None = None
    """|cos(ĝ, v₁)|, ĝ the probe gradient."""
    esam_v1_alignment: float | None = None
    """|cos(v, v₁)| of the Eigen-SAM optimizer's eigenvector estimate v and the measured v₁."""
    curvature: str = "hessian"
    lambda_c: float | None = None
    """The critical sharpness 2/η_c, the middle of its bracket [``lambda_c_low``,
    ``lambda_c_high``] (None unless bracketed; see
    :mod:`~sharpscope.analysis.critical_sharpness`)."""
    lambda_c_low: float | None = None
    lambda_c_high: float | None = None
    """None (infinite) when the loss rose at the search's smallest step."""
    lambda_c_direction: str | None = None
    """``update`` (the last step's parameter change over its learning rate) or ``-gradient``."""
    lambda_c_passes: int | None = None

    def row(self) -> dict[str, Any]:
        """The figures as a flat dict (None where not measured)."""
        return asdict(self)


class SharpnessTracker:
    """Measures the sharpness of ``objective``'s model on its batches (a fixed probe set) every
    ``every`` steps.

    λ_max is the top eigenvalue of the ``curvature`` matrix (a name of
    :data:`~sharpscope.curvature.CURVATURES`: ``hessian``, ``ggn``, ``fisher`` with labels drawn
    from the model, seeded by ``seed``, or ``empirical-fisher``) of the objective's loss (the mean
    over the probe batches, each an ``(inputs, targets)`` pair), over the parameters it selects,
    in eval mode (BatchNorm on running statistics, or on each batch's with its ``batch_stats``),
    as ``sharpscope analyze`` measures it.

    A measurement takes at most ``products`` matrix-vector products (default 1, 1.8-3.9 % of the
    training at ``every=100`` with a probe set of half to one training batch) and refines across
    measurements: Lanczos starts from the last eigenvector moved one power step on (from its
    product, kept: no product more), so while the matrix drifts slowly λ_max converges over
    measurements, as Eigen-SAM's estimate does; with one product each this is a power iteration
    (it finds the end of largest magnitude, the top one for a trained network). With
    ``products=None`` each measurement solves to relative residual ``tol`` (at most
    ``max_iter`` products), as ``sharpscope analyze`` does. Either way λ_max is the Rayleigh
    quotient of its vector v (never above the true λ_max, up to rounding) and its residual the
    true ‖Hv − λv‖ at the current weights, from the products the solve took; ``converged`` only
    when that met ``tol``. Optionally also λ_min (from the same Krylov space), the trace (Hutch++,
    ``trace_samples`` products more), |cos(ĝ, v₁)| (``alignment``, free) and, given an
    ``eigen_sam`` optimizer, how well its eigenvector estimate matches v₁.

    With ``measure`` ``critical`` (or ``both``) it also measures the critical sharpness 2/η_c
    (:mod:`~sharpscope.analysis.critical_sharpness`: forward passes only, about 8, where λ_max's
    products are out of reach) along the training's own update: the parameter change of the step
    that :meth:`step_started` was told of (the measuring step), over that step's learning rate;
    without it (the callbacks' first measurement, a resumed run's) along −g of the probe set. Its
    search starts from the last η_c. ``critical`` alone takes no product: no λ_max, alignment or
    warm start then (None), and ``lambda_min`` and ``trace`` are refused.

    Measuring changes nothing of the training: modes, BatchNorm buffers, ``.grad``, the CPU and
    CUDA random streams and the parameters are as they were; products run outside any autocast,
    in the parameters' dtype. ``log`` receives each measurement's row (see
    :func:`~sharpscope.training.sinks.as_sinks`: a list, a ``.jsonl`` path, a TensorBoard writer,
    a callable, or a tuple of them). Under torch.distributed every rank calls it with its share of
    the probe set, all get the same figures, and rank 0 alone logs.

    A model whose parameters FSDP2 shards over the ranks (``fully_shard``) is measured on
    :class:`~sharpscope.curvature.sharded.ShardedHessianOperator` (the Hessian by finite
    differences of sharded gradients): every vector, the warm start included, is this rank's
    pieces, and dot products and norms are summed over the ranks as scalars; :meth:`state_dict`
    holds the vectors as DTensors placed like the parameters, which
    ``torch.distributed.checkpoint`` reshards.

    Args:
        objective: The model in training (a DistributedDataParallel's module is used), its loss,
            the fixed probe batches and the parameters (:class:`~sharpscope.curvature.Objective`).
        every: Measure every this many steps.
        lambda_min: Also λ_min.
        trace: Also the trace (Hutch++).
        alignment: Also |cos(ĝ, v₁)|.
        eigen_sam: An :class:`~sharpscope.optim.EigenSAM` whose estimate to compare with v₁.
        tol: The relative residual a measurement converges at.
        products: The most products per measurement (None: solve to ``tol``).
        max_iter: The most products when ``products`` is None.
        trace_samples: The trace's products.
        seed: The seed of the first start and of the Fisher's label draws.
        warm_start: Start each measurement from the last one's vector.
        curvature: The matrix: ``hessian``, ``ggn``, ``fisher`` or ``empirical-fisher``.
        backend: How the Hessian's products are taken (:data:`~sharpscope.choices.BACKENDS`; a
            ``finite-difference`` solve chooses its step again on v₁, as analyze's does).
        measure: ``lambda_max``, ``critical`` or ``both`` (:data:`TRACK_MEASURES`).
        log: Where each row goes (:func:`~sharpscope.training.sinks.as_sinks`).

    Raises:
        InputError: An unknown ``curvature``, ``backend`` or ``measure``; a sharded model's
            λ_max asked of a matrix other than the Hessian or by products other than finite
            differences.
        ValueError: A setting out of range, an empty probe set, an ``eigen_sam`` that is no
            Eigen-SAM, or parameters partly sharded.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import Objective
        >>> probe = [(torch.randn(16, 3), torch.randn(16, 1))]
        >>> objective = Objective(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss, probe)
        >>> rows = []
        >>> tracker = SharpnessTracker(objective, every=1, products=None, log=rows)
        >>> measured = tracker.measure(step=1)
        >>> measured.lambda_max > 0, measured.lambda_max_converged, len(rows)
        (True, True, 1)
    """

    def __init__(
        self,
        objective: Objective,
        every: int = 100,
        *,
        lambda_min: bool = False,
        trace: bool = False,
        alignment: bool = True,
        eigen_sam: Any = None,
        tol: float = TRACK_TOL,
        products: int | None = TRACK_PRODUCTS,
        max_iter: int = 20,
        trace_samples: int = 30,
        seed: int = 0,
        warm_start: bool = True,
        curvature: str = "hessian",
        backend: Backend = "double-backward",
        measure: str = "lambda_max",
        log: object = None,
    ) -> None:
        check_choice("curvature", curvature, CURVATURES)
        check_choice("backend", backend, BACKENDS)
        check_choice("measure", measure, TRACK_MEASURES)
        if measure == "critical" and (lambda_min or trace):
            raise ValueError("`lambda_min` and `trace` need `measure` lambda_max or both")
        if every < 1:
            raise ValueError(f"`every` must be at least 1, got {every}")
        if not tol > 0:
            raise ValueError(f"`tol` must be positive, got {tol}")
        if max_iter < 1 or trace_samples < 2:
            raise ValueError("`max_iter` must be at least 1 and `trace_samples` at least 2")
        if products is not None and products < 1:
            raise ValueError(f"`products` must be at least 1 (or None), got {products}")
        if eigen_sam is not None and not hasattr(eigen_sam, "eigenvector"):
            raise ValueError("`eigen_sam` must be an EigenSAM optimizer")
        if isinstance(objective.model, DistributedDataParallel):
            objective = objective.replace(model=objective.model.module)
        if not objective.batches:
            raise ValueError("the objective's `batches` are empty: the tracker needs a batch")
        self.objective = objective
        self.model = objective.model
        self.sharded = reduction(self._space().params) is not None
        """Whether FSDP2 shards the measured parameters (vectors are this rank's pieces)."""
        if self.sharded and measure != "critical":
            if backend != "finite-difference":
                raise InputError(
                    "a model sharded by FSDP2 takes the Hessian's products by finite differences "
                    f"only, not `backend` {backend}: pass `backend` finite-difference"
                )
            if curvature != "hessian":
                raise InputError(
                    f"a model sharded by FSDP2 has its Hessian's λ_max tracked, not `curvature` "
                    f"{curvature}"
                )
        self.every = every
        self.lambda_min = lambda_min
        self.trace = trace
        self.alignment = alignment
        self.eigen_sam = eigen_sam
        self.tol = tol
        self.products = products
        self.max_iter = max_iter
        self.trace_samples = trace_samples
        self.seed = seed
        self.warm_start = warm_start
        self.curvature = curvature
        self.backend = backend
        self.measure_eigen = measure != "critical"
        self.measure_critical = measure != "lambda_max"
        self.sinks: list[Sink] = as_sinks(log) if distributed.is_main() else []
        self.last: Measurement | None = None
        self._top: torch.Tensor | None = None
        self._bottom: torch.Tensor | None = None
        self._next: torch.Tensor | None = None
        self._eta: float | None = None
        self._before: tuple[int, list[torch.Tensor], float] | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measuring step (a multiple of ``every``)."""
        return step % self.every == 0

    def step_started(self, step: int, lr: float) -> None:
        """Say that the optimizer step that makes ``step``, a step measured after, starts now, at
        learning rate ``lr``: with the critical measure the tracked parameters are copied (one
        copy, dropped by the measurement), so that its direction is that step's update."""
        if self.measure_critical and lr > 0:
            params = self._space().params
            self._before = (step, [local(p).detach().clone() for p in params], lr)

    def __call__(self, step: int) -> Measurement | None:
        """At a measuring step, :meth:`measure`; else nothing."""
        return self.measure(step) if self.due(step) else None

    def measure(self, step: int | None = None) -> Measurement:
        """Measure now, log the row (rank 0) and return it; ``step`` labels the row."""
        start = time.perf_counter()
        top = bottom = warm = traced = gradient = critical = None
        with _untouched(self.model):
            op = self._operator()
            over = over_of(op)
            if self.measure_eigen:
                top, bottom, warm = self._eigen(op)
            eigen_products = op.n_products
            if (self.alignment and self.measure_eigen) or self.measure_critical:
                gradient = op.gradient()
            probe_loss = op.loss()
            op.release()
            if self.measure_critical:
                assert gradient is not None
                critical = self._critical(op, step, gradient, probe_loss, top)
            if self.trace:
                samples = self.trace_samples - 2 * TRACE_SKETCH
                traced = hutchpp(
                    op,
                    sketch=TRACE_SKETCH,
                    settings=SolveSettings(tol=0.0, max_iter=samples, seed=self.seed),
                    min_samples=2,
                )
                op.release()
        eigen = {}
        if top is not None:
            v1 = top.eigenvectors[0]
            self._top = v1.detach().clone()
            self._bottom = None if bottom is None else bottom.eigenvectors[0].detach().clone()
            self._next = _power_step(top, bottom, over)
            eigen = {
                "lambda_max": float(top.eigenvalues[0]),
                "lambda_max_residual": float(top.residuals[0]),
                "lambda_max_converged": bool(top.converged[0]),
                "alignment": None if gradient is None else abs_cosine(gradient, v1, over),
                "esam_v1_alignment": self._esam_alignment(op.space, v1, over),
            }
        measured = Measurement(
            step=step,
            lambda_max=eigen.get("lambda_max"),
            lambda_max_residual=eigen.get("lambda_max_residual"),
            lambda_max_converged=eigen.get("lambda_max_converged"),
            probe_loss=probe_loss,
            n_products=op.n_products,
            eigen_products=eigen_products,
            warm_start=warm,
            product_dtype=str(op.dtype).removeprefix("torch."),
            seconds=time.perf_counter() - start,
            lambda_min=None if bottom is None else float(bottom.eigenvalues[0]),
            lambda_min_residual=None if bottom is None else float(bottom.residuals[0]),
            lambda_min_converged=None if bottom is None else bool(bottom.converged[0]),
            trace=None if traced is None else traced.estimate,
            trace_error=None if traced is None else traced.std_error,
            alignment=eigen.get("alignment") if self.alignment else None,
            esam_v1_alignment=eigen.get("esam_v1_alignment"),
            curvature=self.curvature,
            **_critical_fields(critical),
        )
        self.last = measured
        row = measured.row()
        for sink in self.sinks:
            sink(row)
        return measured

    def _critical(
        self,
        op: CurvatureOperator,
        step: int | None,
        gradient: torch.Tensor,
        loss: float,
        top: EigenResult | None,
    ) -> CriticalSharpness:
        """The critical sharpness along the update of the step :meth:`step_started` was told of
        (when it is ``step``, or ``step`` is None), else along −g; its search starts at the last
        η_c, else at the update's learning rate, else at 2/λ_max, else at 1."""
        before, self._before = self._before, None
        direction, name, eta = -gradient, "-gradient", None
        if before is not None and step in (None, before[0]):
            params = op.space.params
            change = [local(p).detach() - q for p, q in zip(params, before[1], strict=True)]
            direction, name, eta = flat(change) / before[2], "update", before[2]
        if self._eta is not None:
            eta = self._eta
        elif eta is None:
            lam = None if top is None else float(top.eigenvalues[0])
            eta = 2 / lam if lam is not None and lam > 0 else 1.0
        found = critical_sharpness(op, direction, name=name, eta=eta, base_loss=loss)
        if found.status == "bracketed":
            self._eta = math.sqrt(found.eta_low * found.eta_high)
        return found

    def _space(self) -> ParamSpace:
        """The measured parameters."""
        return select_params(self.model, self.objective.params, self.objective.exclude)

    def _operator(self) -> CurvatureOperator:
        """The probe set's ``curvature`` matrix (the true Fisher's labels drawn by ``seed``), on
        sharded vectors for a sharded model."""
        # training runs the model on the data; the loss is taken as it is: no validation
        if self.sharded:
            return ShardedHessianOperator(self.objective, validate=False)
        return curvature_operator(
            self.curvature, self.objective, backend=self.backend, seed=self.seed, validate=False
        )

    def _eigen(self, op: CurvatureOperator) -> tuple[Any, Any, bool]:
        """λ_max's (and λ_min's, if asked) Lanczos results (one product: the start's Rayleigh
        quotient, the same without Lanczos' bookkeeping), and whether they started warm; the
        pairs are checked by the products kept from the run, so no product more. A
        finite-difference solve is redone while the step chosen again on v₁ changes
        (:func:`~sharpscope.curvature.hvp.refined`)."""
        start = self._start(op.size)
        top, bottom = refined(op, lambda: self._solved(op, start), self.tol)
        return top, bottom, start is not None

    def _solved(self, op: CurvatureOperator, start: torch.Tensor | None) -> tuple[Any, Any]:
        """One solve of :meth:`_eigen` from ``start``: λ_max's result and λ_min's (or None)."""
        budget = self.max_iter if self.products is None else self.products
        if budget == 1 and not self.lambda_min:
            first = start_vector(op, torch.Generator().manual_seed(self.seed), start)
            return rayleigh(op, first, self.tol), None
        settings = SolveSettings(tol=self.tol, max_iter=budget, seed=self.seed)
        if self.lambda_min:
            return lanczos_extremes(op, 1, settings=settings, v0=start, keep_images=True)
        return lanczos(op, 1, settings=settings, v0=start, keep_images=True), None

    def _start(self, size: int) -> torch.Tensor | None:
        """The warm start: the last v₁ moved one power step on (plus the last λ_min vector when
        both ends are tracked), or None for a seeded random start."""
        top = self._top if self._next is None else self._next
        if not self.warm_start or top is None or top.shape != (size,):
            return None
        if self.lambda_min and self._bottom is not None:
            return top + self._bottom
        return top

    def _esam_alignment(
        self, space: ParamSpace, v1: torch.Tensor, over: Over | None
    ) -> float | None:
        """|cos(v, v₁)| of the Eigen-SAM optimizer's v (paired with the tracked parameters by
        identity; zero where it has none; this rank's pieces of sharded ones, reduced ``over``
        the ranks), or None before its first estimate."""
        vector = None if self.eigen_sam is None else self.eigen_sam.eigenvector
        if vector is None:
            return None
        names = {p: n for n, p in self.eigen_sam.model.named_parameters()}
        pieces = [local(p) for p in space.params]
        parts = [
            vector.get(names.get(p, ""), torch.zeros_like(t))
            for p, t in zip(space.params, pieces, strict=True)
        ]
        return abs_cosine(flat(parts), v1, over)

    def state_dict(self) -> dict[str, Any]:
        """The warm-start vectors, so that a resumed run measures as an uninterrupted one: flat
        tensors, or for a sharded model ``{parameter name: DTensor}`` placed like the parameters
        (this rank's pieces; ``torch.distributed.checkpoint`` saves and reshards them)."""
        vectors = {"top": self._top, "bottom": self._bottom, "next": self._next}
        return {**{k: self._placed(v) for k, v in vectors.items()}, "eta": self._eta}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state_dict` (None: start cold; a state without ``next``, from
        before the power step, starts from ``top``); its sharded vectors may be cut for another
        number of ranks, placed like the parameters (:meth:`vector_template`)."""
        state = state or {}
        self._top, self._bottom = self._flat(state.get("top")), self._flat(state.get("bottom"))
        self._next = self._flat(state.get("next"))
        self._eta = state.get("eta")

    def vector_template(self) -> dict[str, torch.Tensor]:
        """A sharded model's vector as :meth:`state_dict` holds it, zero: what
        ``torch.distributed.checkpoint`` loads a saved one into."""
        space = self._space()
        return {
            n: placed(torch.zeros_like(local(p)), p)
            for n, p in zip(space.names, space.params, strict=True)
        }

    def _placed(self, vector: torch.Tensor | None) -> Any:
        """A flat vector as :meth:`state_dict` holds it: itself, or for a sharded model
        ``{parameter name: DTensor}`` sharing its storage."""
        if vector is None or not self.sharded:
            return vector
        space = self._space()
        pieces = split(vector, space.params)
        return {n: placed(t, p) for n, p, t in zip(space.names, space.params, pieces, strict=True)}

    def _flat(self, stored: Any) -> torch.Tensor | None:
        """A vector of :meth:`state_dict` as the flat vector (this rank's pieces) it was."""
        if not isinstance(stored, dict):
            return stored
        return flat(stored[n] for n in self._space().names)

    def close(self) -> None:
        """Close the file logs and TensorBoard writers this tracker opened."""
        close_all(self.sinks)


def tracker_for(
    model: nn.Module, loss_fn: LossFn, probe_batches: Iterable[Batch], every: int, **options: Any
) -> SharpnessTracker:
    """A :class:`SharpnessTracker` of ``model``'s ``loss_fn`` on ``probe_batches`` (what the
    training callbacks make): the ``options`` that name a field of
    :class:`~sharpscope.curvature.Objective` (``params``, ``batch_stats``, ...) set the
    objective, the rest go to the tracker."""
    fields = {field.name for field in dataclasses.fields(Objective)}
    problem = {k: v for k, v in options.items() if k in fields}
    own = {k: v for k, v in options.items() if k not in fields}
    return SharpnessTracker(Objective(model, loss_fn, probe_batches, **problem), every, **own)


def _critical_fields(found: CriticalSharpness | None) -> dict[str, Any]:
    """A measurement's critical-sharpness fields (all None when not measured)."""
    if found is None:
        return {}
    return {
        "lambda_c": found.value,
        "lambda_c_low": found.low if math.isfinite(found.low) else None,
        "lambda_c_high": found.high if math.isfinite(found.high) else None,
        "lambda_c_direction": found.direction,
        "lambda_c_passes": found.passes,
    }


def _power_step(
    top: EigenResult, bottom: EigenResult | None, over: Over | None
) -> torch.Tensor | None:
    """The next measurement's start: (H − σ)v₁ normalised, from v₁'s image kept by this one
    (no product), σ = min(0, λ_min) when λ_min is tracked, else 0, so that a dominant negative end
    does not pull it; None when that image is zero (its norm summed ``over`` the ranks of a
    sharded one)."""
    if top.images is None:
        return None
    shift = 0.0 if bottom is None else min(0.0, float(bottom.eigenvalues[0]))
    step = top.images[0] if shift == 0 else top.images[0] - shift * top.eigenvectors[0]
    length = norm(step, over)
    return (step / length).detach() if length > 0 else None


@contextlib.contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Gradients on and autocast off for the body, with the CPU and CUDA random streams saved
    and restored (the operator itself restores modes and leaves ``.grad`` and buffers alone)."""
    device = next(model.parameters()).device
    devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=devices))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


@dataclass
class Tracker:
    """A ``sharpscope finetune`` row's tracked figures: λ_max, its residual and |cos(ĝ, v₁)|, or
    the critical sharpness λ_c, or both, from ``sharpness`` (see :class:`SharpnessTracker`), and
    loss and accuracy on its probe batches and on ``val``. Under torch.distributed each rank
    holds its share of both, and every figure is that of all ranks' data together."""

    sharpness: SharpnessTracker
    val: list[Batch] | None

    def __call__(self, model: nn.Module) -> dict[str, float | None]:
        """The figures of the tracked model now (``model`` must be it)."""
        if model is not self.sharpness.model:
            raise ValueError("the tracker measures the model it was made for")
        start = time.perf_counter()
        top = self.sharpness.measure()
        loss_fn, probe = self.sharpness.objective.loss_fn, self.sharpness.objective.batches
        with torch.random.fork_rng(devices=[]):
            probe_loss, probe_accuracy = evaluate(model, loss_fn, probe)
            val_loss, val_accuracy = (
                evaluate(model, loss_fn, self.val) if self.val else (None, None)
            )
        return {
            **{key: getattr(top, name) for key, name in _MEASURED.items()},
            "probe_loss": probe_loss,
            "probe_accuracy": probe_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "track_seconds": time.perf_counter() - start,
        }


_MEASURED: dict[str, str] = {
    "lambda_max": "lambda_max",
    "lambda_residual": "lambda_max_residual",
    "lambda_c": "lambda_c",
    "lambda_c_low": "lambda_c_low",
    "lambda_c_high": "lambda_c_high",
    "lambda_c_direction": "lambda_c_direction",
    "alignment": "alignment",
    "curvature": "curvature",
    "product_dtype": "product_dtype",
}
"""A row's curvature figures -> the :class:`Measurement` fields they come from."""
