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
        (0.90, 0.70, 0.0, True),  # better
        (math.nan, 0.70, 0.01, False),  # broken evaluation never promotes
        (math.nan, None, 0.01, False),
        (0.3, math.nan, 0.01, True),  # unusable champion score counts as absent
    ],
)
def test_promotion_table(challenger, champion, tol, expected):
    d = decide_promotion(challenger, champion, tol)
    assert d.promote is expected and d.reason
