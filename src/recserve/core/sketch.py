"""Progressive inference (PICE): a short sketch of numbered points, each point expanded on its own, the answer
assembled from the expansions. Pure text in, requests and text out; the tiers and the protocol wire them up.

The flow: `sketch_request` asks a model (the cloud) for an outline; `parse_sketch` turns its text into points;
`expand_request` asks a model (the edge) to write one point, for every point at once; `assemble` (or
`assemble_point`, point by point in order, for streaming) joins them into the answer.

The sketch's shape, which `sketch_grammar` enforces and `parse_sketch` checks:

    1. few words here
    2. few words here

- Between `min_points` (SKETCH_MIN_POINTS, 2: one point is no plan and leaves nothing to expand in parallel; fewer
  only when max_points is 1) and `max_points` points (at most SKETCH_MAX_POINTS), numbered 1, 2, 3, ... with ". "
  and one point per line; nothing before the first point; at most one newline after the last.
- A point is 1 to `max_words` words separated by single spaces. The prompt asks for SKETCH_MIN_WORDS or more; the
  grammar does not insist, since forcing words on a model that has said what it means only makes it pad.
- A word starts with a letter or digit (ASCII, or Latin letters with diacritics) and continues with those or
  ' / & + . , : ; ( ) -, up to SKETCH_MAX_WORD_CHARS characters: enough for real terms ("HTTP/2", "cache-aside",
  "e.g.", "Python's"), and no markdown, which the assembled answer adds itself.

`parse_sketch` reads stricter-than-grammar where it matters and forgives the rest, because a server may ignore the
grammar (an OpenAI-compatible one other than vLLM's, a replayed answer): the points are the lines numbered "N." or
"N)" (optionally in markdown bold or after a heading mark), and every other line (an introduction, a closing
remark, a bullet or a nested list under a point) is ignored. The numbering must run 1, 2, 3, ... without a gap or a
repeat, no point may be empty, and a sketch of more than `max_points` points is refused, not cut: the grammar never
admits one, so it means the constraint was not applied. Shortening a good sketch (PICE does so under load) is a
separate, explicit step: `shorten_sketch`.

The prompts are chat messages: every engine renders them with its model's chat template (the generated tiny models
carry one), and instruction-tuned models follow instructions given that way. The instructions go in a system turn,
the question in the user turn. An expansion's prompt keeps everything its siblings share (the instructions, the
question, the whole sketch) ahead of the one line that names its point, so a server with prefix caching (vLLM)
computes the shared part once for all of a sketch's points.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from recserve.core.engine import CHAT_ROLES, ChatMessage, GenerationRequest

SKETCH_MAX_POINTS = 10
SKETCH_MIN_POINTS = 2
# Words per point: the prompt asks for SKETCH_MIN_WORDS to max_words; the grammar allows 1 to max_words.
SKETCH_MIN_WORDS = 3
SKETCH_MAX_WORDS = 5
SKETCH_MAX_WORD_CHARS = 20
# The sketch's max_tokens: per point, its number, ". " and the newline, and this many tokens per word. Real
# tokenizers take 1-2 tokens for a common word; 3 leaves room for rarer ones without letting a point run on.
SKETCH_TOKENS_PER_POINT = 4
SKETCH_TOKENS_PER_WORD = 3

# The characters of a word: the first, and the rest. A "-" last in a class is literal in GBNF (llama.cpp knows no
# "\-" escape); "\u00C0-\u024F" are the Latin letters with diacritics.
_WORD_FIRST = r"[A-Za-z0-9\u00C0-\u024F]"
_WORD_REST = r"[A-Za-z0-9\u00C0-\u024F'/&+.,:;()-]"

# A numbered line: indentation, an optional heading mark or bold, the number, "." or ")", then the point (or nothing).
_NUMBERED = re.compile(
    r"^(?P<indent>[ \t]*)(?:#{1,6}[ \t]*)?(?:\*\*|__)?(?P<number>\d{1,3})[.)](?:\*\*|__)?(?:\s+(?P<text>.*))?$"
)
# What a point keeps of its line: not surrounding markdown emphasis, nor trailing sentence punctuation.
_EMPHASIS = "*_"
_TRAILING = ".,;:"


class SketchParseError(ValueError):
    """A sketch's text is not a numbered list of points; the message says what is wrong with it."""


def _check_points(max_points: int, min_points: int = 1) -> None:
    if not 1 <= max_points <= SKETCH_MAX_POINTS:
        raise ValueError(f"a sketch has 1 to {SKETCH_MAX_POINTS} points, not max_points={max_points}")
    if min_points < 1:
        raise ValueError(f"a sketch has at least one point, not min_points={min_points}")


