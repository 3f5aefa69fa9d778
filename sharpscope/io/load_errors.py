"""The one-line errors of reading checkpoints: corrupt files, refused pickles, long lists."""

from __future__ import annotations

import re
from pathlib import Path

from sharpscope.errors import InputError

SHOWN = 5
"""How many items of a list an error message names."""


def corrupt(path: Path, exc: BaseException) -> InputError:
    """A file that could not be parsed: name it and the parser's first line."""
    return InputError(
        f"{path} is truncated or corrupt ({first_line(exc)}); save or download it again"
    )


def first_line(exc: BaseException) -> str:
    """An exception's first line of text, without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def refused_global(exc: BaseException) -> str:
    """The class the weights-only unpickler refused, from its message."""
    found = re.search(r"GLOBAL (\S+)", str(exc))
    return f"e.g. {found[1]}" if found else "beyond tensors and containers"


def pickle_refusal(path: Path, what: str) -> InputError:
    """The refusal to unpickle ``what`` from ``path`` without ``trust_pickle``."""
    return InputError(
        f"{path} holds arbitrary Python objects ({what}), not only weights; unpickling them can "
        "run any code, so sharpscope refuses by default: pass `trust_pickle` "
        "only for files you trust, or re-save with torch.save(model.state_dict(), ...)"
    )


def few(items: list[str]) -> str:
    """The first :data:`SHOWN` items, comma-separated, and how many more there are."""
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more
