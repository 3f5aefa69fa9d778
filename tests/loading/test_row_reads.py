"""Loading under a :class:`Placement` (``fsdp``), in one process: the model built with its
parameters on the meta device and its buffers real, then filled from the file through
:class:`Rows`, equals the whole load bit for bit in every format of tensors in files; weights that
do not fit give the whole load's error. The sharding itself (each rank reading its rows only) is
in tests/distributed/test_sharded_loading.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny_hf
import torch
from safetensors.torch import save_file

from sharpscope.errors import InputError
from sharpscope.io.checkpoints import Placement, load_model, save_checkpoint
from sharpscope.io.models import ModelSpec, build_model
from sharpscope.io.row_reads import Rows, local_rows, meta_parameters, safetensors_placeholders

MODELS = ("gpt2", "llama", "bert")
FORMATS = ("folder", "safetensors", "pt")


def written(folder: Path, name: str, kind: str) -> tuple[Path, ModelSpec | None]:
    """The tiny model ``name`` written as ``kind``, and the spec to load it with (None: the
    folder's config)."""
    model, spec = getattr(tiny_hf, name)(), ModelSpec(f"tiny_hf:{name}", {})
    if kind == "folder":
        model.save_pretrained(folder / name)
        return folder / name, None
    if kind == "safetensors":
        save_checkpoint(folder / f"{name}.safetensors", model, spec)
        return folder / f"{name}.safetensors", spec
    torch.save(model.state_dict(), folder / f"{name}.pt")
    return folder / f"{name}.pt", spec


def placed(shard=lambda model: model) -> Placement:
    return Placement(shard, torch.device("cpu"), torch.float64)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[int, ...], slice | None]]:
    """Every read through :class:`Rows`: the stored tensor's shape and the rows asked for."""
    seen: list[tuple[tuple[int, ...], slice | None]] = []
    read = Rows.read

    def recorded(self: Rows, stored: torch.Tensor, rows: slice | None) -> torch.Tensor:
        seen.append((tuple(stored.shape), rows))
        return read(self, stored, rows)

    monkeypatch.setattr(Rows, "read", recorded)
    return seen


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_a_placed_load_equals_the_whole_load(tmp_path, name, kind, reads):
    path, spec = written(tmp_path, name, kind)
    model, checkpoint = load_model(path, spec, placement=placed())
    whole, _ = load_model(path, spec)
    whole = whole.double()
    assert all(t.is_meta for t in checkpoint.state_dict.values())  # nothing of the file held
    assert model.training == whole.training
    assert dict(model.named_parameters()).keys() == dict(whole.named_parameters()).keys()
    for (key, ours), theirs in zip(
        model.state_dict().items(), whole.state_dict().values(), strict=True
    ):
        assert ours.dtype == torch.float64 or not ours.is_floating_point(), key
        assert torch.equal(ours, theirs), key
    for (key, ours), theirs in zip(
        model.named_buffers(), whole.buffers(), strict=True
    ):  # inv_freq too
        assert torch.equal(ours, theirs), key
    if name == "gpt2":  # tied: one tensor, read once
        assert model.lm_head.weight is model.transformer.wte.weight
    # each parameter read once, whole (no sharding in one process)
    assert len([r for r in reads if r[1] is None]) >= len(list(model.parameters()))


def test_meta_parameters_keeps_the_buffers_real():
    with meta_parameters():
        model = tiny_hf.llama()
    reference = tiny_hf.llama()
    assert all(p.is_meta for p in model.parameters())
    (name, inv_freq), *_ = [(n, b) for n, b in model.named_buffers() if "inv_freq" in n]
    assert not inv_freq.is_meta and torch.equal(inv_freq, dict(reference.named_buffers())[name])
    assert not torch.nn.Linear(2, 2).weight.is_meta  # after the context: real again


def test_safetensors_placeholders_read_the_rows_asked(tmp_path, reads):
    spec = ModelSpec("mlp", {"hidden": (16,)})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec)
    rows = Rows()
    _, tensors = safetensors_placeholders(tmp_path / "m.safetensors", rows)
    torch.manual_seed(0)
    reference = build_model(spec)
    for key, stored in tensors.items():
        assert stored.is_meta
        want = reference.state_dict()[key]
        assert torch.equal(rows.read(stored, slice(1, 3)), want[1:3])
        assert torch.equal(rows.read(stored, None), want)
    assert torch.equal(local_rows(want)[0], want) and local_rows(want)[1] is None


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_weights_that_do_not_fit_give_the_whole_loads_error(tmp_path, kind):
    """Checked before anything is sharded: the placement's ``shard`` is never called."""
    stored, wanted = ModelSpec("mlp", {"hidden": (16,)}), ModelSpec("mlp", {"hidden": (8,)})
    path = tmp_path / f"m.{kind}"
    if kind == "pt":
        torch.save(build_model(stored).state_dict(), path)
    else:
        save_file(dict(build_model(stored).state_dict()), str(path))

    def never(model: torch.nn.Module) -> torch.nn.Module:
        raise AssertionError("sharded before the weights were checked")

    with pytest.raises(InputError) as whole:
        load_model(path, wanted)
    with pytest.raises(InputError) as ours:
        load_model(path, wanted, placement=placed(never))
    assert str(ours.value) == str(whole.value)
    assert "shape mismatch" in str(ours.value)


def test_rows_of_every_dtype_and_shape_read_as_stored(tmp_path):
    """Plain reads at the header's offsets: a scalar, bf16, bool and int rows as safetensors
    itself reads them; a dtype outside the table (float8) is read whole, as a real tensor."""
    g = torch.Generator().manual_seed(0)
    stored = {
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "mask": torch.rand(7, generator=g) > 0.5,
        "ids": torch.randint(0, 9, (4, 2, 2), generator=g),
        "f8": torch.randn(3, 2, generator=g).to(torch.float8_e4m3fn),
    }
    save_file(stored, str(tmp_path / "t.safetensors"))
    rows = Rows()
    _, tensors = safetensors_placeholders(tmp_path / "t.safetensors", rows)
    assert not tensors["f8"].is_meta and all(t.is_meta for k, t in tensors.items() if k != "f8")
    for key, want in stored.items():
        assert tensors[key].dtype == want.dtype and tensors[key].shape == want.shape, key
        got = rows.read(tensors[key], None)
        assert got.shape == want.shape and raw(got).equal(raw(want)), key
        if want.dim():
            assert raw(rows.read(tensors[key], slice(1, 3))).equal(raw(want[1:3])), key
            assert rows.read(tensors[key], slice(want.shape[0], want.shape[0])).numel() == 0


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` (bit-for-bit comparison, whatever its dtype)."""
    return tensor.reshape(-1).view(torch.uint8)
