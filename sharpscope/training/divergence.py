"""When a fine-tuning run has diverged, beyond a loss that is not finite: a documented rule on
the recorded losses (docs/finetune.md, "Stopping, signals and divergence")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sharpscope.training.trainer import Diverged

FACTOR = 100.0
"""How far past max(the starting probe loss, 1) a recorded loss may rise."""


@dataclass
class DivergenceRule:
    """A run has diverged when a recorded row's probe loss, or its mean training loss since the
    previous row, exceeds ``factor`` × max(|the first row's probe loss|, 1). The first row is
    the run's start (step 0, recorded before any step), also when the run is resumed."""

    start: float | None = None
    """The first row's probe loss; None until that row is seen."""
    factor: float = FACTOR

    def check(self, row: dict[str, Any]) -> None:
        """Raise :class:`Diverged` when ``row`` breaks the rule (the first row sets the start)."""
        if self.start is None:
            self.start = row["probe_loss"]
            return
        limit = self.factor * max(abs(self.start), 1.0)
        for key, what in (("probe_loss", "probe loss"), ("loss", "training loss")):
            value = row.get(key)
            if value is not None and value > limit:
                raise Diverged(
                    row["step"],
                    f"the {what} rose to {value:.4g}, more than {self.factor:g} × max(the "
                    f"starting probe loss {self.start:.4g}, 1)",
                )
