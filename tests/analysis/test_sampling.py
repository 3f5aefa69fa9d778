"""The data uncertainty (a jackknife over shards of the samples) on a problem whose sampling
distribution is known: least squares on Gaussian data, where the population Hessian, gradient,
trace and SAM sharpness have closed forms. Its 95 % intervals (allowing for the split-sample
bias) must cover the population figures at about their nominal rate, and its standard errors
must match the figures' spread over samples. At the minimum of an isotropic problem the figures
are biased by O(1/√n) (a degenerate spectrum, a zero population gradient): there the bias
estimate must account for the bias the plain interval misses."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from functools import cache

import pytest
import torch
from torch import nn

from sharpscope.analysis.alignment import MinibatchCosines
from sharpscope.analysis.analyze import AnalyzeConfig, analyze
from sharpscope.analysis.gate import GateInput, Reading, Thresholds, gate
from sharpscope.analysis.intervals import (
    Figures,
    bias_range,
    deleted_means,
    interval,
    jackknife_se,
    noise_corrected_se,
    paired_se,
    rounded_outward,
    samples_to_settle,
    t_quantile,
)
from sharpscope.analysis.sampling import (
    SHARD_TOL,
    Resolve,
    sampling_errors,
    shard_operators,
    static_batch,
)
from sharpscope.analysis.verdict import spread_notes, verdict
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos_extremes
from sharpscope.errors import InputError
from sharpscope.io.checkpoints import load_model
from sharpscope.io.losses import resolve_loss

SCALES = torch.tensor([4.0, 1.0, 0.5, 0.25], dtype=torch.float64)
"""Variances of the inputs' coordinates: the population Hessian of the MSE is 2·diag(SCALES)."""
W_STAR = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
W = torch.tensor([1.2, -0.7, 0.9, 1.5], dtype=torch.float64)
RHO, N, RUNS = 0.05, 256, 100


FIGURES = ("lambda_max", "lambda_min", "cos_full", "sam_sharpness", "trace")


def population() -> dict[str, float]:
    """λ_max, λ_min, |cos(g, v₁)|, the SAM sharpness and the trace of the population loss at W."""
    sigma = torch.diag(SCALES)
    g = 2 * sigma @ (W - W_STAR)
    g_hat = g / g.norm()
    return {
        "lambda_max": float(2 * SCALES.max()),
        "lambda_min": float(2 * SCALES.min()),
        "cos_full": float(g[0].abs() / g.norm()),
        "sam_sharpness": float(RHO * g.norm() + RHO**2 * g_hat @ sigma @ g_hat),
        "trace": float(2 * SCALES.sum()),
    }


def sample(seed: int, scales: torch.Tensor = SCALES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64) * scales.sqrt()
    y = x @ W_STAR + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)
    return list(zip(x.split(64), y.split(64), strict=True))


Run = dict[str, tuple[float, float, tuple[float, float]]]
"""Figure -> (estimate, standard error, range of its bias) on one sample."""


def analysed(w: torch.Tensor, scales: torch.Tensor) -> list[Run]:
    """Each figure on ``RUNS`` independent samples, analysed at ``w``."""
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    config = AnalyzeConfig(k=1, tol=1e-10, rho=RHO, shards=8, bias=True)
    found = []
    for seed in range(RUNS):
        a = analyze(model, resolve_loss("mse"), sample(seed, scales), config)
        s, b = a.sampling, a.sampling.bias
        f = s.bias_factor
        found.append(
            {
                "lambda_max": (a.lambda_max, s.eigenvalues[0], bias_range(b.eigenvalues[0], f)),
                "lambda_min": (
                    a.bottom.eigenvalues[0].item(),
                    s.lambda_min,
                    bias_range(b.lambda_min, f),
                ),
                "cos_full": (
                    a.alignment.cos_full,
                    s.cos_full,
                    bias_range(b.cos_full, f, signed=False),
                ),
                "sam_sharpness": (
                    a.alignment.sam_sharpness,
                    s.sam_sharpness,
                    bias_range(b.sam_sharpness, f),
                ),
                "trace": (a.trace.estimate, s.trace, (0.0, 0.0)),  # linear: unbiased
            }
        )
    return found


@cache
def runs() -> list[Run]:
    return analysed(W, SCALES)


