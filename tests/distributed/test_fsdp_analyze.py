"""``analyze --fsdp``: the parameters sharded over 2 Gloo ranks by FSDP2, against one process
holding the whole model, in float64 on the tiny GPT-2 (a Hugging Face folder checkpoint).

The reference is one process's double backward: the sharded products are central differences at
the step searched as one process searches it, about 1e-11 off exact on this model, so the figures
are compared at :data:`REL_FD`; every figure that depends on the products only through
reductions (loss, gradient norm, batch counts) at 1e-12.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_hf
import torch
from test_distributed import sharpscope
from tiny_cli import make_checkpoint, one_error_line
from tiny_hf_truth import N, token_data
from typer.testing import CliRunner

from sharpscope.analysis.fsdp import blocks
from sharpscope.cli.app import app
from sharpscope.io.eigenvectors import load_eigenvectors

REL_FD = 1e-8
"""The sharded finite differences' error allows this (a fixed step's was 1e-6 on this model)."""
EXACT = ["--data", "lm.pt", "--batch-size", "2", "--dtype", "float64", "--top-k", "3"]
EXACT += ["--tol", "1e-8", "--json"]
STALL = ["--dist-timeout", "30"]
"""A rank left waiting in a collective (the ranks' forwards out of step) fails, not hangs."""
ALIGNMENT = ("cos_full", "topk_share", "sam_sharpness_quadratic", "eigen_sam_cos")
BATCHES = ("mean", "min", "max", "std_error", "eigen_sam_mean")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, str, Path]:
    """One process (double backward) and 2 ranks under ``--fsdp``: their reports, the sharded
    run's stderr, and the folder holding their ``one/`` and ``two/`` output folders. Neither
    runs the spread or the critical sharpness (test_fsdp_spread.py compares them)."""
    folder = tmp_path_factory.mktemp("fsdp")
    tiny_hf.gpt2().save_pretrained(folder / "gpt2")
    ids = torch.randint(0, tiny_hf.VOCAB - 1, (10, 10), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, folder / "lm.pt")  # 5 batches: the ranks hold 3 and 2
    common = ["analyze", str(folder / "gpt2"), *EXACT]
    common[common.index("lm.pt")] = str(folder / "lm.pt")
    skipped = ["--shards", "0", "--no-critical-sharpness"]
    one = sharpscope(
        [*common, "--no-trace", *skipped, "--out", str(folder / "one")], 1, HF_HUB_OFFLINE="1"
    )
    assert one.returncode == 0, one.stderr[-4000:]
    sharded = ["--fsdp", "--backend", "finite-difference", *STALL, *skipped]
    two = sharpscope([*common, *sharded, "--out", str(folder / "two")], 2, HF_HUB_OFFLINE="1")
    assert two.returncode == 0, two.stderr[-4000:]
    return json.loads(one.stdout), json.loads(two.stdout), two.stderr, folder


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


ESTIMATORS = ["--batch-size", "5", "--top-k", "2", "--method", "power", "--max-iter", "20"]
ESTIMATORS += ["--density", "--per-layer", "--no-trace", "--shards", "0"]
ESTIMATORS += ["--no-critical-sharpness", "--backend", "finite-difference"]


@pytest.fixture(scope="module")
def estimated(runs: tuple[dict, dict, str, Path]) -> tuple[dict, dict]:
    """Power iteration, the density and the per-layer blocks: one process's finite differences
    and 2 ranks under ``--fsdp`` (2 batches of 5: one per rank), their reports' results. Against
    finite differences, not double backward: power iteration stops after ``--max-iter`` and SLQ
    runs its 80 steps, so each follows its products step by step, as the trace does."""
    folder = runs[3]
    args = ["analyze", str(folder / "gpt2"), *EXACT, *ESTIMATORS]
    args[args.index("lm.pt")] = str(folder / "lm.pt")
    one = sharpscope(args, 1, HF_HUB_OFFLINE="1")
    assert one.returncode == 0, one.stderr[-4000:]
    two = sharpscope([*args, "--fsdp", *STALL], 2, HF_HUB_OFFLINE="1")
    assert two.returncode == 0, two.stderr[-4000:]
    return json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]


