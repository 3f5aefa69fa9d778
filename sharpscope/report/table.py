"""The report as rich tables for a terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from sharpscope.analysis.intervals import UNIT, rounded_outward
from sharpscope.analysis.verdict import GOOD, POOR
from sharpscope.report.document import (
    BatchCosines,
    CriticalSharpnessFigures,
    Inputs,
    Layer,
    Report,
    Results,
    Trace,
)

HELP = {
    "summary": "loss: the mean over the analysed samples; ‖∇L‖: the norm of its gradient "
    "(0 at a critical point)",
    "eigenvalues": "λ: Hessian eigenvalues, each within its bound of a true one; converged: "
    "bound ≤ tol·|λ_max|",
    "curvature": "λ_max: curvature of the sharpest direction; trace = Σλ, an estimate ± its "
    "standard error",
    "critical": "λ_c = 2/η_c, η_c the smallest step along −g that raises the loss (forward "
    "passes only); on a quadratic it is ĝᵀHĝ ≤ λ_max",
    "alignment": f"ĝ_B: a minibatch's gradient, as SAM uses; |cos| < {POOR:g}: poorly aligned, "
    f"{POOR:g}–{GOOD:g} partly, ≥ {GOOD:g} well",
    "adaptive_sharpness": "worst: max L(w + δ) − L(w) over ‖δ ⊘ |w|‖ ≤ ρ by ascent (a lower "
    "bound); average: its mean over δ = ρ|w|⊙z; adaptive: invariant to rescaling layers",
    "per_layer": "λ_max: top eigenvalue of each group's own Hessian block (a module; a "
    "transformer block's one kind)",
    "sampling": "the figures, verdict and checks are of the data given; ± data, [a, b]: their "
    "spread, a 95 % interval over other samples of this size from the same data (jackknife, "
    "{shards} shards{bias})",
    "psd": "the {matrix} is positive semi-definite (the GGN for a loss convex in the outputs, "
    "as the built-in ones): λ_min ≥ 0, a negative one is 0 within its residual",
    "no_sampling": "the figures are of the data given; their spread over other samples was not "
    "estimated (--shards 0): another sample of the data may give other values",
}
"""The dim line under each table: what its figures mean, and the cut-offs (docs/report.md)."""
MATRICES = {
    "hessian": "Hessian",
    "ggn": "GGN",
    "fisher": "Fisher",
    "empirical-fisher": "empirical Fisher",
}
"""Each curvature matrix's name in the tables (a report without one is of the Hessian)."""


def _matrix(results: Results) -> str:
    return MATRICES.get(results.curvature or "hessian", results.curvature or "Hessian")