@cache
def isotropic_runs() -> list[Run]:
    """At the minimum W_STAR of an isotropic problem: Hessian 2·I, population gradient 0."""
    return analysed(W_STAR, torch.ones(4, dtype=torch.float64))


def covered(found: list[Run], figure: str, truth: float, bias: bool = True) -> int:
    """How many of the stated 95 % intervals (without the bias: the plain ones) hold ``truth``."""
    multiplier = t_quantile(8 - 1)
    hits = 0
    for value, se, b in (r[figure] for r in found):
        low, high = interval(value, se, multiplier, None, b if bias else (0.0, 0.0))
        hits += low <= truth <= high
    return hits


@pytest.mark.parametrize("figure", FIGURES)
def test_intervals_cover_the_population_figure(figure):
    hits = covered(runs(), figure, population()[figure])
    assert 0.88 <= hits / RUNS <= 1.0, hits


@pytest.mark.parametrize("figure", FIGURES)
def test_standard_errors_match_the_spread_over_samples(figure):
    values = torch.tensor([r[figure][0] for r in runs()])
    errors = torch.tensor([r[figure][1] for r in runs()])
    ratio = float(errors.mean() / values.std())
    assert 0.75 <= ratio <= 1.3, ratio


ISOTROPIC = {"lambda_max": 2.0, "lambda_min": 2.0, "sam_sharpness": RHO**2}
"""The population figures at the isotropic minimum: H = 2·I, and L(w* + ε) − L(w*) = ‖ε‖²."""


@pytest.mark.parametrize("figure", ISOTROPIC)
def test_the_bias_estimate_accounts_for_a_known_bias(figure):
    found, truth = isotropic_runs(), ISOTROPIC[figure]
    bias = sum(r[figure][0] for r in found) / RUNS - truth  # the figure's actual bias at n
    spread = torch.tensor([r[figure][0] for r in found]).std().item()
    estimated = sum(r[figure][2][1] for r in found) / RUNS  # its 1/√n estimate, on average
    assert abs(bias) > spread / 2  # a bias that matters
    assert 0.8 <= bias / estimated <= 1.25, (bias, estimated)
    assert covered(found, figure, truth) / RUNS >= 0.9
    assert covered(found, figure, truth, bias=False) < covered(found, figure, truth)


def test_the_plain_interval_of_lambda_min_misses_at_the_isotropic_minimum():
    found = isotropic_runs()
    assert covered(found, "lambda_min", 2.0, bias=False) / RUNS <= 0.7


def test_the_noise_correction_removes_the_probes_scatter():
    weights = [0.25] * 4
    signal = [1.0, 3.0, 2.0, 6.0]
    g = torch.Generator().manual_seed(0)
    probes = [[x + float(torch.randn(1, generator=g)) for x in signal] for _ in range(4000)]
    exact = jackknife_se(deleted_means(signal, weights))
    assert noise_corrected_se(probes, weights) == pytest.approx(exact, rel=0.03)


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
    assert any("spread over other samples was not estimated" in note for note in a.notes)


def test_the_verdict_is_decisive_and_a_note_says_when_other_minibatches_could_change_it():
    model = nn.Linear(4, 1, bias=False).double()
    a = analyze(model, resolve_loss("mse"), sample(0), AnalyzeConfig(k=1, trace=False))
    assert a.num_samples == N and a.sampling.bias is None  # the bias re-solve is opt-in
    values = [0.05, 0.19, 0.08, 0.16]  # mean 0.12, SE 0.0324: 2 SE reach below 0.1
    straddling = replace(
        a, alignment=replace(a.alignment, cos_batches=MinibatchCosines.of(values, values, 8))
    )
    # the full-data figure no longer decides, whatever its spread
    assert "partly aligned" in verdict(straddling) and "uncertain" not in verdict(straddling)
    (note,) = spread_notes(straddling)
    se = statistics.stdev(values) / 2
    needed = math.ceil(4 * (2 * se / 0.02) ** 2)  # the excursion shrinks as 1/√minibatches
    assert "crosses the cut-off 0.1;" in note
    assert f"about {8 * needed:,} samples ({needed:,} minibatches of 8)" in note
    values = [0.11, 0.13, 0.12, 0.12]
    clear = replace(
        a, alignment=replace(a.alignment, cos_batches=MinibatchCosines.of(values, values, 8))
    )
    assert "partly aligned" in verdict(clear) and spread_notes(clear) == []


