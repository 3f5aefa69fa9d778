"""The CI gate: checks of an analysis report against thresholds and against a baseline report.

It answers two questions, kept apart (docs/ci.md):

1. **The model on the data given** (the default, ``sigmas`` 0). Each figure is read with the
   solver's uncertainty only: for λ_max and λ_min the residual ‖Hv − λv‖ of their eigenpair, a
   bound on the distance from the estimate to the nearest eigenvalue of H (used as it is); for
   the trace, the average-case adaptive sharpness and the alignment |cos(ĝ_B, v₁)| (the mean over
   minibatches that the verdict reads: an estimate of SAM's expected alignment over the
   minibatches it draws), :data:`ESTIMATOR_SIGMAS` standard errors of their random estimate;
   none for the SAM sharpness, the full-data |cos(ĝ, v₁)| and the worst case, which are
   computed exactly. On fixed validation data a figure is a deterministic function of the
   model, so this is its only uncertainty.
2. **Other samples of this size** (``sigmas`` > 0): the figure's spread is added, ``sigmas``
   jackknife standard errors of how it would move with another sample of the same size
   (:mod:`sharpscope.analysis.sampling`) and, in the absolute checks, the range of its
   sample-size bias when the report holds one (the interval runs over value − b for every b).
   Against a baseline on the same data it is the spread of the **paired** difference: both
   reports' delete-one-shard replicates, jackknifed together, so that the data's common part
   cancels (two models on the same samples differ by far less than either moves on its own).

A check only flags the model when the figure is past its limit by more than its uncertainty:

- ``max`` limit: flagged when ``value − uncertainty > limit``;
- ``min`` limit: flagged when ``value + uncertainty < limit``;
- ``max-increase`` by a fraction ``p`` over a baseline figure ``b ± u_b``: flagged when
  ``value − uncertainty > B + p·|B|`` with ``B = b + u_b`` (``u_b`` the baseline's solver
  uncertainty; the paired spread, with ``sigmas``, is in the report's ``uncertainty``).

A figure with no uncertainty is gated as it is, and shown as without one, never as ± 0. A check
that passes only thanks to the uncertainty has status ``noise``: its value is past the limit,
but not by more than the uncertainty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from sharpscope.analysis.intervals import paired_se
from sharpscope.errors import InputError, check_finite_fields
from sharpscope.settings import setting

Kind = Literal["max", "min", "max-increase"]
Status = Literal["pass", "noise", "fail"]


THRESHOLDS = "Thresholds"
BASELINE = "Baseline"


def _limit(text: str) -> Any:
    """A threshold: None leaves its check out."""
    return setting(None, help=text, common=True, panel=THRESHOLDS)


@dataclass(frozen=True)
class Thresholds:
    """Limits to gate a report on; ``None`` leaves that check out.

    Example:
        >>> Thresholds(max_eigenvalue=40.0, max_increase=0.1).sigmas
        0.0
    """

    max_eigenvalue: float | None = _limit(
        "Most λ_max allowed. The model is flagged when λ_max exceeds it by more than its residual."
    )
    min_eigenvalue: float | None = _limit(
        "Least λ_min allowed (strong negative curvature). The model is flagged when λ_min is "
        "below it by more than its residual."
    )
    max_trace: float | None = _limit(
        "Most trace allowed. The model is flagged when the trace exceeds it by more than 2 SE "
        "of its estimate."
    )
    max_sam_sharpness: float | None = _limit("Most SAM sharpness L(w+ρĝ) − L(w) allowed.")
    min_alignment: float | None = _limit(
        "Least SAM alignment allowed. The alignment is the mean |cos(ĝ_B, v₁)| over minibatches; "
        "the model is flagged when it is below the limit by more than 2 SE."
    )
    max_adaptive_sharpness: float | None = _limit(
        "Most adaptive sharpness allowed (measured with --adaptive-sharpness). The model is "
        "flagged when it exceeds the limit (by more than 2 Monte-Carlo SE for the average case)."
    )
    max_increase: float | None = setting(
        None,
        help="Most increase of λ_max, trace, SAM or adaptive sharpness over --baseline: 10% or "
        "0.1.",
        common=True,
        panel=BASELINE,
        kind="fraction",
    )
    """Largest allowed increase over the baseline, as a fraction (0.1 = 10 %)."""
    sigmas: float = setting(
        0.0,
        help="Also allow this many standard errors of each figure's spread over other samples of "
        "this size (paired with --baseline); 0 gates the model on the data given, with the "
        "solver's bounds only.",
        panel=THRESHOLDS,
    )
    """How many of the spread's standard errors (over other samples of this size) to add to each
    figure's uncertainty; 0 gates the figures on the data given, with the solver's bounds."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not self.sigmas >= 0:
            raise InputError(f"`sigmas` must be at least 0, got {self.sigmas:g}")
        if self.max_increase is not None and not self.max_increase >= 0:
            raise InputError(f"`max_increase` must be at least 0, got {self.max_increase:g}")


