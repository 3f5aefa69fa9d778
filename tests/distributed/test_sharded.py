"""Hessian products, Lanczos and the other estimators under FSDP2 (parameters sharded with
``fully_shard``) on 2 Gloo ranks, against one process holding the whole model and all the
data, in float64.

The run is a real ``python -m torch.distributed.run --standalone`` subprocess with a timeout
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

import tiny_hf
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from sharpscope import distributed
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos, select_params
from sharpscope.curvature.hvp import refined
from sharpscope.curvature.sharded import ShardedHessianOperator
from sharpscope.curvature.vectors import dot, norm
from sharpscope.errors import InputError

REL = 1e-8
WIDE = 2.0**8
NAME = {name!r}


def lm_loss(out, y):
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


def class_loss(out, y):
    return F.cross_entropy(out.logits, y)


g = torch.Generator().manual_seed(0)
ids = torch.randint(0, tiny_hf.VOCAB - 1, (10, 10), generator=g)  # 0 is BERT's padding token
targets = torch.randint(0, 3, (10,), generator=g) if NAME == "bert" else ids
loss_fn = class_loss if NAME == "bert" else lm_loss
# 5 batches: the ranks hold 2 and 3
pieces = [({{"input_ids": x}}, y) for x, y in zip(ids.split(2), targets.split(2))]
BLOCKS = {{
    "gpt2": lambda m: m.transformer.h,
    "bert": lambda m: m.bert.encoder.layer,
    "llama": lambda m: m.model.layers,
}}


def build():
    return getattr(tiny_hf, NAME)().double()


def sharded():
    model = build()
    for block in BLOCKS[NAME](model):
        fully_shard(block)
    fully_shard(model)
    return model


def relative(ours, theirs, over):
    return norm(ours - theirs, over) / norm(theirs, over)
"""
END = """
main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""
SHARDED_CHECK = (
    PRELUDE
    + """
# On 2 ranks, a tiny model sharded per block and at the root: the sharded operator's step
# search, product, gradient, loss, error estimates and top-3 eigenpairs (refined() on v1) equal
# one process's finite differences (whole model, all the data); its weights are bit-identical
# after the solve, also on a model whose first forward runs inside a shift; what it cannot take
# is refused. The GPT-2's and the BERT's (whose word embeddings hold a padding row) products and
# eigenvalues equal double backward too; the Llama's RMSNorm and rotary positions compute in
# float32 inside, which puts any finite difference 1e-5 off it. The lean step search chooses the
# same step.


def main():
    with distributed.launched(60):
        mine = [pieces[i] for i in distributed.shard(len(pieces))]
        model = sharded()
        whole = Objective(build(), loss_fn, pieces, distributed=False)
        size = select_params(whole.model).size
        v = torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        one = HessianOperator(whole, backend="finite-difference")  # searches its step on v
        # the reference: double backward, but the Llama's own finite differences (see above)
        exact = one if NAME == "llama" else HessianOperator(whole.replace(model=build()))
        op = ShardedHessianOperator(Objective(model, loss_fn, mine))  # searches its step too
        over = op.shards.sum
        assert op.shards.size == one.size and op.shape == one.shape and op.size < one.size
        loss, gradient = op.loss_and_gradient()
        whole_loss, whole_gradient = one.loss_and_gradient()
        assert abs(loss - whole_loss) <= 1e-12 * whole_loss, (loss, whole_loss)
        off = relative(gradient, op.cut(whole_gradient), over)
        assert off <= 1e-12, f"the gradient is {{off:.1e}} off one process's"
        image = one.matvec(v)
        product, expected = op.matvec(op.cut(v)), op.cut(image)
        # the same search: the same step; its error estimate is at the rounding floor there, which
        # the sums' order moves (GPT-2: 1.73e-11 against 1.67e-11)
        assert (op.fd_scale, op.n_products) == (one.fd_scale, one.n_products)
        assert abs(op.fd_error - one.fd_error) <= 0.25 * one.fd_error, (op.fd_error, one.fd_error)
        assert relative(product, expected, over) <= REL, relative(product, expected, over)
        # the lean step search (one product's buffer) chooses the same step, the same product
        lean = ShardedHessianOperator(Objective(model, loss_fn, mine), lean=True)
        assert relative(lean.matvec(op.cut(v)), product, over) <= 1e-13
        assert (lean.fd_lean, lean.fd_scale, op.fd_lean) == (True, op.fd_scale, False)
        off = relative(product, op.cut(exact.matvec(v)), over)
        assert off <= REL, f"the product is {{off:.1e}} off one process's reference"
        gathered = torch.tensor(sum(distributed.all_gather(product.tolist()), []))
        reference = torch.tensor(sum(distributed.all_gather(expected.tolist()), []))
        off = norm(gathered - reference) / norm(reference)
        assert off <= REL, f"the gathered product is {{off:.1e}} off one process's"
        # at a step 2^8 times the base one the error is truncation's: equal to 1e-6
        wide = ShardedHessianOperator(Objective(model, loss_fn, mine), step_scale=WIDE)
        one.fd_scale, scale = WIDE, one.fd_scale
        images = wide.matvec(op.cut(v)), one.matvec(v)
        spread = wide.difference_error(op.cut(v), images[0]), one.difference_error(v, images[1])
        assert abs(spread[0] - spread[1]) <= 1e-6 * spread[1], spread
        one.fd_scale = scale
        before = [t.clone() for t in op._weights()]
        # the Llama's reference follows the same products: a looser tolerance, fewer of them
        settings = SolveSettings(tol=1e-4 if NAME == "llama" else 1e-10, max_iter=200)
        counts = op.n_products, one.n_products
        ours = refined(op, lambda: lanczos(op, k=3, settings=settings), 1e-9)
        theirs = refined(one, lambda: lanczos(one, k=3, settings=settings), 1e-9)
        counts = op.n_products - counts[0], one.n_products - counts[1]
        assert (op.fd_scale, counts[0]) == (one.fd_scale, counts[1]), (op.fd_scale, counts)
        assert abs(op.fd_error - one.fd_error) <= 0.25 * one.fd_error, (op.fd_error, one.fd_error)
        if exact is not one:
            theirs = lanczos(exact, k=3, settings=settings)
        values, expected_values = ours.eigenvalues, theirs.eigenvalues
        assert ((values - expected_values).abs() <= REL * expected_values.abs()).all(), (
            values.tolist(),
            expected_values.tolist(),
        )
        for a, b in zip(ours.eigenvectors, theirs.eigenvectors, strict=True):
            assert abs(dot(a, op.cut(b), over)) >= 1 - 1e-6  # the same start, the same vectors
        assert all(torch.equal(a, b) for a, b in zip(before, op._weights(), strict=True))
        assert all(p.grad is None for p in model.parameters())
        values = distributed.all_gather(values.tolist())
        assert all(v == values[0] for v in values), "ranks differ"
        # a model that has not run yet: FSDP2's first forward must not re-point the shards moved
        lazy = ShardedHessianOperator(Objective(sharded(), loss_fn, mine), validate=False)
        kept = [t.clone() for t in lazy._weights()]
        lazy.matvec(lazy.cut(v))
        assert all(torch.equal(a, b) for a, b in zip(kept, lazy._weights(), strict=True))
        for objective, expected in [
            (Objective(build(), loss_fn, mine), "`fully_shard`"),
            (Objective(sharded(), loss_fn, pieces, distributed=False), "`distributed` True"),
        ]:
            try:
                ShardedHessianOperator(objective)
                raise AssertionError("not refused")
            except InputError as exc:
                assert expected in str(exc), exc
        if distributed.rank() == 0:
            print("ok", distributed.world_size())
