"""What ``analyze`` computes, and how precisely: :class:`AnalyzeConfig`, checked when made
without importing torch (so that the command line refuses a bad option before it loads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sharpscope.analysis.fsdp_settings import check_sharded
from sharpscope.choices import (
    ADAPTIVE_KINDS,
    ADAPTIVE_NORMS,
    BACKEND_CHOICES,
    BASIS_DEVICE_CHOICES,
    CURVATURE_NAMES,
    REDUCTIONS,
    SOLVER_NAMES,
)
from sharpscope.errors import InputError, check_choice, check_finite_fields
from sharpscope.io.load_spec import RUN
from sharpscope.settings import setting

if TYPE_CHECKING:
    from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings
    from sharpscope.curvature.solvers import SolveSettings
Method = Literal["lanczos", "power", "pyhessian"]
HESSIAN = "Hessian"
SAM = "SAM alignment"
ADAPTIVE = "Adaptive sharpness"


@dataclass(frozen=True)
class AnalyzeConfig:
    """What to compute, and how precisely; checked when made (an :class:`InputError` naming the
    parameter). Each field is declared with its help and flag
    (:func:`~sharpscope.settings.setting`).

    Example:
        >>> AnalyzeConfig(k=3, trace=False).max_iter
        200
    """

    k: int = setting(
        5, help="How many top eigenpairs.", flag="--top-k", short="-k", common=True, panel=HESSIAN
    )
    method: Method = setting(
        "lanczos", help=f"Eigen-solver: {', '.join(SOLVER_NAMES)}.", panel=HESSIAN
    )
    tol: float = setting(
        1e-4, help="Stop when every residual ‖Hv − λv‖ ≤ tol·|λ_max|.", panel=HESSIAN
    )
    max_iter: int = setting(
        200,
        help="Most Hessian-vector products per solve. Power iteration: per pair. Lanczos then "
        "takes one more per returned pair, which measures its true residual.",
        common=True,
        panel=HESSIAN,
    )
    max_basis: int | None = setting(
        None,
        help="Lanczos: keep at most this many vectors of the model's size in memory (thick "
        "restarts; more products, raise --max-iter). Default: all.",
        panel=HESSIAN,
    )
    basis_device: str = setting(
        "auto",
        help="Lanczos: where its vectors lie: device, or host (pinned, streamed to the device). "
        "auto: the host when they would not fit the device's free memory but fit the host's.",
        panel=HESSIAN,
    )
    seed: int = setting(0, help="Seed for data subsets and random vectors.", panel=RUN)
    trace: bool = setting(
        True, help="Estimate the trace (Hutch++).", common=True, panel=HESSIAN, negatable=True
    )
    trace_tol: float = setting(
        4e-3,
        help="The trace's target standard error, relative: 2.5 SE within 1 %, so that the "
        "estimate lands within 1 % for about 99 % of seeds (at 0.5 % it was 95 %).",
        cli=False,
    )
    trace_samples: int = setting(100, help="The trace's most Hutch++ samples.", cli=False)
    density: bool = setting(
        False, help="Estimate the spectral density (SLQ).", common=True, panel=HESSIAN
    )
    density_vectors: int = setting(4, help="The density's SLQ start vectors.", cli=False)
    density_iter: int = setting(80, help="The density's Lanczos steps per vector.", cli=False)
    per_layer: bool = setting(
        False, help="Top eigenvalue of each module's block.", common=True, panel=HESSIAN
    )
    rho: float = setting(0.05, help="SAM radius ρ.", panel=SAM)
    alpha: float = setting(0.2, help="Eigen-SAM's α.", panel=SAM)
    backend: str = setting(
        "double-backward",
        help=f"HVP backend: {', '.join(BACKEND_CHOICES)} (the Hessian's products only). "
        "finite-difference: two gradients per product at a gradient's memory, any attention "
        "kernel, smooth activations only; its error is estimated and in the bounds. auto: "
        "double-backward when its graph fits the free memory (docs/engine.md).",
        panel=HESSIAN,
    )
    curvature: str = setting(
        "hessian",
        help=f"The matrix analysed: {', '.join(CURVATURE_NAMES)}. Fisher: labels drawn from the "
        "model, seeded by --seed; empirical-fisher: the data's labels. See docs/engine.md.",
        common=True,
        panel=HESSIAN,
    )
    batch_stats: bool = setting(
        False,
        help="BatchNorm on batch statistics (train mode) instead of running statistics.",
        panel=HESSIAN,
    )
    micro_batch: int | None = setting(
        None,
        help="Run each batch's Hessian products in chunks of at most this many samples: the "
        "same matrix at one chunk's memory; no graph is kept between products.",
        panel=HESSIAN,
    )
    gradient_checkpointing: bool = setting(
        False,
        help="Hugging Face models: recompute each layer's activations in the backward pass "
        "(non-reentrant) instead of keeping them.",
        panel=HESSIAN,
    )
    reduction: str = setting(
        "mean",
        help="How the loss reduces a batch: mean (the curvature of the mean loss) or sum (of the "
        "total loss; a built-in loss then sums). A --loss function is checked on the halves of "
        "a batch.",
        panel=HESSIAN,
    )
    params: Sequence[str] | None = setting(
        None,
        help="Only parameters whose name matches this glob (repeatable, e.g. 'fc.*').",
        common=True,
        panel=HESSIAN,
    )
    exclude: Sequence[str] | None = setting(
        None,
        help="Leave out parameters whose name matches this glob (repeatable; after --params), "
        "e.g. '*word_embeddings*'.",
        panel=HESSIAN,
    )
    slices: bool = setting(
        False,
        help="Also measure the loss along v₁ and along ĝ, at 21 points in ±2ρ (for plots).",
        cli=False,
    )
    shards: int = setting(
        8,
        help="Disjoint shards of the samples for each figure's spread over other samples of "
        "this size (a jackknife: about top-k + 11 more products); 0 = off.",
        panel=HESSIAN,
    )
    adaptive_sharpness: str | None = setting(
        None,
        help="Also measure the adaptive sharpness: worst or average. The worst-case (ascent) or "
        "average-case (random draws) L(w+δ) − L(w) over ‖δ/|w|‖ ≤ ρ (Andriushchenko et al. "
        "2023).",
        common=True,
        panel=ADAPTIVE,
    )
    adaptive_norm: str = setting(
        "l2", help="Its ball: l2 or linf (average case: Gaussian or uniform draws).", panel=ADAPTIVE
    )
    adaptive_rho: float = setting(0.1, help="Its radius ρ.", panel=ADAPTIVE)
    adaptive_steps: int = setting(
        20, help="Its ascent steps (worst) or random draws (average).", panel=ADAPTIVE
    )
    adaptive_scale: bool = setting(
        True,
        help="Scale the ball by |w| (adaptive: invariant to rescaling layers); off: a plain ball.",
        panel=ADAPTIVE,
        negatable=True,
    )
    critical_sharpness: bool = setting(
        True,
        help="Also the critical sharpness 2/η_c along −g (Kalra et al. 2026): the smallest "
        "step that raises the loss, by a line search of about 8 forward passes.",
        panel=HESSIAN,
        negatable=True,
    )
    bias: bool = setting(
        False,
        help="Also estimate each figure's sample-size bias by solving it on every shard (about "
        "one more eigen-solve); the spread's intervals then allow for it.",
        panel=HESSIAN,
        negatable=True,
    )
    fsdp: bool = setting(
        False,
        help="Under torchrun: shard the parameters over the ranks with FSDP2 (per transformer "
        "block, then the root); products by finite differences on sharded vectors. "
        "docs/distributed.md.",
        panel=RUN,
    )

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice("method", self.method, SOLVER_NAMES)
        check_choice("backend", self.backend, BACKEND_CHOICES)
        check_choice("basis_device", self.basis_device, BASIS_DEVICE_CHOICES)
        check_choice("curvature", self.curvature, CURVATURE_NAMES)
        check_choice("reduction", self.reduction, REDUCTIONS)
        for name in ("k", "max_iter", "trace_samples", "density_vectors", "density_iter"):
            if getattr(self, name) < 1:
                raise InputError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        for name in ("tol", "trace_tol", "rho"):
            if not getattr(self, name) > 0:
                raise InputError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise InputError(f"`micro_batch` must be at least 1, got {self.micro_batch}")
        if self.shards == 1 or self.shards < 0:
            raise InputError(f"`shards` must be 0 (off) or at least 2, got {self.shards}")
        if not self.alpha >= 0:
            raise InputError(f"`alpha` must not be negative, got {self.alpha}")
        if self.adaptive_sharpness is not None:
            check_choice("adaptive_sharpness", self.adaptive_sharpness, ADAPTIVE_KINDS)
        check_choice("adaptive_norm", self.adaptive_norm, ADAPTIVE_NORMS)
        if not self.adaptive_rho > 0:
            raise InputError(f"`adaptive_rho` must be positive, got {self.adaptive_rho}")
        if self.adaptive_steps < 1:
            raise InputError(f"`adaptive_steps` must be at least 1, got {self.adaptive_steps}")
        if self.max_basis is not None and self.max_basis < self.k + 3:
            raise InputError(
                f"`max_basis` must be at least `k` + 3 = {self.k + 3} (the top-k, λ_min and "
                f"two more), got {self.max_basis}"
            )
        if self.fsdp:
            check_sharded(self)

    def settings(self) -> SolveSettings:
        """The eigen-solver's part of the config (``auto`` keeps the basis on the device: the plan
        may move it to the host, :func:`~sharpscope.analysis.plan.basis_home`)."""
        from sharpscope.curvature.solvers import SolveSettings  # torch: only for the analysis

        home = "host" if self.basis_device == "host" else "device"
        return SolveSettings(self.tol, self.max_iter, self.seed, self.max_basis, home)

    def sharpness_settings(self) -> AdaptiveSharpnessSettings | None:
        """The adaptive sharpness's part of the config (None: not measured)."""
        from sharpscope.analysis.adaptive_sharpness import AdaptiveSharpnessSettings  # torch

        if self.adaptive_sharpness is None:
            return None
        return AdaptiveSharpnessSettings(
            kind=self.adaptive_sharpness,  # type: ignore[arg-type]
            norm=self.adaptive_norm,  # type: ignore[arg-type]
            rho=self.adaptive_rho,
            adaptive=self.adaptive_scale,
            steps=self.adaptive_steps,
            seed=self.seed,
        )
