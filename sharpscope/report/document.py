"""The analysis report as typed sections: made from an :class:`Analysis`, written as JSON and read
back from it (checked against the report schema). The one place that knows the report's layout:
each field below is a key of the JSON document (docs/report.md), in the order it is written."""

from __future__ import annotations

import datetime
import json
import math
import platform
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union, get_args, get_origin, get_type_hints

from sharpscope.analysis.gate import GateInput, Reading
from sharpscope.analysis.intervals import COSINES, SamplingErrors, bias_range, interval
from sharpscope.analysis.verdict import spread_notes, verdict
from sharpscope.errors import InputError
from sharpscope.report.json_report import dumps
from sharpscope.report.schema import REANALYZE, SCHEMA_VERSION, NotAReport, check_report
from sharpscope.version import __version__

if TYPE_CHECKING:  # a report is read, explained and gated without torch
    from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessResult
    from sharpscope.analysis.alignment import Alignment
    from sharpscope.analysis.analyze import Analysis, LayerEigen
    from sharpscope.analysis.critical_sharpness import CriticalSharpness
    from sharpscope.analysis.plan import BackendChoice
    from sharpscope.curvature import DensityResult, EigenResult, MultiplicityCheck, TraceResult
    from sharpscope.curvature.product_error import ProductError

S = TypeVar("S", bound="Section")

_OPTIONAL = {"optional": True}
"""Field metadata: a key that reports may lack; the field is None then, and left out of the JSON."""


class Section:
    """A part of the report whose dataclass fields are its JSON keys."""

    def to_json(self) -> dict[str, Any]:
        """The section as JSON values: sections as objects, tuples as arrays."""
        return {
            f.name: _dump(getattr(self, f.name))
            for f in fields(self)  # type: ignore[arg-type]
            if not (f.metadata.get("optional") and getattr(self, f.name) is None)
        }

    @classmethod
    def from_json(cls: type[S], data: dict[str, Any]) -> S:
        """The section from JSON values the schema accepts (keys it does not know are ignored)."""
        hints = get_type_hints(cls)
        known = [f.name for f in fields(cls) if f.name in data]  # type: ignore[arg-type]
        return cls(**{name: _load(hints[name], data[name]) for name in known})