def _check_words(max_words: int) -> None:
    if max_words < 1:
        raise ValueError(f"a sketch's points have at least one word, not max_words={max_words}")


def sketch_grammar(max_points: int, max_words: int, *, min_points: int = SKETCH_MIN_POINTS) -> str:
    """The GBNF grammar of a sketch of min(min_points, max_points) to max_points points of 1 to max_words words.

    For 2 to 4 points of up to 5 words:

        root ::= "1. " point "\\n2. " point ("\\n3. " point ("\\n4. " point)?)? "\\n"?
        point ::= word (" " word){0,4}
        word ::= [A-Za-z0-9...] [A-Za-z0-9...'/&+.,:;()-]{0,19}

    The points are spelled out one by one, so the numbering cannot go wrong; the optional ones nest, so a point
    comes only after the one before it.
    """
    _check_points(max_points, min_points)
    _check_words(max_words)
    least = min(min_points, max_points)
    required = " ".join(['"1. " point', *(f'"\\n{n}. " point' for n in range(2, least + 1))])
    optional = ""
    for n in range(max_points, least, -1):
        optional = f' ("\\n{n}. " point{optional})?'
    words = "word" if max_words == 1 else f'word (" " word){{0,{max_words - 1}}}'
    return (
        f'root ::= {required}{optional} "\\n"?\n'
        f"point ::= {words}\n"
        f"word ::= {_WORD_FIRST} {_WORD_REST}{{0,{SKETCH_MAX_WORD_CHARS - 1}}}\n"
    )


def sketch_max_tokens(max_points: int, max_words: int) -> int:
    """The max_tokens of a sketch request: room for max_points points of max_words words."""
    return max_points * (SKETCH_TOKENS_PER_POINT + max_words * SKETCH_TOKENS_PER_WORD)


def _count(lo: int, hi: int, noun: str) -> str:
    plural = f"{noun}s" if hi != 1 else noun
    return f"{lo} to {hi} {plural}" if lo < hi else f"exactly {hi} {plural}"


def _conversation(question: str | Sequence[ChatMessage], instructions: str) -> list[ChatMessage]:
    """The chat that asks a question under our instructions: a system turn with them (and the caller's own system
    turns after them), then the caller's other turns, the last of which is the user's question."""
    if isinstance(question, str):
        if not question.strip():
            raise ValueError("the question is empty")
        return [ChatMessage("system", instructions), ChatMessage("user", question)]
    turns = list(question)
    if not turns or turns[-1].role != "user" or not turns[-1].content.strip():
        raise ValueError("a chat to sketch an answer for must end with the user's question (a non-empty user turn)")
    for turn in turns:
        if turn.role not in CHAT_ROLES:
            raise ValueError(f"unknown chat role {turn.role!r}: use one of {', '.join(CHAT_ROLES)}")
    system = "\n\n".join([instructions, *(turn.content for turn in turns if turn.role == "system")])
    return [ChatMessage("system", system), *(turn for turn in turns if turn.role != "system")]


def sketch_request(
    question: str | Sequence[ChatMessage],
    max_points: int,
    max_words: int = SKETCH_MAX_WORDS,
    temperature: float = 0.0,
    *,
    min_points: int = SKETCH_MIN_POINTS,
) -> GenerationRequest:
    """The request for a sketch of the answer to `question` (a question, or a chat ending in the user's question):
    our instructions, the grammar of sketch_grammar, and room for max_points points of max_words words."""
    _check_points(max_points, min_points)
    _check_words(max_words)
    least = min(min_points, max_points)
    instructions = (
        "Plan the answer to the user's question before anyone writes it. Reply with the plan alone: a numbered list "
        f"of {_count(least, max_points, 'point')}, one per line, in the order the answer should take them. Each "
        f"point names one idea in a short phrase of {_count(min(SKETCH_MIN_WORDS, max_words), max_words, 'word')}, "
        "not a sentence. Write nothing before or after the list."
    )
    return GenerationRequest(
        messages=tuple(_conversation(question, instructions)),
        max_tokens=sketch_max_tokens(max_points, max_words),
        temperature=temperature,
        grammar=sketch_grammar(max_points, max_words, min_points=min_points),
    )


def _clean_point(text: str) -> str:
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip(_EMPHASIS).rstrip(_TRAILING)
    return text


