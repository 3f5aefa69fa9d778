"""What ``analyze`` measures under ``fsdp`` (parameters sharded over the ranks by FSDP2), checked
without importing torch: the one list of the figures whose estimators do not take sharded
vectors yet, refused when asked for and turned off (with a note) when on by default."""

from __future__ import annotations

import dataclasses
from typing import Any

from sharpscope.errors import InputError

UNSHARDED: dict[str, Any] = {
    "shards": 0,
    "bias": False,
    "adaptive_sharpness": None,
    "critical_sharpness": False,
}
"""Setting -> the value it takes under ``fsdp``: the stages of these figures (the spread over
shards and its bias, adaptive and critical sharpness) take whole vectors still. Lift an entry
when its stage takes sharded ones."""


def _defaults(config: Any) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(config)}


def check_sharded(config: Any) -> None:
    """Refuse (:class:`InputError`) what ``fsdp`` cannot run: curvatures other than the Hessian,
    products other than finite differences, and a figure of :data:`UNSHARDED` asked for."""
    if config.curvature != "hessian":
        raise InputError(
            f"`fsdp` analyses the Hessian only, not `curvature` {config.curvature}: its products "
            "are finite differences of sharded gradients"
        )
    if config.backend != "finite-difference":
        raise InputError(
            f"`fsdp` takes products by finite differences only, not `backend` {config.backend}: "
            "pass `backend` finite-difference"
        )
    defaults = _defaults(config)
    for name, off in UNSHARDED.items():
        value = getattr(config, name)
        if value != off and value != defaults[name]:
            asked = f"`{name}`" if isinstance(value, bool) else f"`{name}` {value}"
            raise InputError(
                f"{asked} does not run under `fsdp` yet (its estimator does not take sharded "
                "vectors); leave it out"
            )


def turned_off(config: Any) -> tuple[Any, list[str]]:
    """``config`` with the figures of :data:`UNSHARDED` that are on by default turned off, and a
    note naming them (none when ``fsdp`` is off or none was on)."""
    if not config.fsdp:
        return config, []
    changed = {n: off for n, off in UNSHARDED.items() if getattr(config, n) != off}
    if not changed:
        return config, []
    names = ", ".join(f"`{n}`" for n in changed)
    note = (
        f"under `fsdp` {names} did not run: their estimators do not take vectors sharded over "
        "the ranks yet"
    )
    return dataclasses.replace(config, **changed), [note]
