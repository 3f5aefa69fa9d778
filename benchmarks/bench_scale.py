"""Memory and time of a top-1 λ_max on causal LMs, per Hessian backend, against a training step.

Run by hand from the repository root::

    python benchmarks/bench_scale.py [--workload gpt2|qwen2-0.5b|llama-1b|llama-8b-lora|all]
        [--device auto|cpu|cuda] [--batch 8] [--length 128] [--products 12] [--tol 1e-3]
        [--backends double-backward,finite-difference] [--solvers lanczos,power] [--out FILE]

Workloads (random init from a config, no download; causal LMs, next-token cross-entropy, eval
mode, one batch of ``--batch`` × ``--length`` random token ids):

- ``gpt2``: GPT-2 small's shape (124M parameters), float32;
- ``qwen2-0.5b``: Qwen2-0.5B's shape (494M parameters, tied embeddings), float32;
- ``llama-1b``: Llama-3.2-1B's shape (1.24B parameters), weights stored in bfloat16 and analysed
  in float32 (what ``sharpscope analyze`` does with a bf16 checkpoint); meant for a GPU;
- ``llama-8b-lora``: Llama-3-8B's shape, weights stored in bfloat16 and analysed in float32,
  with a rank-16 LoRA adapter (``peft``) on the attention projections, the Hessian over the
  adapter's parameters only; meant for a GPU.

Each figure comes from a fresh process (``--workload`` and the batch shape are passed on):

- ``step sgd`` / ``step adamw``: one plain training step (forward, backward, ``optimizer.step``)
  over every trainable parameter, the reference a product's memory is compared with;
- ``<backend> <solver>``: the seconds of one gradient and of one product (its second, after the
  first has built what later ones reuse or chosen the finite-difference step), then a top-1
  solve stopped after ``--products`` products (or converged at ``--tol``; a finite-difference
  solve is redone when its step is chosen again on v₁, as in ``analyze``): Lanczos with
  ``max_basis`` 4 (the least ``analyze --top-k 1`` takes) or power iteration (its vector and
  the product); its λ_max estimate and the process's peak memory (resident set on the CPU,
  allocated memory on a GPU). The solves start from the same vector: the relative gap of one
  solver's λ_max over the backends is their agreement (a meaningful one where both converged).

A backend whose solve fails (out of memory, killed) is recorded with its exit status and the
next one runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from sharpscope import HessianOperator, lanczos, power_iteration
from sharpscope.cli.loading import resolve_device
from sharpscope.curvature import Objective, SolveSettings
from sharpscope.curvature.hvp import refined
from sharpscope.errors import InputError
from sharpscope.io.losses import loss_name, resolve_loss

WORKLOADS = ("gpt2", "qwen2-0.5b", "llama-1b", "llama-8b-lora")
BACKENDS = ("double-backward", "finite-difference")
SOLVERS = ("lanczos", "power")
LORA_RANK, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPE = {"batch": 8, "length": 128}
SOLVE_BASIS = 4


def config(key: str):
    """The transformers config of a workload (its architecture's shape, random init)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if key == "gpt2":
        return GPT2Config()  # 12 blocks, width 768, vocabulary 50257
    if key == "qwen2-0.5b":
        return Qwen2Config(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1e6,
        )
    width, mlp, layers = (2048, 8192, 16) if key == "llama-1b" else (4096, 14336, 32)
    return LlamaConfig(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=key == "llama-1b",
        rope_theta=5e5,
    )


def build(key: str, device: str) -> tuple[torch.nn.Module, list[tuple[dict, torch.Tensor]]]:
    """The workload's model on ``device`` in the dtype its products run in, and its one batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    stored = torch.float32 if key in ("gpt2", "qwen2-0.5b") else torch.bfloat16
    model = AutoModelForCausalLM.from_config(config(key), dtype=stored)
    model = model.float()  # bfloat16 weights are analysed in float32, as analyze does
    if key == "llama-8b-lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS)
        )
        for name, p in model.named_parameters():  # a trained adapter: B is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=1e-3)
    model.eval().to(device)
    ids = torch.randint(0, model.config.vocab_size, (SHAPE["batch"], SHAPE["length"]))
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return model, [(inputs, ids.to(device))]


def sync(device: str) -> None:
    """Wait for the device's queued work, so that wall times are the work's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_mib(device: str) -> float:
    """This process's peak memory: GPU allocations on CUDA, the resident set on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, device: str) -> float:
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def train_step(key: str, device: str, optimizer: str) -> dict:
    """One forward, backward and ``optimizer.step`` over the trainable parameters."""
    model, ((inputs, ids),) = build(key, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)(trainable, lr=1e-5)
    loss = resolve_loss(loss_name("auto", model))

    def step() -> None:
        opt.zero_grad()
        loss(model(**inputs), ids).backward()
        opt.step()

    seconds = timed(step, device)
    return {"seconds": seconds, "peak_mib": peak_mib(device)}


def product_seconds(op: HessianOperator, device: str) -> float:
    """The seconds of ``op``'s second product on a random vector (the first builds what later
    ones reuse or chooses the finite-difference step); the vector is freed before the solve."""
    v = torch.randn(op.size, device=device, dtype=op.dtype)
    op.matvec(v)
    return timed(lambda: op.matvec(v), device)


def solve(key: str, device: str, backend: str, solver: str, products: int, tol: float) -> dict:
    """One gradient's and one product's seconds, then a bounded top-1 solve."""
    model, batches = build(key, device)
    objective = Objective(model, resolve_loss(loss_name("auto", model)), batches)
    plain = HessianOperator(objective, cache_graph=False)  # a gradient, not the cached graph's
    plain.gradient()
    gradient_s = timed(plain.gradient, device)
    op = HessianOperator(objective, backend=backend)
    product_s = product_seconds(op, device)
    start = time.perf_counter()
    settings = SolveSettings(tol=tol, max_iter=products, max_basis=SOLVE_BASIS)
    method = lanczos if solver == "lanczos" else power_iteration
    result = refined(op, lambda: method(op, 1, settings=settings), tol)  # as analyze solves
    sync(device)
    return {
        "params": op.size,
        "gradient_s": gradient_s,
        "product_s": product_s,
        "solve_s": time.perf_counter() - start,
        "products": op.n_products - 2,  # the timed ones left out
        "lambda_max": float(result.eigenvalues[0]),
        "residual": float(result.residuals[0]),
        "converged": bool(result.converged[0]),
        "fd_error": op.fd_error,
        "peak_mib": peak_mib(device),
    }


def in_process(call: str) -> dict:
    """Run ``call`` (an expression of this module) in a fresh process with this batch shape;
    its JSON result, or its exit status when it failed (e.g. killed for memory)."""
    code = f"import json, bench_scale as b; b.SHAPE.update({SHAPE!r}); print(json.dumps(b.{call}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=sys.path[0]
    )
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [""]
        return {"failed": f"exit {out.returncode} {tail[0][:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def report(
    keys: list[str],
    device: str,
    backends: list[str],
    solvers: list[str],
    products: int,
    tol: float,
) -> Iterator[str]:
    """The markdown tables of every workload, line by line as they are measured."""
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
    yield (
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} threads, "
        f"batch {SHAPE['batch']} × {SHAPE['length']} tokens, top-1 by {', '.join(solvers)} "
        f"(Lanczos with max_basis {SOLVE_BASIS}), at most {products} products, tol {tol:g}"
    )
    for key in keys:
        log(f"{key}: training steps ...")
        steps = {o: in_process(f"train_step({key!r}, {device!r}, {o!r})") for o in ("sgd", "adamw")}
        yield from [
            "",
            f"### {key}",
            "",
            "| run | peak MiB | × SGD step | × AdamW step | gradient s | product s | "
            "product / gradient | products | λ_max | converged | FD error |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        ]
        for name, step in steps.items():
            yield f"| step {name} | {_peak(step)} | | | | | | | | | |"
        estimates = {}
        for backend in backends:
            for solver in solvers:
                log(f"{key}: {backend} {solver} ...")
                call = f"solve({key!r}, {device!r}, {backend!r}, {solver!r}, {products}, {tol})"
                row = in_process(call)
                yield _row(f"{backend} {solver}", row, steps)
                if "lambda_max" in row:
                    estimates[backend, solver] = row["lambda_max"]
        for solver in solvers:  # the backends' agreement, solver by solver
            values = [v for (_, s), v in estimates.items() if s == solver]
            if len(values) > 1:
                gap = (max(values) - min(values)) / max(abs(v) for v in values)
                yield from ["", f"λ_max by {solver}, the backends' relative gap: {gap:.1e}"]


def _peak(row: dict) -> str:
    return row["failed"] if "failed" in row else f"{row['peak_mib']:.0f}"


def _row(backend: str, row: dict, steps: dict) -> str:
    if "failed" in row:
        return f"| {backend} | {row['failed']} | | | | | | | | | |"
    ratios = [
        f"{row['peak_mib'] / s['peak_mib']:.2f}" if "peak_mib" in s else "—" for s in steps.values()
    ]
    error = "—" if row["fd_error"] is None else f"{row['fd_error']:.1e}"
    return (
        f"| {backend} | {row['peak_mib']:.0f} | {' | '.join(ratios)} | {row['gradient_s']:.2f} | "
        f"{row['product_s']:.2f} | {row['product_s'] / row['gradient_s']:.2f} | "
        f"{row['products']} | {row['lambda_max']:.6g} | {'yes' if row['converged'] else 'no'} | "
        f"{error} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="gpt2")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=SHAPE["batch"])
    parser.add_argument("--length", type=int, default=SHAPE["length"])
    parser.add_argument("--products", type=int, default=12, help="most products per solve")
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--solvers", default=SOLVERS[0], help="lanczos, power or both")
    parser.add_argument("--out")
    args = parser.parse_args()
    backends, solvers = args.backends.split(","), args.solvers.split(",")
    if args.batch < 1 or args.length < 2 or args.products < 2:
        parser.error("--batch must be at least 1, --length and --products at least 2")
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    if unknown := set(solvers) - set(SOLVERS):
        parser.error(f"unknown solvers {sorted(unknown)}; choose from {', '.join(SOLVERS)}")
    try:
        device = str(resolve_device(args.device))
    except InputError as exc:
        parser.error(str(exc))
    SHAPE.update(batch=args.batch, length=args.length)
    keys = list(WORKLOADS) if args.workload == "all" else [args.workload]
    with open(args.out or os.devnull, "w", encoding="utf-8") as out:
        for line in report(keys, device, backends, solvers, args.products, args.tol):
            print(line, flush=True)  # a time limit that stops the run keeps what was measured
            out.write(line + "\n")
            out.flush()


if __name__ == "__main__":
    main()