def test_samples_to_settle_puts_the_shrunk_interval_on_one_side_of_the_cut():
    n, value, se, t = 100, 0.5, 0.25, 2.0
    needed = samples_to_settle(n, value, value - t * se, 0.25)
    assert needed == 400  # half-width 0.5 → 0.25 needs 4 × the samples
    assert value - t * se * math.sqrt(n / needed) == pytest.approx(0.25)
    assert samples_to_settle(n, 0.1, 0.0, 0.1) is None


@pytest.mark.parametrize("seed", range(5))
def test_every_interval_holds_its_point_and_so_does_its_rounding(seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(2000):
        value, se, b0, b1 = (torch.randn(4, generator=g, dtype=torch.float64) * 3).tolist()
        bounds = (0.0, 1.0) if b0 > 0 else None
        if bounds is not None:
            value = abs(value) % 1.0
        low, high = interval(value, abs(se), 2.36, bounds, (b0, b1))
        assert low <= value <= high
        shown = rounded_outward(low, high)
        assert shown[0] <= low and shown[1] >= high
        assert float(f"{shown[0]:.2g}") <= value <= float(f"{shown[1]:.2g}")


def test_the_bias_no_longer_moves_the_interval_off_its_point():
    """MiniLM's λ_max 3.097 and its bias allowance once printed as [0.039, 2.5]."""
    low, high = interval(3.097, 0.5, 2.36, None, (1.8, 1.8 * 3.83))
    assert low < 3.097 <= high


def test_the_paired_jackknife_cancels_what_both_figures_share():
    base = [1.0, 1.3, 0.8, 1.1]
    assert paired_se([2 * b for b in base], base, 2.0) == 0.0  # a pure rescaling: no noise
    noise = [0.01, -0.02, 0.0, 0.01]
    mixed = [b + e for b, e in zip(base, noise, strict=True)]
    assert paired_se(mixed, base) == pytest.approx(jackknife_se(noise), rel=1e-12)
    assert paired_se(mixed, base) < jackknife_se(mixed) / 10


def gated(reading: Reading, sigmas: float | None) -> str:
    report = GateInput({"cos_batches": reading}, 2, 1, (), {})
    thresholds = Thresholds(min_alignment=0.35)
    if sigmas is not None:
        thresholds = replace(thresholds, sigmas=sigmas)
    (check,) = gate(report, thresholds)
    return f"{check.status}: {check.message}"


def test_the_gate_widens_by_sigmas_data_standard_errors_only_when_asked():
    assert gated(Reading(0.3, None, 0.05), 2.0).startswith("noise: |cos(ĝ_B, v₁)| = 0.3 ± 0.1")
    assert gated(Reading(0.3, None, 0.05), 0.0).startswith("fail")
    assert gated(Reading(0.3, None, 0.05), None).startswith(
        "fail: |cos(ĝ_B, v₁)| = 0.3 (no uncertainty estimate)"
    )  # by default: the figure on the data given
    unknown = gated(Reading(0.3, None, None), 2.0)
    assert unknown.startswith("fail: |cos(ĝ_B, v₁)| = 0.3 (no uncertainty estimate)")


def test_min_alignment_gates_the_minibatch_mean_within_two_of_its_standard_errors():
    """The verdict's figure, its SE over minibatches an estimator's (like the trace's Hutch++):
    0.3 ± 2·0.03 reaches 0.36, past 0.35: within noise; ± 2·0.02 reaches 0.34: flagged."""
    assert gated(Reading(0.3, 0.03), None).startswith("noise: |cos(ĝ_B, v₁)| = 0.3 ± 0.06")
    assert gated(Reading(0.3, 0.02), None).startswith("fail: |cos(ĝ_B, v₁)| = 0.3 ± 0.04")
    assert gated(Reading(0.36, 0.02), None).startswith("pass")


def _mlp_batches(lengths: tuple[int, ...] = (16, 16, 16, 16)) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in lengths]
    return model, batches


