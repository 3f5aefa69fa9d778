"""JSON text as the report layer writes it: indented, with NaN and infinity as null."""

from __future__ import annotations

import json
from typing import Any


def dumps(value: Any) -> str:
    """``value`` (JSON values) as indented JSON; NaN and infinity written as null."""
    return json.dumps(_finite(value), indent=2) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
