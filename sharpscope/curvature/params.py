"""Which parameters the Hessian is taken over, and how flat vectors map onto them.

A flat vector concatenates the selected parameters in the order of ``model.named_parameters()``
(module registration order, shared parameters listed once under their first name), each
flattened in row-major order.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sharpscope.curvature.vectors import shaped


@dataclass(frozen=True)
class ParamSpace:
    """The selected parameters of a model: names, tensors and their place in a flat vector.

    Attributes:
        names: The parameters' names, in flat-vector order.
        params: The parameters themselves (not copies).

    Examples:
        >>> import torch
        >>> space = select_params(torch.nn.Linear(3, 2))
        >>> space.names, space.size
        (('weight', 'bias'), 8)
        >>> {n: tuple(t.shape) for n, t in space.unflatten(torch.arange(8.0)).items()}
        {'weight': (2, 3), 'bias': (2,)}
    """

    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return tuple(p.shape for p in self.params)

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(p.numel() for p in self.params)

    @property
    def size(self) -> int:
        """Length of a flat vector over these parameters."""
        return sum(self.numels)

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into ``{name: tensor}`` views shaped like the parameters."""
        if vec.ndim != 1 or vec.numel() != self.size:
            raise ValueError(
                f"expected a flat vector of length {self.size}, got {tuple(vec.shape)}"
            )
        return dict(zip(self.names, shaped(vec, self.shapes), strict=True))

    def split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into parameter-shaped views, in parameter order."""
        return list(self.unflatten(vec).values())

    def flatten(self, tensors: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate ``{name: tensor}`` (or a sequence in parameter order) into a flat vector."""
        if isinstance(tensors, dict):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise KeyError(f"missing parameters: {', '.join(missing)}")
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(tensors)}")
        for name, t, p in zip(self.names, tensors, self.params, strict=True):
            if t.shape != p.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != {tuple(p.shape)}")
        return torch.cat([t.reshape(-1) for t in tensors])


def _globs(globs: Sequence[str] | str | None) -> list[str] | None:
    """One glob or a list of globs as a list (None stays None)."""
    return [globs] if isinstance(globs, str) else None if globs is None else list(globs)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def select_params(
    model: nn.Module,
    include: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
) -> ParamSpace:
    """Select the parameters that require grad, optionally only those whose name matches a glob
    of ``include``, less those that match a glob of ``exclude``.

    Each is one glob or a list of globs (``fnmatch``, e.g. ``"fc.*"``). Every ``exclude`` glob
    must match a parameter that ``include`` selects, and one parameter at least must remain.

    Args:
        model: The model whose parameters to select.
        include: Globs of the names to keep (None: all that require grad).
        exclude: Globs of the names to leave out of those.

    Returns:
        The selection as a :class:`ParamSpace`.

    Raises:
        ValueError: Nothing selected, an ``exclude`` glob that matches nothing, or parameters
            of mixed dtypes or devices.

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        >>> select_params(model, "1.*").names
        ('1.weight', '1.bias')
        >>> select_params(model, exclude="*.bias").names
        ('0.weight', '1.weight')
    """
    include, exclude = _globs(include), _globs(exclude)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if include is not None:
        named = [(n, p) for n, p in named if _matches(n, include)]
    if not named:
        what = f" matching `params` {include}" if include is not None else ""
        raise ValueError(f"the model has no trainable parameters{what}")
    for glob in exclude or ():
        if not any(_matches(n, [glob]) for n, _ in named):
            among = "parameters that `params` selects" if include else "trainable parameters"
            raise ValueError(f"`exclude` {glob!r} matches none of the {len(named)} {among}")
    if exclude:
        named = [(n, p) for n, p in named if not _matches(n, exclude)]
        if not named:
            raise ValueError(f"`exclude` {exclude} leaves no parameters to analyze")
    dtypes = {p.dtype for _, p in named}
    devices = {p.device for _, p in named}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"selected parameters mix dtypes {sorted(map(str, dtypes))} or devices "
            f"{sorted(map(str, devices))}; convert the model to one dtype and device first"
        )
    names, params = zip(*named, strict=True)
    return ParamSpace(names=tuple(names), params=tuple(params))