"""
    + END
)
ESTIMATORS_CHECK = (
    PRELUDE
    + """
# On 2 ranks, the tiny GPT-2 sharded: power iteration, Hutch++ and SLQ on the sharded operator
# follow one process's runs on its finite differences (whole model, all the data) step by step:
# the same probes, cut, and the same products to rounding; a float32 model's product error.
from sharpscope.curvature import hutchpp, power_iteration, slq
from sharpscope.curvature.product_error import product_error


def close(ours, theirs):
    return bool(((ours - theirs).abs() <= REL * theirs.abs().max()).all())


def main():
    with distributed.launched(60):
        mine = [pieces[i] for i in distributed.shard(len(pieces))]
        whole = Objective(build(), loss_fn, pieces, distributed=False)
        one = HessianOperator(whole, backend="finite-difference")
        op = ShardedHessianOperator(Objective(sharded(), loss_fn, mine))

        def both(estimator, **options):
            return [estimator(o, **options) for o in (op, one)]

        ours, theirs = both(power_iteration, k=2, settings=SolveSettings(tol=1e-8, max_iter=60))
        assert op.fd_scale == one.fd_scale and ours.n_products == theirs.n_products
        assert close(ours.eigenvalues, theirs.eigenvalues), (ours.eigenvalues, theirs.eigenvalues)
        for a, b in zip(ours.eigenvectors, theirs.eigenvectors, strict=True):
            assert abs(dot(a, op.cut(b), op.shards.sum)) >= 1 - 1e-6
        ours, theirs = both(hutchpp, sketch=4, settings=SolveSettings(tol=1e-3, max_iter=12))
        assert close(torch.tensor(ours.estimate), torch.tensor(theirs.estimate))
        assert close(ours.samples, theirs.samples) and ours.n_products == theirs.n_products
        ours, theirs = both(slq, n_vectors=1, n_iter=8)
        assert close(ours.nodes[0], theirs.nodes[0]) and close(ours.weights[0], theirs.weights[0])
        assert ours.size == theirs.size == one.size
        # a float32 model: the products' error by the reordered proxy (each rank reorders its
        # batches; no float64 copy of a sharded model), as large as one process's proxy within
        # rounding's spread, and above the error measured against the float64 products
        narrow = sharded().float()
        op32 = ShardedHessianOperator(Objective(narrow, loss_fn, mine))
        one32 = HessianOperator(whole.replace(model=build().float()), backend="finite-difference")
        v = torch.randn(one.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        v = v / v.norm()
        ours = product_error(op32, op32.cut(v).float(), None)
        theirs = product_error(one32, v.float(), 0)  # 0 bytes free: the proxy, not float64
        assert ours.method == theirs.method == "reordered", (ours, theirs)
        assert 0.1 <= ours.absolute / theirs.absolute <= 10, (ours, theirs)
        image = op32.matvec(op32.cut(v).float()).double()
        actual = norm(image - op.cut(one.matvec(v)), op.shards.sum)
        assert ours.absolute >= actual, (ours.absolute, actual)
        if distributed.rank() == 0:
            print("ok", distributed.world_size())
"""
    + END
)


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_sharded_lanczos_equals_one_process(tmp_path, name):
    script = tmp_path / "sharded_check.py"
    script.write_text(SHARDED_CHECK.format(tests=str(TESTS), name=name), encoding="utf-8")
    done = python([str(script)], 2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["ok", "2"]


def test_sharded_estimators_equal_one_process(tmp_path):
    script = tmp_path / "estimators_check.py"
    script.write_text(ESTIMATORS_CHECK.format(tests=str(TESTS), name="gpt2"), encoding="utf-8")
    done = python([str(script)], 2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["ok", "2"]
