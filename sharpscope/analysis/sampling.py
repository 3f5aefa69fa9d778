"""Data uncertainty: how much each headline figure would move with another sample of the same
size from the same data, by a grouped jackknife over disjoint shards of the analysed samples.

The samples are cut into ``m`` shards (every batch split into ``m`` chunks, so each shard spans
all batches). Each figure is written as a function of per-shard means of the loss, the gradient
and Rayleigh quotients at the full-data solution; deleting one shard at a time gives ``m``
replicates ``θ₍₋ⱼ₎``, and the jackknife standard error is

    SE² = (m − 1)/m · Σⱼ (θ₍₋ⱼ₎ − θ̄₍.₎)²,

which estimates the figure's spread over samples of the analysed size (docs/engine.md). The
eigenvalues use the shards' Rayleigh quotients ``vᵀHⱼv`` of the full-data eigenvectors, exact to
first order in the data (an eigenvalue's first-order change is ``vᵀ dH v``); the alignment and
the top-k share hold v₁ and the eigenspace fixed; the SAM sharpness holds ε fixed. Each costs
one product (or one gradient, or two losses) spread over the shards: about one full one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from sharpscope import distributed
from sharpscope.analysis.intervals import (
    Figures,
    SamplingErrors,
    deleted_means,
    jackknife_se,
    noise_corrected_se,
)
from sharpscope.batches import loss_weight
from sharpscope.curvature import CurvatureOperator, EigenResult, Progress
from sharpscope.curvature.lanczos import lanczos_extremes
from sharpscope.curvature.shards import draw, over_of
from sharpscope.curvature.solve_settings import SolveSettings
from sharpscope.curvature.vectors import Over, abs_cosine, dot, norm, orthogonalize
from sharpscope.optim.perturbations import sam_perturbation
from sharpscope.structures import concat, leaves, sample_count, split

SHARD_TOL = 1e-3
"""The shards' re-solves stop at this residual relative to |λ_max| (or at the analysis' own
tolerance when looser): a Ritz value is off by at most its residual (about its square over the gap
when separated), far below the shift between sample sizes that the bias needs; at 1e-2 a small
λ_min came out up to 4 × too close to 0 on the digits MLP's shards."""


@dataclass(frozen=True)
class Resolve:
    """What the split-sample bias solves again on each shard: λ_max and λ_min, by one Lanczos run
    warm-started from ``start`` (the full-data v₁ + v_min) until the relative residual ``tol``,
    with at most ``max_iter`` products and ``max_basis`` vectors on ``basis_device``; and SAM's
    radius ``rho``. The
    other top-k eigenvalues are not solved again (their bias is not estimated): on the benchmark
    CNN's shards the top-5 took 28–36 products, λ_max alone 16–18."""

    start: torch.Tensor
    rho: float
    tol: float = SHARD_TOL
    max_iter: int = 200
    max_basis: int | None = None
    basis_device: str = "device"

    def extremes(self, part: CurvatureOperator) -> tuple[EigenResult, EigenResult]:
        """The shard's top and bottom pairs (Ritz estimates: no checking products)."""
        settings = SolveSettings(
            self.tol, self.max_iter, max_basis=self.max_basis, basis_device=self.basis_device
        )
        return lanczos_extremes(part, 1, settings=settings, v0=self.start, verify=False)


TRACE_PROBES = 10
"""Rademacher probes applied to every shard for the trace's data standard error."""