@dataclass(frozen=True)
class BaselineSettings:
    """The baseline report a gate compares with, and what it does with it."""

    baseline: Path | None = setting(
        None,
        help="A report of the same architecture to compare with (--max-increase). The "
        "recommended gate, since absolute sharpness is not comparable across architectures.",
        common=True,
        panel=BASELINE,
    )
    update_baseline: bool = setting(
        False,
        help="Write this report to the --baseline file instead of comparing with it. Atomically; "
        "it never overwrites a file that is not a sharpscope report.",
        common=True,
        panel=BASELINE,
        in_file=False,
    )
    allow_different_data: bool = setting(
        False,
        help="Compare with a baseline measured on other data (its fingerprint, --samples, "
        "--seed, --rho, --dtype or --loss differ) instead of refusing it.",
        panel=BASELINE,
        in_file=False,
    )


ESTIMATOR_SIGMAS = 2.0
"""Standard errors of a random estimator (the trace's Hutch++, the average-case adaptive
sharpness' draws) that make its uncertainty: a false alarm on an estimate exactly at the limit
is then about a 2 % event (one-sided normal tail)."""


@dataclass(frozen=True)
class Estimate:
    """A figure of the report and its uncertainty (the solver's, plus ``sigmas`` of the spread's
    standard errors; None: none)."""

    value: float
    uncertainty: float | None
    bias: tuple[float, float] = (0.0, 0.0)
    """The range of the figure's sample-size bias (0, 0 when not estimated)."""

    @property
    def margin(self) -> float:
        """The uncertainty as the gate applies it (0 when not estimated)."""
        return self.uncertainty or 0.0

    @property
    def lowest(self) -> float:
        """The lowest value the figure allows: bias-corrected, less the uncertainty."""
        return self.value - max(self.bias) - self.margin

    @property
    def highest(self) -> float:
        """The highest value the figure allows: bias-corrected, plus the uncertainty."""
        return self.value - min(self.bias) + self.margin


@dataclass(frozen=True)
class Reading:
    """A figure as the report holds it: its value, the solver's uncertainty as stated there (a
    residual or a standard error) and the data's standard error (``sampling``); None when the
    report holds none, or none that is finite."""

    value: float
    uncertainty: float | None
    sampling: float | None = None
    bias: tuple[float, float] | None = None
    """The range of the figure's sample-size bias (None: not estimated)."""
    replicates: tuple[float, ...] | None = None
    """The figure without shard j, for every shard j (None: not stored): for paired checks."""


Tensors = tuple[tuple[str, tuple[int, ...]], ...]
"""Analysed parameter tensors: (name, shape) pairs."""


@dataclass(frozen=True)
class GateInput:
    """What the gate reads from one report: its figures, what was analysed and on what data."""

    readings: Mapping[str, Reading]
    """The finite figures the report holds, by metric key (see :data:`METRICS`)."""
    schema_version: int
    num_params: int
    parameters: Tensors
    data: Mapping[str, Any]
    """What the figures were measured on, by parameter name (:data:`DATA_SETTINGS`); a setting
    the report does not hold is left out."""
    curvature: str = "hessian"
    """The matrix the figures are of (:data:`~sharpscope.curvature.CURVATURES`)."""
    shard_weights: tuple[float, ...] | None = None
    """The spread's shards' shares of the data, in order (None: not stored)."""


DATA_SETTINGS = {
    "samples": "`samples`",
    "seed": "`seed`",
    "rho": "`rho`",
    "dtype": "`dtype`",
    "loss": "`loss`",
    "reduction": "`reduction`",
    "data": "the `data` fingerprint",
    "adaptive_sharpness": "`adaptive_sharpness`",
    "adaptive_norm": "`adaptive_norm`",
    "adaptive_rho": "`adaptive_rho`",
    "adaptive_steps": "`adaptive_steps`",
    "adaptive_scale": "`adaptive_scale`",
}
"""What makes two reports measured on the same data, and how a difference names it: ``data`` is
the fingerprint of the loaded inputs and targets, ``samples`` the number of samples analysed;
the ``adaptive_*`` settings say how the adaptive sharpness was measured (a report without one
lacks them, so they are compared only when both have it)."""


