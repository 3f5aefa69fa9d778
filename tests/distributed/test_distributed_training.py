"""Training-time tools under torchrun (2 Gloo processes on localhost against one process): the
SharpnessTracker, its Lightning callback under ``strategy="ddp"``, and SAM's skipped steps with
a GradScaler when only one rank's gradient is non-finite.

Every multi-process run is a real ``python -m torch.distributed.run`` subprocess with a timeout
(helpers from test_distributed.py), so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from test_distributed import finished, launch
from torch import nn

from sharpscope import Objective, SharpnessTracker

pytestmark = pytest.mark.integration  # every test runs torchrun
REL = 1e-9
TRACKER_RUN = """
# The tracker on this rank's share of the probe set, measuring every 2 steps of SGD under DDP
# (each rank half of each batch); rank 0 prints every rank's measurements and sink rows.
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharpscope import Objective, SharpnessTracker, distributed

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
inputs, targets = torch.randn(64, 5, dtype=torch.float64), torch.arange(64) % 3
pieces = list(zip(inputs.split(16), targets.split(16)))  # 4 equal batches


def main():
    with distributed.launched(60):
        rank = distributed.rank()
        probe = [pieces[i] for i in distributed.shard(len(pieces))]
        trained = DistributedDataParallel(model) if distributed.is_distributed() else model
        rows = []
        log = (rows, f"{sys.argv[1]}/rank{rank}.jsonl")
        options = dict(lambda_min=True, trace=True, trace_samples=12, max_iter=30, log=log)
        tracker = SharpnessTracker(Objective(trained, F.cross_entropy, probe), every=2, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        half = distributed.shard(16)
        measured = []
        for step in range(1, 5):
            x, y = pieces[step % 4]
            optimizer.zero_grad()
            mine = slice(half.start, half.stop)
            F.cross_entropy(trained(x[mine]), y[mine]).backward()
            optimizer.step()
            row = tracker(step)
            if row is not None:
                measured.append({k: v for k, v in row.row().items() if k != "seconds"})
        tracker.close()
        everyone = distributed.all_gather({"measured": measured, "sink_rows": len(rows)})
        if rank == 0:
            print(json.dumps(everyone))


main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""
LIGHTNING_RUN = """
# A lightning.Trainer in DDP (2 CPU processes) with the callback, each rank on its share of the
# probe set; rank 0 saves the final weights and probe set and prints every rank's measurement.
import json
import sys

import lightning
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope import distributed
from sharpscope.integrations.lightning_callback import SharpnessCallback

out = sys.argv[1]
torch.manual_seed(0)
inputs, targets = torch.randn(64, 5, dtype=torch.float64), torch.arange(64) % 3
pieces = list(zip(inputs.split(16), targets.split(16)))


class Module(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, index):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


module = Module()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=8)
quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
trainer = lightning.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_steps=4, precision="64-true", **quiet
)
rank = trainer.global_rank
probe = pieces[2 * rank : 2 * rank + 2]
callback = SharpnessCallback(F.cross_entropy, probe, every=4, log=f"{out}/rank{rank}.jsonl")
trainer.callbacks.append(callback)
trainer.fit(module, loader)
last = callback.tracker.last.row()
everyone = distributed.all_gather({k: v for k, v in last.items() if k != "seconds"})
if rank == 0:
    torch.save({"net": module.net.state_dict(), "probe": pieces}, f"{out}/final.pt")
    print(json.dumps(everyone))
distributed.exit_now(0)
"""

SAM_SCALER_RUN = """
# SAM with a GradScaler in DDP, each rank's perturbation from its own gradient (the first pass
# under no_sync, m-sharpness); rank 1 alone turns a gradient to inf: in the first pass of step
# 1, in the second of step 2 (after DDP's all-reduce). Rank 0 prints every rank's history.
import contextlib
import json

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import sharpscope as ss
from sharpscope import distributed

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
inputs, targets = torch.randn(32, 5), torch.arange(32) % 3
POISONED = {(1, 1), (2, 2)}  # (step, pass) at which rank 1's gradient is inf


def main():
    with distributed.launched(60):
        rank = distributed.rank()
        ddp = DistributedDataParallel(model)
        optimizer = ss.SAM(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        mine = distributed.shard(len(inputs))
        x, y = inputs[mine.start : mine.stop], targets[mine.start : mine.stop]
        history = []
        for step in range(4):
            passes = []

            def closure():
                passes.append(len(passes) + 1)
                with ddp.no_sync() if passes == [1] else contextlib.nullcontext():
                    loss = F.cross_entropy(ddp(x), y)
                    scaler.scale(loss).backward()
                if rank == 1 and (step, passes[-1]) in POISONED:
                    model[0].weight.grad[0, 0] = float("inf")
                return loss.detach()

            optimizer.step(closure, scaler=scaler)
            scaler.update()
            history.append(
                {
                    "skipped": optimizer.skipped,
                    "passes": len(passes),
                    "scale": scaler.get_scale(),
                    "global_step": optimizer.global_step,
                    "weights": distributed.model_fingerprint(model),
                    "momentum": distributed.fingerprint(
                        (str(i), s["momentum_buffer"])
                        for i, s in enumerate(optimizer.state.values())
                    ),
                }
            )
        everyone = distributed.all_gather(history)
        if rank == 0:
            print(json.dumps(everyone))


main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""

HF_RUN = """
# A transformers.Trainer in DDP (torchrun, 2 CPU processes, accelerate's Gloo group) with the
# callback, each rank on its share of the probe set; rank 0 saves the final weights and probe set
# and prints every rank's measurement and logged rows.
import json
import sys

sys.path.insert(0, sys.argv[2])  # tests/, for tiny_hf

import tiny_hf
import torch
import transformers

from sharpscope import distributed
from sharpscope.integrations.hf_callback import SharpnessCallback

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, tiny_hf.VOCAB, (32, 6), generator=g)
labels = torch.arange(32) % 3
data = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
probe = [{"input_ids": ids[i : i + 8], "labels": labels[i : i + 8]} for i in (0, 8)]
torch.manual_seed(0)
args = transformers.TrainingArguments(
    **dict(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=0.5),
    **dict(optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to=[]),
    **dict(use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1000),
)
trainer = transformers.Trainer(model=tiny_hf.bert().double(), args=args, train_dataset=data)
rank = args.process_index
callback = SharpnessCallback(trainer, [probe[rank]], every=2, log=f"{out}/rank{rank}.jsonl")
trainer.add_callback(callback)
trainer.train()
logged = [r for r in trainer.state.log_history if "sharpness/lambda_max" in r]
last = {k: v for k, v in callback.tracker.last.row().items() if k != "seconds"}
everyone = distributed.all_gather({"last": last, "logged": logged, "world": args.world_size})
if rank == 0:
    torch.save({"model": trainer.model.state_dict(), "probe": probe}, f"{out}/final.pt")
    print(json.dumps(everyone))
