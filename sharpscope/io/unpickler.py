"""Whether this torch's weights-only unpickler may be given a file from a stranger.

``torch.load(weights_only=True)`` is sharpscope's defence against pickles, but two flaws let a
crafted file run code through it: CVE-2025-32434 (fixed in torch 2.6) and CVE-2026-24747 (heap
corruption, fixed in torch 2.10). On an older torch a pickle-based file is refused unless the
user trusts it; safetensors files never reach the unpickler.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sharpscope.errors import InputError

SAFE_SINCE = (2, 10)
"""The first torch release whose weights-only unpickler has no known way to run code."""


def unpickler_is_safe(version: str | None = None) -> bool:
    """Whether torch ``version`` (default: the one running) is at least :data:`SAFE_SINCE`."""
    found = re.match(r"(\d+)\.(\d+)", str(version or torch.__version__))
    return found is not None and (int(found[1]), int(found[2])) >= SAFE_SINCE


def refuse_unsafe_unpickler(path: Path | str, trust_pickle: bool | None) -> None:
    """Raise before an untrusted pickle meets an unsafe unpickler; the message names
    ``trust_pickle`` unless it is None (an input that has no such opt-in, like data files)."""
    if trust_pickle or unpickler_is_safe():
        return
    opt_in = "" if trust_pickle is None else ", or pass `trust_pickle` if you trust it"
    raise InputError(
        f"{path} is a pickle (torch.save) file, and torch {torch.__version__}'s weights-only "
        "unpickler can be made to run code by a crafted file (CVE-2025-32434, CVE-2026-24747; "
        f"fixed in torch {'.'.join(map(str, SAFE_SINCE))}): upgrade torch or save the file as "
        f".safetensors{opt_in}"
    )