@pytest.mark.integration
def test_fsdp_analyze_equals_one_process(runs):
    one, two, _, _ = (runs[0]["results"], runs[1]["results"], *runs[2:])
    pairs = zip(one["eigenvalues"]["values"], two["eigenvalues"]["values"], strict=True)
    assert all(close(a, b, REL_FD) for a, b in pairs), (one["eigenvalues"], two["eigenvalues"])
    assert close(one["lambda_min"]["value"], two["lambda_min"]["value"], REL_FD)
    for name in ("loss", "grad_norm"):
        assert close(one[name], two[name], 1e-12), name
    assert one["num_params"] == two["num_params"] and one["num_samples"] == two["num_samples"]
    for name in ALIGNMENT:
        assert close(one["alignment"][name], two["alignment"][name], REL_FD), name
    # SAM's loss rise is a difference of losses, exact on both sides
    assert close(one["alignment"]["sam_sharpness"], two["alignment"]["sam_sharpness"], 1e-8)
    batches, sharded = one["alignment"]["cos_batches"], two["alignment"]["cos_batches"]
    for name in BATCHES:
        assert close(batches[name], sharded[name], REL_FD), name
    assert batches["count"] == sharded["count"] == 5
    pairs = zip(batches["values"], sharded["values"], strict=True)
    assert all(close(a, b, REL_FD) for a, b in pairs), (batches["values"], sharded["values"])
    for name, line in one["slices"].items():  # the loss along v₁ and ĝ (--out)
        other = two["slices"][name]
        assert line["steps"] == other["steps"]
        losses = other["loss"] if name == "gradient" else _signed(line["loss"], other["loss"])
        assert all(close(a, b, REL_FD) for a, b in zip(line["loss"], losses, strict=True)), name


@pytest.mark.integration
def test_fsdp_trace_equals_one_process_finite_differences(runs):
    """Against one process's finite differences (the same products, so the same budget, probes
    and stopping), not double backward."""
    folder = runs[3]
    args = ["analyze", str(folder / "gpt2"), *EXACT, "--backend", "finite-difference"]
    args[args.index("lm.pt")] = str(folder / "lm.pt")
    one = sharpscope([*args, "--shards", "0", "--no-critical-sharpness"], 1)
    assert one.returncode == 0, one.stderr[-4000:]
    whole, sharded = json.loads(one.stdout)["results"]["trace"], runs[1]["results"]["trace"]
    assert whole["n_products"] == sharded["n_products"], (whole, sharded)
    for name in ("estimate", "std_error"):
        assert close(whole[name], sharded[name], REL_FD), (whole, sharded)


def _signed(losses: list[float], other: list[float]) -> list[float]:
    """``other``, or reversed (along −v₁: an eigenvector's sign is arbitrary), whichever is nearer
    ``losses``."""
    reverse = other[::-1]
    near = sum(abs(a - b) for a, b in zip(losses, other, strict=True))
    return (
        other if near <= sum(abs(a - b) for a, b in zip(losses, reverse, strict=True)) else reverse
    )


@pytest.mark.integration
def test_fsdp_turns_nothing_off_and_plans_per_rank(runs):
    report, stderr = runs[1], runs[2]
    notes = " ".join(report["results"]["notes"])
    assert "did not run" not in notes and "not measured" not in notes, notes
    plan = [line for line in stderr.splitlines() if line.startswith("plan:")]
    assert len(plan) == 1 and "per rank: parameter shards" in plan[0], stderr[-2000:]
    assert "a gradient's shard" in plan[0] and "836 parameters" in plan[0]


