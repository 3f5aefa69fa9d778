"""The one line that says, before the long stages, what an analysis will cost."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sharpscope.analysis.plan import BackendChoice, Plan, sizes

if TYPE_CHECKING:
    from sharpscope.training.sharded_state import RankShare


def duration(seconds: float) -> str:
    """Seconds as ms, s, min or h, to two significant figures."""
    for unit, size in (("h", 3600.0), ("min", 60.0), ("s", 1.0)):
        if seconds >= 2 * size or (unit == "s" and seconds >= 1):
            return f"{_figures(seconds / size)} {unit}"
    return f"{_figures(1000 * seconds)} ms"


def _figures(value: float) -> str:
    """``value`` to two significant figures, without an exponent."""
    return f"{float(f'{value:.2g}'):g}"


def backend_clause(choice: BackendChoice) -> str:
    """What ``backend`` auto chose and why (:attr:`BackendChoice.reason`), its parameter name in
    backticks."""
    return f"`backend` {choice.backend}: {choice.reason}"


def sharded_clause(share: RankShare) -> str:
    """``finetune``'s plan under ``fsdp``: what each rank holds of the parameters, of the
    optimizer's state and of the tracker's vectors (rank 0's shares)."""
    vectors = share.tracker_vectors
    return (
        f"plan: `fsdp` over {share.ranks} ranks: per rank {sizes(share.parameter_bytes)} of "
        f"parameter shards, {sizes(share.optimizer_bytes)} of optimizer state and the tracker's "
        f"vectors ≤ {sizes(vectors * share.parameter_bytes)} ({vectors} × "
        f"{sizes(share.parameter_bytes)}), sharded checkpoints"
    )


def plan_line(plan: Plan) -> str:
    """E.g. ``plan: 77,850 parameters, 1,024 samples in 8 batches; at most 322 products
    (eigenpairs 206, trace 100, sampling 16), ≈ 15 ms each on 2 CPU threads: typically ≈ 1.6 s,
    at most 4.8 s; Lanczos vectors ≤ 62 MB of 20 GB free``. Parameter names are in backticks (the
    CLI shows them as options)."""
    stages = ", ".join(f"{name} {count:,}" for name, count in plan.products.items())
    memory = f"solver vectors ≤ {sizes(plan.basis_bytes)}"
    if plan.shard_bytes is not None:  # every figure per rank (rank 0's)
        memory = (
            f"per rank: parameter shards {sizes(plan.shard_bytes)}, a gradient's shard "
            f"{sizes(plan.vector_bytes)}, solver vectors ≤ {sizes(plan.basis_bytes)} "
            f"({plan.vectors} × {sizes(plan.vector_bytes)})"
        )
    if plan.host_bytes is not None:
        memory += f" in host memory, streamed to the device ({sizes(plan.host_bytes)} free there"
        if plan.available_bytes is not None:
            memory += f", {sizes(plan.available_bytes)} on the device"
        memory += ")"
    elif plan.available_bytes is not None:
        memory += f" of {sizes(plan.available_bytes)} free"
    if plan.chosen_max_basis is not None:
        memory += (
            f"; the whole basis would not fit, so `max_basis` {plan.chosen_max_basis} is used "
            "(thick restarts: more products; set `max_basis` to choose)"
        )
    most = duration(plan.most_seconds)
    typical = duration(plan.typical_seconds)
    time = f"at most {most}" if typical == most else f"typically ≈ {typical}, at most {most}"
    if plan.backend is not None:
        memory += f"; {backend_clause(plan.backend)}"
    if plan.lean_search:
        memory += (
            "; the finite-difference step search is lean: one product's buffer instead of two, "
            "at about twice its products"
        )
    return (
        f"plan: {plan.num_params:,} parameters, {plan.num_samples:,} samples in "
        f"{plan.num_batches:,} batch(es); at most {plan.most_products:,} products ({stages}), "
        f"≈ {duration(plan.seconds_per_product)} each on {plan.threads} CPU thread"
        f"{'s' if plan.threads != 1 else ''}: {time}; {memory}"
    )
