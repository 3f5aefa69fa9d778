"""What ``analyze`` measures under ``fsdp`` (parameters sharded over the ranks by FSDP2), checked
without importing torch: the Hessian by finite differences; every figure's estimator takes
sharded vectors."""

from __future__ import annotations

from typing import Any

from sharpscope.errors import InputError


def check_sharded(config: Any) -> None:
    """Refuse (:class:`InputError`) what ``fsdp`` cannot run: curvatures other than the Hessian
    and products other than finite differences."""
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
