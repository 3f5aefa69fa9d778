"""An optimizer's state through torch.distributed.checkpoint (DCP), SAM-family wrappers included:
``torch.distributed.checkpoint.state_dict``'s functions keep only the ``state`` and
``param_groups`` of a ``state_dict()`` (and would step a SAM wrapper to initialise it), so these
hand them the base optimizer and add the wrapper's own state under ``"sam"``
(:meth:`~sharpscope.optim.sam.SAM.checkpoint_state`: Eigen-SAM's eigenvector as tensors placed
like the parameters, which DCP reshards onto another number of ranks).

Saving: ``dcp.save({"optim": get_optimizer_state_dict(model, opt)}, ...)``; loading: the same
dict from a fresh optimizer, with ``with_base=True`` when the saved one held the base's state,
is the template that ``dcp.load`` fills in place, then ``set_optimizer_state_dict(model, opt,
template["optim"])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.distributed.checkpoint import state_dict as dcp_state
from torch.optim import Optimizer

from sharpscope.optim.sam import SAM


def get_optimizer_state_dict(
    model: nn.Module,
    optimizer: Optimizer,
    *,
    options: dcp_state.StateDictOptions | None = None,
    with_base: bool | None = None,
) -> dict[str, Any]:
    """``optimizer``'s state dict as DCP saves it: torch's ``get_optimizer_state_dict`` of the
    optimizer (a SAM wrapper's base, whose param groups hold the ``sam_*`` settings) when
    ``with_base`` (None: when it has state; torch makes a missing one by a step of zero gradients,
    which changes SGD's momentum under weight decay, so only a template to load into takes it),
    plus the wrapper's own state under ``"sam"``."""
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if with_base is None:
        with_base = bool(base.state)
    state: dict[str, Any] = (
        dict(dcp_state.get_optimizer_state_dict(model, base, options=options)) if with_base else {}
    )
    if isinstance(optimizer, SAM):
        state["sam"] = optimizer.checkpoint_state()
    return state


def set_optimizer_state_dict(
    model: nn.Module,
    optimizer: Optimizer,
    state: Mapping[str, Any],
    *,
    options: dcp_state.StateDictOptions | None = None,
) -> None:
    """Load what :func:`get_optimizer_state_dict` gave (after ``dcp.load`` filled it) into
    ``optimizer``: torch's ``set_optimizer_state_dict`` where it holds the base's state, then a
    SAM wrapper's own state."""
    state = dict(state)
    own = state.pop("sam", None)
    if isinstance(optimizer, SAM) and own is None:
        raise ValueError("not a sharpscope SAM state dict: it has no 'sam' entry")
    base = optimizer.base_optimizer if isinstance(optimizer, SAM) else optimizer
    if state:
        dcp_state.set_optimizer_state_dict(model, base, state, options=options)
    if isinstance(optimizer, SAM):
        optimizer.load_checkpoint_state(own)
