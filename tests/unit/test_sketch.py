"""Progressive inference's building blocks: the sketch grammar, its parser, the sketch and expansion prompts, and the
assembled answer."""

from __future__ import annotations

import random
import re

import pytest

from recserve.core.engine import ChatMessage
from recserve.core.sketch import (
    SKETCH_MAX_POINTS,
    SKETCH_MAX_WORD_CHARS,
    SKETCH_MAX_WORDS,
    SKETCH_MIN_POINTS,
    SketchParseError,
    assemble,
    assemble_point,
    expand_request,
    parse_sketch,
    shorten_sketch,
    sketch_grammar,
    sketch_max_tokens,
    sketch_request,
)
from tests.conftest import grammar_accepts

QUESTION = "How do I bake bread at home?"
POINTS = ("Mix flour and water", "Knead the dough", "Let it rise", "Bake it hot")
FIRST = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789\u00e9\u00c0\u024f"
REST = FIRST + "'/&+.,:;()-"


def random_sketch(rng: random.Random, min_points: int, max_points: int, max_words: int) -> tuple[str, list[str]]:
    """A text of the shape sketch_grammar describes, with the words drawn at random, and its words per point."""
    lines, words_per_point = [], []
    for n in range(1, rng.randint(min(min_points, max_points), max_points) + 1):
        words = [
            rng.choice(FIRST) + "".join(rng.choices(REST, k=rng.randint(0, SKETCH_MAX_WORD_CHARS - 1)))
            for _ in range(rng.randint(1, max_words))
        ]
        words_per_point.append(" ".join(words))
        lines.append(f"{n}. {' '.join(words)}")
    return "\n".join(lines) + rng.choice(("", "\n")), words_per_point


# --- parse_sketch


def test_a_plain_sketch_parses_to_its_points() -> None:
    assert parse_sketch("1. Mix flour and water\n2. Knead the dough\n3. Let it rise\n4. Bake it hot", 10) == POINTS


def test_prose_before_and_after_the_list_and_blank_lines_are_ignored() -> None:
    text = "Sure! Here is the plan:\n\n1. Mix flour and water\n\n2. Knead the dough\n3. Let it rise\n4. Bake it hot\n\n"
    assert parse_sketch(text + "Hope this helps.", 10) == POINTS


def test_markdown_and_trailing_punctuation_are_stripped() -> None:
    text = "**1.** **Mix flour and water.**\n2) Knead the dough;\n### 3. *Let it rise*\n4. __Bake it hot__:  "
    assert parse_sketch(text, 4) == POINTS
    # A question stays a question.
    assert parse_sketch("1. Why knead at all?\n2. Rest", 2) == ("Why knead at all?", "Rest")


def test_nested_items_under_a_point_are_not_points() -> None:
    text = "1. Mix flour and water\n   1. use warm water\n   - a pinch of salt\n2. Knead the dough"
    assert parse_sketch(text, 10) == POINTS[:2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no numbered points"),
        ("Just bake it.\nThen eat it.", "no numbered points"),
        ("1.5 million loaves are baked", "no numbered points"),
        ("2. Knead\n3. Bake", "starts at 2, not 1"),
        ("1. Mix\n2. Knead\n2. Rise", "two points numbered 2"),
        ("1. Mix\n2. Knead\n1. Rise", "two points numbered 1"),
        ("1. Mix\n2. Knead\n4. Bake", "skips point 3: point 2 is followed by 4"),
        ("1. Mix\n2.\n3. Bake", "point 2 of the sketch is empty"),
        ("1. Mix\n2. **.**\n3. Bake", "point 2 of the sketch is empty"),
    ],
)
def test_malformed_sketches_are_refused_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(SketchParseError, match=re.escape(message)):
        parse_sketch(text, 10)


def test_a_sketch_of_more_points_than_asked_is_refused_not_cut() -> None:
    text = "\n".join(f"{n}. point {n}" for n in range(1, 6))
    assert len(parse_sketch(text, 5)) == 5
    with pytest.raises(SketchParseError, match="more than the 4 points"):
        parse_sketch(text, 4)
    assert shorten_sketch(parse_sketch(text, 5), 3) == ("point 1", "point 2", "point 3")
    assert shorten_sketch(POINTS[:2], 3) == POINTS[:2]
    with pytest.raises(ValueError, match="at least one point"):
        shorten_sketch(POINTS, 0)


def test_a_truncated_sketch_drops_its_unfinished_last_line() -> None:
    assert parse_sketch("1. Mix flour\n2. Knead the dough\n3. ", 5, truncated=True) == ("Mix flour", "Knead the dough")
    assert parse_sketch("1. Mix flour\n2. Knead th", 5, truncated=True) == ("Mix flour",)
    # Cut right after a newline: every point is whole.
    assert parse_sketch("1. Mix flour\n2. Knead\n", 5, truncated=True) == ("Mix flour", "Knead")
    with pytest.raises(SketchParseError, match="empty"):
        parse_sketch("1. Mix flour\n2. Knead the dough\n3. ", 5)
    with pytest.raises(SketchParseError, match="no numbered points"):
        parse_sketch("1. Mix fl", 5, truncated=True)


