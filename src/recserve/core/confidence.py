"""Confidence scorers: turn an engine's log-probs into the one number a tier compares with its threshold."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from recserve.core.engine import Generation

T = TypeVar("T")


@dataclass(frozen=True)
class Score:
    """A confidence in [0, 1] and the diagnostics reported beside it."""

    value: float
    mean_logprob: float = 0.0
    min_logprob: float = 0.0
    first_token_margin: float = 0.0
    chosen_option: str | None = None


def first_token_margin(generation: Generation) -> float:
    """Log-prob gap between the two most likely first tokens (0 when fewer than two are known)."""
    top = generation.first_top_logprobs
    if len(top) < 2:
        return 0.0
    return top[0][1] - top[1][1]


def choice_probability(options: Sequence[str], option_logprobs: Sequence[float], chosen: str | None) -> Score:
    """Probability of the chosen option, renormalised over the options (a max-softmax score).

    The chosen option is the engine's own when it knows it (a replayed answer), else the most likely one.
    """
    if not options or len(options) != len(option_logprobs):
        raise ValueError("choice scoring needs one log-prob per option")
    peak = max(option_logprobs)
    if peak == -math.inf:
        # No option had any probability mass: nothing to prefer, so the confidence is 0.
        return Score(value=0.0, chosen_option=chosen if chosen in options else options[0])
    # Subtracting the peak keeps exp() in range for very negative log-probs.
    weights = [math.exp(lp - peak) for lp in option_logprobs]
    total = sum(weights)
    index = options.index(chosen) if chosen in options else max(range(len(options)), key=weights.__getitem__)
    return Score(value=weights[index] / total, chosen_option=options[index])


def score_choice(generation: Generation, options: Sequence[str]) -> Score:
    """The renormalised probability of the chosen option (RecServe's maximum softmax score)."""
    score = choice_probability(options, generation.option_logprobs, generation.chosen_option)
    return Score(
        value=score.value,
        chosen_option=score.chosen_option,
        first_token_margin=first_token_margin(generation),
    )


def score_choice_margin(generation: Generation, options: Sequence[str]) -> Score:
    """Chosen option's renormalised probability minus the best other option's: low when two options tie."""
    chosen = score_choice(generation, options)
    peak = max(generation.option_logprobs)
    weights = [math.exp(lp - peak) if peak > -math.inf else 0.0 for lp in generation.option_logprobs]
    total = sum(weights) or 1.0
    index = options.index(chosen.chosen_option) if chosen.chosen_option in options else 0
    runner_up = max((w for i, w in enumerate(weights) if i != index), default=0.0) / total
    return Score(max(0.0, chosen.value - runner_up), chosen_option=chosen.chosen_option,
                 first_token_margin=chosen.first_token_margin)  # fmt: skip


def score_perplexity(generation: Generation) -> Score:
    """Normalised-perplexity confidence exp(mean token log-prob), i.e. 1 / perplexity, in [0, 1]."""
    logprobs = generation.token_logprobs
    if not logprobs:
        return Score(value=0.0, first_token_margin=first_token_margin(generation))
    mean = math.fsum(logprobs) / len(logprobs)
    return Score(
        value=math.exp(mean),
        mean_logprob=mean,
        min_logprob=min(logprobs),
        first_token_margin=first_token_margin(generation),
    )


def score_min_token(generation: Generation) -> Score:
    """Probability of the least likely generated token: a stricter score for long generations."""
    base = score_perplexity(generation)
    value = math.exp(base.min_logprob) if generation.token_logprobs else 0.0
    return Score(value, base.mean_logprob, base.min_logprob, base.first_token_margin)


def score_margin(generation: Generation) -> Score:
    """1 - exp(-margin): 0 when the two best first tokens tie, towards 1 as the best one dominates."""
    base = score_perplexity(generation)
    return Score(-math.expm1(-base.first_token_margin), base.mean_logprob, base.min_logprob, base.first_token_margin)


GenerateScorer = Callable[[Generation], Score]
ChoiceScorer = Callable[[Generation, Sequence[str]], Score]

CHOICE_SCORERS: dict[str, ChoiceScorer] = {
    "option_probability": score_choice,
    "option_margin": score_choice_margin,
}

GENERATE_SCORERS: dict[str, GenerateScorer] = {
    "perplexity": score_perplexity,
    "min_token": score_min_token,
    "margin": score_margin,
}


def generate_scorer(name: str) -> GenerateScorer:
    return _pick(GENERATE_SCORERS, name)


def choice_scorer(name: str) -> ChoiceScorer:
    return _pick(CHOICE_SCORERS, name)


def _pick(scorers: dict[str, T], name: str) -> T:
    try:
        return scorers[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; choose one of: {', '.join(scorers)}") from None
