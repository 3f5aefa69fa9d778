"""JSON text as the report layer writes it: indented, with NaN and infinity as null."""

from __future__ import annotations

import json
from typing import Any

from sharpscope.io.json_values import json_safe


def dumps(value: Any) -> str:
    """``value`` (JSON values) as indented JSON; NaN and infinity written as null."""
    return json.dumps(json_safe(value), indent=2) + "\n"