def test_sketch_parse_error_is_a_value_error() -> None:
    assert issubclass(SketchParseError, ValueError)
    with pytest.raises(ValueError, match="max_points"):
        parse_sketch("1. a", 0)


# --- sketch_grammar


def test_the_grammar_spells_out_each_number_and_nests_the_optional_points() -> None:
    grammar = sketch_grammar(4, 5)
    root, point, word = grammar.splitlines()
    assert root == 'root ::= "1. " point "\\n2. " point ("\\n3. " point ("\\n4. " point)?)? "\\n"?'
    assert point == 'point ::= word (" " word){0,4}'
    assert word.startswith("word ::= [A-Za-z0-9")
    assert word.endswith(f"{{0,{SKETCH_MAX_WORD_CHARS - 1}}}")
    assert sketch_grammar(1, 1).splitlines()[:2] == ['root ::= "1. " point "\\n"?', "point ::= word"]
    assert sketch_grammar(3, 2, min_points=3).splitlines()[0] == (
        'root ::= "1. " point "\\n2. " point "\\n3. " point "\\n"?'
    )
    assert sketch_grammar(3, 2, min_points=1).splitlines()[0] == (
        'root ::= "1. " point ("\\n2. " point ("\\n3. " point)?)? "\\n"?'
    )


@pytest.mark.parametrize(("max_points", "max_words"), [(0, 5), (SKETCH_MAX_POINTS + 1, 5), (3, 0)])
def test_the_grammar_refuses_impossible_sizes(max_points: int, max_words: int) -> None:
    with pytest.raises(ValueError, match=r"max_points|max_words"):
        sketch_grammar(max_points, max_words)


@pytest.mark.parametrize(("max_points", "max_words"), [(1, 1), (2, 3), (3, 5), (5, 5), (SKETCH_MAX_POINTS, 8)])
def test_every_text_of_the_grammars_shape_is_admitted_and_parses(max_points: int, max_words: int) -> None:
    grammar = sketch_grammar(max_points, max_words)
    rng = random.Random(max_points * 100 + max_words)
    for _ in range(25):
        text, points = random_sketch(rng, SKETCH_MIN_POINTS, max_points, max_words)
        assert grammar_accepts(grammar, text), text
        parsed = parse_sketch(text, max_points)
        # Exactly the points, less the trailing punctuation the parser strips.
        assert parsed == tuple(point.rstrip(".,;:") for point in points), text
        assert min(SKETCH_MIN_POINTS, max_points) <= len(parsed) <= max_points


@pytest.mark.parametrize(
    "text",
    [
        "1. Mix flour",  # fewer than two points
        "Plan:\n1. Mix flour\n2. Knead",  # prose first
        "1. Mix flour\n3. Knead",  # a skipped number
        "1. Mix flour\n1. Knead",  # a repeated number
        "1. Mix flour\n2. Knead\n3. Rise\n4. Bake",  # more than three points
        "1. Mix flour and warm water now\n2. Knead",  # more than five words
        "1. Mix  flour\n2. Knead",  # two spaces
        "1. **Mix flour**\n2. Knead",  # markdown
        "1. Mix flour\n2. Knead\n\n",  # more than one newline at the end
        "1. Mix flour\n2. Knead\nDone.",  # prose after
        "1. Mix flour\n2. " + "k" * (SKETCH_MAX_WORD_CHARS + 1),  # a word too long
        "1. Mix flour\n2. ",  # an empty point
    ],
)
def test_the_grammar_rejects_what_is_not_a_sketch(text: str) -> None:
    assert not grammar_accepts(sketch_grammar(3, 5), text)


# --- sketch_request


def test_the_sketch_request_asks_for_the_grammars_shape_in_a_chat() -> None:
    request = sketch_request(QUESTION, 6, 4, 0.3)
    system, user = request.messages
    assert (system.role, user) == ("system", ChatMessage("user", QUESTION))
    assert "2 to 6 points" in system.content
    assert "3 to 4 words" in system.content
    assert request.grammar == sketch_grammar(6, 4)
    assert request.max_tokens == sketch_max_tokens(6, 4) > 6 * 4
    assert request.temperature == 0.3
    assert not request.prompt
    assert not request.stop
    default = sketch_request(QUESTION, 3)
    assert default.grammar == sketch_grammar(3, SKETCH_MAX_WORDS)
    assert default.temperature == 0.0
    assert "exactly 1 point," in sketch_request(QUESTION, 1).messages[0].content


