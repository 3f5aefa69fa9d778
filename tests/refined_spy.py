"""A spy on :func:`sharpscope.curvature.hvp.refined` as a module calls it: the solves that went
through it, by their operator's backend and tolerance."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest


def spied_refined(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[tuple[str, float]]:
    """``module.refined`` records ``(op.backend, tol)`` of each call in the list returned, then
    solves as before."""
    solves: list[tuple[str, float]] = []
    refined = module.refined

    def counted(op: Any, solve: Any, tol: float) -> Any:
        solves.append((op.backend, tol))
        return refined(op, solve, tol)

    monkeypatch.setattr(module, "refined", counted)
    return solves
