"""A sharded model's whole weights streamed into one safetensors file (``finetune --fsdp``'s
``model.safetensors``) on 2 Gloo ranks: the bytes the gathered write (``full_state`` then
``save_checkpoint``) gives, for the tiny MLP, and GPT-2 (tied weights) and BERT (buffers) with a
spec, with every rank holding at most one gathered tensor at a time; loadable by safetensors and
``load_model``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import python

from sharpscope.io.checkpoints import load_model
from sharpscope.io.models import ModelSpec

pytestmark = pytest.mark.integration  # torchrun
TESTS = Path(__file__).resolve().parents[1]
SPECS = {
    "mlp": ("mlp", {"hidden": (16, 8)}),
    "gpt2": ("tiny_hf:gpt2", {}),
    "bert": ("tiny_hf:bert", {}),
}
SCRIPT = """
import sys
import weakref

sys.path.insert(0, {tests!r})

import tiny_hf
import torch
from pathlib import Path
from torch.distributed.tensor import DTensor

from sharpscope import distributed
from sharpscope.analysis.fsdp import shard_model
from sharpscope.io.checkpoints import checkpoint_metadata, save_checkpoint
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.training.sharded_state import full_state, stream_full_state

distributed.init_from_env()
main = distributed.is_main()
out = Path({out!r})
gathered = []
held = []
whole = DTensor.full_tensor


def spied(self, *args, **kwargs):
    # how many gathered tensors this rank still holds when it gathers the next
    held.append(sum(ref() is not None for ref in gathered))
    result = whole(self, *args, **kwargs)
    gathered.append(weakref.ref(result))
    return result


for name, (target, kwargs) in {specs!r}.items():
    spec = ModelSpec(target, kwargs)
    torch.manual_seed(0)
    model = shard_model(build_model(spec).double() if name == "mlp" else build_model(spec))
    ids = torch.randint(1, tiny_hf.VOCAB - 1, (2, 6), generator=torch.Generator().manual_seed(0))
    x = torch.randn(4, 64, dtype=torch.float64) if name == "mlp" else None
    loss = model(x).sum() if name == "mlp" else model(input_ids=ids).logits.sum()
    loss.backward()
    metadata = checkpoint_metadata(spec, {{"step": "3"}})
    weights = full_state(model)
    if main:
        save_checkpoint(out / f"{{name}}.gathered", model, spec, {{"step": "3"}}, weights)
    del weights
    gathered.clear()
    DTensor.full_tensor = spied
    stream_full_state(out / f"{{name}}.streamed" if main else None, model, metadata)
    DTensor.full_tensor = whole
    with (out / f"held.{{distributed.rank()}}").open("a") as f:  # rank: gathers, most held
        f.write(f"{{name}} {{len(held)}} {{max(held)}}\\n")
    held.clear()
distributed.teardown()
"""


def parts(path: Path) -> tuple[list, dict, bytes, int]:
    """A safetensors file's tensor entries (in order), metadata, data bytes and header length."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    pairs = json.loads(raw[8 : 8 + length], object_pairs_hook=list)
    metadata = dict(next(v for k, v in pairs if k == "__metadata__"))
    return [p for p in pairs if p[0] != "__metadata__"], metadata, raw[8 + length :], length


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The folder of both files of each model and each rank's gather counts, and the ranks'
    output."""
    out = tmp_path_factory.mktemp("streamed")
    script = out / "stream.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(out), specs=SPECS))
    done = python([str(script)], 2, HF_HUB_OFFLINE="1", PYTHONPATH=str(TESTS))
    assert done.returncode == 0, done.stderr[-4000:]
    return out, done.stdout


@pytest.mark.parametrize("name", list(SPECS))
def test_the_streamed_file_has_the_gathered_writes_bytes(written, name):
    """Byte for byte, but for the order of the metadata's keys, which safetensors draws at
    random per process (the streamed file sorts them)."""
    out, _ = written
    ours, theirs = parts(out / f"{name}.streamed"), parts(out / f"{name}.gathered")
    assert ours[0] == theirs[0]  # names, dtypes, shapes and offsets, in the same order
    assert ours[1] == theirs[1] and ours[3] == theirs[3]
    assert ours[2] == theirs[2]
    head = (out / f"{name}.streamed").read_bytes()[: 8 + ours[3]]
    assert json.dumps(dict(sorted(ours[1].items())), separators=(",", ":")).encode() in head


@pytest.mark.parametrize("name", list(SPECS))
def test_the_streamed_file_loads_as_the_model(written, name):
    out, _ = written
    target, kwargs = SPECS[name]
    spec = ModelSpec(target, kwargs) if name != "mlp" else None  # the mlp's from the file
    model, _ = load_model(out / f"{name}.streamed", spec)
    stored = load_file(str(out / f"{name}.streamed"))
    reference = load_file(str(out / f"{name}.gathered"))
    assert stored.keys() == reference.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, stored[key]) and torch.equal(value, reference[key]), key


def test_every_rank_holds_one_gathered_tensor_at_a_time(written):
    out, _ = written
    for rank in range(2):
        lines = [line.split() for line in (out / f"held.{rank}").read_text().splitlines()]
        assert [name for name, _, _ in lines] == list(SPECS)
        for name, count, most in lines:
            assert int(count) > 3, (rank, name)  # the sharded parameters were gathered
            assert int(most) == 0, (rank, name, most)  # none left from before at each gather
