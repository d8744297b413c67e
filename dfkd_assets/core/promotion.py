"""The champion/challenger promotion rule: a pure function, so it is tested as a table."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide_promotion(challenger: float, champion: float | None, tolerance: float) -> Decision:
    """First model promotes; later ones only if not worse than the champion by more than `tolerance`.

    A non-finite challenger score never promotes; a non-finite champion score is treated as absent.
    """
    if not math.isfinite(challenger):
        return Decision(False, f"challenger score {challenger} is not finite")
    if champion is None or not math.isfinite(champion):
        return Decision(True, "no champion yet")
    if challenger >= champion - tolerance:
        return Decision(True, f"challenger {challenger:.4f} >= champion {champion:.4f} - tolerance {tolerance}")
    return Decision(False, f"challenger {challenger:.4f} is worse than champion {champion:.4f} by more than {tolerance}")