@dataclass(frozen=True)
class Metric:
    """One gated figure: how it is shown, and how its uncertainty is read."""

    key: str
    label: str
    statistical: bool
    """The solver's uncertainty is a standard error (scaled by :data:`ESTIMATOR_SIGMAS`), not a
    bound."""
    fix: str
    """Why the figure can be missing and what to do, for the error message."""


METRICS: dict[str, Metric] = {
    m.key: m
    for m in (
        Metric("lambda_max", "λ_max", False, "re-create the report with `sharpscope analyze`"),
        Metric("lambda_min", "λ_min", False, "re-create the report with `sharpscope analyze`"),
        Metric(
            "trace",
            "trace",
            True,
            "it was made with the trace off (`trace`): analyze again with it on",
        ),
        Metric(
            "sam_sharpness",
            "SAM sharpness",
            False,
            "the gradient is exactly zero or the loss at w + ρĝ is not finite",
        ),
        Metric(
            "cos_full",
            "|cos(ĝ, v₁)|",
            False,
            "the full-data gradient is exactly zero, so there is no SAM perturbation",
        ),
        Metric(
            "cos_batches",
            "|cos(ĝ_B, v₁)|",
            True,
            "it was made by an older sharpscope with a single batch: analyze again with this "
            "version",
        ),
        Metric(
            "adaptive_sharpness",
            "adaptive sharpness",
            True,
            "it was made without `adaptive_sharpness`: analyze again with it",
        ),
    )
}

ABSOLUTE: tuple[tuple[str, str, Kind], ...] = (
    ("max_eigenvalue", "lambda_max", "max"),
    ("min_eigenvalue", "lambda_min", "min"),
    ("max_trace", "trace", "max"),
    ("max_sam_sharpness", "sam_sharpness", "max"),
    ("min_alignment", "cos_batches", "min"),
    ("max_adaptive_sharpness", "adaptive_sharpness", "max"),
)
"""(threshold field, metric, kind) of the absolute checks, in the order they are reported."""

RELATIVE: tuple[str, ...] = ("lambda_max", "trace", "sam_sharpness", "adaptive_sharpness")
"""The metrics ``max_increase`` compares with the baseline (each one the baseline holds): the
sharpness figures, whose rise is the regression; the alignment is not one of them (a rise is no
harm), it has its absolute floor ``min_alignment``."""


@dataclass(frozen=True)
class Check:
    """One gated figure: its value ± uncertainty, its limit, and whether it passed."""

    metric: str
    kind: Kind
    value: float
    uncertainty: float | None
    limit: float
    """The nominal limit (for ``max-increase``: baseline + p·|baseline|)."""
    passed: bool
    baseline: float | None = None
    baseline_uncertainty: float | None = None
    increase: float | None = None
    """``max-increase``'s fraction p."""
    bias: tuple[float, float] | None = None
    """The range of the figure's sample-size bias the check allowed for (absolute checks)."""
    spread: float | None = None
    """The spread's part of ``uncertainty``: ``sigmas`` data SEs (of the paired difference for
    ``max-increase``); None when not asked for (``sigmas`` 0) or not estimated."""

    @property
    def label(self) -> str:
        """The figure's display name, e.g. ``λ_max``."""
        return METRICS[self.metric].label

    @property
    def name(self) -> str:
        """What was checked, e.g. ``λ_max ≤ 40`` or ``trace ≤ baseline + 10%``."""
        if self.kind == "max-increase":
            return f"{self.label} ≤ baseline + {_percent(self.increase)}"
        return f"{self.label} {'≥' if self.kind == 'min' else '≤'} {self.limit:g}"

    @property
    def crossed(self) -> bool:
        """Whether the value itself, uncertainty aside, is past the nominal limit."""
        return self.value < self.limit if self.kind == "min" else self.value > self.limit

    @property
    def status(self) -> Status:
        """``fail``; ``noise`` (past the limit, but by less than the uncertainty); or ``pass``."""
        if not self.passed:
            return "fail"
        return "noise" if self.crossed else "pass"

    @property
    def message(self) -> str:
        """One sentence: the figure, its limit, and the outcome."""
        side = "below" if self.kind == "min" else "above"
        what = f"the limit {self.limit:g}"
        if self.kind == "max-increase":
            base = plus_minus(self.baseline, self.baseline_uncertainty)
            what = f"the baseline {base} + {_percent(self.increase)} ({self.limit:.6g})"
        outcome = {
            "fail": f"is {side} {what} by more than the uncertainty",
            "noise": f"is {side} {what}, but within the uncertainty: not flagged",
            "pass": f"is within {what}",
        }[self.status]
        shown = plus_minus(self.value, self.uncertainty)
        if self.bias is not None:
            shown += f" (bias {self.bias[0]:+.2g} to {self.bias[1]:+.2g})"
        return f"{self.label} = {shown} {outcome}"

    def to_dict(self) -> dict[str, Any]:
        """The fields plus name, label, status and message (for JSON)."""
        derived = {"name": self.name, "label": self.label, "status": self.status}
        return {**derived, **asdict(self), "message": self.message}