@pytest.mark.integration
def test_fsdp_eigenvectors_file_equals_one_process(runs):
    folder = runs[3]
    values, vectors = load_eigenvectors(folder / "one" / "eigenvectors.safetensors")
    sharded_values, sharded = load_eigenvectors(folder / "two" / "eigenvectors.safetensors")
    assert len(vectors) == len(sharded) == 3
    assert all(close(a, b, REL_FD) for a, b in zip(values, sharded_values, strict=True))
    flat = []
    for whole, pieces in zip(vectors, sharded, strict=True):
        assert list(whole) == list(pieces)  # the same parameters, in the same order
        assert all(whole[n].shape == pieces[n].shape for n in whole)
        a = torch.cat([t.reshape(-1) for t in whole.values()])
        b = torch.cat([t.reshape(-1) for t in pieces.values()])
        b = b * torch.sign(a @ b)
        assert float((a - b).norm()) <= REL_FD, float((a - b).norm())
        flat.append(b)
    gram = torch.stack(flat) @ torch.stack(flat).T  # each its own vector: orthonormal
    assert torch.allclose(gram, torch.eye(3, dtype=gram.dtype), atol=1e-6), gram


def test_blocks_are_the_layers_of_a_transformer():
    model = tiny_hf.gpt2()
    assert blocks(model) == list(model.transformer.h)
    assert blocks(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--backend", "finite-difference"], ["--fsdp", "torchrun --nproc-per-node N"]),
        ([], ["--fsdp", "finite differences only", "--backend finite-difference"]),
        (["--backend", "forward-over-reverse"], ["--backend forward-over-reverse"]),
        (["--backend", "finite-difference", "--curvature", "ggn"], ["Hessian only", "ggn"]),
    ],
)
def test_fsdp_bad_combinations_are_one_line(tmp_path, extra, words):
    args = ["analyze", str(make_checkpoint(tmp_path)), "--data", "digits", "--fsdp", *extra]
    one_error_line(CliRunner().invoke(app, args), *words)


def test_check_fsdp_outside_torchrun_is_one_line(tmp_path):
    args = ["check", str(make_checkpoint(tmp_path)), "--data", "digits", "--fsdp"]
    args += ["--backend", "finite-difference", "--max-eigenvalue", "1"]
    one_error_line(CliRunner().invoke(app, args), "torchrun --nproc-per-node N -m sharpscope check")


@pytest.mark.integration
def test_fsdp_check_gates_as_one_process(runs):
    """``check --fsdp`` on 2 ranks: the same checks pass and fail as in one process (double
    backward), with the same exit code, and rank 0 alone prints (stdout is one JSON document)."""
    folder = runs[3]
    args = ["check", str(folder / "gpt2"), "--data", str(folder / "lm.pt"), "--batch-size", "2"]
    args += ["--dtype", "float64", "--top-k", "1", "--no-trace", "--shards", "0", "--json"]
    sharded = ["--fsdp", "--backend", "finite-difference", *STALL]
    passing = ["--max-eigenvalue", "1000"]
    for thresholds, code in ((passing, 0), ([*passing, "--max-sam-sharpness", "0"], 1)):
        one = CliRunner().invoke(app, [*args, *thresholds], env={"HF_HUB_OFFLINE": "1"})
        two = sharpscope([*args, *thresholds, *sharded], 2, HF_HUB_OFFLINE="1")
        assert one.exit_code == two.returncode == code, (one.output, two.stderr[-4000:])
        ours, theirs = json.loads(two.stdout), json.loads(one.stdout)
        assert ours["verdict"] == theirs["verdict"] == ("pass" if code == 0 else "fail")
        verdicts = [(c["name"], c["passed"]) for c in ours["checks"]]
        assert verdicts == [(c["name"], c["passed"]) for c in theirs["checks"]], verdicts


