"""``analyze --fsdp``'s spread over data shards, its sample-size bias, the critical and the
adaptive sharpness on 2 Gloo ranks, against one process holding the whole model, in float64.

The reference is one process's finite differences (the same products, step searches and
stopping, so the shards' re-solves for the bias take the same path): every figure equals it to
:data:`REL` relative. The MLP's data (samples 18, batches of 16) leave rank 1 one batch of 2,
which holds no sample of shards 2 and 3: it runs its filler in step with rank 0 there, and its
shard losses take fewer forwards than rank 0's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import tiny_hf
import torch
from test_distributed import sharpscope
from tiny_cli import make_checkpoint

pytestmark = pytest.mark.integration  # every test runs torchrun
REL = 1e-8
COMMON = ["--dtype", "float64", "--tol", "1e-8", "--json", "--backend", "finite-difference"]
COMMON += ["--bias", "--critical-sharpness"]
SHARDED = ["--fsdp", "--dist-timeout", "60"]
"""A rank left waiting in a collective (the ranks' forwards out of step) fails, not hangs."""
FIGURES = ("sampling", "critical_sharpness", "adaptive_sharpness")
SKIPPED = {"seconds", "timings"}


def both(args: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The report results of ``analyze ARGS`` in one process and on 2 ranks under ``--fsdp``."""
    one = sharpscope(["analyze", *args], 1, HF_HUB_OFFLINE="1")
    assert one.returncode == 0, one.stderr[-4000:]
    two = sharpscope(["analyze", *args, *SHARDED], 2, HF_HUB_OFFLINE="1")
    assert two.returncode == 0, two.stderr[-4000:]
    return json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The tiny MLP on 18 digits in batches of 16 and 2, 4 shards, the trace's spread and the
    worst-case adaptive sharpness (ℓ2: its ascent's and projection's norms summed over the
    ranks)."""
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("spread"))
    args = [str(checkpoint), "--data", "digits", "--samples", "18", "--batch-size", "16"]
    args += [*COMMON, "--top-k", "2", "--shards", "4", "--adaptive-sharpness", "worst"]
    return both([*args, "--adaptive-steps", "3"])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """The tiny GPT-2 on 10 sequences in 5 batches of 2 (the ranks hold 3 and 2), 2 shards, the
    average-case adaptive sharpness."""
    folder = tmp_path_factory.mktemp("spread_gpt2")
    tiny_hf.gpt2().save_pretrained(folder / "gpt2")
    ids = torch.randint(0, tiny_hf.VOCAB - 1, (10, 10), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, folder / "lm.pt")
    args = [str(folder / "gpt2"), "--data", str(folder / "lm.pt"), "--batch-size", "2"]
    args += [*COMMON, "--top-k", "2", "--no-trace", "--shards", "2"]
    return both([*args, "--adaptive-sharpness", "average", "--adaptive-steps", "3"])


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two report values differ: numbers by more than :data:`REL` relative, anything else
    at all (the keys of :data:`SKIPPED` left out)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        if ours.keys() != theirs.keys():
            return [f"{path}: keys {sorted(ours)} != {sorted(theirs)}"]
        return [
            d
            for k in ours
            if k not in SKIPPED
            for d in differences(ours[k], theirs[k], f"{path}.{k}")
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, pair in enumerate(zip(ours, theirs, strict=True))
            for d in differences(*pair, f"{path}.{i}")
        ]
    numbers = all(isinstance(x, float | int) and not isinstance(x, bool) for x in (ours, theirs))
    if numbers and abs(ours - theirs) <= REL * max(abs(ours), abs(theirs), 1e-12):
        return []
    return [] if ours == theirs else [f"{path}: {ours!r} != {theirs!r}"]


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
@pytest.mark.parametrize("figure", FIGURES)
def test_fsdp_figure_equals_one_process(request, model, figure):
    one, two = request.getfixturevalue(model)
    assert one[figure] is not None, figure
    assert differences(two[figure], one[figure]) == [], figure


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_fsdp_spread_and_bias_are_measured_and_equal_one_process(request, model):
    """The spread's interval ends (value ± t·SE) and the bias, figure by figure."""
    one, two = request.getfixturevalue(model)
    sampling = two["sampling"]
    assert sampling["shards"] == one["sampling"]["shards"] == (4 if model == "mlp" else 2)
    assert sampling["bias"]["eigenvalues"][0] is not None and sampling["bias"]["lambda_min"]
    assert (sampling.get("trace") is not None) == (model == "mlp")
    for name, value in (("lambda_max", one["lambda_max"]), ("cos_full", None)):
        se = sampling["eigenvalues"][0] if name == "lambda_max" else sampling["cos_full"]
        theirs = one["sampling"]["eigenvalues"][0] if value else one["sampling"]["cos_full"]
        value = value or one["alignment"]["cos_full"]
        ours = two["lambda_max"] if name == "lambda_max" else two["alignment"]["cos_full"]
        m = sampling["interval_multiplier"]
        ends = (ours - m * se, ours + m * se)
        expected = (value - m * theirs, value + m * theirs)
        assert differences(list(ends), list(expected)) == [], name
    assert not any("did not run" in note for note in two["notes"]), two["notes"]


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_fsdp_verdict_with_spread_equals_one_process(request, model):
    """The verdict, and the notes on how other samples could move it, word for word."""
    one, two = request.getfixturevalue(model)
    assert two["verdict"] == one["verdict"], (two["verdict"], one["verdict"])
    spread = [[n for n in r["notes"] if "verdict" in n or "minibatch" in n] for r in (one, two)]
    assert spread[0] == spread[1], spread


def test_fsdp_check_widens_a_gate_by_the_spread_as_one_process(tmp_path):
    """``check --fsdp --sigmas 2``: λ_max above the limit but within its spread is not flagged
    (status ``noise``, exit 0), with one process's uncertainty."""
    args = ["check", str(make_checkpoint(tmp_path)), "--data", "digits", "--samples", "18"]
    args += ["--batch-size", "16", "--dtype", "float64", "--tol", "1e-8", "--top-k", "1"]
    args += ["--backend", "finite-difference", "--no-trace", "--shards", "4", "--sigmas", "2"]
    args += ["--max-eigenvalue", "1.0", "--json"]
    one, two = sharpscope(args, 1), sharpscope([*args, *SHARDED], 2)
    assert one.returncode == two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    (ours,), (theirs,) = (json.loads(run.stdout)["checks"] for run in (two, one))
    assert ours["status"] == theirs["status"] == "noise", ours
    assert ours["value"] > ours["limit"]
    assert differences(ours, theirs) == [], (ours, theirs)
