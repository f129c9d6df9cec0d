"""Judging answers against references."""

from __future__ import annotations

from recserve.core.judge import is_correct


def test_choice_compares_the_chosen_option() -> None:
    assert is_correct("B", answer="whatever", chosen_option="b ")
    assert not is_correct("B", answer="B", chosen_option="C")


def test_generate_matches_normalised_whole_words_and_final_answers() -> None:
    assert is_correct("Paris", answer="It is Paris.", chosen_option=None)
    assert is_correct("The Beatles", answer="beatles", chosen_option=None)
    assert not is_correct("Paris", answer="Parisian", chosen_option=None)
    assert is_correct("20", answer="15 x 4 = 60; 60 / 3 = 20\n#### 20", chosen_option=None)
    assert not is_correct("20", answer="we need 20 dolls... #### 15", chosen_option=None)
    assert not is_correct("", answer="anything", chosen_option=None)