def test_a_chat_keeps_its_turns_and_its_system_prompt_after_the_instructions() -> None:
    chat = (
        ChatMessage("system", "Answer in French."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Bonjour"),
        ChatMessage("user", QUESTION),
    )
    request = sketch_request(chat, 4)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[0].content.endswith("\n\nAnswer in French.")
    assert request.messages[1:] == chat[1:]


@pytest.mark.parametrize(
    ("question", "message"),
    [
        ("  ", "empty"),
        ((), "end with the user's question"),
        ((ChatMessage("user", "q"), ChatMessage("assistant", "a")), "end with the user's question"),
        ((ChatMessage("robot", "x"), ChatMessage("user", "q")), "unknown chat role"),
    ],
)
def test_a_question_that_is_not_one_is_refused(question: str | tuple[ChatMessage, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sketch_request(question, 4)
    with pytest.raises(ValueError, match=message):
        expand_request(question, POINTS, 0, 32)


# --- expand_request


def test_the_expansion_request_carries_the_question_the_whole_sketch_and_its_point_last() -> None:
    request = expand_request(QUESTION, POINTS, 1, 48, 0.5)
    system, user = request.messages
    assert system.role == "system"
    assert user.role == "user"
    assert user.content.startswith(f"Question: {QUESTION}\n\nPlan:\n1. Mix flour and water\n2. Knead the dough\n")
    assert user.content.endswith("4. Bake it hot\n\nWrite point 2 (Knead the dough) in one or two sentences.")
    assert request.stop == ("\n\n", "\n3.")
    assert (request.max_tokens, request.temperature, request.grammar) == (48, 0.5, "")
    # Siblings differ only in their last line, so a prefix cache serves the rest once.
    other = expand_request(QUESTION, POINTS, 3, 48)
    assert other.messages[0] == system
    shared = user.content.rsplit("\n", 1)[0]
    assert other.messages[1].content.rsplit("\n", 1)[0] == shared
    assert other.stop == ("\n\n", "\n5.")


def test_a_chats_last_question_is_expanded_in_its_context() -> None:
    chat = (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"), ChatMessage("user", QUESTION))
    request = expand_request(chat, POINTS, 0, 32)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "user"]
    assert request.messages[1:3] == chat[:2]
    assert request.messages[-1].content.startswith(f"Question: {QUESTION}\n\nPlan:\n")


@pytest.mark.parametrize(
    ("points", "index", "max_tokens"), [((), 0, 8), (POINTS, 4, 8), (POINTS, -1, 8), (POINTS, 0, 0)]
)
def test_an_expansion_outside_the_sketch_is_refused(points: tuple[str, ...], index: int, max_tokens: int) -> None:
    with pytest.raises(ValueError, match=r"point|max_tokens"):
        expand_request(QUESTION, points, index, max_tokens)


# --- assemble


def test_the_answer_is_a_numbered_list_of_bold_points_and_their_expansions() -> None:
    expansions = ("Combine 500 g of flour with 350 ml of water.", "Work it for ten minutes.", "", "Bake at 230 C.")
    answer = assemble(POINTS, expansions)
    assert answer == (
        "1. **Mix flour and water** Combine 500 g of flour with 350 ml of water.\n"
        "2. **Knead the dough** Work it for ten minutes.\n"
        "3. **Let it rise**\n"
        "4. **Bake it hot** Bake at 230 C."
    )
    streamed = [assemble_point(i, p, e) for i, (p, e) in enumerate(zip(POINTS, expansions, strict=True))]
    assert "".join(streamed) == answer
    assert not streamed[0].startswith("\n")
    assert all(part.startswith("\n") for part in streamed[1:])


@pytest.mark.parametrize(
    "expansion",
    [
        "Work it for ten minutes.",
        "  Work it\nfor ten   minutes.\n",
        "2. Work it for ten minutes.",
        "**2.** Work it for ten minutes.",
        "**Knead the dough** Work it for ten minutes.",
        "**Knead the dough:** Work it for ten minutes.",
        "**knead the dough**: Work it for ten minutes.",
        "Knead the dough: Work it for ten minutes.",
        "2. Knead the dough - Work it for ten minutes.",
    ],
)
def test_an_expansion_is_one_line_without_an_echo_of_its_number_or_point(expansion: str) -> None:
    assert assemble_point(1, "Knead the dough", expansion) == "\n2. **Knead the dough** Work it for ten minutes."


def test_an_expansion_that_merely_starts_with_the_points_words_keeps_them() -> None:
    assert assemble_point(0, "Knead", "Knead it for ten minutes.") == "1. **Knead** Knead it for ten minutes."


def test_assemble_needs_one_expansion_per_point() -> None:
    with pytest.raises(ValueError, match="4 points but 3 expansions"):
        assemble(POINTS, ("a", "b", "c"))
    with pytest.raises(ValueError, match="negative"):
        assemble_point(-1, "a", "b")
    assert assemble((), ()) == ""
