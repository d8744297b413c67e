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
