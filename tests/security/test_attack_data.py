"""Attacks through data files, each refused in one line (exit 2) while the legitimate form of
the same input still loads: CIFAR batch files built by hand (pickle opcodes) whose numpy dtype
state makes an array read past its buffer (a segfault) or whose ``bytes(N)`` allocates N bytes
(run in a subprocess: a crash would kill pytest); .npz members that expand past a memory cap;
text far longer than the model reads (cut before tokenizing); a data .pt holding a pickled
object; a datasets folder whose state.json or links lead outside it."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import tiny_hf
import tiny_tokenizer
import torch
import transformers
from tiny_cli import refused

from security.attack import NetworkGuard, Snapshot, cli, run_sharpscope
from sharpscope.io.checkpoints import save_checkpoint
from sharpscope.io.models import ModelSpec, build_model

# --- CIFAR batch files -------------------------------------------------------------------------


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _str(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


def _bytes(raw: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(raw)) + raw


def _dtype(spec: str, order: str, elsize: int = -1, memo: bytes = b"") -> bytes:
    """``numpy.dtype(spec)`` with its state, as numpy pickles it (``memo``: a BINPUT to keep
    the dtype for later)."""
    made = b"cnumpy\ndtype\n" + _str(spec) + b"\x89\x88\x87R" + memo
    alignment = -1 if elsize == -1 else 1
    return (
        made
        + b"("
        + _int(3)
        + _str(order)
        + b"NNN"
        + _int(elsize)
        + _int(alignment)
        + _int(0)
        + b"tb"
    )


def _array(shape: tuple[int, ...], dtype: bytes, raw: bytes) -> bytes:
    """``_reconstruct(ndarray, (0,), b"b")`` and its state ``(1, shape, dtype, False, raw)``."""
    made = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _int(0) + b"\x85"
    made += _bytes(b"b") + b"\x87R"
    return (
        made
        + b"("
        + _int(1)
        + b"("
        + b"".join(map(_int, shape))
        + b"t"
        + dtype
        + b"\x89"
        + _bytes(raw)
        + b"tb"
    )


def _batch(labels: bytes) -> bytes:
    """A test batch of one black image with the given opcodes as its labels."""
    data = _array((1, 3072), _dtype("u1", "|"), bytes(3072))
    return b"\x80\x03}(" + _bytes(b"data") + data + _bytes(b"labels") + labels + b"u."


def _dtype_state(order: str, elsize: int) -> bytes:
    """A second state for the dtype kept in memo 99 (then popped)."""
    return b"h\x63(" + _int(3) + _str(order) + b"NNN" + _int(elsize) + _int(1) + _int(0) + b"tb0"


def _read_past_the_buffer() -> bytes:
    """A one-byte label array of type S1, whose dtype (kept in the memo) gets a second state
    making each item 64 MiB: reading the labels reads 64 MiB past the byte (a segfault)."""
    labels = _array((1,), _dtype("S1", "|", 1, memo=b"q\x63"), b"7")
    return _batch(labels + _dtype_state("|", 2**26))


def _huge_bytes() -> bytes:
    """``bytes(2**31 - 1)``: 2 GiB from a 40-byte file."""
    return b"\x80\x02}(" + _bytes(b"data") + b"c__builtin__\nbytes\n" + _int(2**31 - 1) + b"\x85Ru."


def _bytes_by_memo() -> bytes:
    """One 4 kB string encoded 65 times through the memo: 260 kB from a 5 kB file."""
    head = b"\x80\x02]q\x01c_codecs\nencode\nq\x020" + _str("x" * 4096) + b"q\x030("
    encode = b"h\x02(h\x03" + _str("latin1") + b"tR"
    return head + encode * 65 + b"e."


ATTACKS = {
    "read-past-the-buffer": (_read_past_the_buffer(), "the array type 'S1'"),
    "huge-bytes": (_huge_bytes(), "bytes(2147483647)"),
    "second-dtype-state": (
        _batch(_array((1,), _dtype("i8", "<", memo=b"q\x63"), bytes(8)) + _dtype_state("<", 2**26)),
        "the array type 'i8' with the state",
    ),
    "a-string-array": (_batch(_array((1,), _dtype("S1", "|", 1), b"7")), "the array type 'S1'"),
    "item-larger-than-its-type": (
        _batch(_array((1,), _dtype("u1", "|", 2**26), b"7")),
        "the array type 'u1' with the state",
    ),
    "array-larger-than-its-bytes": (
        _batch(_array((2**20,), _dtype("u1", "|"), b"7")),
        "whose bytes do not match it",
    ),
    "bytes-bomb-by-memo": (_bytes_by_memo(), "more bytes than the file's own size"),
}


@pytest.fixture(scope="module")
def cifar_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLP on CIFAR's 3072 inputs, saved with its model spec."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 3072, "hidden": (4,)})
    path = tmp_path_factory.mktemp("cifar-model") / "mlp.safetensors"
    save_checkpoint(path, build_model(spec), spec)
    return path


def cifar_folder(root: Path, test_batch: bytes) -> Path:
    """A CIFAR-10 folder holding only ``test_batch``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(test_batch)
    return folder