@pytest.mark.integration
def test_fsdp_classifier_accuracy_with_uneven_batches(tmp_path):
    """The tiny BERT classifier (padding tokens, a held padding row): 3 batches (5, 5, 2) over
    ranks holding 2 and 1, so the rank with fewer runs its accuracy forwards in lockstep (a sharded
    forward gathers over the ranks); the accuracy and loss equal one process's, λ₁ within the
    step's error."""
    tiny_hf.bert().save_pretrained(tmp_path / "bert")
    torch.save(token_data(), tmp_path / "tokens.pt")
    args = ["analyze", str(tmp_path / "bert"), "--data", str(tmp_path / "tokens.pt")]
    args += ["--batch-size", "5", "--dtype", "float64", "--top-k", "1", "--json"]
    whole_only = ["--no-trace", "--shards", "0", "--no-critical-sharpness"]
    one = sharpscope([*args, *whole_only], 1, HF_HUB_OFFLINE="1")
    sharded = ["--fsdp", "--backend", "finite-difference", *STALL]
    two = sharpscope([*args, *sharded], 2, HF_HUB_OFFLINE="1")
    assert one.returncode == 0, one.stderr[-4000:]
    assert two.returncode == 0, two.stderr[-4000:]
    one, two = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
    assert one["num_samples"] == two["num_samples"] == N
    assert one["accuracy"] is not None and one["accuracy"] == two["accuracy"]
    assert close(one["loss"], two["loss"], 1e-12)
    assert close(one["lambda_max"], two["lambda_max"], REL_FD), (
        one["lambda_max"],
        two["lambda_max"],
    )


def _scaled(ours: list[float], theirs: list[float], scale: float) -> bool:
    """Each of ``ours`` within :data:`REL_FD` × ``scale`` of ``theirs`` (SLQ's nodes near 0 are
    equal to the spectrum's scale, not to their own)."""
    return all(abs(a - b) <= REL_FD * scale for a, b in zip(ours, theirs, strict=True))


@pytest.mark.integration
def test_fsdp_power_iteration_equals_one_process(estimated):
    one, two = estimated
    assert one["eigenvalues"]["method"] == two["eigenvalues"]["method"] == "power"
    assert one["eigenvalues"]["n_products"] == two["eigenvalues"]["n_products"]
    pairs = zip(one["eigenvalues"]["values"], two["eigenvalues"]["values"], strict=True)
    assert all(close(a, b, REL_FD) for a, b in pairs), (one["eigenvalues"], two["eigenvalues"])
    assert close(one["lambda_min"]["value"], two["lambda_min"]["value"], REL_FD)


@pytest.mark.integration
def test_fsdp_density_equals_one_process(estimated):
    one, two = (r["density"] for r in estimated)
    assert len(one["nodes"]) == len(two["nodes"]) == 4  # the default SLQ start vectors
    scale = max(abs(x) for nodes in one["nodes"] for x in nodes)
    for name in ("nodes", "weights"):
        for ours, theirs in zip(two[name], one[name], strict=True):
            assert _scaled(ours, theirs, scale if name == "nodes" else 1.0), name
    assert close(one["mean"], two["mean"], REL_FD)


@pytest.mark.integration
def test_fsdp_per_layer_equals_one_process(estimated):
    """Each block is a sub-operator of its group's parameters, each rank holding its shards of
    them: the same groups, whole sizes and eigenvalues as one process."""
    one, two = (r["per_layer"] for r in estimated)
    assert [b["name"] for b in one] == [b["name"] for b in two] and len(one) == 6
    for whole, sharded in zip(one, two, strict=True):
        assert whole["size"] == sharded["size"] and whole["parameters"] == sharded["parameters"]
        assert close(whole["eigenvalue"], sharded["eigenvalue"], REL_FD), (whole, sharded)


@pytest.mark.integration
def test_fsdp_product_error_is_measured_as_one_process(estimated):
    """The finite-difference error estimate (Richardson, on v₁ and the other pairs) on sharded
    vectors: the same method, within 25 % of one process's (it is at the rounding floor there,
    which the order of the sums moves), and in the eigenvalues' bounds."""
    one, two = (r["product_error"] for r in estimated)
    assert one["method"] == two["method"] == "finite-difference"
    for name in ("absolute", "relative"):  # relative: over ‖Hv₁‖, summed over the ranks
        assert abs(one[name] - two[name]) <= 0.25 * one[name], (one, two)
    bounds = estimated[1]["eigenvalues"]["bounds"]
    residuals = estimated[1]["eigenvalues"]["residuals"]
    assert all(
        b >= r + two["absolute"] * (1 - 1e-9) for b, r in zip(bounds, residuals, strict=True)
    )
