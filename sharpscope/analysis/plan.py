"""What an analysis will cost, known before its long stages: sizes, the most products each stage
may take, the measured time of one product, the memory of the eigen-solver's vectors, and the
Hessian backend ``auto`` chooses for that memory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sharpscope import distributed

MEMINFO = Path("/proc/meminfo")
BASIS_SHARE = 0.5
"""The share of the free memory the eigen-solver's vectors may take before the basis is bounded."""
GRAPH_SAFETY = 4.5
"""``auto`` takes double backward when this many times its graph's estimate
(:meth:`~sharpscope.curvature.HessianOperator.graph_bytes`) fits the free memory: the peak while
the graph is built and differentiated was 1.9 to 3.4 times the estimate on CPU (VmHWM; two MLPs
and two GPT-2s, docs/engine.md, "backend auto"), 3.65 times on a loaded machine."""
LEAN_MARGIN = 4.0
"""The finite-difference step search holds a second product (:meth:`~sharpscope.curvature.
HessianOperator._chosen_step`) only when this many vectors fit the free memory at its first
product: beside that one it must still hold the product's buffer and a backward's activations."""
TYPICAL_LANCZOS = 50
"""The products one Lanczos solve of the top-k and λ_min typically takes at the default tolerance:
43–57 on the digits MLP for k = 1 to 10, about 30 on the benchmark CNN (docs/benchmarks.md, "Cost
of a default analyze"); its bound, ``max_iter``, is about 4 times more."""


