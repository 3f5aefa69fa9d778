"""Confidence intervals of sample means: Student's t quantile without scipy."""

from __future__ import annotations

import math

LEVEL = 0.95
"""The confidence of every interval sharpscope reports."""

_Z975 = 1.959963984540054
"""The standard normal's 97.5 % quantile."""


def t_quantile(dof: int) -> float:
    """Student's t 97.5 % quantile for ``dof`` degrees of freedom (two-sided 95 %): exact for 1
    and 2, a four-term Cornish–Fisher expansion otherwise (within 0.12 % at 3, 1e-5 from 9 on)."""
    if dof < 1:
        raise ValueError(f"dof must be at least 1, got {dof}")
    if dof == 1:
        return math.tan(math.pi * (0.975 - 0.5))
    if dof == 2:
        return 0.95 / math.sqrt(2 * 0.975 * 0.025)
    z = _Z975
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(term / dof ** (i + 1) for i, term in enumerate(terms))
