"""Offload policies decide exactly as specified."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from recserve.core.offload import Verdict
from recserve.policies import make_policy
from recserve.policies.simple import (
    FixedThresholdPolicy,
    ForwardAllPolicy,
    LocalOnlyPolicy,
    RecServePolicy,
    parse_family_thresholds,
)


def test_recserve_forwards_iff_below_the_windowed_quantile_including_the_current_value() -> None:
    policy = RecServePolicy(beta=0.3, window=5)
    rng = random.Random(1)
    seen: list[float] = []
    for _ in range(40):
        confidence = rng.random()
        seen.append(confidence)
        verdict = policy.decide("mmlu", confidence, is_last=False)
        expected = float(np.percentile(seen[-5:], 30.0))
        assert verdict.threshold == expected
        assert verdict.forward == (len(seen) >= 2 and confidence < expected)


def test_recserve_never_forwards_with_a_single_value_or_from_the_last_tier() -> None:
    policy = RecServePolicy(beta=0.9, window=10)
    assert not policy.decide("f", 0.1, is_last=False).forward
    assert policy.decide("f", 0.05, is_last=False).forward
    assert not policy.decide("f", 0.01, is_last=True).forward


def test_recserve_keeps_one_window_per_family() -> None:
    policy = RecServePolicy(beta=0.5, window=10)
    for value in (0.9, 0.95, 0.99):
        policy.decide("easy", value, is_last=False)
    policy.decide("hard", 0.1, is_last=False)
    assert policy.threshold("easy") == 0.95
    assert policy.threshold("hard") == 0.1
    assert policy.threshold("unseen") is None


def test_fixed_forward_all_and_local() -> None:
    fixed = FixedThresholdPolicy(0.6)
    assert fixed.decide("f", 0.59, is_last=False).forward
    assert not fixed.decide("f", 0.6, is_last=False).forward
    assert not fixed.decide("f", 0.1, is_last=True).forward
    assert ForwardAllPolicy().decide("f", 1.0, is_last=False).forward
    assert not ForwardAllPolicy().decide("f", 0.0, is_last=True).forward
    assert not LocalOnlyPolicy().decide("f", 0.0, is_last=False).forward


def test_make_policy_by_name() -> None:
    assert isinstance(make_policy("recserve", beta=0.2, window=3), RecServePolicy)
    assert make_policy("fixed", threshold=0.4).threshold("x") == 0.4
    assert make_policy("forward-all").threshold("x") == math.inf
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("oracle")
    with pytest.raises(ValueError, match="beta"):
        make_policy("recserve", beta=2.0)


def test_fixed_thresholds_per_family() -> None:
    policy = make_policy("fixed", threshold=0.5, family_thresholds=parse_family_thresholds("mmlu=0.9, gsm8k=0.1"))
    assert policy.decide("mmlu", 0.8, is_last=False).forward
    assert not policy.decide("gsm8k", 0.2, is_last=False).forward
    assert policy.decide("other", 0.4, is_last=False) == Verdict(True, 0.5)
    with pytest.raises(ValueError, match="must look like"):
        parse_family_thresholds("mmlu:0.3")
