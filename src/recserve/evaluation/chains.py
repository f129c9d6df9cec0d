"""The chains the reports evaluate by default: cheapest model first."""

from __future__ import annotations

DEFAULT_CHAINS = (
    ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b"),
    ("llama3.2-3b", "llama3.1-70b", "llama3.1-405b"),
    ("gpt-4o-mini", "qwen2.5-72b-instruct", "gpt-4o"),
)
