"""Data specs end to end on tiny data built in tmp_path, and every bad-input error."""

from __future__ import annotations

import os
import pickle
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sharpscope.errors import InputError
from sharpscope.io.data import (
    DataBundle,
    batches,
    check_targets,
    held_out_split,
    load_data,
    subset_indices,
)


def error(*args, **kwargs) -> str:
    """The message of the InputError ``load_data(*args, **kwargs)`` raises; it must be one line."""
    with pytest.raises(InputError) as info:
        load_data(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def bundle_of(inputs: torch.Tensor, targets: torch.Tensor, classes: int | None) -> DataBundle:
    return DataBundle(inputs, targets, classes, "test data (4 samples)", "train", ("train",))


# --- digits --------------------------------------------------------------------------------------


def test_digits_splits_shapes_and_scale():
    train, test, whole = (load_data("digits", s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (1437, 360, 1797)
    assert train.inputs.shape == (1437, 1, 8, 8) and train.inputs.dtype == torch.float32
    assert train.targets.dtype == torch.int64 and set(train.targets.tolist()) == set(range(10))
    assert train.inputs.min() >= 0 and train.inputs.max() == 1
    assert train.num_classes == test.num_classes == 10
    assert train.source == "digits (train split, 1437 samples)"
    assert whole.source == "digits (all splits, 1797 samples)"
    assert (train.split, train.splits) == ("train", ("train", "test"))
    rows = {tuple(r) for r in train.inputs.flatten(1).tolist()}
    assert not rows & {tuple(r) for r in test.inputs.flatten(1).tolist()}


def test_digits_split_is_fixed_whatever_the_seed():
    assert torch.equal(load_data("digits", seed=0).inputs, load_data("digits", seed=5).inputs)


def test_samples_subset_is_deterministic_sorted_and_nested():
    first = load_data("digits", samples=512, seed=3)
    assert first.source == "digits (train split, 512 of 1437 samples)"
    assert torch.equal(first.inputs, load_data("digits", samples=512, seed=3).inputs)
    assert not torch.equal(first.targets, load_data("digits", samples=512, seed=4).targets)
    small, large = subset_indices(1000, 10, seed=7), subset_indices(1000, 20, seed=7)
    assert torch.equal(small, small.sort().values) and set(small.tolist()) <= set(large.tolist())
    assert subset_indices(10, 3, seed=0).tolist() == [2, 4, 8]  # numpy's frozen RandomState


def test_samples_beyond_the_data_take_all_and_say_so():
    bundle = load_data("digits", "test", samples=5000)
    assert len(bundle) == 360
    assert bundle.source == "digits (test split, all 360 samples, 5000 asked)"


def test_bad_samples_seed_and_split():
    assert "`samples` must be at least 1, got 0" in error("digits", samples=0)
    assert "`seed` must be in" in error("digits", samples=3, seed=-1)
    assert "digits has no 'val' split: pass `split` train, test or all" in error("digits", "val")


def test_held_out_split():
    assert held_out_split(load_data("digits", samples=4)) == "test"
    assert held_out_split(load_data("digits", "all", samples=4)) is None


# --- tensor files --------------------------------------------------------------------------------


def test_npz_classification_keeps_values_as_they_are(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(6, 4)
    np.savez(tmp_path / "d.npz", x=x, labels=np.array([0, 1, 2, 0, 1, 4], dtype=np.int32))
    bundle = load_data(str(tmp_path / "d.npz"))
    assert bundle.inputs.dtype == torch.float32 and bundle.inputs.max() == 23
    assert bundle.targets.dtype == torch.int64 and bundle.num_classes == 5
    assert (bundle.split, bundle.splits) == ("all", ())
    assert bundle.source == f"{tmp_path / 'd.npz'} (6 samples)"
    assert held_out_split(bundle) is None


def test_float_targets_are_regression(tmp_path):
    np.savez(
        tmp_path / "r.npz", inputs=np.ones((5, 3)), targets=np.linspace(0, 1, 10).reshape(5, 2)
    )
    bundle = load_data(str(tmp_path / "r.npz"))
    assert bundle.num_classes is None and bundle.targets.dtype == torch.float32
    assert bundle.targets.shape == (5, 2)


@pytest.mark.parametrize("form", ["dict", "tuple", "list", "legacy"])
def test_torch_files(tmp_path, form):
    x, y = torch.randn(7, 2, 3), torch.tensor([0, 1, 1, 0, 2, 2, 1])
    obj = {"dict": {"data": x, "target": y}, "tuple": (x, y), "list": [x, y]}.get(form, (x, y))
    path = tmp_path / ("d.pth" if form != "legacy" else "d.bin")
    torch.save(obj, path, _use_new_zipfile_serialization=form != "legacy")
    bundle = load_data(str(path))
    assert torch.equal(bundle.inputs, x) and torch.equal(bundle.targets, y)
    assert bundle.num_classes == 3


def test_zip_torch_files_are_memory_mapped_and_the_bundle_owns_its_samples(tmp_path, monkeypatch):
    """Only a zip-format file is mapped (legacy files cannot be); the samples taken are copies,
    so rewriting the file afterwards changes nothing loaded."""
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or load(*a, **k))
    x, y = torch.randn(50, 3), torch.arange(50) % 4
    for legacy in (False, True):
        path = tmp_path / f"d{int(legacy)}.pt"
        torch.save({"x": x, "y": y}, path, _use_new_zipfile_serialization=not legacy)
        bundle = load_data(str(path), samples=7, seed=3)
        torch.save({"x": torch.zeros(50, 3), "y": y}, path)
        idx = subset_indices(50, 7, 3)
        assert torch.equal(bundle.inputs, x[idx]) and torch.equal(bundle.targets, y[idx])
    assert calls == [True, False]


def test_safetensors_and_detection_by_content(tmp_path):
    x, y = torch.rand(4, 3, dtype=torch.float64), torch.tensor([1, 0, 1, 1])
    save_file({"features": x, "Y": y}, tmp_path / "d.safetensors")
    with (tmp_path / "npz_named.pt").open("wb") as f:
        np.savez(f, X=x.numpy(), y=y.numpy())
    torch.save({"x": x, "y": y}, tmp_path / "torch_named.npz")
    for name in ("d.safetensors", "npz_named.pt", "torch_named.npz"):
        bundle = load_data(str(tmp_path / name))
        torch.testing.assert_close(bundle.inputs, x.float())
        assert torch.equal(bundle.targets, y)


def test_per_split_keys(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((6, 2)),
        "y_train": np.array([0, 1, 0, 1, 0, 1]),
        "test_x": rng.random((3, 2)),
        "test_labels": np.array([0, 0, 3]),
        "label_names": np.array([1, 2, 3, 4]),
    }
    np.savez(tmp_path / "s.npz", **arrays)
    spec = str(tmp_path / "s.npz")
    train, test, whole = (load_data(spec, s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(whole)) == (6, 3, 9)
    assert train.num_classes == test.num_classes == 4  # over all of the file's splits
    assert train.source == f"{spec} (train split, 6 samples)" and train.splits == ("train", "test")
    assert held_out_split(train) == "test"
    assert torch.equal(whole.inputs[6:], torch.from_numpy(arrays["test_x"]).float())
    assert "has no 'val' split: pass `split` train, test or all" in error(spec, "val")


def test_plain_keys_beside_split_keys_are_the_train_split(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.ones((4, 2)), y=np.zeros(4, int), x_test=np.ones((2, 2)),
             y_test=np.zeros(2, int))  # fmt: skip
    assert len(load_data(str(tmp_path / "p.npz"), "train")) == 4
    assert len(load_data(str(tmp_path / "p.npz"), "test")) == 2


def test_unknown_and_missing_specs(tmp_path):
    assert "unknown data spec 'mnist'; pass digits, a tensor file" in error("mnist")
    assert "never downloads data" in error("cifar10")
    message = error(str(tmp_path / "nope.npz"))
    assert message.startswith("data not found: no file or folder") and "nope.npz" in message
    assert "pkg.module:function" in error("mypkg.data")


def test_file_errors(tmp_path):
    def npz(name: str, **arrays) -> str:
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)

    message = error(npz("k.npz", pixels=np.ones((2, 2)), classes=np.ones(2)))
    assert "no inputs and targets sharpscope knows (keys: pixels, classes)" in message
    assert "inputs/x/X/data/images/features" in message and "targets/y/Y/labels" in message
    message = error(npz("m.npz", x=np.ones((5, 2)), y=np.ones(4, int)))
    assert "inputs 'x' have 5 samples but targets 'y' have 4" in message
    assert "has no samples" in error(npz("e.npz", x=np.ones((0, 2)), y=np.ones(0, int)))
    assert "'y' holds non-numeric data (<U3)" in error(npz("s.npz", x=np.ones(2), y=["cat", "dog"]))
    assert "several inputs arrays (x, data)" in error(npz("a.npz", x=np.ones(2), data=np.ones(2),
                                                          y=np.ones(2, int)))  # fmt: skip
    assert "class labels must be 0, 1, 2, ... (or -100 for no label); found -1" in error(
        npz("n.npz", x=np.ones(2), y=np.array([-1, 0]))
    )
    single = npz("one.npz", x=np.ones(2), y=np.ones(2, int))
    message = error(single, "test")
    assert "holds a single split, so it has no 'test' split" in message


def test_object_arrays_and_damaged_files(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.ones(2), y=np.array([{"a": 1}, None], dtype=object))
    assert "'y' holds Python objects" in error(str(tmp_path / "o.npz"))
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file at all")
    assert "cannot read" in error(str(tmp_path / "bad.pt"))
    (tmp_path / "what.txt").write_text("1,2\n")
    assert "not a tensor file sharpscope reads" in error(str(tmp_path / "what.txt"))
    np.save(tmp_path / "single.npy", np.ones(3))
    os.rename(tmp_path / "single.npy", tmp_path / "single.npz")
    assert "holds a single array" in error(str(tmp_path / "single.npz"))
    torch.save(torch.ones(3), tmp_path / "t.pt")
    assert "holds a Tensor; save a dict of tensors" in error(str(tmp_path / "t.pt"))


class NotATensor:
    pass


def test_torch_file_with_python_objects_is_refused(tmp_path):
    torch.save({"x": torch.ones(2), "y": torch.ones(2), "extra": NotATensor()}, tmp_path / "o.pt")
    message = error(str(tmp_path / "o.pt"))
    assert "a Python object (test_data.NotATensor) that sharpscope will not unpickle" in message
    assert "save tensors or dicts of tensors" in message


def test_nan_and_inf_are_refused_with_the_sample(tmp_path):
    x = np.ones((6, 2))
    x[4, 1] = np.nan
    x[5, 0] = np.inf
    np.savez(tmp_path / "n.npz", x=x, y=np.zeros(6, int))
    assert "inputs hold 2 NaN/inf values (first in sample 4)" in error(str(tmp_path / "n.npz"))
    message = error(str(tmp_path / "n.npz"), samples=2, seed=4)  # picks samples 4 and 5
    assert "(first in sample 4)" in message
    np.savez(tmp_path / "t.npz", x=np.ones((2, 2)), y=np.array([0.5, np.nan]))
    assert "targets hold 1 NaN/inf values (first in sample 1)" in error(str(tmp_path / "t.npz"))


# --- CIFAR ---------------------------------------------------------------------------------------


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, per_batch: int = 2, n_test: int = 3) -> dict[str, np.ndarray]:
    """A CIFAR-10 folder in the original layout, ``per_batch`` samples per training batch."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    data: dict[str, list] = {"train_x": [], "train_y": []}
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": b"training batch %d of 5" % i, b"labels": y, b"data": x,
                 b"filenames": [b"img_%d.png" % j for j in range(per_batch)]}  # fmt: skip
        write_pickle(root / f"data_batch_{i}", batch)
        data["train_x"].append(x)
        data["train_y"] += y
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = [9, 0, 3][:n_test]
    write_pickle(root / "test_batch", {b"labels": test_y, b"data": test_x})
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]  # fmt: skip
    write_pickle(root / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return {"train_x": np.concatenate(data["train_x"]), "train_y": np.array(data["train_y"]),
            "test_x": test_x, "test_y": np.array(test_y)}  # fmt: skip


def test_cifar10_folder(tmp_path):
    made = make_cifar10(tmp_path / "cifar-10-batches-py")
    for spec in (tmp_path / "cifar-10-batches-py", tmp_path):  # the archive folder or its parent
        train = load_data(str(spec))
        assert train.inputs.shape == (10, 3, 32, 32) and train.num_classes == 10
        expected = torch.from_numpy(made["train_x"]).float().div(255).view(-1, 3, 32, 32)
        torch.testing.assert_close(train.inputs, expected, rtol=0, atol=0)
        assert train.targets.tolist() == made["train_y"].tolist()
        assert train.source == f"CIFAR-10 {spec} (train split, 10 samples)"
    test = load_data(str(tmp_path), "test")
    assert test.targets.tolist() == [9, 0, 3] and held_out_split(train) == "test"
    assert len(load_data(str(tmp_path), "all", samples=4)) == 4


def test_cifar_pickles_from_numpy_1_and_protocol_5(tmp_path):
    root = tmp_path / "c"
    make_cifar10(root)
    old = pickle.dumps({b"labels": [1], b"data": np.ones((1, 3072), np.uint8)}, protocol=2)
    (root / "test_batch").write_bytes(
        old.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    )
    assert load_data(str(root), "test").targets.tolist() == [1]
    (root / "test_batch").write_bytes(
        pickle.dumps({"labels": [2, 3], "data": np.zeros((2, 3072), np.uint8)}, protocol=5)
    )
    assert load_data(str(root), "test").targets.tolist() == [2, 3]


def test_cifar100_folder(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    x = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    write_pickle(root / "train", {b"fine_labels": [99, 5], b"coarse_labels": [19, 1], b"data": x})
    write_pickle(root / "test", {b"fine_labels": [7], b"coarse_labels": [2], b"data": x[:1]})
    write_pickle(root / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)]})
    train = load_data(str(tmp_path))
    assert train.targets.tolist() == [99, 5] and train.num_classes == 100
    assert train.source.startswith("CIFAR-100 ")
    assert load_data(str(root), "test").targets.tolist() == [7]


class Evil:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)

    def __init__(self, marker: Path) -> None:
        self.marker = marker


@pytest.mark.parametrize("victim", ["test_batch", "batches.meta"])
def test_malicious_cifar_pickle_is_refused(tmp_path, victim):
    root = tmp_path / "c"
    make_cifar10(root)
    marker = tmp_path / "pwned"
    write_pickle(root / victim, {b"labels": [0], b"data": Evil(marker)})
    message = error(str(root), "test")
    assert (
        f"refusing to unpickle {root / victim}: it asks for {os.system.__module__}.system"
        in message
    )
    assert not marker.exists()


def test_bad_cifar_files(tmp_path):
    root = tmp_path / "c"
    make_cifar10(root)
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    assert "as a CIFAR pickle" in error(str(root), "test")
    write_pickle(root / "test_batch", {b"data": np.ones((2, 100), np.uint8), b"labels": [0, 1]})
    assert "is not a CIFAR batch: expected 'data' (N x 3072 uint8)" in error(str(root), "test")
    (root / "test_batch").unlink()
    assert "has no 'test' split: pass `split` train or all" in error(str(root), "test")


# --- image folders -------------------------------------------------------------------------------


def save_image(path: Path, value: int, size=(4, 3), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(np.full(channels, value, dtype=np.uint8), mode).save(path)


def test_image_folder_rgb(tmp_path):
    save_image(tmp_path / "pets" / "dog" / "a.png", 255)
    save_image(tmp_path / "pets" / "cat" / "b.png", 51)
    save_image(tmp_path / "pets" / "cat" / "nested" / "c.jpg", 0, mode="L")
    (tmp_path / "pets" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "pets" / "cat" / ".hidden.png").write_bytes(b"junk")
    bundle = load_data(str(tmp_path / "pets"))
    assert bundle.inputs.shape == (3, 3, 3, 4) and bundle.num_classes == 2
    assert bundle.targets.tolist() == [0, 0, 1]  # cat (sorted first), then dog
    assert bundle.inputs[0].max() == pytest.approx(0.2) and bundle.inputs[2].min() == 1
    assert bundle.source == f"image folder {tmp_path / 'pets'} (3 samples)"


def test_all_grayscale_images_give_one_channel(tmp_path):
    for i, cls in enumerate(["0", "1", "2"]):
        save_image(tmp_path / cls / "x.png", 10 * i, mode="L")
    bundle = load_data(str(tmp_path), samples=2)
    assert bundle.inputs.shape == (2, 1, 3, 4) and bundle.num_classes == 3


def test_image_folder_with_splits(tmp_path):
    save_image(tmp_path / "train" / "ant" / "1.png", 1)
    save_image(tmp_path / "train" / "bee" / "1.png", 2)
    save_image(tmp_path / "test" / "bee" / "1.png", 3)
    save_image(tmp_path / "test" / "cow" / "1.png", 4)
    train, test = load_data(str(tmp_path)), load_data(str(tmp_path), "test")
    assert train.targets.tolist() == [0, 1] and test.targets.tolist() == [1, 2]
    assert train.num_classes == test.num_classes == 3 and held_out_split(train) == "test"
    assert len(load_data(str(tmp_path), "all")) == 4


def test_image_folder_errors(tmp_path):
    save_image(tmp_path / "a" / "cat" / "1.png", 0, size=(4, 3))
    save_image(tmp_path / "a" / "dog" / "2.png", 0, size=(5, 3))
    message = error(str(tmp_path / "a"))
    assert f"{tmp_path / 'a' / 'cat' / '1.png'} is 4x3 but" in message
    assert f"{tmp_path / 'a' / 'dog' / '2.png'} is 5x3; resize them" in message
    save_image(tmp_path / "b" / "cat" / "1.png", 0)
    (tmp_path / "b" / "cat" / "2.png").write_bytes(b"not a png")
    assert "cannot read image" in error(str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    assert "neither a CIFAR folder nor an image folder" in error(str(tmp_path / "c"))
    (tmp_path / "d" / "cat").mkdir(parents=True)
    assert "has no samples" in error(str(tmp_path / "d"))
    save_image(tmp_path / "e" / "cat" / "1.png", 0)
    assert "so it has no 'test' split" in error(str(tmp_path / "e"), "test")


# --- pkg.module:function -------------------------------------------------------------------------

MODULE = """
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

X = torch.arange(40, dtype=torch.float32).reshape(20, 2)
Y = torch.arange(20) % 4


class Counted(Dataset):
    classes = ["a", "b", "c", "d", "e"]
    reads = 0

    def __len__(self):
        return 20

    def __getitem__(self, i):
        Counted.reads += 1
        return X[i].numpy(), int(Y[i])


def tensors(split="train"):
    n = 12 if split == "train" else 8
    return TensorDataset(X[:n], Y[:n])


def counted():
    return Counted()


def loader():
    return DataLoader(TensorDataset(X, Y), batch_size=6, shuffle=True)


def pair():
    return X.numpy(), Y.tolist()


def mapping():
    return {"inputs": X, "labels": Y}


def dicts():
    return [{"images": X[i], "label": Y[i]} for i in range(20)]


def broken(split):
    raise ValueError("no such\\nsplit " + split)


def wrong():
    return 42


def text():
    return "abc"


def triples():
    return DataLoader(TensorDataset(X, Y, Y), batch_size=5)


def unstackable():
    return [(torch.ones(i + 1), 0) for i in range(3)]


NOT_A_FUNCTION = 3
"""


@pytest.fixture
def module(tmp_path, monkeypatch) -> str:
    """The name of a fresh importable module holding data functions."""
    name = f"userdata_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_function_with_split_parameter(module):
    train = load_data(f"{module}:tensors")
    test = load_data(f"{module}:tensors", "test")
    assert (len(train), len(test)) == (12, 8) and train.num_classes == 4
    assert train.source == f"{module}:tensors (train split, 12 samples)"
    assert held_out_split(train) == "test"


def test_dataset_reads_only_the_samples_asked_for(module):
    bundle = load_data(f"{module}:counted", samples=5, seed=1)
    counted = sys.modules[module].Counted
    assert counted.reads == 5 and bundle.num_classes == 5  # from its classes attribute
    assert bundle.targets.tolist() == (subset_indices(20, 5, 1) % 4).tolist()
    assert bundle.source == f"{module}:counted (5 of 20 samples)"


@pytest.mark.parametrize("function", ["loader", "pair", "mapping", "dicts"])
def test_other_return_forms(module, function):
    bundle = load_data(f"{module}:{function}")
    assert len(bundle) == 20 and bundle.num_classes == 4
    order = bundle.inputs[:, 0].argsort()  # a shuffling loader changes the order only
    assert torch.equal(bundle.targets[order], torch.arange(20) % 4)
    assert torch.equal(load_data(f"{module}:{function}").inputs, bundle.inputs)


def test_python_file_form(tmp_path):
    (tmp_path / "helper_for_test.py").write_text("N = 6\n")
    script = "from helper_for_test import N\nimport torch\n\ndef make():\n"
    script += "    return torch.ones(N, 2), torch.zeros(N)\n"
    (tmp_path / "make_data.py").write_text(script)
    bundle = load_data(f"{tmp_path / 'make_data.py'}:make")
    assert len(bundle) == 6 and bundle.num_classes is None
    assert "no such Python file" in error(f"{tmp_path / 'missing.py'}:make")
    sys.modules.pop("helper_for_test", None)


def test_module_is_found_in_the_working_folder(tmp_path, monkeypatch):
    name = f"cwddata_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "import torch\ndef f():\n    return torch.ones(3, 1), [0, 1, 1]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    assert len(load_data(f"{name}:f")) == 3


def test_function_errors(module):
    assert "cannot find module nosuchpkg_xyz" in error("nosuchpkg_xyz.data:make")
    message = error(f"{module}:nope")
    assert f"{module} has no 'nope'" in message and "counted" in message
    assert "raised ValueError: no such split test; fix the function" in error(
        f"{module}:broken", "test"
    )
    assert "returned a int; return a Dataset" in error(f"{module}:wrong")
    assert "returned a str; return a Dataset" in error(f"{module}:text")
    assert "yields list items; each must be an (input, label) pair" in error(f"{module}:triples")
    assert "cannot stack the samples" in error(f"{module}:unstackable")
    assert "is a int, not a function" in error(f"{module}:NOT_A_FUNCTION")
    assert "holds a single split, so it has no 'test' split" in error(f"{module}:pair", "test")


def test_import_errors_inside_the_module(tmp_path, monkeypatch):
    (tmp_path / "fails_on_import.py").write_text("import not_installed_pkg_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = error("fails_on_import:make")
    assert "importing fails_on_import failed (ModuleNotFoundError" in message


# --- batches and model checks --------------------------------------------------------------------


def test_batches_in_order_with_a_smaller_last_one():
    bundle = load_data("digits", samples=10)
    parts = batches(bundle, 4)
    assert [len(x) for x, _ in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([x for x, _ in parts]), bundle.inputs)
    assert torch.equal(torch.cat([y for _, y in parts]), bundle.targets)
    with pytest.raises(InputError, match="`batch_size` must be at least 1, got 0"):
        batches(bundle, 0)


def check_error(bundle: DataBundle, outputs: object) -> str:
    with pytest.raises(InputError) as info:
        check_targets(bundle, outputs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    return str(info.value)


def test_check_targets_classification():
    bundle = bundle_of(torch.zeros(4, 2), torch.tensor([0, 9, 3, 1]), 10)
    check_targets(bundle, torch.zeros(4, 10))
    check_targets(bundle, torch.zeros(4, 12))
    message = check_error(bundle, torch.zeros(4, 5))
    assert "labels in test data (4 samples) go up to 9 but the model has 5 outputs" in message
    assert "model has 1 output;" in check_error(bundle, torch.zeros(4))
    check_targets(bundle, (torch.zeros(4, 10),))  # a tuple's first entry is the logits
    check_targets(bundle, {"logits": torch.zeros(4, 10), "hidden": torch.zeros(4, 3)})
    assert "the model returns a dict without logits" in check_error(bundle, {"h": torch.zeros(4)})
    assert "5 outputs" in check_error(bundle, ({"logits": torch.zeros(4, 5)},))
    pixels = bundle_of(torch.zeros(4, 2), torch.zeros(4, 6, 6, dtype=torch.int64), 3)
    check_targets(pixels, torch.zeros(4, 3, 6, 6))
    assert "must match after the class dimension" in check_error(pixels, torch.zeros(4, 3, 5, 5))


def test_check_targets_regression():
    bundle = bundle_of(torch.zeros(4, 2), torch.zeros(4), None)
    check_targets(bundle, torch.zeros(4, 1))
    check_targets(bundle, torch.zeros(4))
    wide = bundle_of(torch.zeros(4, 2), torch.zeros(4, 3), None)
    message = check_error(wide, torch.zeros(4, 1))
    assert (
        "targets in test data (4 samples) have 3 values per sample but the model has 1 output"
        in message
    )
