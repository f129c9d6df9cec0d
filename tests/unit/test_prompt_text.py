"""The one prompt text every engine sends for a request."""

from __future__ import annotations

from recserve.core.engine import GenerationRequest


def test_a_system_prompt_comes_first_and_a_blank_line_parts_it_from_the_prompt() -> None:
    request = GenerationRequest(prompt="Which is right?", system_prompt="Answer with A, B, C or D.")
    assert request.full_prompt == "Answer with A, B, C or D.\n\nWhich is right?"


def test_without_a_system_prompt_the_prompt_goes_alone() -> None:
    assert GenerationRequest(prompt="Which is right?").full_prompt == "Which is right?"
