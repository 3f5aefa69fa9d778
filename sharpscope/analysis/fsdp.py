"""``analyze`` under ``fsdp``: the loaded model sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``) and its Hessian as :class:`ShardedHessianOperator`."""

from __future__ import annotations

from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from sharpscope import distributed
from sharpscope.errors import InputError


def require_ranks(command: str = "analyze") -> None:
    """Refuse (:class:`InputError`) ``fsdp`` outside a torchrun launch of several ranks, saying
    how to launch ``command``."""
    if distributed.world_size() < 2:
        raise InputError(
            "`fsdp` shards the parameters over the ranks of a torchrun launch: run "
            f"`torchrun --nproc-per-node N -m sharpscope {command} ...` with N ≥ 2"
        )


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the children of the :class:`~torch.nn.ModuleList` that holds
    the most parameters (a transformer's layers); none when it has no such list."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    held = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(held)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is sharded already (:func:`shard_model`, as it loaded)."""
    return isinstance(model, FSDPModule)


def reshard(model: nn.Module) -> None:
    """Put every sharded module of ``model`` back on its shards: a forward outside training (the
    loading's check of one batch) leaves the root's parameters gathered, and the module's
    parameters would then be those whole tensors, not the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over every rank with ``fully_shard``: each of its
    :func:`blocks`, then the root (which takes the rest), on the device and in the dtype it has;
    returns it (unchanged when sharded already, as :func:`~sharpscope.io.checkpoints.load_model`
    shards it under a placement)."""
    if is_sharded(model):
        return model
    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model