def test_a_shard_joins_its_chunks_into_batches_with_the_same_samples_and_hessian():
    model, batches = _mlp_batches()
    loss = resolve_loss("cross-entropy")
    op = HessianOperator(Objective(model, loss, batches))
    parts = shard_operators(op, 4)
    v = torch.randn(op.size, dtype=torch.float64)
    for j, part in enumerate(parts):
        assert part.num_batches == 1 and part.num_samples == 16  # 4 chunks of 4, joined
        chunks = [(x[4 * j : 4 * j + 4], y[4 * j : 4 * j + 4]) for x, y in batches]
        alone = HessianOperator(Objective(model, loss, chunks))  # the same samples, one batch each
        assert torch.allclose(part.matvec(v), alone.matvec(v), rtol=1e-12, atol=1e-14)


def test_chunks_of_other_shapes_are_not_joined():
    torch.manual_seed(0)
    model = _MeanTokens()
    batches = [
        (torch.randint(0, 7, (8, length)), torch.randn(8, dtype=torch.float64))
        for length in (5, 5, 3)
    ]
    op = HessianOperator(Objective(model, resolve_loss("mse"), batches))
    parts = shard_operators(op, 4)
    assert [p.num_batches for p in parts] == [2] * 4  # length-5 chunks joined, length-3 apart
    assert [p.num_samples for p in parts] == [6] * 4


class _MeanTokens(nn.Module):
    """Token embeddings averaged over the sequence, then a linear read-out: any length."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, dtype=torch.float64)
        self.out = nn.Linear(4, 1, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(ids).mean(1)).squeeze(-1)


def test_the_warm_loose_shard_solves_give_the_tight_solves_bias_for_fewer_products():
    model, batches = _mlp_batches((32, 32, 32, 32))
    op = HessianOperator(Objective(model, resolve_loss("cross-entropy"), batches))
    top, bottom = lanczos_extremes(
        op, 3, k_smallest=1, settings=SolveSettings(tol=1e-10, max_iter=200)
    )
    vectors, low = top.eigenvectors, bottom.eigenvectors[0]
    full = Figures(top.eigenvalues.tolist(), float(bottom.eigenvalues[0]))
    gradient = op.gradient()
    found = {}
    for tol in (1e-10, SHARD_TOL):
        resolve = Resolve(start=vectors[0] + low, rho=0.05, tol=tol)
        found[tol] = sampling_errors(op, 4, vectors, low, gradient, None, full, resolve)
    tight, loose = found[1e-10], found[SHARD_TOL]
    assert loose.n_products < tight.n_products
    pairs = [
        (tight.bias.eigenvalues[0], loose.bias.eigenvalues[0], tight.eigenvalues[0]),
        (tight.bias.lambda_min, loose.bias.lambda_min, tight.lambda_min),
    ]
    for exact, cheap, se in pairs:
        assert abs(cheap) > 0.1 * se  # a bias worth estimating
        assert abs(cheap - exact) <= 0.05 * se, (exact, cheap, se)
    assert loose.bias.eigenvalues[1:] == [None, None]  # λ₂, λ₃: not solved again


def test_a_static_batch_export_gets_whole_batches_per_shard(tmp_path):
    """It once got 2-sample chunks and failed: "exported for inputs of shape [16, ...]"."""
    mlp, _ = _mlp_batches()
    program = torch.export.export(mlp, (torch.randn(16, 5, dtype=torch.float64),))
    torch.export.save(program, tmp_path / "mlp.pt2")
    model, _ = load_model(tmp_path / "mlp.pt2")  # with its shape check, as sharpscope loads it
    assert static_batch(model) and not static_batch(_mlp_batches()[0])
    _, batches = _mlp_batches((16, 16, 16, 16))
    shapes = []
    model.register_forward_pre_hook(lambda _, args: shapes.append(args[0].shape[0]))
    a = analyze(model, resolve_loss("cross-entropy"), batches, AnalyzeConfig(k=1))
    assert a.sampling is not None and a.sampling.shards == 4  # one batch each
    assert set(shapes) == {16}
    one = analyze(model, resolve_loss("cross-entropy"), batches[:1], AnalyzeConfig(k=1))
    assert one.sampling is None
    assert any("exported for one batch size" in note for note in one.notes)


def test_a_dynamic_batch_export_is_cut_like_any_model():
    model, batches = _mlp_batches()
    dims = ({0: torch.export.Dim("batch")},)
    program = torch.export.export(model, (batches[0][0],), dynamic_shapes=dims)
    assert not static_batch(program.module())