IN_A_PROCESS = ("read-past-the-buffer", "huge-bytes")
"""The attacks that crashed or exhausted a process: tried in a real one."""


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(name, marks=pytest.mark.integration) if name in IN_A_PROCESS else name
        for name in ATTACKS
    ],
)
def test_a_hostile_cifar_batch_is_refused_in_one_line(tmp_path, cifar_mlp, no_network, attack):
    """The two attacks found (a segfault, 17 GB) in a subprocess; their variants in-process."""
    guard: NetworkGuard = no_network
    payload, what = ATTACKS[attack]
    folder = cifar_folder(tmp_path, payload)
    snapshot = Snapshot(folder)
    args = ("analyze", cifar_mlp, "--data", folder, "--split", "test", "--quiet")
    if attack in IN_A_PROCESS:
        done = run_sharpscope(*args, guard=guard)
        code, stderr = done.returncode, done.stderr
    else:
        result = cli(*args)
        code, stderr = result.exit_code, result.stderr
    refused(code, stderr, "refusing to unpickle", "test_batch", what)
    snapshot.assert_unchanged()


def _official(protocol: int, numpy_module: bytes = b"numpy._core") -> bytes:
    """A test batch as CIFAR's own files hold it (bytes keys, a uint8 array, int labels, bytes
    file names), pickled by numpy and pickle (``numpy.core`` for numpy 1)."""
    rng = np.random.default_rng(0)
    batch = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": [3, 8, 0],
        b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png", b""],
    }
    return pickle.dumps(batch, protocol=protocol).replace(b"numpy._core", numpy_module)


