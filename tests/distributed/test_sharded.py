"""Hessian products and Lanczos under FSDP2 (parameters sharded with ``fully_shard``) on 2 Gloo
ranks, against one process holding the whole model and all the data, in float64.

The run is a real ``python -m torch.distributed.run --standalone`` subprocess with a timeout
(helpers from test_distributed.py), so a hang fails the test instead of stalling it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import python

pytestmark = pytest.mark.integration  # every test runs torchrun
TESTS = Path(__file__).resolve().parents[1]
SHARDED_CHECK = """
# On 2 ranks, the tiny GPT-2 sharded per block and at the root: the sharded operator's product,
# gradient, loss and top-3 eigenpairs equal one process's (double backward, whole model, all the
# data); its weights are bit-identical after the solve; what it cannot take is refused.
import sys

sys.path.insert(0, {tests!r})

import tiny_hf
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

from sharpscope import distributed
from sharpscope.curvature import HessianOperator, Objective, SolveSettings, lanczos
from sharpscope.curvature.sharded import ShardedHessianOperator
from sharpscope.curvature.vectors import dot, norm
from sharpscope.errors import InputError

REL = 1e-8


def lm_loss(out, y):
    return F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1))


ids = torch.randint(0, tiny_hf.VOCAB - 1, (10, 10), generator=torch.Generator().manual_seed(0))
pieces = [({{"input_ids": x}}, x) for x in ids.split(2)]  # 5 batches: ranks hold 2 and 3


def sharded_gpt2():
    model = tiny_hf.gpt2().double()
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    return model


def relative(ours, theirs, over):
    return norm(ours - theirs, over) / norm(theirs, over)


def main():
    with distributed.launched(60):
        mine = [pieces[i] for i in distributed.shard(len(pieces))]
        model = sharded_gpt2()
        op = ShardedHessianOperator(Objective(model, lm_loss, mine), step_scale=1 / 32)
        whole = Objective(tiny_hf.gpt2().double(), lm_loss, pieces, distributed=False)
        one = HessianOperator(whole)
        over = op.shards.sum
        assert op.shards.size == one.size and op.shape == one.shape and op.size < one.size
        loss, gradient = op.loss_and_gradient()
        whole_loss, whole_gradient = one.loss_and_gradient()
        assert abs(loss - whole_loss) <= 1e-12 * whole_loss, (loss, whole_loss)
        off = relative(gradient, op.cut(whole_gradient), over)
        assert off <= 1e-12, f"the gradient is {{off:.1e}} off one process's"
        v = torch.randn(one.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        product, expected = op.matvec(op.cut(v)), op.cut(one.matvec(v))
        assert relative(product, expected, over) <= REL, relative(product, expected, over)
        gathered = torch.tensor(sum(distributed.all_gather(product.tolist()), []))
        reference = torch.tensor(sum(distributed.all_gather(expected.tolist()), []))
        off = norm(gathered - reference) / norm(reference)
        assert off <= REL, f"the gathered product is {{off:.1e}} off one process's"
        before = [t.clone() for t in op._locals()]
        settings = SolveSettings(tol=1e-10, max_iter=200)
        ours, theirs = lanczos(op, k=3, settings=settings), lanczos(one, k=3, settings=settings)
        values, expected_values = ours.eigenvalues, theirs.eigenvalues
        assert ((values - expected_values).abs() <= REL * expected_values.abs()).all(), (
            values.tolist(),
            expected_values.tolist(),
        )
        for a, b in zip(ours.eigenvectors, theirs.eigenvectors, strict=True):
            assert abs(dot(a, op.cut(b), over)) >= 1 - 1e-6  # the same start, the same vectors
        assert ours.n_products == theirs.n_products
        assert all(torch.equal(a, b) for a, b in zip(before, op._locals(), strict=True))
        assert all(p.grad is None for p in model.parameters())
        values = distributed.all_gather(values.tolist())
        assert all(v == values[0] for v in values), "ranks differ"
        for objective, expected in [
            (Objective(tiny_hf.gpt2().double(), lm_loss, mine), "`fully_shard`"),
            (Objective(sharded_gpt2(), lm_loss, pieces, distributed=False), "`distributed` True"),
        ]:
            try:
                ShardedHessianOperator(objective)
                raise AssertionError("not refused")
            except InputError as exc:
                assert expected in str(exc), exc
        if distributed.rank() == 0:
            print("ok", distributed.world_size())


main()
distributed.exit_now(0)  # finalising after Gloo collectives may abort: see its docstring
"""


def test_sharded_lanczos_equals_one_process(tmp_path):
    script = tmp_path / "sharded_check.py"
    script.write_text(SHARDED_CHECK.format(tests=str(TESTS)), encoding="utf-8")
    done = python([str(script)], 2)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["ok", "2"]
