"""Streamed text never splits a UTF-8 character nor shows text that a stop string later cuts away."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from recserve.core.engine import EngineError, Generation, TextDelta
from recserve.engines.streaming import StreamText, collect


def _feed(pieces: list[bytes], stops: tuple[str, ...] = ()) -> tuple[list[str], StreamText]:
    text = StreamText(stops)
    shown = [text.feed(piece) for piece in pieces]
    return [*shown, text.finish()], text


def test_a_multi_byte_character_split_across_tokens_is_shown_whole() -> None:
    euro = "€".encode()  # three bytes
    shown, text = _feed([b"a", euro[:1], euro[1:2], euro[2:] + b"b"])
    assert shown == ["a", "", "", "€b", ""]
    assert text.text == "a€b"
    assert not text.stopped


def test_invalid_bytes_become_replacement_characters() -> None:
    shown, text = _feed([b"a\xff", b"\xe2\x82"])  # a stray byte, then a character cut off by the end
    assert "".join(shown) == text.text == "a\ufffd\ufffd"


def test_a_tail_that_may_start_a_stop_string_is_held_back_until_it_does_not() -> None:
    shown, text = _feed([b"Hello", b" EN", b"Dx"], stops=("END",))
    assert shown == ["Hel", "lo ", "", ""]  # "EN" could have started "END": never shown
    assert text.text == "Hello "
    assert text.stopped
    shown, text = _feed([b"Hello", b" EN", b"Ox"], stops=("END",))
    assert shown == ["Hel", "lo ", "EN", "Ox"]  # as vLLM: the last len(stop) - 1 characters wait
    assert "".join(shown) == text.text == "Hello ENOx"


def test_the_earliest_stop_string_cuts_even_inside_one_piece() -> None:
    shown, text = _feed([b"ab", b"c STOP d END"], stops=("END", "STOP", ""))
    assert "".join(shown) == text.text == "abc "
    assert text.feed(b"more") == ""  # nothing after a stop


async def test_collect_returns_the_final_generation_and_closes_the_stream() -> None:
    closed: list[bool] = []

    async def events(final: bool) -> AsyncGenerator[TextDelta | Generation, None]:
        try:
            yield TextDelta("a")
            if final:
                yield Generation(text="a", token_logprobs=())
                yield TextDelta("never read")
        finally:
            closed.append(True)

    assert (await collect(events(final=True))).text == "a"
    assert closed == [True]
    with pytest.raises(EngineError, match="without a final generation"):
        await collect(events(final=False))
