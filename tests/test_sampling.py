"""The data uncertainty (a jackknife over shards of the samples) on a problem whose sampling
distribution is known: least squares on Gaussian data, where the population Hessian, gradient
and SAM sharpness have closed forms. Its 95 % intervals must cover the population figures at
about their nominal rate, and its standard errors must match the figures' spread over samples."""

from __future__ import annotations

import math
from dataclasses import replace
from functools import cache

import pytest
import torch
from torch import nn

from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.gate import GateInput, Reading, Thresholds, gate
from sharpscope.analysis.sampling import deleted_means, jackknife_se, t_quantile
from sharpscope.analysis.verdict import verdict
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss

SCALES = torch.tensor([4.0, 1.0, 0.5, 0.25], dtype=torch.float64)
"""Variances of the inputs' coordinates: the population Hessian of the MSE is 2·diag(SCALES)."""
W_STAR = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
W = torch.tensor([1.2, -0.7, 0.9, 1.5], dtype=torch.float64)
RHO, N, RUNS = 0.05, 256, 100


def population() -> dict[str, float]:
    """λ_max, λ_min, |cos(g, v₁)| and the SAM sharpness of the population loss at W."""
    sigma = torch.diag(SCALES)
    g = 2 * sigma @ (W - W_STAR)
    g_hat = g / g.norm()
    return {
        "lambda_max": float(2 * SCALES.max()),
        "lambda_min": float(2 * SCALES.min()),
        "cos_full": float(g[0].abs() / g.norm()),
        "sam_sharpness": float(RHO * g.norm() + RHO**2 * g_hat @ sigma @ g_hat),
    }


def sample(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64) * SCALES.sqrt()
    y = x @ W_STAR + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return list(zip(x.split(64), y.split(64), strict=True))


@cache
def runs() -> list[dict[str, tuple[float, float]]]:
    """(estimate, standard error) of each figure on ``RUNS`` independent samples."""
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(W)
    config = AnalyzeConfig(k=1, trace=False, tol=1e-10, rho=RHO, shards=8)
    found = []
    for seed in range(RUNS):
        a = analyze(model, resolve_loss("mse"), sample(seed), config)
        s = a.sampling
        found.append(
            {
                "lambda_max": (a.lambda_max, s.eigenvalues[0]),
                "lambda_min": (float(a.bottom.eigenvalues[0]), s.lambda_min),
                "cos_full": (a.alignment.cos_full, s.cos_full),
                "sam_sharpness": (a.alignment.sam_sharpness, s.sam_sharpness),
            }
        )
    return found


@pytest.mark.parametrize("figure", ["lambda_max", "lambda_min", "cos_full", "sam_sharpness"])
def test_intervals_cover_the_population_figure(figure):
    truth = population()[figure]
    multiplier = t_quantile(8 - 1)
    hits = [abs(value - truth) <= multiplier * se for value, se in (r[figure] for r in runs())]
    assert 0.88 <= sum(hits) / RUNS <= 1.0, sum(hits)


@pytest.mark.parametrize("figure", ["lambda_max", "lambda_min", "cos_full", "sam_sharpness"])
def test_standard_errors_match_the_spread_over_samples(figure):
    values = torch.tensor([r[figure][0] for r in runs()])
    errors = torch.tensor([r[figure][1] for r in runs()])
    ratio = float(errors.mean() / values.std())
    assert 0.75 <= ratio <= 1.3, ratio


def test_the_jackknife_of_a_mean_is_its_standard_error():
    values = [1.0, 3.0, 2.0, 6.0]
    weights = [0.25] * 4
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    assert jackknife_se(deleted_means(values, weights)) == pytest.approx(sd / 2, rel=1e-12)


def test_one_shard_is_refused():
    with pytest.raises(InputError, match=r"`shards` must be 0 \(off\) or at least 2, got 1"):
        AnalyzeConfig(shards=1)


def test_too_few_samples_for_two_shards_leave_it_out_with_a_note():
    model = nn.Linear(4, 1, bias=False).double()
    one = [(torch.ones(1, 4, dtype=torch.float64), torch.ones(1, dtype=torch.float64))]
    a = analyze(model, resolve_loss("mse"), one, AnalyzeConfig(k=1, trace=False))
    assert a.sampling is None
    assert any("data uncertainty was not estimated" in note for note in a.notes)


def test_the_verdict_is_uncertain_across_a_cut_off():
    model = nn.Linear(4, 1, bias=False).double()
    a = analyze(model, resolve_loss("mse"), sample(0), AnalyzeConfig(k=1, trace=False))
    straddling = replace(
        a,
        alignment=replace(a.alignment, cos_full=0.12),
        sampling=replace(a.sampling, cos_full=0.02),
    )
    assert "is uncertain" in verdict(straddling) and "cut-off 0.1)" in verdict(straddling)
    clear = replace(straddling, sampling=replace(a.sampling, cos_full=0.001))
    assert "partly aligned" in verdict(clear)


def gated(reading: Reading, sigmas: float) -> str:
    report = GateInput({"cos_full": reading}, 2, 1, (), {})
    (check,) = gate(report, Thresholds(min_alignment=0.35, sigmas=sigmas))
    return f"{check.status}: {check.message}"


def test_the_gate_widens_by_sigmas_data_standard_errors():
    assert gated(Reading(0.3, None, 0.05), 2.0).startswith("noise: |cos(ĝ, v₁)| = 0.3 ± 0.1")
    assert gated(Reading(0.3, None, 0.05), 0.0).startswith("fail")
    unknown = gated(Reading(0.3, None, None), 2.0)
    assert unknown.startswith("fail: |cos(ĝ, v₁)| = 0.3 (no uncertainty estimate)")
