"""Attacks through data files: CIFAR batch files built by hand (pickle opcodes) whose numpy
dtype state makes an array read past its buffer (a segfault) or whose ``bytes(N)`` allocates
N bytes; each is refused in one line, in a subprocess (a crash would kill pytest), while
CIFAR files as numpy and pickle write them still load."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from attack import NetworkGuard, Snapshot, cli, refused, run_sharpscope

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


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_hostile_cifar_batch_is_refused_in_one_line(tmp_path, cifar_mlp, no_network, attack):
    """The two attacks found (a segfault, 17 GB) in a subprocess; their variants in-process."""
    guard: NetworkGuard = no_network
    payload, what = ATTACKS[attack]
    folder = cifar_folder(tmp_path, payload)
    snapshot = Snapshot(folder)
    args = ("analyze", cifar_mlp, "--data", folder, "--split", "test", "--quiet")
    if attack in ("read-past-the-buffer", "huge-bytes"):
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