def _num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _summary(inputs: Inputs, results: Results) -> Table:
    table = Table(title="Model and data", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    checkpoint, data = inputs.checkpoint, inputs.data
    table.add_row("checkpoint", escape("—" if checkpoint is None else checkpoint.path))
    adapter = None if checkpoint is None else checkpoint.adapter
    if adapter is not None:
        targets = ", ".join(adapter["target_modules"])
        table.add_row(
            "adapter",
            escape(f"LoRA rank {adapter['rank']} on {targets}, base {adapter['base']}"),
        )
    table.add_row("data", escape("—" if data is None else data.source))
    table.add_row("parameters", f"{results.num_params:,}")
    if inputs.weights_dtype is not None and inputs.weights_dtype != inputs.dtype:
        table.add_row(
            "precision", f"weights stored in {inputs.weights_dtype}, products in {inputs.dtype}"
        )
    table.add_row("samples", f"{results.num_samples:,}")
    table.add_row("loss", f"{_num(results.loss)} ({escape(inputs.loss or '—')})")
    if results.accuracy is not None:
        table.add_row("accuracy", f"{100 * results.accuracy:.2f} %")
    table.add_row("‖∇L‖", _num(results.grad_norm))
    return table


EPS = {"bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}
"""Machine epsilon of each analysis dtype: the floor under a residual computed in it."""


def _bound(residual: float | None, floor: float) -> str:
    """A residual shown as the bound it is, never below the dtype's precision: ``≤ 4.1e-07``."""
    return "—" if residual is None else f"≤ {max(residual, floor):.2g}"


def _eigenvalues(results: Results, dtype: str | None) -> Table:
    eig = results.eigenvalues
    scale = max(
        (abs(v) for v in (*eig.values, results.lambda_min.value) if v is not None), default=0
    )
    floor = EPS.get(dtype or "float64", EPS["float64"]) * scale
    title = f"Top {_matrix(results)} eigenvalues ({eig.method})"
    table = Table(title=title, title_justify="left", caption=_product_error(results))
    table.add_column("#", justify="right")
    table.add_column("λ", justify="right")
    bounded = eig.bounds is not None  # the products' own error is in the bounds
    table.add_column("‖Hv − λv‖ + product error" if bounded else "‖Hv − λv‖", justify="right")
    table.add_column("converged")
    s = results.sampling
    if s is not None:
        table.add_column("± data", justify="right")
    if s is not None and s.bias is not None:
        table.add_column("bias", justify="right")
    spread = [None] * len(eig.values) if s is None else list(s.eigenvalues)
    rows = zip(eig.values, eig.uncertainties, eig.converged, spread, strict=True)
    for i, (value, residual, ok, se) in enumerate(rows, 1):
        cells = [str(i), _num(value, 6), _bound(residual, floor), "yes" if ok else "[red]no[/red]"]
        table.add_row(*cells, *_data_cells(results, se, "eigenvalues", i - 1))
    low = results.lambda_min
    flag = "yes" if low.converged else "[red]no[/red]"
    cells = ["min", _num(low.value, 6), _bound(low.uncertainty, floor), flag]
    table.add_row(*cells, *_data_cells(results, s and s.lambda_min, "lambda_min"))
    return table


def _product_error(results: Results) -> str | None:
    """The products' own error under the eigenvalues, e.g. ``product error ≤ 3.1e-05 (2.1e-05 of
    ‖Hv₁‖, float64 measure; finite-difference estimate 1.9e-05), in every bound``."""
    error = results.product_error
    if error is None:
        return None
    fd = error.finite_difference
    estimate = "" if fd is None else f"; finite-difference estimate {fd:.2g}"
    return (
        f"product error ≤ {error.absolute:.2g} ({error.relative:.2g} of ‖Hv₁‖, "
        f"{error.method} measure{estimate}), in every bound"
    )


def _data_cells(results: Results, se: float | None, pick: str, index: int = 0) -> list[str]:
    """The ``± data`` half-width and, when estimated, the ``bias`` range of one eigenvalue."""
    s = results.sampling
    if s is None:
        return []
    cells = ["—" if se is None else f"± {s.interval_multiplier * se:.2g}"]
    if s.bias is not None:
        bias = s.bias_of(pick, index)
        cells.append("—" if bias is None else _bias(bias))
    return cells


def _bias(bias: tuple[float, float]) -> str:
    """A bias range, ``+0.052 to +0.2``."""
    return f"{bias[0]:+.2g} to {bias[1]:+.2g}"


def _with_interval(
    results: Results,
    value: float | None,
    se: float | None,
    digits: int,
    bounds: tuple[float, float] | None = None,
    pick: str | None = None,
) -> str:
    """``value [low, high]`` with the data's 95 % interval when it was estimated (allowing for
    the bias of figure ``pick`` when that was estimated)."""
    s = results.sampling
    bias = None if s is None or pick is None else s.bias_of(pick)
    interval = (
        None if s is None or value is None else s.interval(value, se, bounds, bias or (0.0, 0.0))
    )
    if interval is None:
        return _num(value, digits)
    return f"{_num(value, digits)} {_bracket(*interval)}"


def _bracket(low: float, high: float, digits: int = 2) -> str:
    """``[low, high]`` rounded outward, so that it holds every point the exact interval holds."""
    low, high = rounded_outward(low, high, digits)
    return f"[{_num(low, digits)}, {_num(high, digits)}]"


def _curvature(results: Results) -> Table:
    table = Table(title=f"Curvature: {_matrix(results)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    s = results.sampling
    table.add_row(
        "λ_max",
        _with_interval(results, results.lambda_max, s and s.eigenvalues[0], 6, None, "eigenvalues"),
    )
    table.add_row(
        "λ_min",
        _with_interval(
            results, results.lambda_min.value, s and s.lambda_min, 6, None, "lambda_min"
        ),
    )
    trace = results.trace
    if trace is not None:
        table.add_row("trace", _trace(trace))
        if s is not None and s.trace is not None:
            table.add_row(
                "  over other samples (± data)", _with_interval(results, trace.estimate, s.trace, 6)
            )
        ratio = _num(results.lambda_max_over_trace)  # not a number while the trace is not one
        table.add_row(
            "λ_max / trace", ratio if trace.converged else "— (the trace did not converge)"
        )
    if results.density is not None:
        table.add_row("density mean (trace/n)", _num(results.density.mean))
    if results.critical_sharpness is not None:
        _critical_rows(table, results.critical_sharpness)
    return table


def _critical_rows(table: Table, c: CriticalSharpnessFigures) -> None:
    """λ_c as the interval its line search bracketed, and how far below λ_max and why."""
    shown = {
        "bracketed": _bracket(c.low, c.high, 3),
        "never-increases": f"< {_num(c.high)} (the loss never rose)",
        "increases-at-once": f"> {_num(c.low)} (the loss rose at the smallest step)",
        "zero-direction": "— (the gradient is zero)",
    }[c.status]
    table.add_row(f"λ_c = 2/η_c along {c.direction}", f"{shown}, {c.passes} forward passes")
    if c.quadratic is not None:
        table.add_row("  quadratic model ĝᵀHĝ = Σ λ_i cos²(ĝ, v_i)", _num(c.quadratic))
    if c.ratio_to_lambda_max is not None:
        cos2 = "" if c.cos2_v1 is None else f", cos²(ĝ, v₁) = {_num(c.cos2_v1, 3)}"
        table.add_row("  λ_c / λ_max", f"{_num(c.ratio_to_lambda_max, 3)}{cos2}")


def _trace(trace: Trace) -> str:
    """``estimate ± SE (95 %: low to high)``, flagged when the trace stopped at its budget."""
    text = f"{_num(trace.estimate, 6)} ± {_num(trace.std_error, 2)}"
    if trace.interval is not None:
        low, high = rounded_outward(*trace.interval, 4)
        text += f" (95 %: {_num(low)} to {_num(high)})"
    return text if trace.converged else f"{text} [red]not converged[/red]"


def _alignment(results: Results) -> Table | None:
    a = results.alignment
    if a is None:
        return None
    table = Table(title=f"SAM alignment (ρ = {a.rho:g})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    s = results.sampling
    batches = a.cos_batches
    if batches is not None:
        table.add_row(*_minibatch_rows(batches))
    table.add_row(
        "|cos(ĝ, v₁)|, full-data gradient",
        _with_interval(results, a.cos_full, s and s.cos_full, 3, UNIT, "cos_full"),
    )
    table.add_row(
        "‖P_k ĝ‖, ĝ's share in the top-k eigenspace",
        _with_interval(results, a.topk_share, s and s.topk_share, 3, UNIT, "topk_share"),
    )
    table.add_row(
        "SAM sharpness L(w+ρĝ) − L(w)",
        _with_interval(results, a.sam_sharpness, s and s.sam_sharpness, 4, None, "sam_sharpness"),
    )
    table.add_row("  predicted ρ‖g‖ + ½ρ²ĝᵀHĝ", _num(a.sam_sharpness_taylor))
    table.add_row("  of which curvature ½ρ²ĝᵀHĝ", _num(a.sam_sharpness_quadratic))
    if batches is not None and batches.eigen_sam_mean is not None:
        table.add_row(
            f"|cos(ε_B, v₁)|, Eigen-SAM α = {a.alpha:g}, minibatch mean",
            _num(batches.eigen_sam_mean, 3),
        )
    table.add_row(f"|cos(ε, v₁)|, Eigen-SAM α = {a.alpha:g}, full data", _num(a.eigen_sam_cos, 3))
    return table


def _minibatch_rows(b: BatchCosines) -> tuple[str, str]:
    """SAM's alignment over its minibatches, the verdict's figure: ``mean ± SE [min–max]``; a
    single minibatch is marked as without a standard error, never shown ± 0."""
    size = "" if b.batch_size is None else f" of {b.batch_size}"
    spread = "no SE" if b.std_error is None else f"± {b.std_error:.2g}"
    if b.count < 2:
        return f"|cos(ĝ_B, v₁)|, 1 minibatch{size}", f"{_num(b.mean, 3)} ({spread})"
    low, high = rounded_outward(b.min, b.max)
    return (
        escape(f"|cos(ĝ_B, v₁)|, mean ± SE over {b.count} minibatches{size} [min–max]"),
        f"{_num(b.mean, 3)} {spread} [{_num(low, 2)}–{_num(high, 2)}]",
    )


def _adaptive(results: Results) -> Table | None:
    h = results.adaptive_sharpness
    if h is None:
        return None
    ball = f"{'adaptive' if h.adaptive else 'plain'} {'ℓ∞' if h.norm == 'linf' else 'ℓ2'}"
    table = Table(
        title=f"Sharpness ({h.kind} case, {ball}, ρ = {h.rho:g})",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(justify="right")
    shown = _num(h.value, 4)
    if h.interval is not None:
        shown += f" {_bracket(*h.interval)}"
    table.add_row("L(w + δ) − L(w)", shown)
    if h.std_error is not None:
        table.add_row("  Monte-Carlo SE", f"± {h.std_error:.2g} ({h.steps} draws)")
    else:
        table.add_row(
            "  ascent", f"{h.n_gradients} steps, ‖δ ⊘ s‖ = {_num(h.perturbation_norm, 3)}"
        )
    return table


def _group(layer: Layer) -> Text:
    """A transformer group's name, then the full name of each module that owns its tensors."""
    owners = dict.fromkeys(name.rpartition(".")[0] for name in layer.parameters or ())
    return Text("\n").join(
        [Text(layer.name), *(Text(f"  {owner}", style="dim") for owner in owners)]
    )


def _per_layer(results: Results) -> Table | None:
    if not results.per_layer:
        return None
    table = Table(title="Per-layer top eigenvalue", title_justify="left")
    grouped = any(layer.kind is not None for layer in results.per_layer)
    table.add_column("group: modules" if grouped else "module", overflow="fold")
    table.add_column("type")
    table.add_column("parameters", justify="right")
    table.add_column("λ_max", justify="right")
    table.add_column("converged")
    for layer in sorted(results.per_layer, key=lambda x: -x.eigenvalue):
        ok = "yes" if layer.converged else "[red]no[/red]"
        name = _group(layer) if layer.kind is not None else escape(layer.name)
        kind = escape(layer.module_type or "—")
        table.add_row(name, kind, f"{layer.size:,}", _num(layer.eigenvalue, 5), ok)
    return table


def render(report: Report) -> Group:
    """All tables of an analysis report, each with its line of :data:`HELP`, then the work
    done, the verdict and the notes."""
    results = report.results
    tables = {
        "summary": _summary(report.inputs, results),
        "eigenvalues": _eigenvalues(results, report.inputs.dtype),
        "curvature": _curvature(results),
        "alignment": _alignment(results),
        "adaptive_sharpness": _adaptive(results),
        "per_layer": _per_layer(results),
    }
    parts: list[Any] = []
    for name, table in tables.items():
        if table is not None:
            parts += [table, Text(HELP[name], style="dim")]
        if name == "curvature" and (results.curvature or "hessian") != "hessian":
            parts.append(Text(HELP["psd"].format(matrix=_matrix(results)), style="dim"))
        if name == "curvature" and results.critical_sharpness is not None:
            parts.append(Text(HELP["critical"], style="dim"))
    s = results.sampling
    data_help = (
        HELP["no_sampling"]
        if s is None
        else HELP["sampling"].format(
            shards=s.shards,
            bias=""
            if s.bias is None
            else "; bias: the sample size's, under 1/n to 1/√n, which [a, b] allows for",
        )
    )
    parts.append(Text(data_help, style="dim"))
    timings = report.timings
    parts.append(
        Text(
            f"{timings.n_products} {_matrix(results)}-vector products, "
            f"{timings.total_seconds:.1f} s",
            style="dim",
        )
    )
    parts.append(Text(results.verdict, style="bold"))
    parts += [Text(f"note: {n}", style="yellow") for n in results.notes]
    return Group(*parts)


def print_report(report: Report, console: Console) -> None:
    """Print :func:`render`'s tables to ``console``."""
    console.print(render(report))
