"""Estimator results print as a short summary: the figures that matter, never the raw samples."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sharpscope.curvature import (
    EigenResult,
    MatrixOperator,
    SolveSettings,
    TraceResult,
    hutchinson,
    hutchpp,
    lanczos,
    slq,
)

SPECTRUM = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.linspace(0.1, 2.0, 37)]).double()
NUMBER = r"-?\d+(?:\.\d+)?(?:e[-+]\d+)?"


@pytest.fixture
def op() -> MatrixOperator:
    """A symmetric matrix with a known spectrum in a random basis (bigger than Hutch++'s sketch)."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64, generator=generator)).Q
    return MatrixOperator(basis @ torch.diag(SPECTRUM) @ basis.T)


def summary(result: object) -> str:
    """What ``print(result)`` shows, checked to be short: one line, no tensors."""
    text = str(result)
    assert text == repr(result)
    assert len(text.splitlines()) == 1 and len(text) < 200, text
    assert "tensor" not in text, text
    return text


def figure(text: str, before: str) -> float:
    """The number that follows ``before`` in ``text``."""
    found = re.search(re.escape(before) + f"({NUMBER})", text)
    assert found, f"{before!r} not in {text!r}"
    return float(found.group(1))


def trace_result(estimate: float, std_error: float, n: int = 10) -> TraceResult:
    return TraceResult(estimate, std_error, n, n, 0.5, "hutchinson", True, torch.zeros(n))


@pytest.mark.parametrize("estimator", [hutchinson, hutchpp])
def test_trace_summary_gives_estimate_standard_error_and_cost(op, estimator):
    result = estimator(op, settings=SolveSettings(tol=1e-3, max_iter=40, seed=1))
    text = summary(result)
    assert text.startswith("TraceResult(estimate=")
    shown, error = figure(text, "estimate="), figure(text, " ± ")
    assert error == pytest.approx(result.std_error, rel=0.05) and error > 0
    assert abs(shown - result.estimate) <= 0.1 * result.std_error
    assert f"{result.n_samples} samples, {result.n_products} products" in text
    assert ("not converged" in text) == (not result.converged)


def test_trace_summary_shows_a_tiny_standard_error_as_a_figure():
    text = summary(trace_result(12.0, 3e-7))
    assert "estimate=12 ± 3e-07 (SE)" in text
    text = summary(trace_result(2.5e-9, 4e-10))
    assert "estimate=2.5e-09 ± 4e-10 (SE)" in text
    assert not re.search(r"± 0(?![.\d])|=0(?![.\d])", text)


def test_trace_summary_keeps_the_digits_the_standard_error_allows():
    assert "estimate=1234.568 ± 0.031 (SE)" in summary(trace_result(1234.5678, 0.0314))
    assert "estimate=1234.6 ± 3.1 (SE)" in summary(trace_result(1234.5678, 3.14))


def test_trace_summary_without_a_spread_or_a_standard_error():
    equal = summary(trace_result(5.0, 0.0))
    assert "estimate=5 (all 10 samples equal)" in equal and "±" not in equal
    single = summary(trace_result(5.0, math.inf, n=1))
    assert "estimate=5 (no standard error from 1 sample)" in single and "±" not in single
    assert "estimate=0.0 ± 0.2" in summary(trace_result(0.0, 0.2))


def test_eigen_summary_gives_eigenvalues_residual_and_cost(op):
    result = lanczos(op, 3, settings=SolveSettings(tol=1e-8, seed=0))
    assert result.all_converged
    text = summary(result)
    assert text.startswith("EigenResult(k=3 largest, eigenvalues=[10, 7, 5], max residual ")
    residual = figure(text, "max residual ")
    assert residual > 0
    assert residual == pytest.approx(float(result.residuals.max()), rel=0.05)
    assert f"all converged, lanczos: {result.n_iterations} iterations" in text
    assert f"{result.n_products} products" in text


def test_eigen_summary_elides_many_eigenvalues_and_counts_the_unconverged(op):
    result = lanczos(op, 8, which="smallest", settings=SolveSettings(max_iter=3, seed=0))
    text = summary(result)
    done = int(result.converged.sum())
    assert done < 8 and f"{done} of 8 converged" in text
    listed = re.search(r"eigenvalues=\[([^\]]*)\]", text).group(1).split(", ")
    assert len(listed) == 7 and listed[-1] == "… 2 more"
    assert [float(v) for v in listed[:6]] == pytest.approx(result.eigenvalues[:6].tolist(), 1e-5)


def test_eigen_summary_shows_a_tiny_residual_as_a_figure():
    result = EigenResult(
        eigenvalues=torch.tensor([4.0, 1e-7]),
        eigenvectors=torch.eye(2),
        residuals=torch.tensor([3e-6, 1e-9]),
        converged=torch.tensor([True, True]),
        n_products=35,
        n_iterations=30,
        seconds=0.25,
        method="lanczos",
        which="largest",
    )
    text = summary(result)
    assert "eigenvalues=[4, 1e-07], max residual 3e-06, all converged" in text
    assert "30 iterations, 35 products, 0.25 s" in text


def test_density_summary_gives_span_mean_and_cost(op):
    result = slq(op, n_vectors=3, n_iter=10, seed=0)
    text = summary(result)
    assert text.startswith(f"DensityResult(size=40, 3 vectors, {sum(map(len, result.nodes))} nodes")
    low, high = map(float, re.search(rf"in \[({NUMBER}), ({NUMBER})\]", text).groups())
    assert float(SPECTRUM.min()) - 1e-6 <= low < high <= float(SPECTRUM.max()) + 1e-6
    assert figure(text, "mean ") == pytest.approx(result.mean, rel=1e-5)
    assert f"{result.n_products} products" in text
