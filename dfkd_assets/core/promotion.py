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


def shared_metric(metric: str) -> str:
    """The same score on the classes challenger and champion both serve ('student_mean_top1' ->
    'student_shared_mean_top1'), recorded when the champion was trained for another class list."""
    return metric.replace("student_", "student_shared_", 1)


@dataclass(frozen=True)
class Comparison:
    """What the evaluation compared: the challenger's and the champion's scores (None: no champion
    compared) and, when their class lists differ, the classes both serve that the scores are on."""

    challenger: float
    champion: float | None
    shared_classes: tuple[str, ...] = ()

    def decide(self, tolerance: float) -> Decision:
        d = decide_promotion(self.challenger, self.champion, tolerance)
        if not self.shared_classes:
            return d
        return Decision(d.promote, f"on the {len(self.shared_classes)} classes both serve ({', '.join(self.shared_classes)}): {d.reason}")


def compared_scores(metrics: dict, metric: str) -> Comparison:
    """The scores an evaluation record (metrics.json) compared for `metric`: on the shared classes
    when the champion served another class list, on every class otherwise."""
    if metric not in metrics:
        raise KeyError(f"promotion.metric {metric!r} is not in the evaluation record (have {sorted(k for k in metrics if k.endswith('top1'))})")
    if not metrics.get("champion_version"):
        return Comparison(metrics[metric], None)
    shared = metrics.get("shared_classes")
    if not shared:
        return Comparison(metrics[metric], metrics.get(champion_metric(metric)))
    key = shared_metric(metric)
    if key not in metrics:
        raise KeyError(f"the champion was compared on the classes both serve, but the record has no {key!r} for promotion.metric {metric!r}")
    return Comparison(metrics[key], metrics[champion_metric(key)], tuple(shared))


def promotion_decision(metrics: dict, metric: str, tolerance: float, current: str | None) -> Decision:
    """The champion/challenger rule on an evaluation record (metrics.json) and the champion alias now.

    `current` is the version the alias points at now (None: no champion). The evaluation compared
    the challenger with the champion it saw; if the alias has moved to a third version since,
    the comparison is stale and PromotionRefused is raised. A champion trained for another class
    list was compared on the classes both serve, and the decision says so; one seen but not
    compared (fewer than 2 classes in common, or an old format) counts as absent, so the
    challenger replaces it.
    """
    comparison = compared_scores(metrics, metric)
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
    if current is None:  # the alias was removed since the evaluation: nothing to compare with
        return decide_promotion(metrics[metric], None, tolerance)
    return comparison.decide(tolerance)