def _dump(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load(hint: Any, value: Any) -> Any:
    """The JSON ``value`` as the type ``hint`` says: objects as sections, arrays as tuples."""
    if value is None:
        return None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return _load(next(a for a in args if a is not type(None)), value)
    if origin is tuple:
        return tuple(_load(args[0], v) for v in value)
    if origin is dict:
        return {k: _load(args[1], v) for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, Section):
        return hint.from_json(value)
    return value


# --- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInput(Section):
    """The checkpoint file analysed."""

    path: str
    sha256: str
    format: str
    adapter: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    """Of a PEFT LoRA adapter: its folder, type, rank, alpha, target modules and base model."""


@dataclass(frozen=True)
class ModelInput(Section):
    """How the model was built."""

    spec: dict[str, Any] | None
    """``{"target": ..., "args": {...}}``; None for a checkpoint that holds the whole module."""


@dataclass(frozen=True)
class DataInput(Section):
    """The data analysed: as specified, as found, and how it was sampled and batched."""

    spec: str
    source: str
    split: str
    num_samples: int
    batch_size: int
    seed: int
    fingerprint: str
    """A hash of the loaded inputs and targets (:func:`sharpscope.cli.loading.data_fingerprint`):
    the CI gate compares it with its baseline's."""
    split_size: int | None = field(default=None, metadata=_OPTIONAL)
    """How many samples the split holds (``num_samples`` of them were analysed)."""


def current_versions() -> dict[str, str]:
    """The versions of sharpscope, torch and Python running now."""
    import torch  # only where an analysis ran, so torch is loaded already

    return {
        "sharpscope": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class Inputs(Section):
    """What was analysed, with which settings, by which versions (only the versions required)."""

    checkpoint: CheckpointInput | None = field(default=None, metadata=_OPTIONAL)
    model: ModelInput | None = field(default=None, metadata=_OPTIONAL)
    data: DataInput | None = field(default=None, metadata=_OPTIONAL)
    loss: str | None = field(default=None, metadata=_OPTIONAL)
    dtype: str | None = field(default=None, metadata=_OPTIONAL)
    """The dtype of the analysis: of the model's weights and of its products."""
    weights_dtype: str | None = field(default=None, metadata=_OPTIONAL)
    """The floating dtype the checkpoint stores its weights in (``bfloat16``; ``mixed`` for
    several), widened or narrowed to ``dtype`` for the analysis."""
    device: str | None = field(default=None, metadata=_OPTIONAL)
    config: dict[str, Any] | None = field(default=None, metadata=_OPTIONAL)
    """The :class:`~sharpscope.analysis.analyze.AnalyzeConfig` fields."""
    versions: dict[str, str] = field(default_factory=current_versions)

    def measured_on(self) -> dict[str, Any]:
        """The settings that make the data a report was measured on, by parameter name (see
        :data:`~sharpscope.analysis.gate.DATA_SETTINGS`); those these inputs lack are left out."""
        data, config = self.data, self.config or {}
        found = {
            "data": None if data is None else data.fingerprint,
            "samples": None if data is None else data.num_samples,
            "seed": None if data is None else data.seed,
            "rho": config.get("rho"),
            "dtype": self.dtype,
            "loss": self.loss,
            "reduction": config.get("reduction"),
        }
        return {key: value for key, value in found.items() if value is not None}


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Multiplicity(Section):
    """How the solve looked for further copies of its eigenvalues (see
    :class:`~sharpscope.curvature.results.MultiplicityCheck`)."""

    starts: int
    complete: bool
    products: int
    note: str

    @classmethod
    def of(cls, check: MultiplicityCheck | None) -> Multiplicity | None:
        """The section of a solve's check; None when it made none."""
        if check is None:
            return None
        return cls(check.starts, check.complete, check.products, str(check))


@dataclass(frozen=True)
class Eigenvalues(Section):
    """The top eigenpairs' values, residuals ‖Hv − λv‖ and convergence, and their cost."""

    method: str
    which: str
    values: tuple[float, ...]
    residuals: tuple[float | None, ...]
    converged: tuple[bool, ...]
    n_products: int
    n_iterations: int
    seconds: float
    history: tuple[tuple[float, ...], ...]
    """The estimates after each iteration (for the convergence plot)."""
    bounds: tuple[float | None, ...] | None = field(default=None, metadata=_OPTIONAL)
    """Per pair, the residual plus the products' own error (``product_error``): how far the value
    can be from an eigenvalue of the model's exact matrix; None where that error was not measured
    (float64 runs, older reports): the residuals are the bounds then."""
    multiplicity: Multiplicity | None = field(default=None, metadata=_OPTIONAL)
    """How repeated eigenvalues were looked for (Lanczos); absent when not."""

    @classmethod
    def of(cls, result: EigenResult) -> Eigenvalues:
        """The section of an eigen-solve."""
        return cls(
            method=result.method,
            which=result.which,
            values=tuple(result.eigenvalues.tolist()),
            residuals=tuple(result.residuals.tolist()),
            converged=tuple(result.converged.tolist()),
            n_products=result.n_products,
            n_iterations=result.n_iterations,
            seconds=result.seconds,
            history=tuple(tuple(row) for row in result.history),
            bounds=tuple(result.bounds.tolist()) if result.product_error else None,
            multiplicity=Multiplicity.of(result.multiplicity),
        )

    @property
    def uncertainties(self) -> tuple[float | None, ...]:
        """Each value's bound: ``bounds`` where measured, the residuals otherwise."""
        return self.residuals if self.bounds is None else self.bounds


@dataclass(frozen=True)
class LambdaMin(Section):
    """The smallest eigenvalue, its residual and convergence."""

    value: float
    residual: float | None
    converged: bool
    n_products: int
    bound: float | None = field(default=None, metadata=_OPTIONAL)
    """The residual plus the products' own error (as :attr:`Eigenvalues.bounds`)."""

    @classmethod
    def of(cls, result: EigenResult) -> LambdaMin:
        """The first pair of the bottom eigen-solve."""
        return cls(
            value=float(result.eigenvalues[0]),
            residual=float(result.residuals[0]),
            converged=bool(result.converged[0]),
            n_products=result.n_products,
            bound=float(result.bounds[0]) if result.product_error else None,
        )

    @property
    def uncertainty(self) -> float | None:
        """The value's bound: ``bound`` where measured, the residual otherwise."""
        return self.residual if self.bound is None else self.bound


@dataclass(frozen=True)
class ProductErrorFigures(Section):
    """How far the products are from the float64 Hessian's, on v₁: the analysis dtype's rounding
    and the finite-difference backend's estimated error (docs/engine.md)."""

    absolute: float
    """‖(H_op − H₆₄)v₁‖, added to every eigenvalue's residual in its bound."""
    relative: float
    """The same over ‖H v₁‖."""
    method: str
    """``float64`` (a product of a float64 copy of the model), ``reordered`` (a second product
    in another summation order, scaled as docs/engine.md calibrates it) or ``finite-difference``
    (a float64 finite-difference run: its own estimate alone)."""
    dtype: str
    finite_difference: float | None = field(default=None, metadata=_OPTIONAL)
    """The finite-difference backend's estimated relative error (its first product's Richardson
    estimate), included in ``absolute``; absent for the other backends."""

    @classmethod
    def of(cls, error: ProductError) -> ProductErrorFigures:
        """The section of a measured product error."""
        return cls(**asdict(error))


@dataclass(frozen=True)
class BackendFigures(Section):
    """The Hessian backend ``--backend auto`` chose, and why (docs/engine.md)."""

    backend: str
    reason: str
    graph_bytes: int | None
    """The double-backward graph's estimated bytes (None: one batch's graph did not fit)."""
    available_bytes: int | None
    """The free memory it was held against (None: unknown)."""

    @classmethod
    def of(cls, choice: BackendChoice) -> BackendFigures:
        """The section of ``auto``'s choice."""
        return cls(choice.backend, choice.reason, choice.graph_bytes, choice.available_bytes)


@dataclass(frozen=True)
class Trace(Section):
    """The trace estimate and its standard error."""

    estimate: float
    std_error: float | None
    n_samples: int
    n_products: int
    method: str
    converged: bool
    interval: tuple[float, float] | None = field(default=None, metadata=_OPTIONAL)
    """The 95 % confidence interval (Student's t); None with fewer than two samples or in a
    report made before it was written."""

    @classmethod
    def of(cls, result: TraceResult) -> Trace:
        """The section of a trace estimate."""
        low, high = result.interval
        return cls(
            estimate=result.estimate,
            std_error=result.std_error,
            n_samples=result.n_samples,
            n_products=result.n_products,
            method=result.method,
            converged=result.converged,
            interval=(low, high) if math.isfinite(high - low) else None,
        )


@dataclass(frozen=True)
class Density(Section):
    """Stochastic Lanczos quadrature: nodes and weights per starting vector, and the mean."""

    nodes: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    mean: float

    @classmethod
    def of(cls, result: DensityResult) -> Density:
        """The section of a density estimate."""
        return cls(
            nodes=tuple(tuple(t.tolist()) for t in result.nodes),
            weights=tuple(tuple(w.tolist()) for w in result.weights),
            mean=result.mean,
        )


@dataclass(frozen=True)
class BatchCosines(Section):
    """|cos(ĝ_B, v₁)| over the full minibatches' gradients, SAM's own perturbations (see
    :class:`~sharpscope.analysis.alignment.MinibatchCosines`): the figure the verdict and
    `check --min-alignment` read is ``mean`` ± ``std_error``."""

    count: int
    mean: float
    min: float
    max: float
    quantiles: dict[str, float]
    """``q05``, ``q25``, ``q50``, ``q75``, ``q95``."""
    std_error: float | None = field(default=None, metadata=_OPTIONAL)
    """The standard error of ``mean`` over the minibatches; absent with fewer than two (and in
    older reports)."""
    batch_size: int | None = field(default=None, metadata=_OPTIONAL)
    """Samples per minibatch (absent in older reports, whose minibatches included a last,
    shorter one)."""
    values: tuple[float, ...] | None = field(default=None, metadata=_OPTIONAL)
    """Each minibatch's |cos(ĝ_B, v₁)|, in data order (absent in older reports)."""
    eigen_sam_mean: float | None = field(default=None, metadata=_OPTIONAL)
    """The mean of Eigen-SAM's |cos(ε_B, v₁)| over the same minibatches (absent in older
    reports)."""


@dataclass(frozen=True)
class AlignmentFigures(Section):
    """The SAM alignment figures (see :class:`~sharpscope.analysis.alignment.Alignment`)."""

    rho: float
    alpha: float
    cos_full: float
    cos_batches: BatchCosines | None
    topk_share: float
    sam_sharpness: float | None
    sam_sharpness_quadratic: float | None
    sam_sharpness_taylor: float | None
    eigen_sam_cos: float

    @classmethod
    def of(cls, a: Alignment) -> AlignmentFigures:
        """The section of an alignment measurement."""
        batches = a.cos_batches
        return cls(
            rho=a.rho,
            alpha=a.alpha,
            cos_full=a.cos_full,
            cos_batches=None if batches is None else BatchCosines(**asdict(batches)),
            topk_share=a.topk_share,
            sam_sharpness=a.sam_sharpness,
            sam_sharpness_quadratic=a.sam_sharpness_quadratic,
            sam_sharpness_taylor=a.sam_sharpness_taylor,
            eigen_sam_cos=a.eigen_sam_cos,
        )


@dataclass(frozen=True)
class SamplingBias(Section):
    """Each figure's sample-size bias under a 1/n law, split-sample (null: not estimated)."""

    eigenvalues: tuple[float | None, ...]
    lambda_min: float | None
    cos_full: float | None
    topk_share: float | None
    sam_sharpness: float | None


@dataclass(frozen=True)
class Sampling(Section):
    """The data uncertainty: each figure's jackknife standard error over ``shards`` disjoint
    shards of the samples (null: not estimated), the 95 % interval's multiplier, and the
    figures' sample-size bias."""

    shards: int
    interval_multiplier: float
    eigenvalues: tuple[float, ...]
    lambda_min: float
    cos_full: float | None
    topk_share: float | None
    sam_sharpness: float | None
    trace: float | None = field(default=None, metadata=_OPTIONAL)
    """The trace's data standard error; absent without a trace, or in older reports."""
    bias: SamplingBias | None = field(default=None, metadata=_OPTIONAL)
    """Absent with `bias` off, or in older reports."""
    bias_factor: float | None = field(default=None, metadata=_OPTIONAL)
    """The bias under a 1/√n law over the one under 1/n (√shards + 1)."""
    replicates: dict[str, tuple[float, ...]] | None = field(default=None, metadata=_OPTIONAL)
    """Each gated figure without shard j, for every shard j, and the shards' ``weights``: what
    `check --baseline --sigmas` jackknifes together with the baseline's (absent in older
    reports, which then cannot be compared on the spread)."""

    @classmethod
    def of(cls, errors: SamplingErrors) -> Sampling:
        """The section of a jackknife."""
        b = errors.bias
        return cls(
            shards=errors.shards,
            interval_multiplier=errors.multiplier,
            eigenvalues=tuple(errors.eigenvalues),
            lambda_min=errors.lambda_min,
            cos_full=errors.cos_full,
            topk_share=errors.topk_share,
            sam_sharpness=errors.sam_sharpness,
            trace=errors.trace,
            bias=None
            if b is None
            else SamplingBias(
                tuple(b.eigenvalues), b.lambda_min, b.cos_full, b.topk_share, b.sam_sharpness
            ),
            bias_factor=None if b is None else errors.bias_factor,
            replicates=None
            if errors.replicates is None
            else {key: tuple(values) for key, values in errors.replicates.items()},
        )

    def replicates_of(self, metric: str) -> tuple[float, ...] | None:
        """The delete-one-shard replicates of a gated figure (None: not stored)."""
        return None if self.replicates is None else self.replicates.get(metric)

    def bias_of(self, pick: str, index: int = 0) -> tuple[float, float] | None:
        """The range of figure ``pick``'s bias (a field of :class:`SamplingBias`; ``index``: which
        eigenvalue), from its 1/n estimate to ``bias_factor`` times it; None when not estimated."""
        if self.bias is None:
            return None
        value = getattr(self.bias, pick)
        value = value[index] if isinstance(value, tuple) else value
        factor, signed = self.bias_factor or 1.0, pick not in COSINES
        return None if value is None else bias_range(value, factor, signed)

    def interval(
        self,
        value: float,
        se: float | None,
        bounds: tuple[float, float] | None = None,
        bias: tuple[float, float] = (0.0, 0.0),
    ) -> tuple[float, float] | None:
        """The 95 % interval ``value − b ± multiplier·se`` over the ``bias`` range of b, clipped
        to the figure's ``bounds`` (a cosine's [0, 1]); None without a standard error."""
        if se is None:
            return None
        return interval(value, se, self.interval_multiplier, bounds, bias)


@dataclass(frozen=True)
class AdaptiveSharpness(Section):
    """The worst- or average-case sharpness L(w + δ) − L(w) over the ball ‖δ ⊘ s‖_p ≤ ρ (s = |w|
    + η when ``adaptive``, else 1), its uncertainties and its cost (docs/engine.md)."""

    kind: str
    norm: str
    rho: float
    adaptive: bool
    eta: float
    steps: int
    step_size: float | None
    value: float | None
    std_error: float | None
    """The Monte-Carlo standard error over the draws (average case; null for the worst case)."""
    sampling: float | None
    """The data's jackknife standard error (null: not estimated)."""
    shards: int | None
    interval: tuple[float, float] | None
    """The 95 % data interval (null: not estimated)."""
    perturbation_norm: float | None
    """‖δ ⊘ (|w| + η)‖_p of the worst case's δ (null for the average case)."""
    n_gradients: int
    n_losses: int
    seconds: float
    history: tuple[float | None, ...]
    replicates: tuple[float, ...] | None = field(default=None, metadata=_OPTIONAL)
    """The value without shard j, for every shard j (absent when not estimated, and in older
    reports): what `check --baseline --sigmas` jackknifes together with the baseline's."""

    @classmethod
    def of(cls, result: AdaptiveSharpnessResult) -> AdaptiveSharpness:
        """The section of a sharpness measurement."""
        s = result.settings
        return cls(
            kind=s.kind,
            norm=s.norm,
            rho=s.rho,
            adaptive=s.adaptive,
            eta=s.eta,
            steps=s.steps,
            step_size=s.step_size,
            value=result.value,
            std_error=result.std_error,
            sampling=result.sampling,
            shards=result.shards,
            interval=result.interval,
            perturbation_norm=result.perturbation_norm,
            n_gradients=result.n_gradients,
            n_losses=result.n_losses,
            seconds=result.seconds,
            history=result.history,
            replicates=result.replicates,
        )


@dataclass(frozen=True)
class CriticalSharpnessFigures(Section):
    """The critical sharpness 2/η_c along ``direction`` (η_c: the smallest step that raises the
    loss), as the interval [low, high] its line search bracketed, beside λ_max (docs/report.md)."""

    direction: str
    status: str
    """``bracketed``, ``never-increases`` (λ_c < high), ``increases-at-once`` (λ_c > low) or
    ``zero-direction`` (no gradient: none)."""
    low: float | None
    """2/η_hi (null: zero direction)."""
    high: float | None
    """2/η_lo (null: the loss rose at the smallest step, or a zero direction)."""
    value: float | None
    """The bracket's geometric middle (null unless ``bracketed``)."""
    passes: int
    """The forward passes the search took."""
    quadratic: float | None
    """ĝᵀHĝ: the quadratic model's λ_c along −g (null without a gradient)."""
    ratio_to_lambda_max: float | None
    """``value`` / λ_max: on a quadratic Σ λ_i c_i² / λ_max ≤ 1, c_i = cos(ĝ, v_i)."""
    cos2_v1: float | None
    """cos²(ĝ, v₁), the share of λ_max in that sum (null without the alignment)."""

    @classmethod
    def of(
        cls, found: CriticalSharpness, lambda_max: float, cos_v1: float | None
    ) -> CriticalSharpnessFigures:
        """The section of a search, beside λ_max and |cos(ĝ, v₁)|."""
        value = found.value
        return cls(
            direction=found.direction,
            status=found.status,
            low=_finite(found.low),
            high=_finite(found.high),
            value=value,
            passes=found.passes,
            quadratic=found.quadratic,
            ratio_to_lambda_max=None if value is None or lambda_max == 0 else value / lambda_max,
            cos2_v1=None if cos_v1 is None else cos_v1**2,
        )


@dataclass(frozen=True)
class Layer(Section):
    """The top eigenvalue of one group's block of the Hessian (a module's parameters, or a
    transformer block's of one kind)."""

    name: str
    size: int
    eigenvalue: float
    residual: float | None
    converged: bool
    module_type: str | None = field(default=None, metadata=_OPTIONAL)
    """The module's class name (``Linear``, ``Conv2d``); reports written before it lack it."""
    kind: str | None = field(default=None, metadata=_OPTIONAL)
    """A transformer group's kind (``attention.q``, ``mlp``); absent for one module's block."""
    parameters: tuple[str, ...] | None = field(default=None, metadata=_OPTIONAL)
    """The block's parameter tensors; reports written before it lack it."""

    @classmethod
    def of(cls, layer: LayerEigen) -> Layer:
        """The entry of one group's block."""
        return cls(
            name=layer.name,
            size=layer.size,
            eigenvalue=layer.eigenvalue,
            residual=layer.residual,
            converged=layer.converged,
            module_type=layer.module_type,
            kind=layer.kind,
            parameters=layer.params,
        )


@dataclass(frozen=True)
class ParameterTensor(Section):
    """One analysed parameter tensor: its name and shape."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Slice(Section):
    """The loss at w + t·direction for each step t."""

    steps: tuple[float, ...]
    loss: tuple[float | None, ...]


@dataclass(frozen=True)
class Results(Section):
    """Everything measured, and the verdict."""

    loss: float
    accuracy: float | None
    grad_norm: float
    num_samples: int
    num_params: int
    parameters: tuple[ParameterTensor, ...]
    """The analysed tensors (``params``), in the order of the flat vector."""
    eigenvalues: Eigenvalues
    lambda_max: float
    lambda_min: LambdaMin
    trace: Trace | None
    lambda_max_over_trace: float | None
    density: Density | None
    alignment: AlignmentFigures | None
    sampling: Sampling | None
    """How much the figures would move with another sample of the same size (docs/report.md)."""
    per_layer: tuple[Layer, ...]
    slices: dict[str, Slice]
    """Direction name (``v1``, ``gradient``) -> the loss along it."""
    verdict: str
    notes: tuple[str, ...]
    curvature: str | None = field(default=None, metadata=_OPTIONAL)
    """The matrix the eigenvalues, trace and density are of (``hessian``, ``ggn``, ``fisher``,
    ``empirical-fisher``); reports written before it lack it, and are of the Hessian."""
    adaptive_sharpness: AdaptiveSharpness | None = field(default=None, metadata=_OPTIONAL)
    """``--adaptive-sharpness`` (absent when not measured, and in older reports)."""
    product_error: ProductErrorFigures | None = field(default=None, metadata=_OPTIONAL)
    """The products' own error (absent in float64 runs, where it is not measured, but for the
    finite-difference backend)."""
    critical_sharpness: CriticalSharpnessFigures | None = field(default=None, metadata=_OPTIONAL)
    """The critical sharpness along −g (absent when not measured, and in older reports)."""
    backend: BackendFigures | None = field(default=None, metadata=_OPTIONAL)
    """The Hessian backend ``auto`` chose, and why (absent when a backend was named)."""

    @classmethod
    def of(cls, analysis: Analysis, split_size: int | None = None) -> Results:
        """The results of an analysis of a split of ``split_size`` samples (None: unknown)."""
        trace, lam_max, alignment = analysis.trace, analysis.lambda_max, analysis.alignment
        return cls(
            loss=analysis.loss,
            accuracy=analysis.accuracy,
            grad_norm=analysis.grad_norm,
            num_samples=analysis.num_samples,
            num_params=analysis.num_params,
            parameters=tuple(
                ParameterTensor(name, shape)
                for name, shape in zip(analysis.param_names, analysis.param_shapes, strict=True)
            ),
            eigenvalues=Eigenvalues.of(analysis.top),
            lambda_max=lam_max,
            lambda_min=LambdaMin.of(analysis.bottom),
            trace=None if trace is None else Trace.of(trace),
            lambda_max_over_trace=lam_max / trace.estimate
            if trace and trace.estimate and trace.converged
            else None,  # not a number while the trace is not one
            density=None if analysis.density is None else Density.of(analysis.density),
            alignment=None if alignment is None else AlignmentFigures.of(alignment),
            sampling=None if analysis.sampling is None else Sampling.of(analysis.sampling),
            per_layer=tuple(Layer.of(layer) for layer in analysis.per_layer),
            slices={
                name: Slice(tuple(steps), tuple(losses))
                for name, (steps, losses) in analysis.slices.items()
            },
            verdict=verdict(analysis),
            notes=tuple(analysis.notes + spread_notes(analysis, split_size)),
            curvature=analysis.curvature,
            adaptive_sharpness=None
            if analysis.adaptive_sharpness is None
            else AdaptiveSharpness.of(analysis.adaptive_sharpness),
            product_error=None
            if analysis.product_error is None
            else ProductErrorFigures.of(analysis.product_error),
            critical_sharpness=None
            if (c := analysis.critical_sharpness) is None
            else CriticalSharpnessFigures.of(c, lam_max, alignment and alignment.cos_full),
            backend=None if analysis.backend is None else BackendFigures.of(analysis.backend),
        )


@dataclass(frozen=True)
class Timings(Section):
    """Seconds per pipeline stage, their total, and the Hessian-vector products."""

    total_seconds: float
    stages: dict[str, float]
    n_products: int


@dataclass(frozen=True)
class Partial(Section):
    """What an interrupted analysis finished: its report holds these stages' results only."""

    interrupted: str | None
    """The stage the interrupt stopped (None: between stages)."""
    finished: tuple[str, ...]
    """The stages that ran to the end, in order."""

    @classmethod
    def of(cls, analysis: Analysis) -> Partial | None:
        """None for a complete analysis."""
        if analysis.interrupted is None:
            return None
        stopped = analysis.interrupted
        return cls(stopped, tuple(stage for stage in analysis.timings if stage != stopped))


# --- the document --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Report(Section):
    """The versioned analysis report that tables, plots and the CI gate all read."""

    schema_version: int
    created: str
    """UTC time, ISO 8601."""
    inputs: Inputs
    results: Results
    timings: Timings
    partial: Partial | None = field(default=None, metadata=_OPTIONAL)
    """Set when the analysis was interrupted: the report holds the finished stages only."""

    @classmethod
    def from_analysis(cls, analysis: Analysis, inputs: Inputs) -> Report:
        """The report of ``analysis`` of ``inputs``, created now."""
        return cls(
            schema_version=SCHEMA_VERSION,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            inputs=inputs,
            results=Results.of(analysis, inputs.data and inputs.data.split_size),
            timings=Timings(
                sum(analysis.timings.values()), dict(analysis.timings), analysis.n_products
            ),
            partial=Partial.of(analysis),
        )

    @classmethod
    def from_json(
        cls, data: dict[str, Any], source: str = "the report", remake: str = REANALYZE
    ) -> Report:
        """The report in the JSON value ``data``; an :class:`InputError` naming ``source`` and
        the problem unless it is a report of this schema version that the schema accepts
        (``remake``: how to replace one that is not)."""
        check_report(data, source, remake)
        return super().from_json(data)

    def dumps(self) -> str:
        """The report as indented JSON (NaN and infinity written as null)."""
        return dumps(self.to_json())

    def gate_input(self) -> GateInput:
        """The figures, the analysed parameters and the data settings that the CI gate reads
        (finite figures only)."""
        r, a, s = self.results, self.results.alignment, self.results.sampling

        def spread(metric: str, se: float | None, bias: str | None = None) -> dict[str, Any]:
            """The figure's data SE, bias range and replicates, as :func:`_reading` takes them."""
            if s is None:
                return {}
            return {
                "sampling": se,
                "bias": None if bias is None else s.bias_of(bias),
                "replicates": s.replicates_of(metric),
            }

        found = {
            "lambda_max": _reading(
                r.lambda_max,
                r.eigenvalues.uncertainties[0],
                **spread("lambda_max", s and s.eigenvalues[0], "eigenvalues"),
            ),
            "lambda_min": _reading(
                r.lambda_min.value,
                r.lambda_min.uncertainty,
                **spread("lambda_min", s and s.lambda_min, "lambda_min"),
            ),
            "trace": None
            if r.trace is None
            else _reading(r.trace.estimate, r.trace.std_error, **spread("trace", s and s.trace)),
            "sam_sharpness": None
            if a is None
            else _reading(
                a.sam_sharpness,
                None,
                **spread("sam_sharpness", s and s.sam_sharpness, "sam_sharpness"),
            ),
            "cos_full": None
            if a is None
            else _reading(a.cos_full, None, **spread("cos_full", s and s.cos_full, "cos_full")),
            "cos_batches": None
            if a is None or (b := a.cos_batches) is None
            else _reading(b.mean, b.std_error),
            "adaptive_sharpness": None
            if (h := r.adaptive_sharpness) is None
            else _reading(h.value, h.std_error, h.sampling, replicates=h.replicates),
        }
        return GateInput(
            readings={key: reading for key, reading in found.items() if reading is not None},
            schema_version=self.schema_version,
            num_params=r.num_params,
            parameters=tuple((p.name, p.shape) for p in r.parameters),
            data={**self.inputs.measured_on(), **_adaptive_settings(r.adaptive_sharpness)},
            curvature=r.curvature or "hessian",
            shard_weights=s.replicates_of("weights") if s is not None else None,
        )


def _adaptive_settings(section: AdaptiveSharpness | None) -> dict[str, Any]:
    """How the adaptive sharpness was measured, by parameter name (see
    :data:`~sharpscope.analysis.gate.DATA_SETTINGS`); none without it."""
    if section is None:
        return {}
    return {
        "adaptive_sharpness": section.kind,
        "adaptive_norm": section.norm,
        "adaptive_rho": section.rho,
        "adaptive_steps": section.steps,
        "adaptive_scale": "on" if section.adaptive else "off",
    }


def _reading(
    value: float | None,
    uncertainty: float | None,
    sampling: float | None = None,
    bias: tuple[float, float] | None = None,
    replicates: tuple[float | None, ...] | None = None,
) -> Reading | None:
    """A figure as the gate reads it: none when the value is null or not finite, and no
    uncertainty (solver's or data's), bias or replicates where not all finite (the report
    would write null)."""
    if value is None or not math.isfinite(value):
        return None
    finite_bias = bias if bias is not None and all(map(math.isfinite, bias)) else None
    finite = replicates is not None and all(r is not None and math.isfinite(r) for r in replicates)
    kept = tuple(float(r) for r in replicates if r is not None) if finite else None
    return Reading(value, _finite(uncertainty), _finite(sampling), finite_bias, kept)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def gateable(report: Report, path: Path) -> Report:
    """``report``, refused in one line when it is partial: an interrupted analysis lacks the
    stages after the interrupt, so a gate on it would pass or fail on what was never measured."""
    if report.partial is None:
        return report
    during = f" during {report.partial.interrupted}" if report.partial.interrupted else ""
    finished = ", ".join(report.partial.finished) or "no stage"
    raise InputError(
        f"{path} is a partial report (its analysis was interrupted{during}; it holds {finished} "
        "only): gate a complete report, analyzing again to the end"
    )


def read_report(path: Path, remake: str = REANALYZE) -> Report:
    """A report file, checked against the report schema; an :class:`InputError` naming the file
    and the problem otherwise (:class:`NotAReport` when it holds no report at all; ``remake``:
    how to replace a report of another version or one the schema refuses)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise NotAReport(f"cannot read the report {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise NotAReport(f"{path} is not a JSON report (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise NotAReport(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    return Report.from_json(data, str(path), remake)
