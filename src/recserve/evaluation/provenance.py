"""Whether the committed reports are still what the code computes.

docs/results.md, docs/chains.md and docs/results/spending_bound.json come from the full trace set, which takes an
hour and more to replay and which a fresh clone does not have. So each report generator also replays a probe, a
small trace set cut from the bundled demo trace, through the same code, and records a fingerprint of the figures
beside its report (docs/results/provenance.json). A test replays the probe again: when a change to a policy, a
rival's tuning or the replay moves any figure of the probe, the fingerprint no longer matches, and the test says
which report to regenerate. A change that moves no figure (a refactor) keeps the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, write_subset

PROVENANCE_FILE = "provenance.json"  # in the folder of the reports' figures (docs/results)
# The probe: the first PROBE_QUERIES test queries of each benchmark of the bundled trace, even qids as the train split
# and odd ones as the test split, so that what is tuned on train is tuned; 150 test queries a benchmark give the
# every-chain study's short streams of 500 requests. About 35 s to study both chains, 45 s to sweep them, 5 s to bound.
PROBE_QUERIES = 300
# The bundled trace's chain and its first and last models alone: a chain of three tiers (a split between links) and
# one of two.
PROBE_CHAINS = (BUNDLED_CHAIN, (BUNDLED_CHAIN[0], BUNDLED_CHAIN[-1]))
# Figures are rounded to this many significant digits before they are fingerprinted, so that float noise in the last
# digits (summation order) does not count as a change.
DIGITS = 9


def write_probe_traces(destination: Path) -> Path:
    def resplit(benchmark: str, split: str, qid: int) -> str | None:
        if split != "test" or qid >= PROBE_QUERIES:
            return None
        return "train" if qid % 2 == 0 else "test"

    write_subset(BUNDLED_TRACE, destination, BUNDLED_CHAIN, resplit=resplit)
    return destination


def fingerprint(figures: Any) -> str:
    """A short digest of JSON-like figures, floats rounded to DIGITS significant digits."""

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.{DIGITS}g}")
        if isinstance(value, dict):
            return {str(key): rounded(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [rounded(item) for item in value]
        return value

    text = json.dumps(rounded(figures), sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def probe(figures_of: Callable[[Path, tuple[str, ...]], Awaitable[Any]]) -> str:
    """The fingerprint of what `figures_of(trace folder, chain)` computes on the probe, for each of its chains."""
    with tempfile.TemporaryDirectory(prefix="recserve-probe-") as folder:
        traces = write_probe_traces(Path(folder))
        return fingerprint([await figures_of(traces, chain) for chain in PROBE_CHAINS])


def recorded(results: Path) -> dict[str, str]:
    """The fingerprints recorded in `results` (docs/results), by report; empty when none was."""
    path = results / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record(results: Path, report: str, value: str) -> None:
    """Record `report`'s fingerprint in `results` (docs/results), keeping the other reports'."""
    results.mkdir(parents=True, exist_ok=True)
    (results / PROVENANCE_FILE).write_text(
        json.dumps({**recorded(results), report: value}, indent=1, sort_keys=True) + "\n"
    )
