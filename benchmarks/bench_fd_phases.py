"""Where a finite-difference solve's memory goes: each phase's own peak against a training step's.

Run by hand from the repository root::

    MALLOC_MMAP_THRESHOLD_=1048576 python benchmarks/bench_fd_phases.py
        [--workload gpt2|qwen2-0.5b|...] [--device auto|cpu|cuda] [--batch 8] [--length 128]
        [--lean]

One process, one of ``bench_scale.py``'s workloads (random init from a config, one batch). Each
phase's peak is its own (``bench_fsdp.py``'s: the resident set's high-water mark reset through
/proc/self/clear_refs on the CPU, allocated memory on a GPU), beside what the process holds
before it (the weights, the vector):

- ``step sgd``: one plain training step (the reference);
- ``first product``: the first finite-difference product, which chooses the step (Richardson
  estimates over step sizes: one product held while another is taken; with ``--lean``, one
  product's buffer, about twice the products, ``HessianOperator(lean=True)``);
- ``product``: a later product (the vector and the product's buffer beside a backward);
- ``difference error``: the Richardson estimate on a vector whose product is held
  (``HessianOperator.difference_error``, as ``analyze`` takes on each reported eigenvector);
- ``refine step``: the step chosen again on a vector (``HessianOperator.refine_step``).

The resident set on the CPU counts what glibc keeps of freed blocks: set its mmap threshold as
above (docs/benchmarks.md §16).
"""

from __future__ import annotations

import argparse
import time

import bench_scale
import torch
from bench_fsdp import phase_peak, reset_peak, resident_mib

from sharpscope import HessianOperator
from sharpscope.cli.loading import resolve_device
from sharpscope.curvature import Objective
from sharpscope.errors import InputError
from sharpscope.io.losses import loss_name, resolve_loss


def sgd_step(model: torch.nn.Module, loss, inputs: dict, ids: torch.Tensor) -> None:
    """One plain training step: forward, backward, ``SGD.step``."""
    loss(model(**inputs), ids).backward()
    torch.optim.SGD(model.parameters(), lr=1e-5).step()


def measure(
    key: str, device: torch.device, lean: bool | None
) -> tuple[list[tuple[str, float, float, float]], str]:
    """Per phase: its name, the memory held before it, its peak and its seconds (MiB, s), with
    the step search ``lean`` (None: as the free memory decides); and the search in words."""
    model, batches = bench_scale.build(key, str(device))
    loss = resolve_loss(loss_name("auto", model))
    rows = []

    def phase(name: str, fn, *args) -> object:
        reset_peak(device)
        before, start = resident_mib(device), time.perf_counter()
        out = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append((name, before, phase_peak(device), time.perf_counter() - start))
        return out

    (inputs, ids), *_ = batches
    phase("step sgd", sgd_step, model, loss, inputs, ids)
    model.zero_grad(set_to_none=True)
    op = HessianOperator(Objective(model, loss, batches), backend="finite-difference", lean=lean)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0)).to(device)
    v /= v.norm()
    phase("first product", op.matvec, v)
    phase("product", op.matvec, v)
    phase("difference error", op.difference_error, v, op.matvec(v))
    phase("refine step", op.refine_step, v, 1e-4)
    search = "lean" if op.fd_lean else "two products held"
    return rows, f"step search {search}: scale {op.fd_scale:g}, {op.n_products} products in all"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=bench_scale.WORKLOADS, default="gpt2")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=bench_scale.SHAPE["batch"])
    parser.add_argument("--length", type=int, default=bench_scale.SHAPE["length"])
    parser.add_argument("--lean", action="store_true", help="the step search with one buffer")
    args = parser.parse_args()
    if args.batch < 1 or args.length < 2:
        parser.error("--batch must be at least 1 and --length at least 2")
    try:
        device = resolve_device(args.device)
    except InputError as exc:
        parser.error(str(exc))
    bench_scale.SHAPE.update(batch=args.batch, length=args.length)
    rows, search = measure(args.workload, device, True if args.lean else None)
    step_peak = rows[0][2]
    print(f"{args.workload}, {args.batch} × {args.length} tokens, {device}; {search}")
    print("| phase | held before MiB | peak MiB | × SGD step | s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, before, peak, seconds in rows:
        print(f"| {name} | {before:.0f} | {peak:.0f} | {peak / step_peak:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
