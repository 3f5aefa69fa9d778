"""Seeded random vectors, accurate reductions, orthogonalisation and |cos| shared by the
estimators and their users.

Dot products and norms of whole vectors accumulate in float64 whatever the vectors' dtype:
torch's float32 CPU ``vector_norm`` drifts by 2e-5 at 1.8M elements and 1e-3 at 22.7M
(pytorch#169237), enough to put Lanczos vectors off unit norm and every eigenvalue off by more
than a 1e-4 tolerance. Long vectors are reduced a slab at a time and the slabs' partial sums
added in float64: accurate to float32's rounding of a slab, with no float64 copy of a vector.

A vector may be sharded over ranks (each holds a piece, :mod:`sharpscope.curvature.shards`): the
reductions then take ``over``, which sums a rank's partial results over the ranks, so that only
scalars (and a basis's coefficients) travel, never a vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch

SLAB = 1 << 16
"""Coordinates summed in the vectors' own dtype before a partial sum joins the float64 total."""
DISTANCE_SLAB = 1 << 22
"""Coordinates of two vectors :func:`distance` subtracts at a time (bounded scratch)."""
Kind = Literal["normal", "rademacher"]
"""The distribution of :func:`random_vectors`' coordinates."""
Over = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor of a rank's partial reductions (dot products) over the ranks that hold the
pieces of sharded vectors (:meth:`sharpscope.curvature.shards.Shards.sum`); None: whole vectors."""


def random_vectors(
    count: int,
    size: int,
    like: torch.Tensor,
    generator: torch.Generator,
    kind: Kind = "normal",
) -> torch.Tensor:
    """``count`` random vectors (rows) of ``size``, drawn on the CPU so that a seed gives the same
    vectors on every device, then moved to ``like``'s dtype and device."""
    if kind == "normal":
        out = torch.randn(count, size, generator=generator, dtype=torch.float64)
    else:
        out = torch.randint(0, 2, (count, size), generator=generator, dtype=torch.int8) * 2.0 - 1.0
    return out.to(dtype=like.dtype, device=like.device)


def shaped(vec: torch.Tensor, shapes: Iterable[torch.Size]) -> list[torch.Tensor]:
    """The flat vector ``vec`` as consecutive views shaped like ``shapes``, in order."""
    sizes = [torch.Size(s) for s in shapes]
    chunks = vec.split([s.numel() for s in sizes])
    return [c.view(s) for c, s in zip(chunks, sizes, strict=True)]


def dot(a: torch.Tensor, b: torch.Tensor, over: Over | None = None) -> float:
    """⟨a, b⟩ of two flat vectors: dot products over slabs of :data:`SLAB` coordinates in the
    vectors' dtype, added in float64 (and summed ``over`` the ranks of sharded vectors)."""
    if a.dtype == torch.float64 or a.shape[0] <= SLAB:
        value = torch.dot(a, b).double()
    else:
        slabs = [torch.dot(a[i : i + SLAB], b[i : i + SLAB]) for i in range(0, a.shape[0], SLAB)]
        value = torch.stack(slabs).double().sum()
    return float(value if over is None else over(value))


