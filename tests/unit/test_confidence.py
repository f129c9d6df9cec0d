"""Confidence math: renormalised option probability and normalised-perplexity scores."""

from __future__ import annotations

import math

import pytest

from recserve.core.confidence import choice_probability, choice_scorer, generate_scorer, score_choice, score_perplexity
from recserve.core.engine import Generation

OPTIONS = ("A", "B", "C", "D")


def test_choice_renormalises_over_options_and_picks_the_most_likely() -> None:
    # Options hold 0.4 + 0.2 + 0.1 + 0.1 of the mass; the rest went to other tokens.
    score = choice_probability(OPTIONS, [math.log(p) for p in (0.2, 0.4, 0.1, 0.1)], None)
    assert score.chosen_option == "B"
    assert score.value == pytest.approx(0.4 / 0.8)


def test_choice_keeps_the_engines_own_choice() -> None:
    score = choice_probability(OPTIONS, [math.log(p) for p in (0.2, 0.4, 0.1, 0.1)], "C")
    assert score.chosen_option == "C"
    assert score.value == pytest.approx(0.1 / 0.8)


def test_choice_survives_extreme_logprobs() -> None:
    score = choice_probability(("A", "B"), [-1000.0, -1001.0], None)
    assert score.value == pytest.approx(1 / (1 + math.exp(-1)))
    assert choice_probability(("A", "B"), [-math.inf, -math.inf], None).value == 0.0
    assert choice_probability(("A", "B"), [0.0, -math.inf], None).value == 1.0


def test_choice_needs_one_logprob_per_option() -> None:
    with pytest.raises(ValueError, match="one log-prob per option"):
        choice_probability(OPTIONS, [0.0], None)


def test_perplexity_is_exp_mean_logprob_with_diagnostics() -> None:
    generation = Generation(text="x", token_logprobs=(-0.1, -0.5, -2.0), first_top_logprobs=(("a", -0.1), ("b", -2.4)))
    score = score_perplexity(generation)
    assert score.value == pytest.approx(math.exp(-2.6 / 3))
    assert score.mean_logprob == pytest.approx(-2.6 / 3)
    assert score.min_logprob == -2.0
    assert score.first_token_margin == pytest.approx(2.3)


def test_perplexity_of_nothing_is_zero_confidence() -> None:
    assert score_perplexity(Generation(text="", token_logprobs=())).value == 0.0


def test_pluggable_scorers_by_name() -> None:
    generation = Generation(text="x", token_logprobs=(-0.1, -3.0), first_top_logprobs=(("a", -0.1), ("b", -0.1)))
    assert generate_scorer("min_token")(generation).value == pytest.approx(math.exp(-3.0))
    assert generate_scorer("margin")(generation).value == 0.0
    with pytest.raises(ValueError, match="unknown scorer"):
        generate_scorer("nope")


def test_score_choice_reports_the_first_token_margin() -> None:
    generation = Generation(
        text="A",
        token_logprobs=(-0.2,),
        first_top_logprobs=(("A", -0.2), ("B", -1.2)),
        option_logprobs=(-0.2, -1.2, -5.0, -6.0),
    )
    score = score_choice(generation, OPTIONS)
    assert score.chosen_option == "A"
    assert score.first_token_margin == pytest.approx(1.0)


def test_choice_margin_scorer_is_low_when_options_tie() -> None:
    tie = Generation(text="A", token_logprobs=(), option_logprobs=(math.log(0.4), math.log(0.4), -9.0, -9.0))
    clear = Generation(text="A", token_logprobs=(), option_logprobs=(math.log(0.9), math.log(0.05), -9.0, -9.0))
    margin = choice_scorer("option_margin")
    assert margin(tie, OPTIONS).value == pytest.approx(0.0, abs=1e-3)
    assert margin(clear, OPTIONS).value > 0.8
    assert choice_scorer("option_probability")(tie, OPTIONS).value == pytest.approx(0.5, abs=1e-3)
