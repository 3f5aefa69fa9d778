"""The CI gate's power: the smallest rise of λ_max that `check --max-increase 10%` flags.

For each sample size the demo's digits MLP is analysed once (`sharpscope analyze --json`); the
baseline is that report with every eigenvalue divided by 1 + r (its residuals, bounds, spread and
per-shard figures too: tests/cli/test_check.py's ``scaled``), i.e. a model whose λ_max is r lower on
the same data. Bisection finds the smallest r that `sharpscope check REPORT --baseline BASE
--max-increase 10%` fails (exit 1), with the default `--sigmas 0` (the data given, solver bounds)
and with `--sigmas 2` (the paired spread). Target (issue 25): at most 12 % on all sizes.

    python benchmarks/bench_gate_power.py [--samples 64 360 1437]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_check import scaled


def sharpscope(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sharpscope", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
    )


def flagged(report: Path, base: dict, rise: float, folder: Path, sigmas: float) -> bool:
    """Whether the gate fails ``report`` against ``base`` scaled down by 1 + ``rise``."""
    path = folder / "base.json"
    path.write_text(json.dumps(scaled(base, 1 / (1 + rise))))
    done = sharpscope(
        "check", report, "--baseline", path, "--max-increase", "10%", "--sigmas", sigmas
    )
    if done.returncode not in (0, 1):
        raise SystemExit(done.stderr)
    return done.returncode == 1


def smallest_rise(report: Path, base: dict, folder: Path, sigmas: float) -> float:
    """Bisection on r in [0, 3] to 0.01 % (the gate is monotone in r)."""
    low, high = 0.0, 3.0
    if not flagged(report, base, high, folder, sigmas):
        return float("inf")
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (
            (low, middle) if flagged(report, base, middle, folder, sigmas) else (middle, high)
        )
    return high


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 360, 1437])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        demo = sharpscope("demo", "--out", folder / "demo")
        if demo.returncode != 0:
            raise SystemExit(demo.stderr)
        checkpoint = folder / "demo" / "digits-mlp.safetensors"
        print("| samples | λ_max | bound | spread SE | smallest rise flagged: --sigmas 0 | 2 |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for samples in args.samples:
            done = sharpscope(
                "analyze", checkpoint, "--data", "digits", "--samples", samples, "--json", "-q"
            )
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            report = folder / f"report-{samples}.json"
            report.write_text(done.stdout)
            document = json.loads(done.stdout)
            results = document["results"]
            eig = results["eigenvalues"]
            bound = (eig.get("bounds") or eig["residuals"])[0]
            spread = results["sampling"]["eigenvalues"][0]
            rises = [smallest_rise(report, document, folder, s) for s in (0, 2)]
            print(
                f"| {samples} | {eig['values'][0]:.4g} | {bound:.2g} | {spread:.2g} | "
                f"{100 * rises[0]:.2f} % | {100 * rises[1]:.2f} % |"
            )


if __name__ == "__main__":
    main()
