"""What a bounded Lanczos basis (``max_basis``, thick restarts) costs in products and time.

Run by hand from the repository root (under a minute on 2 cores)::

    python benchmarks/bench_max_basis.py

On the digits MLP of ``bench_engine.py`` (analyze's default data: 1024 samples in batches of
128), the top-5 and the smallest eigenpair at tol 1e-4 with every basis kept and with
``max_basis`` m: products, seconds, the most basis vectors held, the largest eigenvalue
error against the unbounded run and whether every pair converged. Prints a Markdown table.
"""

from __future__ import annotations

import time

import bench_analyze
import bench_engine
import torch

from sharpscope import HessianOperator, lanczos
from sharpscope.curvature import Objective, SolveSettings

BASES = (None, 30, 20, 12, 8)


def main() -> None:
    """Solve with each basis size and print the table."""
    workload = bench_engine.build_mlp()
    op = HessianOperator(
        Objective(
            workload.model, torch.nn.functional.cross_entropy, bench_analyze.batches_of(workload)
        )
    )
    print(f"MLP on digits, {op.size:,} parameters, torch {torch.__version__}\n")
    print("| solve | max_basis | products | seconds | vectors held | max rel. error | converged |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for which, k in (("largest", 5), ("smallest", 1)):
        reference = None
        for m in BASES:
            start = time.perf_counter()
            result = lanczos(
                op, k, which=which, settings=SolveSettings(tol=1e-4, max_iter=2000, max_basis=m)
            )
            seconds = time.perf_counter() - start
            reference = result.eigenvalues if reference is None else reference
            scale = float(reference.abs().max())
            error = float((result.eigenvalues - reference).abs().max()) / scale
            held = result.n_products if m is None else min(m, result.n_products)
            print(
                f"| {which} {k} | {m or 'all'} | {result.n_products} | {seconds:.2f} | {held} | "
                f"{error:.1e} | {result.all_converged} |"
            )


if __name__ == "__main__":
    main()
