"""The sharpness tracker on a model whose parameters FSDP2 shards (``fully_shard``) over 2 Gloo
ranks, against one process holding the whole model and the whole probe batch, in float64: 8 SGD
steps measured every 2 (λ_max, λ_min, the trace, the alignment, an Eigen-SAM estimate's alignment
and the critical sharpness along the last update, all by finite differences on both sides), one
λ_max against the dense Hessian's, and the warm-start vectors saved through
torch.distributed.checkpoint and loaded whole in one process.

The runs are real ``python -m torch.distributed.run --standalone`` subprocesses with a timeout
(helpers from test_distributed.py), so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import python

pytestmark = pytest.mark.integration  # every test runs torchrun
TESTS = Path(__file__).resolve().parents[1]
PRELUDE = """
import sys

sys.path.insert(0, {tests!r})

import types

import sharded_problem
import torch
import torch.distributed.checkpoint as dcp
from ground_truth import dense_hessian

from sharpscope import distributed
from sharpscope.analysis.critical_sharpness import critical_sharpness
from sharpscope.analysis.fsdp import shard_model
from sharpscope.curvature.sharded import ShardedHessianOperator
from sharpscope.optim.pieces import cut
from sharpscope.curvature import Objective
from sharpscope.training.tracking import SharpnessTracker

NAME, FOLDER = {name!r}, {folder!r}
STEPS, EVERY, LR = 8, 2, 0.2
FIGURES = ("lambda_max", "lambda_min", "trace", "alignment", "esam_v1_alignment", "lambda_c",
           "lambda_c_low", "lambda_c_high")


inputs, targets, loss_fn = sharded_problem.data(NAME)


def build():
    return sharded_problem.build(NAME)


def half(rank):
    return sharded_problem.half(inputs, targets, rank)


def estimate(model):
    # an Eigen-SAM stand-in: a seeded whole vector, held as this rank's pieces where sharded
    g = torch.Generator().manual_seed(3)
    whole = {{n: torch.randn(p.shape, generator=g, dtype=torch.float64)
             for n, p in build().named_parameters()}}
    pieces = {{n: cut(whole[n], p) for n, p in model.named_parameters()}}
    return types.SimpleNamespace(eigenvector=pieces, model=model)


def tracked(model, batch, rows):
    # the same tracker on both sides: every figure, solved to a tight tolerance
    return SharpnessTracker(
        Objective(model, loss_fn, [batch]), EVERY, lambda_min=True, trace=True,
        trace_samples=12, products=None, max_iter=60, tol=1e-6, backend="finite-difference",
        measure="both", eigen_sam=estimate(model), log=rows,
    )


def train(model, batch, tracker):
    # STEPS steps of SGD on batch, measured at step 0 and every EVERY steps
    x, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    tracker.measure(0)
    for step in range(1, STEPS + 1):
        tracker.step_started(step, LR)
        opt.zero_grad()
        loss_fn(model(**x) if isinstance(x, dict) else model(x), y).backward()
        opt.step()
        tracker(step)


def whole(model):
    return {{n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
            for n, p in model.named_parameters()}}
"""
SHARDED_CHECK = (
    PRELUDE
    + """
# On 2 ranks: every row's figures equal one process's to 1e-6 relative; the last λ_max (and
# λ_min) equal the dense Hessian's extremes at the last weights to 1e-6 (the MLP); the tracker's
# vectors saved through DCP as DTensors placed like the parameters. A critical-sharpness
# direction zero on one rank's pieces only is searched on every rank.


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def main():
    model = build()
    expected = []
    train(model, (inputs, targets), tracked(model, (inputs, targets), expected))
    with distributed.launched(60):
        rank = distributed.rank()
        sharded = shard_model(build())
        rows = []
        tracker = tracked(sharded, half(rank), rows)
        train(sharded, half(rank), tracker)
        rows = distributed.main_value(rows)  # rank 0 alone logs
        assert [r["step"] for r in rows] == [0, 2, 4, 6, 8], rows
        worst = 0.0
        for ours, theirs in zip(rows, expected, strict=True):
            assert ours["lambda_c_direction"] == theirs["lambda_c_direction"]
            assert all(ours[k] is not None for k in FIGURES[:5]), ours
            for key in FIGURES:
                assert (ours[key] is None) == (theirs[key] is None), (key, ours, theirs)
                if ours[key] is None:  # λ_c's bracket is open where the loss rose at once
                    continue
                off = relative(ours[key], theirs[key])
                assert off <= 1e-6, (ours["step"], key, ours[key], theirs[key])
                worst = max(worst, off)
        assert rows[-1]["lambda_c_direction"] == "update" and rows[-1]["warm_start"]
        assert any(r["lambda_c"] is not None for r in rows), rows
        if NAME == "mlp":
            weights = whole(sharded)
            dense = build()
            dense.load_state_dict(weights)
            values = torch.linalg.eigvalsh(dense_hessian(dense, loss_fn, inputs, targets))
            assert relative(rows[-1]["lambda_max"], values[-1].item()) <= 1e-6, values
            assert relative(rows[-1]["lambda_min"], values[0].item()) <= 1e-6, values
        # a direction zero on rank 1's pieces alone is not zero: its norm is summed over ranks
        op = ShardedHessianOperator(Objective(sharded, loss_fn, [half(rank)]), validate=False)
        direction = torch.zeros(op.size, dtype=torch.float64)
        direction[:1] = 1.0 - rank
        assert critical_sharpness(op, direction).status != "zero-direction"
        state = tracker.state_dict()
        assert all(isinstance(state[k], dict) for k in ("top", "bottom", "next")), state
        dcp.save({{k: state[k] for k in ("top", "bottom", "next")}}, checkpoint_id=FOLDER)
        top = torch.cat([t.full_tensor().reshape(-1) for t in state["top"].values()])
        if rank == 0:
            torch.save(top, f"{{FOLDER}}/top.pt")
            print("ok", f"{{worst:.1e}}", file=sys.stderr)
            print("ok")


main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""
)
LOAD_ONE = (
    PRELUDE
    + """
# One process loads the vectors 2 ranks saved (DCP reshards them onto whole tensors): the warm
# start is the 2 ranks' vector, whole.
model = build()
tracker = tracked(model, (inputs, targets), [])
state = {{k: {{n: torch.zeros_like(p) for n, p in model.named_parameters()}}
         for k in ("top", "bottom", "next")}}
dcp.load(state, checkpoint_id=FOLDER)
tracker.load_state_dict(state)
assert torch.equal(tracker.state_dict()["top"], torch.load(f"{{FOLDER}}/top.pt"))
assert tracker.measure(9).warm_start
print("ok")
"""
)


@pytest.mark.parametrize("name", ["mlp", "gpt2"])
def test_tracking_sharded_parameters_equals_one_process(tmp_path, name):
    for script, text, nproc in [("tracked.py", SHARDED_CHECK, 2), ("load_one.py", LOAD_ONE, 1)]:
        path = tmp_path / script
        path.write_text(text.format(tests=str(TESTS), name=name, folder=str(tmp_path)), "utf-8")
        done = python([str(path)], nproc)
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.split() == ["ok"]
