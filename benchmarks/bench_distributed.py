"""Hessian-vector-product throughput of ``HessianOperator`` with 1, 2, ... torchrun processes.

Run by hand from the repository root (CPU, Gloo)::

    python benchmarks/bench_distributed.py [--procs 1 2] [--samples 4096] [--batch-size 256]
        [--hidden 256 256] [--products 20] [--threads 1] [--out FILE]

The data size is fixed: every run holds the same ``--samples`` synthetic CIFAR-shaped samples
(flattened, 3072 features) in ``--batch-size`` batches, split across the processes, and an MLP
with ``--hidden`` layers (float32). For each process count the script launches
``python -m torch.distributed.run --standalone`` on itself; each rank builds its shard's operator
(cached graph, the default), does one warm-up product, then ``--products`` timed products between
barriers. Rank 0 reports the wall time per product and every rank's peak resident memory. The
Markdown table goes to stdout (and to ``--out``); each process uses ``--threads`` threads, so
compare process counts at the same total number of cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sharpscope import HessianOperator, distributed
from sharpscope.curvature import Objective
from sharpscope.io.architectures import mlp

FEATURES = 3072
CLASSES = 10


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--products", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def shard_batches(args: argparse.Namespace) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's block of the fixed synthetic data (the same on every rank before sharding)."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.samples, FEATURES, generator=gen)
    targets = torch.randint(0, CLASSES, (args.samples,), generator=gen)
    pieces = list(zip(inputs.split(args.batch_size), targets.split(args.batch_size), strict=True))
    return [pieces[i] for i in distributed.shard(len(pieces))]


def worker(args: argparse.Namespace) -> None:
    """One rank: time ``--products`` products; rank 0 prints one JSON line."""
    torch.set_num_threads(args.threads)
    with distributed.launched():
        torch.manual_seed(0)
        model = mlp(in_features=FEATURES, hidden=tuple(args.hidden), num_classes=CLASSES)
        op = HessianOperator(Objective(model, F.cross_entropy, shard_batches(args)))
        v = torch.randn(op.size, generator=torch.Generator().manual_seed(1))
        start = time.perf_counter()
        op.matvec(v)  # builds the cached graph
        build = time.perf_counter() - start
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(args.products):
            v = op.matvec(v)
            v = v / torch.linalg.vector_norm(v)
        distributed.barrier()
        per_product = (time.perf_counter() - start) / args.products
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peaks = distributed.all_gather(peak_mib)
        if distributed.is_main():
            row = {"procs": distributed.world_size(), "params": op.size, "build_s": build}
            print(json.dumps({**row, "product_s": per_product, "peak_mib": max(peaks)}))


def launch(args: argparse.Namespace, procs: int) -> dict[str, float]:
    """Run the workers under torchrun; return rank 0's measurements."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        __file__,
        "--worker",
        *sys.argv[1:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        sys.exit(f"{procs} process(es) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace, rows: list[dict[str, float]]) -> str:
    """The Markdown report: settings, then one row per process count."""
    base = rows[0]["product_s"]
    lines = [
        f"HVP throughput, {args.samples} samples in batches of {args.batch_size}, MLP "
        f"{FEATURES}-{'-'.join(map(str, args.hidden))}-{CLASSES} ({rows[0]['params']:,} "
        f"parameters, float32), {args.threads} thread(s) per process, Gloo on CPU, "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}.",
        "",
        "| processes | graph build (s) | s / product | products / s | speed-up "
        "| peak RSS / rank (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['procs']} | {r['build_s']:.3f} | {r['product_s']:.4f} | "
            f"{1 / r['product_s']:.1f} | {base / r['product_s']:.2f}x | {r['peak_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        distributed.exit_now(0)  # finalising after Gloo collectives may abort
    rows = []
    for procs in args.procs:
        print(f"{procs} process(es)...", file=sys.stderr)
        rows.append(launch(args, procs))
    text = table(args, rows)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
