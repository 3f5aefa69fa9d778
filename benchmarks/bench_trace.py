"""Is analyze's trace worth its cost? The deflated trace (the eigen stage's Krylov basis traced
exactly, Hutchinson on the rest) against Hutch++, the trace's share of a default analyze, and a
whole `sharpscope analyze --top-k 5` process against PyHessian's top-5.

Run by hand: ``python benchmarks/bench_trace.py [--seeds 40] [--only mlp cnn resnet processes]
[--out FILE]``. The digits MLP and the CIFAR-shaped CNN of ``bench_analyze.py`` (1024 samples
in batches of 128), and the built-in ResNet-18 on 16 CIFAR-shaped samples (float32). Product
counts come first: they are the same on any machine; wall times are ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bench_analyze
import bench_engine
import torch
from torch import nn

from sharpscope import HessianOperator, hutchpp, lanczos_extremes
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.curvature import Objective, SolveSettings
from sharpscope.curvature.results import TraceResult
from sharpscope.curvature.solvers import HUTCHPP_SKETCH, TRACE_BUDGET_SHARE, trace_budget
from sharpscope.curvature.trace import deflated_trace
from sharpscope.io.architectures import resnet18

LOSS = nn.functional.cross_entropy
DEFAULTS = AnalyzeConfig()
HERE = Path(__file__).resolve().parent
SECTIONS = ("mlp", "cnn", "resnet", "processes")


def float64_trace(model: nn.Module, batches: list) -> float:
    """tr(H) in float64: Σᵢ (H eᵢ)ᵢ, each column by autograd double backward on a float64 copy."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    params = [p for p in twin.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in batches)
    loss = sum(LOSS(twin(x.double()), y) * (len(y) / total) for x, y in batches)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    trace = 0.0
    for param, grad in zip(params, grads, strict=True):
        flat = grad.reshape(-1)
        for i in range(flat.numel()):
            (row,) = torch.autograd.grad(flat[i], param, retain_graph=True)
            trace += float(row.reshape(-1)[i])
    return trace


@dataclass
class Run:
    """One seed's trace: products, estimate and its interval."""

    eigen_products: int
    result: TraceResult


def seeded_runs(op: HessianOperator, seeds: int) -> dict[str, list[Run]]:
    """Per seed, analyze's eigen stage and its trace, and Hutch++ with the same budget."""
    runs: dict[str, list[Run]] = {"deflated": [], "hutch++, same budget": []}
    for seed in range(seeds):
        start = op.n_products
        top, _ = lanczos_extremes(
            op,
            DEFAULTS.k,
            k_smallest=1,
            keep_subspace=True,
            settings=SolveSettings(tol=DEFAULTS.tol, max_iter=DEFAULTS.max_iter, seed=seed),
        )
        eigen = op.n_products - start
        budget = trace_budget(DEFAULTS.trace_samples, eigen)
        tol = DEFAULTS.trace_tol
        runs["deflated"].append(
            Run(
                eigen,
                deflated_trace(
                    op, top.subspace, settings=SolveSettings(tol=tol, max_iter=budget, seed=seed)
                ),
            )
        )
        samples = max(2, budget - 2 * HUTCHPP_SKETCH)
        runs["hutch++, same budget"].append(
            Run(
                eigen,
                hutchpp(
                    op,
                    sketch=HUTCHPP_SKETCH,
                    settings=SolveSettings(tol=tol, max_iter=samples, seed=seed),
                ),
            )
        )
    return runs


