"""``sharpscope analyze`` under torchrun: 2 Gloo processes on localhost against one process.

Every multi-process run is a real ``python -m torch.distributed.run --standalone`` subprocess
with a timeout, so a hang fails the test instead of stalling it. Runs go one at a time (two
workers at most) and use one thread each: the models are tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sharpscope import distributed
from sharpscope.cli.app import app
from sharpscope.errors import InputError
from sharpscope.io.architectures import mlp
from sharpscope.launch import TORCHRUN_VARS

REL = 1e-8
TIMEOUT_S = 120
MLP16 = ["--model", "mlp", "--model-arg", "hidden=(16,)"]
ANALYZE = ["--dtype", "float64", "--top-k", "3", "--json", "--quiet"]
WORLD_DATA = '''
import os
import time
import torch

def data():
    """The same inputs on every rank, except rank 1 under SHARPSCOPE_TEST_ODD=differ, which
    gets other ones, =fail, which fails, and =slow, which stalls for a minute."""
    odd = os.environ.get("RANK") == "1" and os.environ.get("SHARPSCOPE_TEST_ODD")
    if odd == "fail":
        raise RuntimeError("this rank cannot see the data")
    if odd == "slow":
        time.sleep(60)
    inputs = torch.randn(40, 64, generator=torch.Generator().manual_seed(1 if odd else 0))
    return inputs, torch.arange(40) % 10
'''
OPERATOR_CHECK = """
# On 2 ranks: each backend's operator over the shards equals one process's over all batches,
# identically on both ranks; a model that differs, and a failure on rank 1, raise on both ranks.
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope import HessianOperator, Objective, distributed, lanczos
from sharpscope.analysis.sampling import shard_losses

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
inputs, targets = torch.randn(67, 5, dtype=torch.float64), torch.arange(67) % 3
pieces = list(zip(inputs.split(10), targets.split(10)))  # 7 batches, the last of 7 samples
v, delta = torch.randn(2, 57, dtype=torch.float64)


def main():
    with distributed.launched(60):
        rank = distributed.rank()
        mine = [pieces[i] for i in distributed.shard(len(pieces))]
        for kwargs in [{}, {"cache_graph": False}, {"backend": "forward-over-reverse"}]:
            objective = Objective(model, F.cross_entropy, mine)
            ours = HessianOperator(objective, **kwargs)
            one = HessianOperator(objective.replace(batches=pieces, distributed=False), **kwargs)
            assert ours.distributed and (ours.num_samples, ours.num_batches) == (67, 7)
            for a, b in [
                (ours.matvec(v), one.matvec(v)),
                (ours.gradient(), one.gradient()),
                (torch.tensor(ours.loss()), torch.tensor(one.loss())),
                (torch.tensor(ours.loss(delta)), torch.tensor(one.loss(delta))),
                (lanczos(ours, k=3).eigenvalues, lanczos(one, k=3).eigenvalues),
                tuple(torch.tensor(shard_losses(o, 3, delta)) for o in (ours, one)),
            ]:
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
                gathered = distributed.all_gather(a.tolist())
                assert all(g == gathered[0] for g in gathered), "ranks differ"
        # Finite differences: the same step and error estimate on every rank, the exact product.
        fd = HessianOperator(Objective(model, F.cross_entropy, mine), backend="finite-difference")
        one = Objective(model, F.cross_entropy, pieces, distributed=False)
        expected = HessianOperator(one, cache_graph=False).matvec(v)
        product = fd.matvec(v)
        torch.testing.assert_close(product, expected, rtol=1e-7, atol=1e-9)
        gathered = distributed.all_gather([*product.tolist(), fd.fd_error, fd.fd_scale])
        assert all(g == gathered[0] for g in gathered), "ranks differ"
        try:
            odd = nn.Linear(2, 2 + rank)
            distributed.check_same("model", distributed.model_fingerprint(odd))
            raise AssertionError("no disagreement found")
        except distributed.RankError as exc:
            assert "the ranks disagree on model: rank(s) 1 differ from rank 0" in str(exc), exc
        try:
            with distributed.together("loading"):
                if rank == 1:
                    raise ValueError("only on rank 1")
            raise AssertionError("no failure reported")
        except distributed.RankError as exc:
            assert "loading failed on rank 1 of 2: ValueError: only on rank 1" in str(exc), exc
        if rank == 0:
            print("ok", distributed.world_size())


main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""