def measure(report: GateInput, metric: str, sigmas: float) -> Estimate | None:
    """``metric``'s value and uncertainty in a report (with ``sigmas`` of its spread and its bias
    range); None when the report lacks it."""
    reading = report.readings.get(metric)
    if reading is None:
        return None
    solver = _solver(metric, reading)
    spread = sigmas * reading.sampling if sigmas and reading.sampling is not None else None
    parts = [u for u in (solver, spread) if u is not None]
    bias = reading.bias if sigmas and reading.bias is not None else (0.0, 0.0)
    return Estimate(reading.value, sum(parts) if parts else None, bias)


def _solver(metric: str, reading: Reading) -> float | None:
    """The solver's uncertainty of a reading: a bound as it is, a standard error scaled."""
    if reading.uncertainty is None:
        return None
    return reading.uncertainty * (ESTIMATOR_SIGMAS if METRICS[metric].statistical else 1.0)


def figures(report: GateInput, sigmas: float = 0.0) -> dict[str, Estimate]:
    """Every gateable figure the report holds, by metric key."""
    found = {key: measure(report, key, sigmas) for key in METRICS}
    return {key: estimate for key, estimate in found.items() if estimate is not None}


def gate(
    report: GateInput,
    thresholds: Thresholds,
    baseline: GateInput | None = None,
    allow_different_data: bool = False,
) -> list[Check]:
    """Check ``report`` against ``thresholds``, and against ``baseline`` for ``max_increase``
    (refused unless it analysed the same parameters and curvature, and the same data unless
    allowed)."""
    checks = [
        _absolute(report, metric, kind, limit, thresholds.sigmas, _option(field))
        for field, metric, kind in ABSOLUTE
        if (limit := getattr(thresholds, field)) is not None
    ]
    if thresholds.max_increase is not None:
        if baseline is None:
            raise InputError("`max_increase` needs `baseline` (a report of the same architecture)")
        _comparable(report, baseline, allow_different_data)
        checks += _relative(report, baseline, thresholds.max_increase, thresholds.sigmas)
    return checks


def _option(field: str) -> str:
    return f"`{field}`"


def _required(report: GateInput, metric: str, sigmas: float, option: str) -> Estimate:
    estimate = measure(report, metric, sigmas)
    if estimate is None:
        spec = METRICS[metric]
        raise InputError(
            f"{option} needs the {spec.label} ({metric}), which the report does not have: "
            f"{spec.fix}; or drop {option}"
        )
    return estimate


def _absolute(
    report: GateInput, metric: str, kind: Kind, limit: float, sigmas: float, option: str
) -> Check:
    est = _required(report, metric, sigmas, option)
    passed = est.lowest <= limit if kind == "max" else est.highest >= limit
    bias = est.bias if est.bias != (0.0, 0.0) else None
    reading = report.readings[metric]
    spread = sigmas * reading.sampling if sigmas and reading.sampling is not None else None
    return Check(metric, kind, est.value, est.uncertainty, limit, passed, bias=bias, spread=spread)


def _relative(
    report: GateInput, baseline: GateInput, increase: float, sigmas: float
) -> list[Check]:
    checks = []
    for metric in RELATIVE:
        base = measure(baseline, metric, 0.0)
        if base is None:
            continue
        est = _required(report, metric, 0.0, "`max_increase`")
        highest = base.value + base.margin
        factor = 1 + increase * (1 if highest >= 0 else -1)  # B + p·|B| = factor·B
        spread = sigmas * _paired_se(report, baseline, metric, factor) if sigmas else None
        margin = est.margin + (spread or 0.0)
        passed = est.value - margin <= factor * highest
        checks.append(
            Check(
                metric,
                "max-increase",
                est.value,
                margin if est.uncertainty is not None or spread is not None else None,
                base.value + increase * abs(base.value),
                passed,
                baseline=base.value,
                baseline_uncertainty=base.uncertainty,
                increase=increase,
                spread=spread,
            )
        )
    return checks