def static_batch(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes only one batch size: a ``torch.export`` program exported without
    a dynamic batch dimension (its graph's inputs have a fixed first dimension)."""
    if not isinstance(model, torch.fx.GraphModule):
        return False
    for node in model.graph.nodes:
        shape = getattr(node.meta.get("val"), "shape", None) if node.op == "placeholder" else None
        if shape and isinstance(shape[0], int):
            return True
    return False


def whole_batches(op: CurvatureOperator) -> bool:
    """Whether shards must be whole batches: BatchNorm on batch statistics (a batch's own), or a
    model that takes only the batch size it was exported for (:func:`static_batch`)."""
    return op.batch_stats or static_batch(op.model)


def _cuts(op: CurvatureOperator, shards: int) -> list[tuple[int | None, int]]:
    """How each of ``op``'s batches is cut into shards: the size of its chunks and the shard its
    first chunk joins (the next chunk the next shard); whole batches (None), dealt round, when
    they must stay whole (:func:`whole_batches`)."""
    if whole_batches(op):
        return [(None, i % shards) for i in range(len(op.batches))]
    return [(-(-sample_count(inputs, "batch") // shards), 0) for inputs, _ in op.batches]


def _pieces(batch: tuple[Any, Any], size: int | None) -> list[tuple[Any, Any]]:
    """A batch's consecutive chunks of ``size`` samples (None: the batch itself)."""
    if size is None:
        return [batch]
    inputs, targets = batch
    return list(zip(split(inputs, size), targets.split(size), strict=True))


def _shard_batches(op: CurvatureOperator, shards: int) -> list[list[Any]]:
    """``op``'s batches as ``shards`` disjoint groups (:func:`_cuts`): every batch cut into
    ``shards`` chunks, so each shard spans all batches, and each group's chunks joined back to
    about a batch's size (:func:`_joined`; not when batches stay whole)."""
    groups: list[list[Any]] = [[] for _ in range(shards)]
    cuts = _cuts(op, shards)
    for batch, (size, first) in zip(op.batches, cuts, strict=True):
        for j, piece in enumerate(_pieces(batch, size)):
            groups[first + j].append(piece)
    whole = all(size is None for size, _ in cuts)
    return groups if whole else [_joined(group, shards) for group in groups]


def _joined(chunks: list[Any], per_batch: int) -> list[Any]:
    """Consecutive ``chunks`` joined ``per_batch`` at a time where their shapes agree: the same
    samples in fewer, larger batches, so a shard's product costs its share of a full one rather
    than one model call per batch it spans (samples are independent without batch statistics)."""
    runs: list[list[Any]] = []
    for chunk in chunks:
        if runs and len(runs[-1]) < per_batch and _layout(runs[-1][0]) == _layout(chunk):
            runs[-1].append(chunk)
        else:
            runs.append([chunk])
    return [
        run[0] if len(run) == 1 else (concat([x for x, _ in run]), concat([y for _, y in run]))
        for run in runs
    ]


def _layout(batch: Any) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor's name, shape past the sample dimension, and dtype: what joining needs."""
    return [(name, tuple(t.shape[1:]), t.dtype) for name, t in leaves(batch, "batch")]


def _shard_terms(op: CurvatureOperator, groups: list[list[Any]]) -> list[float]:
    """The terms each group's mean loss is over, on all ranks (all agree)."""
    local = [float(sum(loss_weight(op.loss_fn, b) for b in g)) for g in groups]
    return distributed.sum_floats(local) if op.distributed else local


def shard_operators(op: CurvatureOperator, shards: int) -> list[CurvatureOperator]:
    """``op``'s data as at most ``shards`` disjoint operators of its kind (:func:`_shard_batches`),
    shards empty on every rank left out; each keeps its own graph for its products."""
    groups = _shard_batches(op, shards)
    return [
        op.replace(op.objective.replace(batches=group, total_terms=op.total_terms))
        for group, count in zip(groups, _shard_terms(op, groups), strict=True)
        if count > 0
    ]


def shard_losses(
    op: CurvatureOperator, shards: int, delta: torch.Tensor | None = None
) -> tuple[list[float], list[float]]:
    """The weights (shares of the terms) of the shards of :func:`shard_operators`, in order, and
    their losses (a summed loss scaled to all the data) at the weights + ``delta``: what those
    operators' ``loss`` gives, from one forward per batch
    (:meth:`CurvatureOperator.chunk_losses`) and one all-reduce."""
    cuts = _cuts(op, shards)
    found = op.chunk_losses([size for size, _ in cuts], delta)
    terms, sums = [0.0] * shards, [0.0] * shards
    for batch, (size, first), losses in zip(op.batches, cuts, found, strict=True):
        for j, (piece, loss) in enumerate(zip(_pieces(batch, size), losses, strict=True)):
            units = loss_weight(op.loss_fn, piece)
            terms[first + j] += units
            sums[first + j] += loss * (units if op.reduction == "mean" else op.total_terms)
    both = terms + sums
    both = distributed.sum_floats(both) if op.distributed else both
    kept = [j for j in range(shards) if both[j] > 0]
    return [both[j] / op.num_terms for j in kept], [both[shards + j] / both[j] for j in kept]


@dataclass
class _Shard:
    """What one shard contributes: its Rayleigh quotients at the full-data eigenvectors, its
    probes' quadratic forms, its gradient's scalars, its SAM loss rise at the full-data ε, and
    its own figures (for the bias)."""

    rayleigh: list[float]
    probes: list[float]
    gradient: tuple[float, float, list[float]] | None = None
    """(⟨g, gⱼ⟩, ‖gⱼ‖², ⟨vᵢ, gⱼ⟩ for each top-k eigenvector)."""
    sam_rise: float | None = None
    figures: Figures | None = None


def sampling_errors(
    op: CurvatureOperator,
    shards: int,
    eigenvectors: torch.Tensor,
    min_vector: torch.Tensor,
    gradient: torch.Tensor,
    epsilon: torch.Tensor | None,
    full: Figures | None = None,
    resolve: Resolve | None = None,
    trace_probes: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> SamplingErrors | None:
    """The jackknife standard errors of the top-k eigenvalues (rows of ``eigenvectors``), λ_min
    (of ``min_vector``) and, given the full-data ``gradient`` and the SAM perturbation
    ``epsilon`` (None when the gradient is zero), of the alignment, the top-k share and the SAM
    sharpness; with ``trace_probes``, of the trace; with ``resolve`` and the ``full`` figures,
    their split-sample bias. Costs one product per eigenvector and per probe, one gradient and
    two losses, each spread over the shards, and with ``resolve`` one eigen-solve spread over
    them; ``progress`` hears of each shard done. None when the data makes fewer than two
    shards."""
    parts = shard_operators(op, shards)
    if len(parts) < 2:
        return None
    weights = [p.num_terms / op.num_terms for p in parts]
    vectors = torch.cat([eigenvectors, min_vector[None]])
    found = []
    for part in parts:
        found.append(_shard(part, vectors, gradient, epsilon, resolve, trace_probes, seed))
        if progress is not None:
            progress("spread", len(found), len(parts))
    n_products = round(sum(w * p.n_products for w, p in zip(weights, parts, strict=True)))
    replicates = [deleted_means(q, weights) for q in zip(*(s.rayleigh for s in found), strict=True)]
    kept = {"weights": weights, "lambda_max": replicates[0], "lambda_min": replicates[-1]}
    if trace_probes >= 2:
        kept["trace"] = deleted_means([sum(s.probes) / len(s.probes) for s in found], weights)
    errors = SamplingErrors(
        shards=len(parts),
        eigenvalues=[jackknife_se(r) for r in replicates[:-1]],
        lambda_min=jackknife_se(replicates[-1]),
        trace=_trace_se(found, weights) if trace_probes >= 2 else None,
        bias=_bias(found, weights, full) if resolve is not None and full is not None else None,
        n_products=n_products,
        replicates=kept,
    )
    if epsilon is None:
        return errors
    cos, share = _gradient_replicates(found, weights, gradient, eigenvectors, over_of(op))
    sharpness = deleted_means([s.sam_rise for s in found], weights)
    return replace(
        errors,
        cos_full=jackknife_se(cos),
        topk_share=jackknife_se(share),
        sam_sharpness=jackknife_se(sharpness),
        replicates={**kept, "cos_full": cos, "sam_sharpness": sharpness},
    )


def _shard(
    part: CurvatureOperator,
    vectors: torch.Tensor,
    gradient: torch.Tensor,
    epsilon: torch.Tensor | None,
    resolve: Resolve | None,
    probes: int,
    seed: int,
) -> _Shard:
    """One shard's contribution; its graph is freed when it is done."""
    over = over_of(part)  # sharded vectors: every dot product summed over the ranks
    rayleigh = [dot(v, part.matvec(v), over) for v in vectors]
    generator = torch.Generator().manual_seed(seed)  # the same probes on every shard
    forms = []
    for _ in range(probes):
        z = orthogonalize(draw(part, 1, generator, "rademacher")[0], vectors, over=over)
        forms.append(sum(rayleigh) + dot(z, part.matvec(z), over))
    found = _Shard(rayleigh, forms)
    solved = None if resolve is None else resolve.extremes(part)  # before a loss drops the graph
    if epsilon is not None:
        g = part.gradient()
        found.gradient = (
            dot(gradient, g, over),
            dot(g, g, over),
            [dot(v, g, over) for v in vectors[:-1]],
        )
        base = part.loss()  # once, for both SAM rises
        found.sam_rise = part.loss(epsilon) - base
        if solved is not None:
            found.figures = _figures(part, g, solved, resolve.rho, base)
    elif solved is not None:
        found.figures = _figures(part, None, solved, resolve.rho, None)
    part.release()
    return found


def _figures(
    part: CurvatureOperator,
    g: torch.Tensor | None,
    solved: tuple[EigenResult, EigenResult],
    rho: float,
    base: float | None,
) -> Figures:
    """The figures solved on one shard alone: its own eigenpairs (``solved``), gradient and ε,
    its SAM rise from its loss ``base`` at the weights."""
    top, bottom = solved
    eigen = Figures(top.eigenvalues.tolist(), float(bottom.eigenvalues[0]))
    over = over_of(part)
    if g is None or base is None or norm(g, over) == 0:
        return eigen
    rise = part.loss(sam_perturbation(g, rho, over)) - base
    cos = abs_cosine(g, top.eigenvectors[0], over)
    return replace(
        eigen,
        cos_full=cos,
        topk_share=cos,  # the share on v₁ alone: the top-k share's when k = 1
        sam_sharpness=rise if math.isfinite(rise) else None,
    )


def _trace_se(found: list[_Shard], weights: list[float]) -> float:
    """The trace's data SE from every shard's probe estimates of its trace: tr(VᵀHⱼV) exactly
    (the Rayleigh quotients) plus (Pz)ᵀHⱼ(Pz) on the rest, P = I − VVᵀ."""
    per_probe = [list(row) for row in zip(*(s.probes for s in found), strict=True)]
    return noise_corrected_se(per_probe, weights)


def _bias(found: list[_Shard], weights: list[float], full: Figures) -> Figures:
    """Split-sample bias under a 1/n law: (Σ wⱼ θⱼ − θ)/(m − 1), θⱼ solved on shard j alone
    (None where a shard's or the full figure is missing, and for λ₂…λ_k and, with k > 1, the
    top-k share, which the shards do not solve again)."""
    m = len(found)
    shards = [s.figures for s in found]

    def of(value: float | None, pick: Callable[[Figures], float | None]) -> float | None:
        values = [pick(f) for f in shards]
        if value is None or any(v is None for v in values):
            return None
        return (sum(w * v for w, v in zip(weights, values, strict=True)) - value) / (m - 1)

    k = len(full.eigenvalues)
    return Figures(
        eigenvalues=[of(full.eigenvalues[0], lambda f: f.eigenvalues[0])] + [None] * (k - 1),
        lambda_min=of(full.lambda_min, lambda f: f.lambda_min),
        cos_full=of(full.cos_full, lambda f: f.cos_full),
        topk_share=of(full.topk_share, lambda f: f.topk_share) if k == 1 else None,
        sam_sharpness=of(full.sam_sharpness, lambda f: f.sam_sharpness),
    )


def _gradient_replicates(
    found: list[_Shard],
    weights: list[float],
    gradient: torch.Tensor,
    basis: torch.Tensor,
    over: Over | None = None,
) -> tuple[list[float], list[float]]:
    """Delete-one-shard |cos(ĝ, v₁)| and ‖P_k ĝ‖ with v₁ and the top-k eigenspace (rows of
    ``basis``) fixed. The gradient without shard j is ``(g − wⱼgⱼ)/(1 − wⱼ)``, so each shard's
    gradient is needed only as scalars (its norm, and its dot products with g and the basis;
    sharded vectors' summed ``over`` their ranks)."""
    full = [dot(v, gradient, over) for v in basis]
    g_squared = dot(gradient, gradient, over)
    cos, share = [], []
    for w, s in zip(weights, found, strict=True):
        g_dot, own, projections = s.gradient
        squared = (g_squared - 2 * w * g_dot + w * w * own) / (1 - w) ** 2
        coeffs = [(c - w * p) / (1 - w) for c, p in zip(full, projections, strict=True)]
        size = math.sqrt(max(squared, 0.0))
        cos.append(abs(coeffs[0]) / size if size > 0 else 0.0)
        share.append(math.sqrt(sum(c * c for c in coeffs)) / size if size > 0 else 0.0)
    return cos, share