def sizes(count: float) -> str:
    """Bytes as B, kB, MB, GB or TB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


@dataclass(frozen=True)
class BackendChoice:
    """The Hessian backend ``auto`` chose, from the double-backward graph's estimated bytes
    (None: one batch's graph did not fit) and the free memory (None: unknown)."""

    backend: str
    graph_bytes: int | None
    available_bytes: int | None
    given: str | None = None
    """The reason when the memory did not decide (a model sharded by FSDP2 takes finite
    differences only)."""

    @property
    def reason(self) -> str:
        """Why, in words: ``the double-backward graph ≈ 9.1 GB would not fit 6.0 GB free``."""
        if self.given is not None:
            return self.given
        if self.graph_bytes is None:
            return "one batch's double-backward graph did not fit in memory"
        graph = f"the double-backward graph ≈ {sizes(self.graph_bytes)}"
        if self.available_bytes is None:
            return f"{graph}; the free memory is unknown"
        fits = "fits in" if self.backend == "double-backward" else "would not fit in"
        return f"{graph} (× {GRAPH_SAFETY:g} at its peak) {fits} {sizes(self.available_bytes)} free"


def chosen_backend(graph_bytes: int | None, available: int | None) -> BackendChoice:
    """Double backward when :data:`GRAPH_SAFETY` times ``graph_bytes`` fits ``available`` (or
    the free memory is unknown), else finite differences (a gradient's memory)."""
    fits = graph_bytes is not None and (
        available is None or GRAPH_SAFETY * graph_bytes <= available
    )
    backend = "double-backward" if fits else "finite-difference"
    return BackendChoice(backend, graph_bytes, available)


def auto_backend(ops: Sequence[Any], available: int | None) -> BackendChoice:
    """``auto``'s choice for the double-backward Hessian operators ``ops`` (a run's graphs, one
    at a time), given the free bytes on their device (:func:`available_memory`): rank 0's
    estimate of the largest cached graph (:meth:`~sharpscope.curvature.HessianOperator.
    graph_bytes`; None when one did not fit) against rank 0's ``available``, so that every rank
    chooses alike."""
    try:
        graph: int | None = max(op.graph_bytes() for op in ops)
    except torch.OutOfMemoryError:
        graph = None
    return chosen_backend(*distributed.main_value((graph, available)))


@dataclass(frozen=True)
class Plan:
    """The cost of an analysis, as far as it is known before its long stages."""

    num_params: int
    num_samples: int
    num_batches: int
    products: dict[str, int]
    """Stage -> the most products it may take (solvers that converge stop sooner)."""
    typical: dict[str, int]
    """Stage -> the products it typically takes (:data:`TYPICAL_LANCZOS`; a stage of a fixed
    count, or without a known typical count, its bound)."""
    seconds_per_product: float
    """One product, timed on the operator before the eigen stage."""
    vector_bytes: int
    """Bytes of one vector of the operator's size."""
    vectors: int
    """The most such vectors the eigen-solver holds at once."""
    available_bytes: int | None
    """Free memory on the operator's device; None where it cannot be read."""
    chosen_max_basis: int | None = None
    """The Lanczos bound chosen because the whole basis would not fit (None: none chosen)."""
    threads: int = 1
    """torch's intra-op CPU threads when the product was timed (``torch.get_num_threads()``)."""
    backend: BackendChoice | None = None
    """The Hessian backend ``auto`` chose, and why (None: a backend was named)."""
    host_bytes: int | None = None
    """Free host memory when the eigen-solver's vectors lie there (:func:`basis_home`; None:
    they lie on the operator's device)."""
    shard_bytes: int | None = None
    """Under ``fsdp``: bytes of rank 0's shards of the model's parameters (None: not sharded;
    ``vector_bytes`` is then a gradient's shard, and the vectors are rank 0's pieces)."""
    lean_search: bool = False
    """Whether the finite-difference step search runs with one product's buffer
    (:attr:`~sharpscope.curvature.HessianOperator.fd_lean`, :func:`lean_search`)."""

    @property
    def most_products(self) -> int:
        """All stages' most products together."""
        return sum(self.products.values())

    @property
    def typical_products(self) -> int:
        """All stages' typical products together."""
        return sum(self.typical.values())

    @property
    def most_seconds(self) -> float:
        """The longest the long stages may take, at the measured time per product."""
        return self.most_products * self.seconds_per_product

    @property
    def typical_seconds(self) -> float:
        """What the long stages typically take, at the measured time per product."""
        return self.typical_products * self.seconds_per_product

    @property
    def basis_bytes(self) -> int:
        """The memory of the eigen-solver's vectors."""
        return self.vectors * self.vector_bytes


def available_memory(device: torch.device) -> int | None:
    """Free memory in bytes: CUDA's free device memory, or Linux's MemAvailable for the CPU; None
    where neither can be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def lean_search(vector_bytes: int, available: int | None) -> bool:
    """Whether the finite-difference step search should run with one product's buffer: when
    :data:`LEAN_MARGIN` vectors of ``vector_bytes`` would not fit ``available`` (unknown: not)."""
    return available is not None and LEAN_MARGIN * vector_bytes > available


def basis_home(
    setting: str,
    device: torch.device,
    vector_bytes: int,
    wanted: int,
    device_free: int | None,
    host_free: int | None,
) -> str:
    """Where the eigen-solver's ``wanted`` vectors lie for the ``basis_device`` ``setting``: as
    named, or for ``auto`` the host when the operator is on CUDA and they would not fit
    :data:`BASIS_SHARE` of the device's free memory but fit that share of the host's; else the
    device (where :func:`fitting_basis` bounds them when they do not fit)."""
    if setting != "auto":
        return setting
    if device.type != "cuda" or fitting_basis(vector_bytes, device_free, wanted) is None:
        return "device"
    host_fits = host_free is not None and fitting_basis(vector_bytes, host_free, wanted) is None
    return "host" if host_fits else "device"


def fitting_basis(vector_bytes: int, available: int | None, wanted: int) -> int | None:
    """The most vectors that fit in :data:`BASIS_SHARE` of ``available``, when ``wanted`` do
    not (None when they do, or when the free memory is unknown)."""
    if available is None or wanted * vector_bytes <= BASIS_SHARE * available:
        return None
    return int(BASIS_SHARE * available // vector_bytes)
