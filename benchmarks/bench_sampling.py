"""Do the data-uncertainty intervals cover? Coverage of the full-data figures by the 95 %
intervals of analyses on independent subsets.

Run by hand from the repository root::

    python benchmarks/bench_sampling.py [--subsets 40] [--out FILE]

For each workload of ``bench_engine.py`` (the digits MLP on all 1797 digits; the CNN on 1024
synthetic images), the "full-data" figures are those of an analysis on all of its data; each of
``--subsets`` random subsets (seeds 0, 1, ...) is analysed with the defaults (8 shards, the
trace, the split-sample bias), and an interval covers when the full-data figure lies within it:
the stated interval (allowing for the bias) and, for comparison, the plain value ± t·SE. A
subset shares part of its samples with the full data, so the spread of its figures around the
full-data ones is smaller than around the population's by about sqrt(1 - n/N) (n/N printed):
slight over-coverage is expected. The full-data trace is itself an estimate (its SE printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bench_engine
import torch

from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.intervals import bias_range, interval
from sharpscope.io.data import subset_indices

FIGURES = ("lambda_max", "lambda_min", "trace", "cos_full", "sam_sharpness")


def population(key: str) -> tuple[bench_engine.Workload, torch.Tensor, torch.Tensor, int]:
    """The workload, all of its data, and the subset size."""
    workload = bench_engine.WORKLOADS[key]()
    if key == "mlp":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        return workload, x, y, 256
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1024, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (1024,), generator=generator)
    return workload, x, y, 128


def figures(workload: bench_engine.Workload, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Each figure's value, standard error, bias range and 1/n bias estimate, and the analysis'
    products."""
    batches = list(zip(x.split(128), y.split(128), strict=True))
    a = analyze(workload.model, bench_engine.LOSS, batches, AnalyzeConfig(k=1))
    s, b = a.sampling, a.sampling.bias
    f = s.bias_factor
    return {
        "lambda_max": (
            a.lambda_max,
            s.eigenvalues[0],
            bias_range(b.eigenvalues[0], f),
            b.eigenvalues[0],
        ),
        "lambda_min": (
            float(a.bottom.eigenvalues[0]),
            s.lambda_min,
            bias_range(b.lambda_min, f),
            b.lambda_min,
        ),
        "trace": (a.trace.estimate, s.trace, (0.0, 0.0), 0.0),
        "cos_full": (
            a.alignment.cos_full,
            s.cos_full,
            bias_range(b.cos_full, f, signed=False),
            b.cos_full,
        ),
        "sam_sharpness": (
            a.alignment.sam_sharpness,
            s.sam_sharpness,
            bias_range(b.sam_sharpness, f),
            b.sam_sharpness,
        ),
        "multiplier": s.multiplier,
        "products": (a.n_products, s.n_products),
        "trace_se": a.trace.std_error,
    }


def run(key: str, subsets: int, out: str | None) -> list[str]:
    """The workload's table; with ``out``, rewritten there after every subset (so that a run
    stopped early leaves the figures of the subsets done, with their count)."""
    workload, x, y, n = population(key)
    start = time.perf_counter()
    full = figures(workload, x, y)
    rows: list[dict] = []
    for seed in range(subsets):
        idx = subset_indices(len(y), n, seed)
        rows.append(figures(workload, x[idx], y[idx]))
        print(f"{key}: subset {seed + 1}/{subsets}", file=sys.stderr, flush=True)
        if out and len(rows) >= 2:
            lines = table(workload.title, full, rows, n, len(y), time.perf_counter() - start)
            Path(out).write_text("\n".join(lines), encoding="utf-8")
    return table(workload.title, full, rows, n, len(y), time.perf_counter() - start)


def table(title: str, full: dict, rows: list[dict], n: int, size: int, seconds: float) -> list[str]:
    """The coverage table of ``rows``, the subsets' figures, against the ``full`` data's."""
    subsets = len(rows)
    total = statistics.median(r["products"][0] for r in rows)
    spent = statistics.median(r["products"][1] for r in rows)
    lines = [
        f"### {title}: {subsets} subsets of {n} of {size} samples "
        f"(n/N = {n / size:.2f}), {seconds:.0f} s",
        "",
        f"Median products per subset analysis: {total:g}, of which {spent:g} for the data "
        f"uncertainty and its bias. Full-data trace: its estimator's SE {full['trace_se']:.2g}.",
        "",
        "| figure | full data | coverage: stated interval | plain ± t·SE | median width, stated | "
        "median width, plain | SD over subsets | mean SE / SD | mean bias (1/n) | "
        "actual mean shift |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in FIGURES:
        truth = full[name][0]
        values = [r[name][0] for r in rows]
        stated = [interval(*r[name][:2], r["multiplier"], None, r[name][2]) for r in rows]
        plain = [interval(*r[name][:2], r["multiplier"]) for r in rows]
        hits = sum(low <= truth <= high for low, high in stated)
        plain_hits = sum(low <= truth <= high for low, high in plain)
        sd = statistics.stdev(values)
        ratio = statistics.mean(r[name][1] for r in rows) / sd
        lines.append(
            f"| {name} | {truth:.4g} | {hits}/{subsets} | {plain_hits}/{subsets} | "
            f"{statistics.median(h - lo for lo, h in stated):.3g} | "
            f"{statistics.median(h - lo for lo, h in plain):.3g} | {sd:.3g} | {ratio:.2f} | "
            f"{statistics.mean(r[name][3] for r in rows):.3g} | "
            f"{statistics.mean(values) - truth:.3g} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=40)
    parser.add_argument("--workload", choices=["mlp", "cnn", "all"], default="all")
    parser.add_argument("--out")
    args = parser.parse_args()
    keys = ["mlp", "cnn"] if args.workload == "all" else [args.workload]
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core machine ran 25x slower (spinning)
    report = "\n".join(line for key in keys for line in run(key, args.subsets, args.out))
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)


if __name__ == "__main__":
    main()
