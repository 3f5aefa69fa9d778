"""Any mapping of input fields (a ``UserDict``, a tokenizer's ``BatchEncoding``) is moved, cast and
split like a dict, and a model whose forward takes the mapping as one argument is called so."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from tiny_hf import bert
from torch import nn
from transformers import BatchEncoding

from sharpscope.batches import move_to
from sharpscope.curvature import HessianOperator, Objective, SolveSettings
from sharpscope.errors import InputError
from sharpscope.io.losses import resolve_loss
from sharpscope.structures import input_style


def _text_batches(kind: type) -> list:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 24, (6, 7), generator=gen)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 3, (6,), generator=gen)
    return [
        (kind({"input_ids": ids[i : i + 3], "attention_mask": mask[i : i + 3]}), labels[i : i + 3])
        for i in (0, 3)
    ]


def test_move_to_keeps_and_casts_any_mapping() -> None:
    moved = move_to(
        UserDict({"x": torch.ones(2), "ids": torch.ones(2, dtype=torch.long)}),
        torch.device("cpu"),
        torch.float64,
    )
    assert isinstance(moved, UserDict)
    assert moved["x"].dtype == torch.float64 and moved["ids"].dtype == torch.long


@pytest.mark.parametrize("kind", [UserDict, BatchEncoding])
def test_mapping_batches_give_the_dict_results(kind: type) -> None:
    model = bert().double()
    loss = resolve_loss("ce")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = HessianOperator(Objective(model, loss, _text_batches(dict))).matvec(v)
    got = HessianOperator(Objective(model, loss, _text_batches(kind))).matvec(v)
    assert torch.equal(got, want)


class OneArgument(nn.Module):
    """A forward that takes the whole mapping as one argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, batch):
        return self.lin(batch["x"] * batch["scale"])


class Fields(OneArgument):
    def forward(self, x, scale):
        return self.lin(x * scale)


def _mapped(n: int = 6) -> list:
    gen = torch.Generator().manual_seed(1)
    x, scale = torch.randn(n, 4, generator=gen), torch.rand(n, 1, generator=gen) + 0.5
    y = torch.randint(0, 3, (n,), generator=gen)
    return [
        (UserDict({"x": x[i : i + 2], "scale": scale[i : i + 2]}), y[i : i + 2])
        for i in range(0, n, 2)
    ]


def test_a_one_argument_forward_is_chosen_and_matches_keywords() -> None:
    torch.manual_seed(0)
    single = OneArgument().double()
    fields = Fields().double()
    fields.load_state_dict(single.state_dict())
    data = _mapped()
    assert input_style(single, data[0][0]) == "single"
    assert input_style(fields, data[0][0]) == "kwargs"
    loss = resolve_loss("ce")
    v = torch.randn(15, dtype=torch.float64)
    want = HessianOperator(Objective(fields, loss, data)).matvec(v)
    for style in ("auto", "single"):
        got = HessianOperator(Objective(single, loss, data, input_style=style)).matvec(v)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)


def test_a_model_that_cannot_take_the_data_fails_when_built() -> None:
    with pytest.raises(InputError, match=r"cannot run on the first batch.*`input_style` single"):
        HessianOperator(
            Objective(OneArgument().double(), resolve_loss("ce"), _mapped(), input_style="kwargs")
        )


def test_an_undecidable_signature_is_refused() -> None:
    class TwoPositional(OneArgument):
        def forward(self, a, b):
            return self.lin(a * b)

    with pytest.raises(InputError, match=r"cannot tell how to pass .*pass `input_style`"):
        input_style(TwoPositional(), _mapped()[0][0])


MODELS = (
    "from torch import nn\n"
    "class One(nn.Module):\n"
    "    def __init__(self):\n        super().__init__()\n        self.lin = nn.Linear(4, 3)\n"
    "    def forward(self, batch):\n        return self.lin(batch['x'] * batch['scale'])\n"
    "def one():\n    return One()\n"
    "def data():\n    import torch\n    return torch.load(__file__[:-3] + '.pt')\n"
)


def test_cli_input_style(tmp_path, monkeypatch) -> None:
    """A one-argument forward on mapping data: ``auto`` and ``--input-style single`` give the
    operator's λ_max; ``--input-style kwargs`` fails in one line before any solve."""
    import json

    from typer.testing import CliRunner

    from sharpscope.cli.app import app
    from sharpscope.curvature import lanczos
    from sharpscope.io.checkpoints import save_checkpoint
    from sharpscope.io.models import ModelSpec
    from sharpscope.structures import concat

    (tmp_path / "mapmods.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    model = OneArgument()
    save_checkpoint(tmp_path / "m.safetensors", model, ModelSpec("mapmods:one", {}))
    data = _mapped(12)
    inputs, targets = concat([x for x, _ in data]), concat([y for _, y in data])
    torch.save((dict(inputs), targets), tmp_path / "mapmods.pt")
    op = HessianOperator(Objective(model.double(), resolve_loss("ce"), [(inputs, targets)]))
    truth = float(lanczos(op, 1, settings=SolveSettings(tol=1e-12)).eigenvalues[0])
    base = ["analyze", str(tmp_path / "m.safetensors"), "--data", "mapmods:data"]
    base += ["--model", "mapmods:one", "--dtype", "float64", "--top-k", "1", "--tol", "1e-10"]
    base += ["--shards", "0", "--no-trace", "--json", "--quiet", "--batch-size", "5"]
    for style in ("auto", "single"):
        result = CliRunner().invoke(app, [*base, "--input-style", style])
        assert result.exit_code == 0, result.stderr
        value = json.loads(result.stdout)["results"]["eigenvalues"]["values"][0]
        assert value == pytest.approx(truth, rel=1e-9)
    refused = CliRunner().invoke(app, [*base, "--input-style", "kwargs"])
    assert refused.exit_code == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "--input-style single" in refused.stderr


def test_a_tokenizers_batch_encoding_gives_the_dict_results(tmp_path) -> None:
    from tiny_tokenizer import save_tokenizer

    tokenizer = save_tokenizer(tmp_path)
    texts = ["the cat sat on the mat", "a dog ran", "the big red dog is not bad", "a cat ."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert isinstance(encoded, BatchEncoding)
    labels = torch.tensor([0, 1, 2, 1])
    model = bert().double()
    loss = resolve_loss("ce")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    want = HessianOperator(Objective(model, loss, [(dict(encoded), labels)])).matvec(v)
    op = HessianOperator(Objective(model, loss, [(encoded, labels)]))
    assert torch.equal(op.matvec(v), want)
    moved = move_to(encoded, torch.device("cpu"), torch.float64)
    assert isinstance(moved, BatchEncoding) and moved.input_ids.dtype == torch.long
