"""Lanczos with full reorthogonalisation: extreme eigenpairs of a symmetric operator."""

from __future__ import annotations

import time
from typing import Literal

import torch

from sharpscope.choices import BASIS_DEVICES
from sharpscope.curvature.linop import LinearOperator
from sharpscope.curvature.results import EigenResult, MultiplicityCheck, Progress, Subspace
from sharpscope.curvature.shards import dimension, draw, over_of
from sharpscope.curvature.solve_settings import EIGEN_SETTINGS, SolveSettings
from sharpscope.curvature.vectors import (
    combine,
    dot,
    norm,
    orthogonalize,
    rayleigh_quotients,
)

Which = Literal["largest", "smallest", "magnitude"]
WHICH: tuple[str, ...] = ("largest", "smallest", "magnitude")
RESTART_COLUMNS = 1 << 20
"""A thick restart rewrites the basis in slabs of this many coordinates (bounded scratch)."""
HOST_SLAB_BYTES = 1 << 28
"""A basis in host memory streams to the device in slabs of this many bytes (at least a vector)."""


class LanczosProcess:
    """The Lanczos relation H Q = Q T + β q eᵀ, grown one product at a time.

    Every new vector is reorthogonalised against the whole basis. When the Krylov space becomes
    invariant (β ≈ 0) the process continues from a fresh random vector orthogonal to the basis, so
    that T becomes block diagonal and repeated eigenvalues can still be found. :meth:`restart`
    shrinks the basis to chosen Ritz vectors (thick restart, Wu and Simon 2000): T then starts
    as their Ritz values with an arrowhead of couplings to the next vector, and the relation
    holds on. With a ``capacity`` the basis is allocated once with that many rows (no copies
    while it grows); without, it doubles as needed, up to ``limit`` rows (the most it can need, so
    that a short run allocates no more: fresh memory costs page faults). With ``keep_images`` the
    products H q of the basis vectors are kept beside them (as much memory again), so that any
    vector of the basis's span has its image without another product. With ``host_rows`` the
    basis (and images) lie in host memory, pinned when the operator is on CUDA, and stream to the
    device ``host_rows`` vectors at a time for each reorthogonalisation. An operator whose
    vectors are sharded over ranks (:mod:`~sharpscope.curvature.shards`) has its basis sharded
    alike: every dot product and coefficient is summed over the ranks.
    """

    def __init__(
        self,
        op: LinearOperator,
        start: torch.Tensor,
        generator: torch.Generator,
        capacity: int | None = None,
        keep_images: bool = False,
        limit: int | None = None,
        host_rows: int | None = None,
    ) -> None:
        self.op = op
        self.over = over_of(op)
        self.generator = generator
        self.capacity = capacity
        self.limit = limit
        self.rows = host_rows
        self._home = op.device if host_rows is None else torch.device("cpu")
        self._pin = host_rows is not None and op.device.type == "cuda"
        self.basis = self._empty(0)
        self.images = self.basis if keep_images else None
        self.count = 0
        self.steps = 0
        self.beta = 0.0
        self.scale = 0.0
        self.exhausted = False
        self._t = torch.zeros(0, 0, dtype=torch.float64)
        self._arrow: torch.Tensor | None = None
        self._next = start / norm(start, self.over)

    def _empty(self, rows: int) -> torch.Tensor:
        """``rows`` uninitialised vectors where the basis lies."""
        size, dtype = self.op.size, self.op.dtype
        return torch.empty(rows, size, dtype=dtype, device=self._home, pin_memory=self._pin)

    def _push(self, q: torch.Tensor) -> None:
        """Append ``q`` to the basis and its coupling to the previous vector(s) to T."""
        if self.count == self.basis.shape[0]:
            rows = self.capacity
            if rows is None:
                rows = max(8, 2 * self.count)
                rows = rows if self.limit is None else min(rows, self.limit)
            rows = max(rows, self.count + 1)
            grown = self._empty(rows)
            grown[: self.count] = self.basis[: self.count]
            self.basis = grown
            if self.images is not None:
                images = self._empty(rows)
                images[: self.count] = self.images[: self.count]
                self.images = images
            t = torch.zeros(rows, rows, dtype=torch.float64)
            t[: self.count, : self.count] = self._t[: self.count, : self.count]
            self._t = t
        j = self.count
        if self._arrow is not None:
            self._t[j, :j] = self._arrow
            self._t[:j, j] = self._arrow
            self._arrow = None
        elif j > 0:
            self._t[j, j - 1] = self._t[j - 1, j] = self.beta
        self.basis[j] = q
        self.count += 1

    @property
    def vectors(self) -> torch.Tensor:
        return self.basis[: self.count]

    def step(self) -> None:
        """Extend the basis by one vector (one operator product)."""
        self._push(self._next)
        q = self._next if self.rows is not None else self.basis[self.count - 1]
        self._next = None  # on the device, q is its row of the basis: no copy beside it
        w = self.op.matvec(q)
        if self.images is not None:
            self.images[self.count - 1] = w
        self.steps += 1
        alpha = dot(w, q, self.over)
        del q
        self._t[self.count - 1, self.count - 1] = alpha
        w = orthogonalize(w, self.vectors, self.rows, self.over)
        beta = norm(w, self.over)
        self.scale = max(self.scale, abs(alpha), beta)
        tiny = (
            100 * torch.finfo(self.op.dtype).eps * max(self.scale, torch.finfo(torch.float64).tiny)
        )
        if self.count >= dimension(self.op):
            self.exhausted = True
            self.beta = 0.0
            return
        if beta > tiny:
            self.beta = beta
            self._next = w.div_(beta)
            return
        self.beta = 0.0
        self._fresh()

    def _fresh(self) -> None:
        """Continue from a random vector orthogonal to the basis (a new Krylov sequence)."""
        fresh = draw(self.op, 1, self.generator)[0]
        fresh = orthogonalize(fresh, self.vectors, self.rows, self.over)
        self._next = fresh / norm(fresh, self.over)

    def projected(self) -> torch.Tensor:
        """T = QᵀHQ (float64, CPU) of the current basis: tridiagonal until a restart."""
        return self._t[: self.count, : self.count].clone()

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values (ascending), their coordinates in the basis, and residual norms ‖Hy − θy‖."""
        theta, s = torch.linalg.eigh(self.projected())
        return theta, s, (self.beta * s[-1, :]).abs()

    def restart(self, keep: torch.Tensor) -> None:
        """Keep only the Ritz vectors ``keep`` (indices into :meth:`ritz`'s values) as the basis;
        the next product continues from the current residual direction."""
        theta, s, _ = self.ritz()
        coords = s[:, keep]
        weights = coords.T.to(dtype=self.op.dtype, device=self.op.device)
        n = len(keep)
        for start in range(0, self.op.size, RESTART_COLUMNS):  # in place, a slab at a time
            cols = slice(start, start + RESTART_COLUMNS)
            for store in (self.basis, self.images) if self.images is not None else (self.basis,):
                store[:n, cols] = weights @ store[: self.count, cols].to(self.op.device)
        self.count = n
        self._t.zero_()
        self._t[:n, :n] = torch.diag(theta[keep])
        self._arrow = self.beta * coords[-1, :]

    def lock(self, keep: torch.Tensor) -> None:
        """Keep only the (converged) Ritz vectors ``keep`` and continue from a fresh random vector
        orthogonal to them: every later vector is reorthogonalised against them, so the run goes
        on as Lanczos on the operator deflated by them, finding copies of their eigenvalues that
        their Krylov sequence could not hold. Their couplings to the residual (at most their
        residuals) are dropped."""
        self.restart(keep)
        self._arrow = None
        self.beta = 0.0
        self._fresh()


def select(theta: torch.Tensor, k: int, which: Which) -> torch.Tensor:
    """Indices of the ``k`` wanted values of ``theta``, most extreme first."""
    if which == "largest":
        return torch.argsort(theta, descending=True)[:k]
    if which == "smallest":
        return torch.argsort(theta)[:k]
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise ValueError(f"unknown which={which!r}; choose one of {', '.join(WHICH)}")


def start_vector(
    op: LinearOperator, generator: torch.Generator, v0: torch.Tensor | None
) -> torch.Tensor:
    """``v0`` on the operator's device and dtype (warm start), or a seeded random vector (this
    rank's pieces of it where the operator's vectors are sharded, as ``v0`` must be then)."""
    if v0 is None:
        return draw(op, 1, generator)[0]
    if v0.shape != (op.size,):
        raise ValueError(f"v0 must be a flat vector of length {op.size}, got {tuple(v0.shape)}")
    if not norm(v0.to(op.dtype), over_of(op)) > 0:
        raise ValueError("v0 must be a non-zero vector")
    return v0.to(dtype=op.dtype, device=op.device)


def lanczos(
    op: LinearOperator,
    k: int = 5,
    *,
    which: Which = "largest",
    settings: SolveSettings = EIGEN_SETTINGS,
    v0: torch.Tensor | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    keep_images: bool = False,
) -> EigenResult:
    """The ``k`` largest, smallest or largest-magnitude eigenpairs of ``op`` by Lanczos.

    Stops when every wanted Ritz pair has ‖Hy − θy‖ ≤ ``tol`` · max|θ| (the spectral scale seen so
    far), after ``max_iter`` products, or when the space is exhausted. ``converged`` says, per pair,
    whether its residual met the tolerance. For ``k`` ≥ 2 the converged pairs are then locked and
    the run goes on from fresh random vectors orthogonal to them until one finds no further copy
    of their eigenvalues (:meth:`LanczosProcess.lock`; the result's ``multiplicity`` says how it
    went), so a repeated eigenvalue comes with its multiplicity; those products count in
    ``max_iter`` and ``n_products``. ``max_basis`` (at least k + 2) bounds the vectors
    held in memory: a full basis restarts thickly from its k + (max_basis − k) // 2 most wanted
    Ritz vectors; None keeps every vector (fewest products).

    Args:
        op: A symmetric operator (``matvec``, ``size``, ``dtype``, ``device``, ``n_products``).
        k: How many eigenpairs.
        which: ``largest``, ``smallest`` or ``magnitude``.
        settings: ``tol``, ``max_iter``, ``seed``, ``max_basis`` and ``basis_device``
            (:class:`SolveSettings`).
        v0: A start vector (warm start) instead of a seeded random one.
        progress: Called as ``progress("lanczos", products, max_iter)`` after each product.
        verify: One more product per pair makes each returned unit vector's eigenvalue its
            Rayleigh quotient and its residual the true ‖Hv − λv‖ (so both hold in float32
            too); without, they are the Ritz estimates.
        keep_images: Keep the basis's products (a second basis of memory): the same verified
            figures and each vector's image Hv (the result's ``images``) with no product more.

    Returns:
        An :class:`~sharpscope.curvature.results.EigenResult`, most extreme pair first.

    Raises:
        ValueError: ``k`` below 1, an unknown ``which`` or ``basis_device``, a ``max_basis``
            below k + 2, or a ``v0`` of the wrong length or zero.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> lanczos(op, 2).eigenvalues.tolist()
        [3.0, 1.0]
    """
    return _solve(op, [(k, which)], settings, v0, progress, verify, keep_images=keep_images)[0]


def lanczos_extremes(
    op: LinearOperator,
    k: int = 5,
    *,
    k_smallest: int = 1,
    settings: SolveSettings = EIGEN_SETTINGS,
    v0: torch.Tensor | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    keep_subspace: bool = False,
    keep_images: bool = False,
) -> tuple[EigenResult, EigenResult]:
    """The ``k`` largest and the ``k_smallest`` smallest eigenpairs from one Lanczos run, which
    stops when both ends meet :func:`lanczos`' tolerance: fewer products than two runs, as both
    ends converge in the same Krylov space. Both results report that run's products and time;
    ``settings.max_basis`` must be at least k + k_smallest + 2 and keeps Ritz vectors from both
    ends.

    Args:
        op: A symmetric operator, as :func:`lanczos` takes.
        k: How many of the largest eigenpairs.
        k_smallest: How many of the smallest eigenpairs.
        settings: ``tol``, ``max_iter``, ``seed`` and ``max_basis`` (:class:`SolveSettings`).
        v0: A start vector, as in :func:`lanczos` (e.g. the sum of earlier extreme vectors).
        progress: Called as ``progress("lanczos", products, max_iter)`` after each product.
        verify: As in :func:`lanczos`.
        keep_subspace: Both results carry the final Krylov basis as their ``subspace`` (for
            :func:`~sharpscope.curvature.trace.deflated_trace`).
        keep_images: As in :func:`lanczos`.

    Returns:
        The largest and the smallest pairs, two :class:`~sharpscope.curvature.results.EigenResult`.

    Raises:
        ValueError: As :func:`lanczos`.

    Examples:
        >>> import torch
        >>> from sharpscope.curvature import MatrixOperator
        >>> op = MatrixOperator(torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64)))
        >>> top, bottom = lanczos_extremes(op, 1)
        >>> top.eigenvalues.tolist(), bottom.eigenvalues.tolist()
        ([3.0], [-2.0])
    """
    wants: list[tuple[int, Which]] = [(k, "largest"), (k_smallest, "smallest")]
    top, bottom = _solve(op, wants, settings, v0, progress, verify, keep_subspace, keep_images)
    return top, bottom


def _solve(
    op: LinearOperator,
    wants: list[tuple[int, Which]],
    settings: SolveSettings,
    v0: torch.Tensor | None,
    progress: Progress | None,
    verify: bool,
    keep_subspace: bool = False,
    keep_images: bool = False,
) -> list[EigenResult]:
    """One Lanczos run until every ``(k, which)`` of ``wants`` has converged; a result each
    (carrying the final basis when ``keep_subspace``; verified from the kept products with
    ``keep_images``)."""
    if any(k < 1 for k, _ in wants):
        raise ValueError("k must be at least 1")
    if settings.basis_device not in BASIS_DEVICES:
        raise ValueError(
            f"unknown basis_device={settings.basis_device!r}; choose one of "
            f"{', '.join(BASIS_DEVICES)}"
        )
    for _, which in wants:
        select(torch.zeros(1), 1, which)
    tol, max_iter, max_basis = settings.tol, settings.max_iter, settings.max_basis
    start = time.perf_counter()
    products = op.n_products
    generator = torch.Generator().manual_seed(settings.seed)
    size, over = dimension(op), over_of(op)  # whole vectors' length; sums over sharded ones
    wants = [(min(k, size), which) for k, which in wants]
    total = sum(k for k, _ in wants)
    if max_basis is not None and max_basis < total + 2:
        sizes = " + ".join(["k"] if len(wants) == 1 else [str(k) for k, _ in wants])
        raise ValueError(f"max_basis must be at least {sizes} + 2 = {total + 2}, got {max_basis}")
    max_iter = max(total, max_iter)
    limit = min(max_iter, size)  # a basis never holds more
    rows = None  # a host basis: vectors per slab streamed to the device
    if settings.basis_device == "host":
        rows = max(1, HOST_SLAB_BYTES // (op.size * op.dtype.itemsize))
    first = start_vector(op, generator, v0)
    process = LanczosProcess(op, first, generator, max_basis, keep_images, limit, rows)
    del first  # the process holds it as a unit vector
    histories: list[list[list[float]]] = [[] for _ in wants]
    checked = [k >= 2 for k, _ in wants]  # one value needs no copies
    starts, check_from, locked, scale = 0, 0, None, 0.0
    complete = not any(checked)
    while True:
        process.step()
        theta, s, residuals = process.ritz()
        # while checking, one more pair at a checked end: the best the fresh start has found
        picks = [
            select(theta, k + (locked is not None and c), which)
            for (k, which), c in zip(wants, checked, strict=True)
        ]
        for history, wanted, (k, _) in zip(histories, picks, wants, strict=True):
            history.append(theta[wanted[:k]].tolist())
        scale = max(scale, float(theta.abs().max()))  # of the whole run: a lock shrinks T
        converged = [residuals[wanted] <= tol * scale for wanted in picks]
        if progress is not None:
            progress("lanczos", process.steps, max_iter)
        done = all(
            len(wanted) >= k and bool(ok.all())
            for (k, _), wanted, ok in zip(wants, picks, converged, strict=True)
        )
        if process.exhausted:
            complete = True  # the basis spans the whole space: every copy is in it
            break
        if done and not complete:
            tops = torch.cat([theta[p[:k]] for p, (k, _) in zip(picks, wants, strict=True)])
            if locked is not None and bool(((tops - locked).abs() <= tol * scale).all()):
                complete = True  # the last fresh start found no further copy
            elif total < size:
                keep = torch.unique(
                    torch.cat([p[:k] for p, (k, _) in zip(picks, wants, strict=True)])
                )
                if locked is None:
                    check_from = op.n_products
                process.lock(keep)
                locked, starts = tops, starts + 1
                continue
        if done or process.steps >= max_iter:
            break
        if max_basis is not None and process.count >= max_basis:
            extra = (max_basis - sum(len(p) for p in picks)) // (2 * len(wants))
            kept = [
                select(theta, len(p) + extra, which)
                for p, (_, which) in zip(picks, wants, strict=True)
            ]
            process.restart(torch.unique(torch.cat(kept)))
    picks = [wanted[:k] for wanted, (k, _) in zip(picks, wants, strict=True)]
    converged = [ok[:k] for ok, (k, _) in zip(converged, wants, strict=True)]
    check = MultiplicityCheck(starts, complete, op.n_products - check_from if starts else 0)
    ritz = []
    for wanted in picks:
        coords = s[:, wanted].to(dtype=op.dtype, device=op.device)
        vectors = combine(coords.T, process.vectors, process.rows)
        lengths = torch.tensor([norm(v, over) for v in vectors], dtype=op.dtype, device=op.device)
        images = None
        if process.images is not None:
            images = combine(coords.T, process.images[: process.count], process.rows)
            images.div_(lengths[:, None])
        ritz.append((vectors.div_(lengths[:, None]), images))
    subspace = None
    if keep_subspace:
        subspace = Subspace(process.vectors, float(theta.sum()), float(scale), process.rows)
    steps = process.steps
    del process  # the basis is not needed by the verifying products
    found = []
    for wanted, ok, (vectors, images) in zip(picks, converged, ritz, strict=True):
        values, errors = theta[wanted], residuals[wanted]
        if images is not None:
            values, errors = rayleigh_quotients(vectors, images, over)
            ok = errors <= tol * scale
        elif verify:
            values, errors = rayleigh_quotients(vectors, (op.matvec(v) for v in vectors), over)
            ok = errors <= tol * scale
        found.append((vectors, values, errors, ok, images))
    return [
        EigenResult(
            eigenvalues=values,
            eigenvectors=vectors,
            residuals=errors,
            converged=ok,
            n_products=op.n_products - products,
            n_iterations=steps,
            seconds=time.perf_counter() - start,
            method="lanczos",
            which=which,
            history=history,
            subspace=subspace,
            images=images,
            multiplicity=check if c else None,
        )
        for c, (_, which), (vectors, values, errors, ok, images), history in zip(
            checked, wants, found, histories, strict=True
        )
    ]
