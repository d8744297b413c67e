import math

import pytest

from dfkd_assets.core.promotion import decide_promotion


@pytest.mark.parametrize(
    "challenger,champion,tol,expected",
    [
        (0.5, None, 0.01, True),  # first model promotes
        (0.70, 0.70, 0.0, True),  # equal is not worse
        (0.695, 0.70, 0.01, True),  # within tolerance
        (0.68, 0.70, 0.01, False),  # worse beyond tolerance
        (0.5, 0.75, 0.25, True),  # exactly at the tolerance (binary-exact values) still promotes
        (0.0, 1.0, 0.0, False),  # the e2e negative control (test_operations): strictly worse, no tolerance
        (0.0, 1.0, 0.99, False),
        (0.90, 0.70, 0.0, True),  # better
        (math.nan, 0.70, 0.01, False),  # broken evaluation never promotes
        (math.nan, None, 0.01, False),
        (0.3, math.nan, 0.01, True),  # unusable champion score counts as absent
        (math.inf, 0.70, 0.01, False),  # inf is not a score either
        (0.3, -math.inf, 0.01, True),
    ],
)
def test_promotion_table(challenger, champion, tol, expected):
    d = decide_promotion(challenger, champion, tol)
    assert d.promote is expected and d.reason


def _record(challenger="3", compared="2", seen="2", student=0.6, champion=0.7):
    rec = {"challenger_version": challenger, "champion_version": compared, "champion_seen": seen, "student_mean_top1": student}
    return rec | ({"champion_mean_top1": champion} if compared else {})


def _shared(student, champion, full=0.9):
    """A champion trained for [dog, elephant, house] compared with a challenger that added giraffe: the
    full-class scores are the challenger's alone (no champion_mean_top1), the shared ones both."""
    return _record(student=full, compared="2") | {"shared_classes": ["dog", "elephant", "house"],
                                                   "student_shared_mean_top1": student, "champion_shared_mean_top1": champion}


@pytest.mark.parametrize(
    "record,current,expected",
    [
        (_record(compared=None, seen=None), None, (True, "no champion yet")),  # first model
        (_record(student=0.72), "2", (True, "challenger 0.7200 >= champion")),  # better than the champion it was compared with
        (_record(student=0.6), "2", (False, "worse than champion")),  # worse beyond the tolerance
        (_record(compared=None, seen="2"), "2", (True, "no champion yet")),  # champion seen, fewer than 2 classes in common: replaced
        # champion for another class list: compared on the classes both serve, whatever the full score
        (_shared(0.5, 0.7), "2", (False, "on the 3 classes both serve (dog, elephant, house): challenger 0.5000 is worse than champion 0.7000")),
        (_shared(0.7, 0.7), "2", (True, "on the 3 classes both serve (dog, elephant, house): challenger 0.7000 >= champion 0.7000")),
        (_shared(0.695, 0.7, full=0.1), "2", (True, "on the 3 classes both serve")),  # within tolerance; the low full score is not compared
        (_shared(0.7, 0.7), None, (True, "no champion yet")),  # the alias was removed since: nothing compared
        (_record(), "3", (False, "already the champion")),  # promoting twice is a no-op
    ],
)
def test_promotion_decision_table(record, current, expected):
    from dfkd_assets.core.promotion import promotion_decision

    d = promotion_decision(record, "student_mean_top1", 0.01, current)
    assert (d.promote, expected[1] in d.reason) == (expected[0], True), d


def test_promotion_decision_refuses_a_stale_evaluation_and_an_unknown_metric():
    from dfkd_assets.core.promotion import PromotionRefused, promotion_decision

    with pytest.raises(PromotionRefused, match="alias champion moved to v4"):
        promotion_decision(_record(), "student_mean_top1", 0.01, "4")  # the alias moved after the evaluation
    with pytest.raises(PromotionRefused, match="against no champion"):
        promotion_decision(_record(compared=None, seen=None), "student_mean_top1", 0.01, "2")  # a champion appeared since
    with pytest.raises(KeyError, match="promotion.metric 'student_top5'"):
        promotion_decision(_record(), "student_top5", 0.01, "2")


def test_the_check_and_the_asset_read_the_shared_scores():
    from dfkd_assets.core.promotion import Comparison, compared_scores

    assert compared_scores(_shared(0.5, 0.7), "student_mean_top1") == Comparison(0.5, 0.7, ("dog", "elephant", "house"))
    assert compared_scores(_record(student=0.6), "student_mean_top1") == Comparison(0.6, 0.7)
    assert compared_scores(_record(compared=None), "student_mean_top1") == Comparison(0.6, None)
    with pytest.raises(KeyError, match="no 'student_shared_mean_top1'"):
        compared_scores({k: v for k, v in _shared(0.5, 0.7).items() if k != "student_shared_mean_top1"}, "student_mean_top1")
