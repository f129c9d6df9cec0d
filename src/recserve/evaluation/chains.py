"""Which chains to evaluate: the reports' default ones, and every chain a trace set allows, cheapest model first."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from recserve.core.traces import TraceSet

DEFAULT_CHAINS = (
    ("llama3.2-1b", "llama3.1-8b", "llama3.1-70b"),
    ("llama3.2-3b", "llama3.1-70b", "llama3.1-405b"),
    ("gpt-4o-mini", "qwen2.5-72b-instruct", "gpt-4o"),
)


def models_by_train_accuracy(trace_set: TraceSet) -> tuple[str, ...]:
    """The trace set's models, least accurate on the train split first."""
    train = [q for q in trace_set.queries if q.split == "train"]
    accuracy = {m: float(np.mean([trace_set.answers[q.key][m].correct for q in train])) for m in trace_set.models}
    return tuple(sorted(trace_set.models, key=lambda m: accuracy[m]))


def every_chain(models: Sequence[str], sizes: Sequence[int] = (2, 3)) -> list[tuple[str, ...]]:
    """Every chain of `sizes` models, in the order of `models` (cheapest first)."""
    return [chain for size in sizes for chain in itertools.combinations(models, size)]