def env(**extra: str) -> dict[str, str]:
    """The environment of a run: one thread per process, no colour, no torchrun variables."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    return {**base, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "COLUMNS": "200", **extra}


def launch(args: list[str], nproc: int, **extra: str) -> subprocess.Popen[str]:
    """``python ARGS``, or under torchrun with ``nproc`` processes when > 1, started: runs that
    do not depend on each other overlap (a torchrun launch leaves the CPUs idle part of the
    time); :func:`finished` waits for one."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        if nproc > 1
        else []
    )
    return subprocess.Popen(
        [sys.executable, *launcher, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(**extra),
    )


def finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    """The launched run's result; one that takes over ``TIMEOUT_S`` is killed and fails."""
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def python(args: list[str], nproc: int, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python ARGS``, or under torchrun with ``nproc`` processes when > 1, with a timeout."""
    return finished(launch(args, nproc, **extra))


def sharpscope(args: list[str], nproc: int, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m sharpscope ARGS`` in ``nproc`` processes."""
    return python(["-m", "sharpscope", *args], nproc, **extra)


def report(args: list[str], nproc: int) -> dict[str, Any]:
    """The JSON report's results of ``nproc`` processes; one process is this one (no start-up)."""
    if nproc == 1:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["results"]
    done = sharpscope(args, nproc)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["results"]  # one JSON document: only rank 0 printed


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ddp") / "mlp.pt"
    torch.manual_seed(0)
    torch.save(mlp(hidden=(16,)).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def world_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ddp-data") / "world_data.py"
    path.write_text(WORLD_DATA, encoding="utf-8")
    return f"{path}:data"


@pytest.mark.integration
@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param(["--samples", "96", "--batch-size", "16"], id="6-even-batches"),
        pytest.param(["--samples", "100", "--batch-size", "16"], id="7-uneven-batches"),
    ],
)
def test_torchrun_analyze_equals_one_process(checkpoint, sizes):
    args = ["analyze", str(checkpoint), "--data", "digits", *MLP16, *sizes, *ANALYZE]
    one, two = report(args, 1), report(args, 2)
    figures = [
        ("loss",),
        ("accuracy",),
        ("grad_norm",),
        ("lambda_min", "value"),
        ("trace", "estimate"),
        ("trace", "std_error"),
        *[("alignment", name) for name in ("cos_full", "topk_share", "sam_sharpness")],
        *[("alignment", name) for name in ("sam_sharpness_quadratic", "eigen_sam_cos")],
        *[("alignment", "cos_batches", name) for name in ("mean", "min", "max", "std_error")],
        ("alignment", "cos_batches", "eigen_sam_mean"),
        *[("alignment", "cos_batches", "quantiles", q) for q in ("q05", "q50", "q95")],
    ]
    for path in figures:
        a, b = one, two
        for key in path:
            a, b = a[key], b[key]
        assert close(a, b), (path, a, b)
    for a, b in zip(one["eigenvalues"]["values"], two["eigenvalues"]["values"], strict=True):
        assert close(a, b), (a, b)
    assert one["num_samples"] == two["num_samples"]
    for key in ("count", "batch_size"):  # the ranks' minibatches pooled, the shorter one left out
        assert one["alignment"]["cos_batches"][key] == two["alignment"]["cos_batches"][key]
    assert one["trace"]["n_samples"] == two["trace"]["n_samples"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("odd", "expected"),
    [
        ("differ", "the ranks disagree on data"),
        ("fail", "failed on rank 1 of 2: InputError: --data"),
    ],
)
def test_a_misconfigured_world_fails_on_every_rank(checkpoint, world_data, odd, expected):
    args = ["analyze", str(checkpoint), "--data", world_data, *MLP16, "--top-k", "1", "--quiet"]
    done = sharpscope(args, 2, SHARPSCOPE_TEST_ODD=odd)
    assert done.returncode != 0
    assert done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 0: "), done.stderr
    assert expected in errors[0], done.stderr
    if odd == "fail":
        assert "this rank cannot see the data" in errors[0]


@pytest.mark.integration
def test_operator_and_checks_on_2_ranks(tmp_path):
    script = tmp_path / "operator_check.py"
    script.write_text(OPERATOR_CHECK, encoding="utf-8")
    done = python([str(script)], 2)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "2"]


@pytest.mark.integration
def test_a_stalled_rank_times_out_instead_of_hanging(checkpoint, world_data):
    args = ["analyze", str(checkpoint), "--data", world_data, *MLP16, "--dist-timeout", "3"]
    start = time.perf_counter()
    done = sharpscope(args, 2, SHARPSCOPE_TEST_ODD="slow")
    assert time.perf_counter() - start < 40
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: rank 0: ")]
    assert len(errors) == 1 and "waited more than 3 s for the other ranks" in errors[0], done.stderr