def norm(a: torch.Tensor, over: Over | None = None) -> float:
    """‖a‖ of a flat vector, accumulated in float64 (over the ranks of a sharded one)."""
    return math.sqrt(max(dot(a, a, over), 0.0))


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` (rows) each divided by its :func:`norm`."""
    norms = [norm(v) for v in vectors]
    return vectors / torch.tensor(norms, dtype=vectors.dtype, device=vectors.device)[:, None]


def row_slabs(
    basis: torch.Tensor, device: torch.device, rows: int | None
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``basis``'s rows (their slice and themselves) on ``device``: all at once (``rows`` None), or
    ``rows`` at a time, so that a basis in host memory streams to the device a slab at a time
    (without blocking when it is pinned)."""
    if rows is None:
        yield slice(0, basis.shape[0]), basis.to(device)
        return
    for start in range(0, basis.shape[0], rows):
        part = slice(start, start + rows)
        yield part, basis[part].to(device, non_blocking=True)


def project_out(
    w: torch.Tensor, basis: torch.Tensor, rows: int | None = None, over: Over | None = None
) -> torch.Tensor:
    """``w`` less its components along the orthonormal rows of ``basis`` (one pass), projected out
    ``rows`` of them at a time (:func:`row_slabs`; None: all at once); for sharded vectors the
    coefficients are summed ``over`` the ranks. ``w`` is not changed."""
    return _remove(w.clone(), basis, rows, over)


def orthogonalize(
    w: torch.Tensor, basis: torch.Tensor, rows: int | None = None, over: Over | None = None
) -> torch.Tensor:
    """Remove from ``w`` its components along the orthonormal rows of ``basis`` (twice, for
    numerical safety: "twice is enough"), ``rows`` of them at a time (:func:`project_out`; sharded
    vectors ``over`` their ranks). The coefficients are plain products in the vectors' dtype:
    their rounding only perturbs orthogonality, which the second pass restores. ``w`` is not
    changed: one copy of it is the result, worked on in place (no vector beside the two)."""
    if basis.shape[0] == 0:
        return w
    out = w.clone()
    for _ in range(2):
        _remove(out, basis, rows, over)
    return out


def _remove(
    w: torch.Tensor, basis: torch.Tensor, rows: int | None, over: Over | None
) -> torch.Tensor:
    """:func:`project_out` in place."""
    for _, part in row_slabs(basis, w.device, rows):
        coefficients = part @ w
        w.addmv_(part.T, coefficients if over is None else over(coefficients), alpha=-1)
    return w


def orthonormal_rows(
    vectors: torch.Tensor, over: Over | None = None, fill: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """Orthonormal rows spanning ``vectors``' rows, by Gram-Schmidt with :func:`orthogonalize`
    (sharded vectors' coefficients summed ``over`` their ranks): a row within √eps (relative)
    of the span of those before it is replaced by ``fill()`` (a random vector; as Householder QR
    completes a basis) or, without ``fill`` or if that is too, left out."""
    rows = vectors[:0]
    floor = math.sqrt(torch.finfo(vectors.dtype).eps)
    for row in vectors:
        for candidate in (row, None if fill is None else fill()):
            if candidate is None:
                break
            rest = orthogonalize(candidate, rows, over=over)
            length = norm(rest, over)
            if length > floor * norm(candidate, over):
                rows = torch.cat([rows, (rest / length)[None]])
                break
    return rows


def distance(
    a: torch.Tensor, b: torch.Tensor, scale: float = 1.0, over: Over | None = None
) -> float:
    """‖a − ``scale`` b‖ of two flat vectors, accumulated in float64 a slab at a time: no vector
    beside them (summed ``over`` the ranks of sharded vectors)."""
    total = 0.0
    for i in range(0, a.shape[0], DISTANCE_SLAB):
        part = torch.sub(a[i : i + DISTANCE_SLAB], b[i : i + DISTANCE_SLAB], alpha=scale)
        total += dot(part, part)
    if over is not None:
        total = float(over(torch.tensor(total, dtype=torch.float64)))
    return math.sqrt(max(total, 0.0))


def combine(weights: torch.Tensor, basis: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """``weights @ basis`` (k × m weights of m rows) on ``weights``' device, summed over slabs of
    ``rows`` rows (:func:`row_slabs`; None: one product)."""
    if rows is None:  # one product, no accumulator beside its result
        return weights @ basis.to(weights.device)
    out = torch.zeros(weights.shape[0], basis.shape[1], dtype=basis.dtype, device=weights.device)
    for part, slab in row_slabs(basis, weights.device, rows):
        out += weights[:, part] @ slab
    return out


def rayleigh_quotients(
    vectors: torch.Tensor, images: Iterable[torch.Tensor], over: Over | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit vector's Rayleigh quotient vᵀHv and true residual ‖Hv − (vᵀHv)v‖ (float64),
    given its image Hv (one at a time: a generator of products holds one; sharded vectors
    reduced ``over`` their ranks)."""
    values, errors = [], []
    for v, image in zip(vectors, images, strict=True):
        value = dot(v, image, over)
        values.append(value)
        errors.append(distance(image, v, value, over))
    return torch.tensor(values, dtype=torch.float64), torch.tensor(errors, dtype=torch.float64)


def abs_cosine(a: torch.Tensor, b: torch.Tensor, over: Over | None = None) -> float:
    """|cos(a, b)|; 0 when either vector is zero (sharded vectors reduced ``over`` their ranks)."""
    norms = norm(a, over) * norm(b, over)
    return abs(dot(a, b, over)) / norms if norms > 0 else 0.0
