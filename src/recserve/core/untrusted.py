"""Text from the wire in messages and logs: short, escaped excerpts, so input can neither flood nor forge them."""

from __future__ import annotations

EXCERPT_CHARS = 40


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted and escaped as a Python literal (no line breaks or control characters), cut to `limit`
    characters; a cut excerpt says how long the whole was."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def escape_controls(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\x1b, \\u2028), the rest as is."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
