"""Judges an answer against a reference, for the accuracy metrics."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
# Chain-of-thought answers (GSM8K style) end with "#### <final answer>".
_FINAL_MARKER = "####"


def normalise(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation or articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def final_answer(text: str) -> str:
    return text.rsplit(_FINAL_MARKER, 1)[1] if _FINAL_MARKER in text else text


def is_correct(reference: str, *, answer: str, chosen_option: str | None) -> bool:
    """CHOICE: the chosen option is the reference. GENERATE: the normalised final answer equals or
    contains the normalised reference as whole words (so "Paris" matches "It is Paris.")."""
    if chosen_option is not None:
        return chosen_option.strip().lower() == reference.strip().lower()
    expected = normalise(reference)
    got = normalise(final_answer(answer))
    return bool(expected) and (got == expected or f" {expected} " in f" {got} ")
