import math

import pytest

from aepo_core.evaluation import accuracy_and_pass_at_k, ks_up_to, metric_safe, pass_at_k


def test_pass_at_k_hand_values():
    # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # 1 - C(5,3)/C(8,3) = 1 - 10/56
    assert pass_at_k(8, 3, 3) == pytest.approx(1 - 10 / 56)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)  # pass@1 is the plain success rate


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(1000, 500) ~ 2.7e299: the ratio C(999, 500)/C(1000, 500) = 500/1000 must still come out exact
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5)
    assert math.isfinite(pass_at_k(5000, 7, 2500))


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_accuracy_and_pass_at_k_over_prompts():
    # two prompts with 1 and 4 correct out of 4
    m = accuracy_and_pass_at_k([1, 4], 4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["pass_at_1"] == pytest.approx((0.25 + 1) / 2)
    assert m["pass_at_2"] == pytest.approx((0.5 + 1) / 2)
    assert m["pass_at_4"] == pytest.approx(1.0)
    assert ks_up_to(6) == [1, 2, 4, 6]


def test_metric_safe_names():
    assert metric_safe("synthetic-3-terms") == "synthetic-3-terms"
    assert metric_safe("MATH/level 5 (algebra)") == "MATH_level 5 _algebra_"
