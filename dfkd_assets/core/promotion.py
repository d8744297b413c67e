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


class PromotionRefused(RuntimeError):
    """The registry changed since the evaluation the decision would rest on."""


def champion_metric(metric: str) -> str:
    """The champion's score in metrics.json for a `promotion.metric` of the student ('student_mean_top1'
    -> 'champion_mean_top1')."""
    return metric.replace("student_", "champion_", 1)


def promotion_decision(metrics: dict, metric: str, tolerance: float, current: str | None) -> Decision:
    """The champion/challenger rule on an evaluation record (metrics.json) and the champion alias now.

    `current` is the version the alias points at now (None: no champion). The evaluation compared
    the challenger with the champion it saw; if the alias has moved to a third version since,
    the comparison is stale and PromotionRefused is raised. A champion seen but not compared
    (trained for other classes) counts as absent, so the challenger replaces it.
    """
    if metric not in metrics:
        raise KeyError(f"promotion.metric {metric!r} is not in the evaluation record (have {sorted(k for k in metrics if k.endswith('top1'))})")
    challenger = metrics["challenger_version"]
    seen = metrics.get("champion_seen", metrics["champion_version"])
    if current is not None and current != seen and current != challenger:
        compared = f"v{metrics['champion_version']}" if metrics["champion_version"] else "no champion"
        raise PromotionRefused(
            f"alias champion moved to v{current} after evaluation_report compared v{challenger} against {compared} "
            "(another promotion or a rollback since): re-materialize evaluation_report"
        )
    if current == challenger:
        return Decision(False, f"v{challenger} is already the champion")
    return decide_promotion(metrics[metric], compared_champion_score(metrics, metric) if current is not None else None, tolerance)


def compared_champion_score(metrics: dict, metric: str) -> float | None:
    """The champion's score on the challenger's evaluation images, None when none was compared."""
    return metrics.get(champion_metric(metric)) if metrics.get("champion_version") else None
