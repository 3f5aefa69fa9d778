"""Partial fine-tuning: which parameters a run trains (``params`` and ``freeze`` globs, matched
against ``model.named_parameters()`` names as analyze's ``params`` are,
:func:`sharpscope.curvature.params.select_params`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from sharpscope.errors import InputError
from sharpscope.io.load_errors import few


def split_globs(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """The globs of a repeatable option whose values may also be comma-separated; None when
    none is given."""
    if values is None:
        return None
    found = tuple(g.strip() for value in values for g in value.split(",") if g.strip())
    return found or None


def select_trained(
    model: nn.Module, params: Sequence[str] | None, freeze: Sequence[str] | None
) -> tuple[str, ...]:
    """Keep ``requires_grad`` on only the trainable parameters that match a ``params`` glob (all
    when None) and no ``freeze`` glob; the names of those trained. A glob that matches no
    parameter, or a choice that leaves none, is an :class:`InputError`."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    for option, globs in (("params", params), ("freeze", freeze)):
        for glob in globs or ():
            if not any(fnmatch.fnmatchcase(n, glob) for n in names):
                raise InputError(
                    f"`{option}` {glob!r} matches no trainable parameter; the names are like "
                    f"{few(names)} (globs as for analyze: 'classifier.*')"
                )
    chosen = [
        n
        for n in names
        if (params is None or any(fnmatch.fnmatchcase(n, g) for g in params))
        and not any(fnmatch.fnmatchcase(n, g) for g in freeze or ())
    ]
    if not chosen:
        raise InputError("`params` and `freeze` leave no parameter to train; freeze fewer")
    kept = set(chosen)
    for n, p in named:
        p.requires_grad_(n in kept)
    return tuple(chosen)