distributed.exit_now(0)
"""


def _start(tmp_path: Path, script: str, nproc: int, *args: str) -> subprocess.Popen[str]:
    """``script`` started in ``nproc`` processes; :func:`_outputs` waits for it."""
    path = tmp_path / "script.py"
    path.write_text(script, encoding="utf-8")
    return launch([str(path), *args], nproc)


def _outputs(process: subprocess.Popen[str]) -> list[dict[str, Any]]:
    """Every rank's output of a started script (rank 0 prints them all)."""
    done = finished(process)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run(tmp_path: Path, script: str, nproc: int, *args: str) -> list[dict[str, Any]]:
    """Every rank's output of ``script`` run in ``nproc`` processes."""
    return _outputs(_start(tmp_path, script, nproc, *args))


def _same_figures(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal rows: the same keys, flags and counts, floats to ``REL``."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, float):
            assert math.isclose(value, b[key], rel_tol=REL, abs_tol=1e-12), (key, value, b[key])
        else:
            assert value == b[key], (key, value, b[key])


def test_tracker_under_ddp_equals_one_process_and_only_rank_0_logs(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    started = [_start(one, TRACKER_RUN, 1, str(one)), _start(two, TRACKER_RUN, 2, str(two))]
    (single,), ranks = (_outputs(process) for process in started)  # independent: together
    assert len(ranks) == 2 and ranks[0]["measured"] == ranks[1]["measured"]  # bit-identical
    assert [r["sink_rows"] for r in ranks] == [2, 0]
    assert sorted(p.name for p in two.iterdir()) == ["rank0.jsonl", "script.py"]
    logged = [json.loads(line) for line in (two / "rank0.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [2, 4]
    first, second = single["measured"]
    assert (first["warm_start"], second["warm_start"]) == (False, True)
    assert first["lambda_max"] > 0 and first["trace"] is not None
    for ours, reference in zip(ranks[0]["measured"], single["measured"], strict=True):
        _same_figures(ours, reference)


def test_lightning_ddp_callback_equals_one_process_on_the_final_weights(tmp_path):
    pytest.importorskip("lightning")
    ranks = _run(tmp_path, LIGHTNING_RUN, 2, str(tmp_path))
    assert len(ranks) == 2 and ranks[0] == ranks[1] and ranks[0]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "rank0.jsonl", "script.py"]
    (logged,) = [json.loads(line) for line in (tmp_path / "rank0.jsonl").read_text().splitlines()]
    assert logged["lambda_max"] == ranks[0]["lambda_max"]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    net.load_state_dict(final["net"])
    alone = SharpnessTracker(Objective(net, nn.functional.cross_entropy, final["probe"])).measure(4)
    _same_figures(ranks[0], {k: v for k, v in alone.row().items() if k != "seconds"})


def test_sam_with_a_scaler_skips_on_every_rank_when_one_rank_overflows(tmp_path):
    """Without the agreement, rank 1 skipped alone: in the first pass it left rank 0 waiting in
    the second pass's all-reduce; in the second its weights and scale parted from rank 0's."""
    ranks = _run(tmp_path, SAM_SCALER_RUN, 2)
    assert len(ranks) == 2 and ranks[0] == ranks[1]
    history = ranks[0]
    assert [h["skipped"] for h in history] == [False, True, True, False]
    assert [h["passes"] for h in history] == [2, 1, 2, 2]  # step 1 skipped after its first pass
    assert [h["global_step"] for h in history] == [1, 1, 1, 2]
    assert [h["scale"] for h in history] == [2.0**10, 2.0**9, 2.0**8, 2.0**8]
    for key in ("weights", "momentum"):
        assert history[0][key] == history[1][key] == history[2][key] != history[3][key]


def test_hf_trainer_ddp_callback_equals_one_process_on_the_final_weights(tmp_path):
    pytest.importorskip("transformers")
    import tiny_hf

    from sharpscope.integrations.hf_callback import labelled
    from sharpscope.io.losses import loss_name, resolve_loss

    ranks = _run(tmp_path, HF_RUN, 2, str(tmp_path), str(Path(tiny_hf.__file__).parent))
    assert len(ranks) == 2 and ranks[0]["last"] == ranks[1]["last"] and ranks[0]["world"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt", "rank0.jsonl", "script.py"]
    for rank in ranks:  # trainer.log keeps the row on every rank; its integrations report on 0
        (logged,) = rank["logged"]
        assert logged["step"] == 2 and logged["sharpness/lambda_max"] == rank["last"]["lambda_max"]
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    model = tiny_hf.bert().double()
    model.load_state_dict(final["model"])
    loss = resolve_loss(loss_name("auto", model))
    probe = [labelled(b) for b in final["probe"]]
    alone = SharpnessTracker(Objective(model, loss, probe)).measure(2)
    _same_figures(ranks[0]["last"], {k: v for k, v in alone.row().items() if k != "seconds"})