@pytest.mark.parametrize(
    "made", [(2, b"numpy.core"), (2, b"numpy._core"), (4, b"numpy._core"), (5, b"numpy._core")]
)
def test_cifar_batches_as_numpy_writes_them_load(tmp_path, cifar_mlp, made):
    folder = cifar_folder(tmp_path, _official(*made))
    result = cli("analyze", cifar_mlp, "--data", folder, "--split", "test", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    assert '"samples": 3' in result.stdout or "3 samples" in result.stdout


# --- .npz bombs ----------------------------------------------------------------------------------


def npz_bomb(path: Path, shape: tuple[int, ...], body: int) -> Path:
    """An .npz whose x.npy header says ``shape`` (float32) followed by ``body`` zero bytes,
    compressed (written in chunks: nothing of that size is allocated), and 4 labels as y."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(f, header)
            chunk = bytes(1 << 20)
            for start in range(0, body, len(chunk)):
                f.write(chunk[: body - start])
        y = io.BytesIO()
        np.save(y, np.arange(shape[0] if body else 4) % 2)
        archive.writestr("y.npy", y.getvalue())
    return path


@pytest.fixture
def mlp16(tmp_path: Path) -> Path:
    """An MLP on 16 inputs, saved with its model spec."""
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 16, "hidden": (4,), "num_classes": 2})
    save_checkpoint(tmp_path / "mlp16.safetensors", build_model(spec), spec)
    return tmp_path / "mlp16.safetensors"


def test_an_npz_member_over_the_cap_is_refused_before_it_is_read(tmp_path, mlp16, monkeypatch):
    """64 MiB of zeros in a 65 kB file: over a 16 MB cap, refused with the figures; under the
    default cap (half the free memory) the same file is data like any other."""
    bomb = npz_bomb(tmp_path / "bomb.npz", (2**20, 16), 2**26)
    assert bomb.stat().st_size < 100_000
    snapshot = Snapshot(bomb)
    monkeypatch.setenv("SHARPSCOPE_DATA_MEMORY", str(16_000_000))
    result = cli("analyze", mlp16, "--data", bomb, "--samples", "8", "--quiet")
    refused(result.exit_code, result.stderr, "'x' expands to 67.1 MB", "16 MB allowed")
    refused(result.exit_code, result.stderr, "SHARPSCOPE_DATA_MEMORY")
    monkeypatch.delenv("SHARPSCOPE_DATA_MEMORY")
    ok = cli("analyze", mlp16, "--data", bomb, "--samples", "8", "--top-k", "1", "--quiet")
    assert ok.exit_code == 0, ok.output
    snapshot.assert_unchanged()


def test_an_npy_header_claiming_terabytes_is_refused(tmp_path, mlp16):
    """The .npy header's shape is what numpy allocates before reading: checked first."""
    liar = npz_bomb(tmp_path / "liar.npz", (2**38, 16), 0)
    result = cli("analyze", mlp16, "--data", liar, "--quiet")
    refused(result.exit_code, result.stderr, "'x' expands to 17.6 TB", "half the free memory")


# --- text longer than the model reads ------------------------------------------------------------


def test_a_long_text_is_cut_before_the_tokenizer_sees_it(tmp_path, monkeypatch):
    """A 1 MB line is cut to 32 characters per token of the model's 12 positions before it is
    tokenized, and gives the tokens the tokenizer's own truncation gives."""
    folder = tmp_path / "bert"
    tiny_hf.bert().save_pretrained(folder)
    tokenizer = tiny_tokenizer.save_tokenizer(folder)
    long = "the cat sat on the mat . " * 40_000
    rows = [{"text": "a dog ran", "label": 0}, {"text": long, "label": 1}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    seen: list[int] = []
    call = transformers.PreTrainedTokenizerBase.__call__

    def spy(self, *texts, **kwargs):
        seen.extend(len(t) for batch in texts for t in batch)
        return call(self, *texts, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", spy)
    result = cli("analyze", folder, "--data", data, "--top-k", "1", "--no-trace", "--quiet")
    assert result.exit_code == 0, result.output
    assert seen and max(seen) == 32 * 12
    whole, cut = (tokenizer(t, truncation=True, max_length=12) for t in (long, long[: 32 * 12]))
    assert whole["input_ids"] == cut["input_ids"]


# --- a data .pt holding Python objects ------------------------------------------------------------


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickled_object_in_a_data_file_is_named_and_never_run(tmp_path, mlp16, marker, legacy):
    data = tmp_path / "d.pt"
    content = {"x": torch.ones(4, 16), "y": torch.zeros(4, dtype=torch.int64)}
    torch.save({**content, "z": Payload(marker)}, data, _use_new_zipfile_serialization=not legacy)
    result = cli("analyze", mlp16, "--data", data, "--quiet")
    words = ("a Python object (posix.system) that sharpscope will not unpickle", "save tensors")
    refused(result.exit_code, result.stderr, *words)


# --- a datasets folder naming files outside itself ------------------------------------------------


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    """The tiny BERT classifier as a save_pretrained folder."""
    tiny_hf.bert().save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


def _datasets_folder(where: Path) -> Path:
    """Four pre-tokenized rows for the tiny BERT, written by save_to_disk."""
    folder = where / "data" / "set"
    rows = [{"input_ids": [2, 5 + i, 6, 3], "labels": i % 3} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def _point_state_at(folder: Path, filename: str) -> None:
    state = json.loads((folder / "state.json").read_text())
    state["_data_files"] = [{"filename": filename}]
    (folder / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink", "split"])
def test_a_datasets_folder_cannot_name_a_file_outside_itself(tmp_path, bert, how):
    """The outside file is a valid Arrow file: before, its rows were read as the data."""
    folder = _datasets_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    arrow = next(folder.glob("*.arrow"))
    shutil.copy(arrow, outside / "x.arrow")
    if how == "relative":
        _point_state_at(folder, "../../outside/x.arrow")
    elif how == "absolute":
        _point_state_at(folder, str(outside / "x.arrow"))
    elif how == "symlink":
        arrow.unlink()
        arrow.symlink_to(outside / "x.arrow")
    else:  # a DatasetDict whose split folder is outside
        shutil.copytree(folder, outside / "split")
        (folder.parent / "dict").mkdir()
        (folder.parent / "dict" / "dataset_dict.json").write_text(
            '{"splits": ["../../outside/split"]}'
        )
        folder = folder.parent / "dict"
    snapshot = Snapshot(tmp_path / "data", outside)
    result = cli("analyze", bert, "--data", folder, "--split", "all", "--quiet")
    refused(result.exit_code, result.stderr, "leads outside the folder", "save_to_disk")
    snapshot.assert_unchanged()


def test_a_datasets_folder_of_its_own_files_loads(tmp_path, bert):
    folder = _datasets_folder(tmp_path)
    result = cli("analyze", bert, "--data", folder, "--top-k", "1", "--quiet")
    assert result.exit_code == 0, result.output