def seed_table(runs: dict[str, list[Run]], exact: float) -> list[str]:
    """One row per estimator: products, errors, 1 % hits, interval coverage, convergence."""
    lines = [
        "| estimator | trace products: median [max] | within 1 % | within 1 % in ≤ 50 products "
        "| 95 % interval covers | converged | median \\|error\\| | median SE |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, group in runs.items():
        products = [r.result.n_products for r in group]
        errors = [abs(r.result.estimate - exact) / abs(exact) for r in group]
        within = sum(e <= 0.01 for e in errors)
        cheap = sum(e <= 0.01 and p <= 50 for e, p in zip(errors, products, strict=True))
        covered = sum(r.result.interval[0] <= exact <= r.result.interval[1] for r in group)
        converged = sum(r.result.converged for r in group)
        se = statistics.median(r.result.std_error / abs(exact) for r in group)
        n = len(group)
        lines.append(
            f"| {name} | {statistics.median(products):g} [{max(products)}] | {within}/{n} "
            f"| {cheap}/{n} | {covered}/{n} | {converged}/{n} | "
            f"{100 * statistics.median(errors):.2f} % | {100 * se:.2f} % |"
        )
    return lines


def mlp_section(seeds: int, given: float | None) -> list[str]:
    """The digits MLP: exact trace (or ``given``, a previous run's), then every seed's trace."""
    workload = bench_engine.build_mlp()
    batches = bench_analyze.batches_of(workload)
    start = time.perf_counter()
    exact = float64_trace(workload.model, batches) if given is None else given
    exact_seconds = time.perf_counter() - start
    op = HessianOperator(Objective(workload.model, LOSS, batches))
    runs = seeded_runs(op, seeds)
    eigen = [r.eigen_products for r in runs["deflated"]]
    return [
        f"## {workload.title}",
        "",
        f"- {workload.n_params:,} parameters, {bench_analyze.SAMPLES} samples in {len(batches)} "
        f"batches; exact trace (float64, dense Hessian diagonal by double backward, "
        f"{exact_seconds:.0f} s{', given by --exact' if given else ''}): **{exact:.6g}**",
        f"- eigen stage (top-{DEFAULTS.k} and λ_min, one Lanczos run, tol {DEFAULTS.tol:g}): "
        f"median {statistics.median(eigen):g} products [{min(eigen)}–{max(eigen)}] over "
        f"{seeds} seeds; the trace's budget is {TRACE_BUDGET_SHARE} × that "
        f"(at most {DEFAULTS.trace_samples})",
        f"- trace target: standard error ≤ {DEFAULTS.trace_tol:g}·|trace|; seeds 0–{seeds - 1} "
        "start both the Lanczos run and the probes",
        "",
        *seed_table(runs, exact),
        "",
    ]


def cnn_model() -> nn.Module:
    """The benchmark CNN's architecture (``--model bench_trace:cnn_model`` for the CLI)."""
    return bench_engine.build_cnn().model


PYHESSIAN = """
import sys, time, torch
sys.path.insert(0, {here!r})
import bench_trace
from pyhessian import hessian
model = bench_trace.cnn_model()
model.load_state_dict(torch.load({checkpoint!r}))
model.eval()
data = torch.load({data!r})
engine = hessian(model, torch.nn.functional.cross_entropy,
                 data=(data["inputs"], data["targets"]), cuda=False)
values, _ = engine.eigenvalues(top_n=5, tol=1e-6)
print(values)
"""


def whole_process(command: list[str]) -> tuple[float, str]:
    """Wall time and stdout of ``command`` in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=HERE)
    return time.perf_counter() - start, done.stdout


def share_section(title: str, model: nn.Module, batches: list, n_params: int) -> list[str]:
    """A default analyze in process: the trace's share of its products and of its time."""
    start = time.perf_counter()
    result = analyze(model, LOSS, batches, DEFAULTS)
    total = time.perf_counter() - start
    trace = result.trace
    assert trace is not None
    timings = result.timings
    low, high = trace.interval
    samples = sum(len(y) for _, y in batches)
    return [
        f"## {title}",
        "",
        f"- {n_params:,} parameters, {samples} samples in {len(batches)} batches",
        f"- default analyze (in process): {result.n_products} products, eigen stage "
        f"{result.top.n_products}, trace **{trace.n_products}** "
        f"(**{100 * trace.n_products / result.n_products:.0f} %** of the products; "
        f"{trace.method}, {'converged' if trace.converged else 'not converged'}): "
        f"{trace.estimate:.5g} ± {trace.std_error:.2g}, 95 % [{low:.5g}, {high:.5g}]",
        f"- trace {timings['trace']:.2f} s of {total:.2f} s = "
        f"**{100 * timings['trace'] / total:.0f} %** of the analyze's time",
        "",
        "| stage | seconds | share |",
        "| --- | ---: | ---: |",
        *(f"| {s} | {t:.3f} | {100 * t / total:.1f} % |" for s, t in timings.items()),
        "",
    ]


def cnn_section() -> list[str]:
    """The benchmark CNN's default analyze."""
    workload = bench_engine.build_cnn()
    return share_section(
        workload.title, workload.model, bench_analyze.batches_of(workload), workload.n_params
    )


def resnet_section() -> list[str]:
    """The built-in ResNet-18 (random weights, eval mode) on 16 CIFAR-shaped random samples."""
    torch.manual_seed(0)
    model = resnet18().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (16,), generator=generator)
    n_params = sum(p.numel() for p in model.parameters())
    title = "ResNet-18 (built in, random weights, eval mode), 16 CIFAR-shaped samples, float32"
    return share_section(title, model, [(x, y)], n_params)


