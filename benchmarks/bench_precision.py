"""The measurements behind docs/engine.md's finite-difference bounds, ``--backend auto``'s graph
estimate and the bfloat16 figures.

Run by hand from the repository root (a few minutes on 2 cores)::

    python benchmarks/bench_precision.py fd-bounds   # bounds against the dense float64 Hessian
    python benchmarks/bench_precision.py bf16        # bfloat16 products against float64
    python benchmarks/bench_precision.py graph mlp 1024 2048 4   # estimate, held, peak (bytes)

``graph`` runs one model (``mlp WIDTH BATCH BATCHES`` or ``gpt2 WIDTH BATCH BATCHES``) per
process: VmHWM is reset (``/proc/self/clear_refs``) before the cached graph is built.
"""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import torch
from torch import nn

from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.curvature import HessianOperator, Objective

TESTS = Path(__file__).resolve().parent.parent / "tests"
CONFIG = {"k": 2, "trace": False, "density": False, "shards": 0, "slices": False}


def dense_eigenvalues(model: nn.Module, batches: list) -> torch.Tensor:
    """The dense Hessian's eigenvalues, column by column by exact double backward, descending."""
    op = HessianOperator(Objective(model, nn.functional.cross_entropy, batches))
    columns = [op @ e for e in torch.eye(op.size, dtype=op.dtype)]
    return torch.linalg.eigvalsh(torch.stack(columns).double()).flip(0)


def fd_bounds() -> None:
    """Per run: the factor of the finite-difference estimate the bounds needed (≤ 1: held),
    and whether the bound without it missed."""
    for dtype in (torch.float64, torch.float32):
        for seed in range(4):
            for scale in (1.0, 3.0):
                for act in (nn.Tanh, nn.GELU):
                    torch.manual_seed(seed)
                    model = nn.Sequential(nn.Linear(4, 8), act(), nn.Linear(8, 3)).double()
                    x = scale * torch.randn(32, 4, dtype=torch.float64)
                    y = torch.randint(0, 3, (32,))
                    exact = dense_eigenvalues(model, [(x, y)])
                    config = AnalyzeConfig(backend="finite-difference", tol=1e-12, **CONFIG)
                    r = analyze(
                        model.to(dtype), nn.functional.cross_entropy, [(x.to(dtype), y)], config
                    )
                    values = torch.cat([r.top.eigenvalues, r.bottom.eigenvalues]).double()
                    distance = (values - torch.cat([exact[:2], exact[-1:]])).abs()
                    residual = torch.cat([r.top.residuals, r.bottom.residuals]).double()
                    error = r.product_error
                    fd = error.finite_difference * abs(r.lambda_max)
                    needed = float(((distance - residual - (error.absolute - fd)) / fd).max())
                    print(
                        f"{str(dtype)[6:]} seed {seed} scale {scale:g} {act.__name__}: "
                        f"needed {needed:.2f} of the estimate, without it "
                        f"{'missed' if needed > 0 else 'held'}"
                    )


def bf16() -> None:
    """bfloat16 products against float64 ones of the same weights, 3 random unit v."""
    sys.path[:0] = [str(TESTS), str(TESTS / "curvature")]
    from test_finite_difference import _objective

    for name in ("gpt2", "llama"):
        objective = _objective(name, torch.bfloat16)
        op = HessianOperator(objective)
        wide = HessianOperator(objective.replace(model=copy.deepcopy(objective.model).double()))
        errors = []
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            v = torch.randn(op.size, dtype=torch.float64, generator=g)
            truth = wide.matvec(v / v.norm())
            got = op.matvec((v / v.norm()).bfloat16()).double()
            errors.append(f"{float((got - truth).norm() / truth.norm()):.1e}")
        print(name, "bfloat16 relative error:", " ".join(errors))


def status(key: str) -> int:
    """A /proc/self/status figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def graph(kind: str, width: int, batch: int, count: int) -> None:
    """The estimate of the cached graph, and the memory held and at its peak (bytes)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(64, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.GELU(),
            nn.Linear(width, 10),
        )
        data = [(torch.randn(batch, 64), torch.randint(0, 10, (batch,))) for _ in range(count)]
        loss = nn.functional.cross_entropy
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=512,
            n_positions=128,
            n_embd=width,
            n_layer=2,
            n_head=4,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(config).eval()
        data = [({"input_ids": i}, i) for i in torch.randint(0, 512, (count, batch, 128))]

        def loss(out: object, y: torch.Tensor) -> torch.Tensor:
            logits = out.logits[:, :-1].reshape(-1, 512)  # type: ignore[attr-defined]
            return nn.functional.cross_entropy(logits, y[:, 1:].reshape(-1))

    op = HessianOperator(Objective(model, loss, data))
    gc.collect()
    base = status("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    v = torch.randn(op.size)
    op.matvec(v)
    op.matvec(v)
    held, peak = status("VmRSS:") - base, status("VmHWM:") - base
    estimate = op.graph_bytes()
    print(
        f"{kind} {width} {batch}x{count}: estimate {estimate:,}, held {held:,} "
        f"({held / estimate:.2f}x), peak {peak:,} ({peak / estimate:.2f}x)"
    )


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "graph":
        graph(arguments[0], *map(int, arguments[1:]))
    else:
        {"fd-bounds": fd_bounds, "bf16": bf16}[command]()