def _paired_se(report: GateInput, baseline: GateInput, metric: str, factor: float) -> float:
    """The jackknife SE of ``value − factor·baseline`` over the shards both reports share; an
    :class:`InputError` when either lacks the replicates or the shards differ."""
    mine, theirs = report.readings[metric], baseline.readings[metric]
    label = METRICS[metric].label
    for name, reading in (("the baseline", theirs), ("this report", mine)):
        if reading.replicates is None:
            raise InputError(
                f"`sigmas` compares the {label} with the baseline on both reports' per-shard "
                f"figures, and {name} has none (made with `shards` 0, or by an older "
                "sharpscope): re-create the baseline with `update_baseline` and the report with "
                "this version, or compare on the data given with `sigmas` 0"
            )
    weights, base_weights = report.shard_weights, baseline.shard_weights
    if (
        weights is None
        or base_weights is None
        or len(weights) != len(base_weights)
        or any(abs(a - b) > 1e-9 for a, b in zip(weights, base_weights, strict=True))
    ):
        raise InputError(
            f"`sigmas` pairs each shard of this report with the baseline's, and their shards "
            f"differ ({len(theirs.replicates)} vs {len(mine.replicates)} shards, or other "
            "shares of the data): make both with the same `shards` and `batch_size`"
        )
    return paired_se(mine.replicates, theirs.replicates, factor)


def data_differences(report: GateInput, baseline: GateInput) -> list[str]:
    """How the data ``baseline`` was measured on differs from ``report``'s, one phrase per
    setting (``samples`` 64 vs 128); settings either report lacks are not compared."""
    both = [key for key in DATA_SETTINGS if key in report.data and key in baseline.data]
    return [
        f"{DATA_SETTINGS[key]} {baseline.data[key]} vs {report.data[key]}"
        for key in both
        if baseline.data[key] != report.data[key]
    ]


def _comparable(report: GateInput, baseline: GateInput, allow_different_data: bool) -> None:
    """Refuse a baseline of another schema version, of other parameters, or (unless allowed) of
    other data."""
    if baseline.schema_version != report.schema_version:
        raise InputError(
            f"the baseline has schema_version {baseline.schema_version!r} and the report "
            f"{report.schema_version!r}: re-create the baseline with `update_baseline`"
        )
    if baseline.curvature != report.curvature:
        raise InputError(
            f"the baseline's figures are of the {baseline.curvature} and this report's of the "
            f"{report.curvature}: compare reports of one `curvature` (or re-create the baseline "
            "with `update_baseline`)"
        )
    difference = _parameter_difference(baseline.parameters, report.parameters)
    if difference is not None:
        raise InputError(
            f"the baseline analysed {baseline.num_params:,} parameters in "
            f"{len(baseline.parameters)} tensors and this report {report.num_params:,} in "
            f"{len(report.parameters)}, first difference: {difference}; sharpness is only "
            "comparable over the same parameters: re-create the baseline with `update_baseline`"
        )
    differences = data_differences(report, baseline)
    if differences and not allow_different_data:
        raise InputError(
            f"the baseline was measured on other data ({', '.join(differences)}; baseline vs "
            "this report): make both with the same settings, re-create the baseline with "
            "`update_baseline`, or compare anyway with `allow_different_data`"
        )


def _parameter_difference(baseline: Tensors, report: Tensors) -> str | None:
    """The first tensor, in the baseline's order, whose shape differs or that only one side has."""
    theirs, mine = dict(baseline), dict(report)
    for name, shape in baseline:
        if name not in mine:
            return f"{name} {shape} is not in this report"
        if mine[name] != shape:
            return f"{name} {shape} vs {mine[name]}"
    extra = next((name for name, _ in report if name not in theirs), None)
    return None if extra is None else f"{extra} {mine[extra]} is not in the baseline"


def plus_minus(value: float | None, uncertainty: float | None) -> str:
    """``value ± uncertainty``, or the value marked as without an uncertainty estimate."""
    if uncertainty is None:
        return f"{value:.6g} (no uncertainty estimate)"
    return f"{value:.6g} ± {uncertainty:.2g}"


def _percent(fraction: float | None) -> str:
    return f"{100 * (fraction or 0.0):g}%"