def test_helpers_are_no_ops_in_one_process():
    assert not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [0.0, 1.0, 2.0]
    assert distributed.all_gather({"a": 1}) == [{"a": 1}]
    assert distributed.shard(5) == range(5)
    with pytest.raises(ValueError, match="boom"), distributed.together("x"):
        raise ValueError("boom")
    distributed.check_same("anything", "value")


def test_model_fingerprint_sees_weights_shapes_and_buffers():
    torch.manual_seed(0)
    a = torch.nn.BatchNorm1d(3)
    b = torch.nn.BatchNorm1d(3)
    assert distributed.model_fingerprint(a) == distributed.model_fingerprint(b)
    b.running_mean += 1
    assert distributed.model_fingerprint(a) != distributed.model_fingerprint(b)
    assert distributed.model_fingerprint(a) != distributed.model_fingerprint(
        torch.nn.BatchNorm1d(4)
    )


def test_too_few_batches_for_the_world_is_an_input_error(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 3)
    assert distributed.shard(10) == range(7, 10)
    with pytest.raises(InputError, match="3 batch\\(es\\) cannot be shared by 4 processes"):
        distributed.shard(3)


ENTRY = """
import atexit
import sys

class Finalised:
    def __del__(self):
        print("finalised", flush=True)

witness = Finalised()  # its __del__ runs only if the interpreter is finalised
atexit.register(print, "exit handlers ran")
sys.argv = ["sharpscope", *sys.argv[1:]]
from sharpscope.cli.app import main
main()
"""


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "code", "output"),
    [
        (["--version"], 0, "sharpscope "),
        (["analyze", "--no-such-flag"], 2, "No such option"),
        (["check", "absent.json", "--max-eigenvalue", "1", "--debug"], 1, "Traceback"),
    ],
)
def test_under_torchrun_the_cli_skips_finalisation_but_keeps_exit_handlers_and_code(
    args, code, output
):
    """Under torchrun the entry point ends with os._exit (Gloo's threads abort a finalising
    interpreter), also after a --debug traceback: exit handlers still run, the exit code and
    output are kept; not so alone."""
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    cases = [(torchrun, False), ({}, True)]
    started = [launch(["-c", ENTRY, *args], 1, **extra) for extra, _ in cases]  # independent
    for (extra, finalised), process in zip(cases, started, strict=True):
        done = finished(process)
        assert done.returncode == code, done.stderr
        assert output in done.stdout + done.stderr
        assert "exit handlers ran" in done.stdout
        assert ("finalised" in done.stdout) == finalised, (extra, done.stdout)


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["random", "eigen"])
def test_torchrun_landscape_equals_one_process(checkpoint, tmp_path, kind):
    """Each rank evaluates its block of the 15 points on all the data: along the same random
    directions the losses are bit for bit one process's; along v₁, v₂ (Lanczos on the sharded
    data) equal to rounding."""
    from sharpscope.analysis.landscape import LandscapeConfig, landscape
    from sharpscope.cli.loading import load_inputs
    from sharpscope.io.load_spec import LoadSpec

    sizes = {"samples": 96, "batch_size": 16, "dtype": "float64"}
    settings = {"directions": kind, "span": 0.5, "points": 5, "grid": 3}
    args = ["landscape", str(checkpoint), "--data", "digits", *MLP16, "--quiet"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in {**sizes, **settings}.items()]
    done = sharpscope([*args, "--out", str(tmp_path)], 2)
    assert done.returncode == 0, done.stderr
    two = json.loads((tmp_path / "landscape.json").read_text(encoding="utf-8"))
    spec = LoadSpec(checkpoint, "digits", model="mlp", model_args=MLP16[3:], **sizes)
    loaded = load_inputs(spec)
    one = landscape(loaded.model, loaded.loss_fn, loaded.batches, LandscapeConfig(**settings))
    grid = [v for row in two["grid"]["loss"] for v in row]
    ours = [two["centre_loss"], *two["line"]["loss"], *grid]
    theirs = [one.centre_loss, *one.line, *(v for row in one.surface for v in row)]
    assert two["evaluations"] == one.evaluations == len(ours) == 15
    if kind == "random":
        assert ours == theirs
    else:
        assert all(close(a, b) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)
        assert all(
            close(a, b)
            for a, b in zip(
                two["directions"]["eigenvalues"], one.directions.eigenvalues, strict=True
            )
        )