def parse_sketch(text: str, max_points: int, *, truncated: bool = False) -> tuple[str, ...]:
    """The points of a sketch's text, in order; SketchParseError when it is not a sketch of 1 to max_points points.

    `truncated`: the text was cut by max_tokens (finish_reason "length"), so a last line without its newline may be
    cut mid-point: it is dropped.
    """
    _check_points(max_points)
    if truncated and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    points: list[str] = []
    indent: int | None = None
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match is None:
            continue  # an introduction, a closing remark, a bullet under a point
        if indent is None:
            indent = len(match["indent"])
        elif len(match["indent"]) > indent:
            continue  # a nested list under a point
        number = int(match["number"])
        expected = len(points) + 1
        if number != expected:
            if not points:
                raise SketchParseError(f"the sketch's numbering starts at {number}, not 1")
            if number < expected:
                raise SketchParseError(f"the sketch has two points numbered {number}")
            raise SketchParseError(f"the sketch skips point {expected}: point {expected - 1} is followed by {number}")
        if number > max_points:
            raise SketchParseError(f"the sketch has more than the {max_points} points asked for")
        point = _clean_point(match["text"] or "")
        if not point:
            raise SketchParseError(f"point {number} of the sketch is empty")
        points.append(point)
    if not points:
        raise SketchParseError("the sketch has no numbered points (lines like '1. first idea')")
    return tuple(points)


def shorten_sketch(points: Sequence[str], max_points: int) -> tuple[str, ...]:
    """The first max_points points of a sketch: a shorter answer when there is no time for the whole one."""
    if max_points < 1:
        raise ValueError(f"a sketch keeps at least one point, not max_points={max_points}")
    return tuple(points[:max_points])


def _outline(points: Sequence[str]) -> str:
    return "\n".join(f"{n}. {point}" for n, point in enumerate(points, start=1))


EXPAND_INSTRUCTIONS = (
    "You write the answer to the user's question one point at a time, following a plan of numbered points. "
    "When asked for a point, reply with that point's text alone: one or two sentences that develop it, in the "
    "context of the question and the rest of the plan. Do not repeat the point as a heading, do not number it, "
    "and do not write the other points."
)


def expand_request(
    question: str | Sequence[ChatMessage],
    points: Sequence[str],
    index: int,
    max_tokens: int,
    temperature: float = 0.0,
) -> GenerationRequest:
    """The request that writes point `index` (0-based) of the sketch `points` for `question` (a question, or a chat
    ending in the user's question), in one or two sentences. It stops at a blank line or where the next point's
    number would start, should the model run on."""
    if not points:
        raise ValueError("a sketch to expand has at least one point")
    if not 0 <= index < len(points):
        raise ValueError(f"point index {index} is outside the sketch of {len(points)} points (0-based)")
    if max_tokens < 1:
        raise ValueError(f"an expansion needs max_tokens of 1 or more, not {max_tokens}")
    turns = _conversation(question, EXPAND_INSTRUCTIONS)
    number = index + 1
    asked = (
        f"Question: {turns[-1].content}\n\nPlan:\n{_outline(points)}\n\n"
        f"Write point {number} ({points[index]}) in one or two sentences."
    )
    return GenerationRequest(
        messages=(*turns[:-1], ChatMessage("user", asked)),
        max_tokens=max_tokens,
        temperature=temperature,
        stop=("\n\n", f"\n{number + 1}."),
    )


def _clean_expansion(number: int, point: str, expansion: str) -> str:
    """An expansion on one line, without an echo of its number or its point that the model may have started with."""
    text = " ".join(expansion.split())
    text = re.sub(rf"^(?:\*\*|__)?{number}[.)](?:\*\*|__)?\s*", "", text)
    heading = re.escape(point)
    bold = rf"(?:\*\*|__){heading}[.:]?(?:\*\*|__)[.:]?"  # "**Point**" or "**Point:**" or "**Point**:"
    plain = rf"{heading}\s*[:\-\u2013\u2014]"  # "Point:" or "Point -"
    text = re.sub(rf"^(?:{bold}|{plain})\s*", "", text, flags=re.IGNORECASE)
    return text


def assemble_point(index: int, point: str, expansion: str) -> str:
    """Point `index` (0-based) of the answer: "N. **point** expansion", after a newline unless it is the first."""
    if index < 0:
        raise ValueError(f"point index {index} is negative (0-based)")
    number = index + 1
    body = _clean_expansion(number, point, expansion)
    line = f"{number}. **{point}**" + (f" {body}" if body else "")
    return line if index == 0 else f"\n{line}"


def assemble(points: Sequence[str], expansions: Sequence[str]) -> str:
    """The answer: every point with its expansion, in order, one per line (a markdown numbered list)."""
    if len(points) != len(expansions):
        raise ValueError(f"{len(points)} points but {len(expansions)} expansions")
    return "".join(
        assemble_point(i, point, text) for i, (point, text) in enumerate(zip(points, expansions, strict=True))
    )
