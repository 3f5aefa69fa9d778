"""Peak memory and time of one Hessian product with the memory levers (micro-batches, Hugging
Face activation checkpointing) per backend, on a small GPT-2 (6 blocks, width 128, 1.48 M
parameters) and 16 × 256 tokens, float32, CPU, one thread.

Run by hand: ``python benchmarks/bench_memory_levers.py``. Each case runs in a fresh process
(peak resident memory is a process's own); the figure is the increase of the peak over what
the process held before the product, and the time is that one product's (after a first one).
"""

from __future__ import annotations

import itertools
import resource
import subprocess
import sys
import time

CASES = list(itertools.product(("double-backward", "finite-difference"), (0, 4), (0, 1)))
"""(backend, micro-batch (0: none), checkpointing)."""


def one(backend: str, micro: int, checkpointing: bool) -> str:
    """One product's peak memory increase (MB) and seconds, as a table row."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharpscope.curvature import HessianOperator, Objective
    from sharpscope.io.losses import resolve_loss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = GPT2Config(
        vocab_size=2000,
        n_positions=256,
        n_embd=128,
        n_layer=6,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    ids = torch.randint(0, 2000, (16, 256))
    objective = Objective(
        GPT2LMHeadModel(config),
        resolve_loss("causal-lm"),
        [({"input_ids": ids}, ids)],
        micro_batch=micro or None,
        checkpointing=checkpointing,
    )
    op = HessianOperator(objective, backend=backend, cache_graph=False, validate=False)
    v = torch.randn(op.size)
    op.fd_scale = 1.0  # finite differences: skip the first product's choice of step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    op @ v
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    lever = f"{micro or '-'} | {'on' if checkpointing else '-'}"
    return f"| {backend} | {lever} | {peak:,.0f} MB | {seconds:.2f} s |"


def main() -> None:
    if len(sys.argv) == 4:
        print(one(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"))
        return
    print("| backend | micro-batch | checkpointing | peak memory of a product | time |")
    print("| --- | --- | --- | --- | --- |")
    for backend, micro, checkpointing in CASES:
        args = [sys.executable, __file__, backend, str(micro), str(int(checkpointing))]
        print(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