def processes_section() -> list[str]:
    """Whole processes on the CNN: `sharpscope analyze --top-k 5` against PyHessian's top-5."""
    workload = bench_engine.build_cnn()
    batches = bench_analyze.batches_of(workload)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, data = Path(folder) / "cnn.pt", Path(folder) / "data.pt"
        torch.save(workload.model.state_dict(), checkpoint)
        inputs = torch.cat([x for x, _ in batches])
        targets = torch.cat([y for _, y in batches])
        torch.save({"inputs": inputs, "targets": targets}, data)
        ours, printed = whole_process(
            [sys.executable, "-m", "sharpscope", "analyze", str(checkpoint), "--model",
             "bench_trace:cnn_model", "--data", str(data), "--top-k", "5", "--json", "--quiet"]
        )  # fmt: skip
        report = json.loads(printed)
        script = PYHESSIAN.format(here=str(HERE), checkpoint=str(checkpoint), data=str(data))
        theirs, printed = whole_process([sys.executable, "-c", script])
    ours_top = report_eigenvalues(report)
    last = printed.strip().splitlines()[-1]
    theirs_top = sorted((float(v) for v in last.strip("[]").split(",")), reverse=True)
    reference = reference_top5(workload.model, batches)
    ours_error = max(abs(a - b) / abs(b) for a, b in zip(ours_top, reference, strict=True))
    theirs_error = max(abs(a - b) / abs(b) for a, b in zip(theirs_top, reference, strict=True))
    return [
        "## Whole processes on the CNN",
        "",
        f"- same checkpoint and 1024 samples: `sharpscope analyze --top-k 5` (top-5, λ_min, "
        f"trace, alignment, data uncertainty) {ours:.1f} s; PyHessian 0.1 "
        f"`eigenvalues(top_n=5, tol=1e-6)` on one batch of 1024 {theirs:.1f} s: "
        f"**{ours / theirs:.2f}×**",
        f"- top-5 against a tol-1e-10 Lanczos reference (float64): largest relative error "
        f"sharpscope {ours_error:.1e}, PyHessian {theirs_error:.1e}",
        "",
    ]


def report_eigenvalues(report: dict) -> list[float]:
    """The top eigenvalues of an analyze report, largest first."""
    return sorted((float(v) for v in report["results"]["eigenvalues"]["values"]), reverse=True)


def reference_top5(model: nn.Module, batches: list) -> list[float]:
    """The top-5 eigenvalues by Lanczos at tol 1e-10 on a float64 copy: the accuracy reference."""
    import copy

    twin = copy.deepcopy(model).double().eval()
    wide = [(x.double(), y) for x, y in batches]
    op = HessianOperator(Objective(twin, LOSS, wide))
    top, _ = lanczos_extremes(
        op, 5, k_smallest=1, settings=SolveSettings(tol=1e-10, max_iter=400, seed=0)
    )
    return sorted(top.eigenvalues.tolist(), reverse=True)


def main() -> None:
    """Measure both workloads and print (or write) the Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    parser.add_argument("--exact", type=float, help="the MLP's exact trace from a previous run")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = parser.parse_args()
    sections = {
        "mlp": lambda: mlp_section(args.seeds, args.exact),
        "cnn": cnn_section,
        "resnet": resnet_section,
        "processes": processes_section,
    }
    lines = [
        "# The trace's cost and its intervals",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU threads",
        "",
        *(line for name in args.only for line in sections[name]()),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
