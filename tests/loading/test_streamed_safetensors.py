"""The streamed safetensors writer (one tensor at a time) against ``safetensors.torch.save_file``:
the same bytes for every dtype safetensors stores, shared and empty tensors included."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sharpscope.errors import InputError
from sharpscope.io.streamed_safetensors import DTYPES, Entry, save_streamed


def tensors() -> dict[str, torch.Tensor]:
    """One tensor of each dtype, in a scrambled name order, plus a scalar, an empty tensor and
    two of the same dtype (ordered by name in the file)."""
    g = torch.Generator().manual_seed(0)
    out = {
        f"t{7 * i % 16:02d}": torch.randint(0, 2, (3, i + 1), generator=g).to(dtype)
        for i, dtype in enumerate(DTYPES)
    }
    out["a.scalar"] = torch.tensor(2.5, dtype=torch.float32)
    out["z.empty"] = torch.zeros(0, 4, dtype=torch.float64)
    out["m.weight"] = torch.randn(5, 2, generator=g, dtype=torch.float32)
    return out


def streamed(path: Path | None, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> list:
    """Write ``state`` streamed; the names in the order they were fetched."""
    fetched: list[str] = []

    def fetch(entry: Entry) -> torch.Tensor:
        fetched.append(entry.name)
        return state[entry.name]

    entries = [Entry.of(k, v) for k, v in state.items()]
    save_streamed(path, entries, fetch, metadata)
    return fetched


def test_the_streamed_file_is_the_bytes_safetensors_writes(tmp_path: Path):
    state, metadata = tensors(), {"spec": '{"target": "mlp"}'}  # one key: its order is fixed
    save_file(state, str(tmp_path / "theirs"), metadata=metadata)
    fetched = streamed(tmp_path / "ours", state, metadata)
    ours, theirs = (tmp_path / "ours").read_bytes(), (tmp_path / "theirs").read_bytes()
    assert ours == theirs
    length = struct.unpack("<Q", ours[:8])[0]
    assert fetched == [k for k in json.loads(ours[8 : 8 + length]) if k != "__metadata__"]
    loaded = load_file(str(tmp_path / "ours"))
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_the_metadata_keys_are_sorted_where_safetensors_draws_their_order(tmp_path: Path):
    state, metadata = tensors(), {"version": "1", "step": "4", "spec": "{}"}
    save_file(state, str(tmp_path / "theirs"), metadata=metadata)
    streamed(tmp_path / "ours", state, metadata)
    ours, theirs = (tmp_path / "ours").read_bytes(), (tmp_path / "theirs").read_bytes()
    length = struct.unpack("<Q", ours[:8])[0]
    assert ours[: 8 + length].index(b'"spec":"{}","step":"4","version":"1"') > 0
    assert len(ours) == len(theirs) and ours[8 + length :] == theirs[8 + length :]
    assert json.loads(ours[8 : 8 + length]) == json.loads(theirs[8 : 8 + length])


def test_without_a_path_nothing_is_written_but_every_tensor_is_fetched_in_order(tmp_path: Path):
    state = tensors()
    assert streamed(None, state, {}) == streamed(tmp_path / "f", state, {})
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_a_failed_fetch_leaves_no_file_and_the_old_one_intact(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def fetch(entry: Entry) -> torch.Tensor:
        raise RuntimeError("a rank died")

    with pytest.raises(RuntimeError, match="a rank died"):
        save_streamed(path, [Entry("w", torch.float32, (2,))], fetch, {})
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_tensor_unlike_its_header_or_a_dtype_safetensors_lacks_is_refused(tmp_path: Path):
    entry = Entry("w", torch.float32, (2,))
    with pytest.raises(InputError, match=r"'w' came as torch\.float64"):
        save_streamed(tmp_path / "f", [entry], lambda e: torch.zeros(2, dtype=torch.float64), {})
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="cannot save the model's 'c'"):
        Entry.of("c", torch.zeros(2, dtype=torch.complex128))
