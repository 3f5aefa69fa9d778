"""Products per second of the Hessian, GGN and Fisher operators, beside curvlinops' and
hessian-eigenthings' GGN on the same batch.

Run by hand from the repository root::

    python benchmarks/bench_curvature.py [--workload mlp|cnn|minilm|all] [--repeats N]

Workloads: the digits MLP and the benchmark CNN of bench_engine.py (float32, eval mode, one batch
of 512 and 128 samples), and the MiniLM classifier of bench_transformers.py (one batch of 8 x 128
tokens). Each operator's first product (which builds what later ones reuse) is left out;
then ``--repeats`` rounds each run every operator's product once, and each one's median is
shown. Each peer's GGN product is compared with sharpscope's on the same vector (relative
difference), so the rows are the same matrix. Peers not installed are skipped with a note. The
Markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from bench_engine import build_cnn, build_mlp
from bench_transformers import build

from sharpscope import HessianOperator
from sharpscope.curvature import EmpiricalFisherOperator, FisherOperator, GGNOperator, Objective
from sharpscope.curvature.attention import twice_differentiable
from sharpscope.io.losses import resolve_loss

CE = resolve_loss("cross-entropy")


def workload(key: str) -> tuple[nn.Module, list, str]:
    """The model, its one batch, and a description."""
    if key == "minilm":
        model, batches = build("minilm")
        return model, batches, "MiniLM-L6 classifier, 8 x 128 tokens"
    w = {"mlp": build_mlp, "cnn": build_cnn}[key]()
    return w.model, [(w.inputs, w.targets)], w.title


class Logits(nn.Module):
    """A Hugging Face classifier called on a dict of inputs, returning its logits (for peers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs).logits


def peer_products(
    model: nn.Module, batches: list
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The GGN products of the installed peers on the same batch."""
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    dict_inputs = isinstance(batches[0][0], dict)
    func = Logits(model) if dict_inputs else model
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        import curvlinops

        version = importlib.metadata.version("curvlinops-for-pytorch")
        op = curvlinops.GGNLinearOperator(
            func,
            nn.CrossEntropyLoss(),
            params,
            batches,
            check_deterministic=False,
            batch_size_fn=(lambda x: x["input_ids"].shape[0]) if dict_inputs else None,
        )
        found[f"curvlinops {version} GGNLinearOperator"] = op.__matmul__
    except ImportError as exc:
        print(f"curvlinops skipped: {exc}", file=sys.stderr)
    try:
        import hessian_eigenthings as he

        version = importlib.metadata.version("hessian-eigenthings")
        op = he.GGNOperator(
            model,
            batches,
            (lambda m, b: m(**b[0]).logits) if dict_inputs else (lambda m, b: m(b[0])),
            lambda out, b: nn.functional.cross_entropy(out, b[1]),
        )
        found[f"hessian-eigenthings {version} GGNOperator"] = op.matvec
    except ImportError as exc:
        print(f"hessian-eigenthings skipped: {exc}", file=sys.stderr)
    return found


def timed_rounds(
    products: dict[str, Callable[[torch.Tensor], torch.Tensor]], v: torch.Tensor, repeats: int
) -> dict[str, tuple[float, torch.Tensor]]:
    """Each product's median time over ``repeats`` rounds that run every product once in turn
    (so a load change on the shared machine hits all alike), after a first untimed product;
    and the product itself."""
    times: dict[str, list[float]] = {name: [] for name in products}
    with twice_differentiable():
        results = {name: product(v).detach() for name, product in products.items()}
        for _ in range(repeats):
            for name, product in products.items():
                start = time.perf_counter()
                product(v)
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in products}


def run(key: str, repeats: int) -> list[str]:
    model, batches, description = workload(key)
    ours = {
        "sharpscope HessianOperator": HessianOperator(Objective(model, CE, batches)),
        "sharpscope GGNOperator": GGNOperator(Objective(model, CE, batches)),
        "sharpscope FisherOperator (drawn labels)": FisherOperator(Objective(model, CE, batches)),
        "sharpscope EmpiricalFisherOperator": EmpiricalFisherOperator(
            Objective(model, CE, batches)
        ),
    }
    size = ours["sharpscope GGNOperator"].size
    v = torch.randn(size, generator=torch.Generator().manual_seed(0))
    products = {name: op.matvec for name, op in ours.items()}
    rows = timed_rounds({**products, **peer_products(model, batches)}, v, repeats)
    hessian = rows["sharpscope HessianOperator"][0]
    ggn = rows["sharpscope GGNOperator"][1]
    lines = [
        f"**{key}**: {description}, {size:,} parameters",
        "",
        "| operator | s / product | products / s | time vs sharpscope Hessian | "
        "‖Gv − G_ours v‖ / ‖G_ours v‖ |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (seconds, product) in rows.items():
        same = "GGN" in name or "ggn" in name.lower()
        diff = (
            f"{float((product.reshape(-1) - ggn).norm() / ggn.norm()):.1e}"
            if same and "sharpscope" not in name
            else "—"
        )
        lines.append(
            f"| {name} | {seconds:.4g} | {1 / seconds:.3g} | {seconds / hessian:.2f}x | {diff} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["mlp", "cnn", "minilm", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keys = ["mlp", "cnn", "minilm"] if args.workload == "all" else [args.workload]
    print(
        f"- command: `python {' '.join(sys.argv)}`\n- torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, float32; median of {args.repeats} rounds "
        "(each runs every operator's product once) after a first untimed product\n"
    )
    for key in keys:
        print("\n".join(run(key, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
