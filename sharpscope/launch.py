"""Whether this process was started by ``torchrun``: read from the environment alone, so the
command-line entry point can ask before importing torch."""

from __future__ import annotations

import os

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks by default (``--dist-timeout``)."""


def launched_by_torchrun() -> bool:
    """True when torchrun's environment variables (RANK, WORLD_SIZE, ...) are all set."""
    return all(name in os.environ for name in TORCHRUN_VARS)
