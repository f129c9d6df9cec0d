"""The committed reports (docs/results.md, docs/chains.md, docs/results/spending_bound.json) are what the code
computes today, judged by the probe each report generator fingerprints beside them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE, TraceSet
from recserve.evaluation.chain_study import study_figures
from recserve.evaluation.provenance import (
    PROBE_QUERIES,
    fingerprint,
    probe,
    record,
    recorded,
    write_probe_traces,
)
from recserve.evaluation.report import chain_figures_json
from recserve.evaluation.spending_bound import bound_figures

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
REGENERATE = {
    "chains": "make chains TRACES=DIR (docs/chains.md, results/chains.json), then make results, which summarises it",
    "results": "make results TRACES=DIR (docs/results.md and its plots)",
    "spending-bound": "make spending-bound TRACES=DIR (results/spending_bound.json, quoted in docs/evaluation.md)",
}


@pytest.mark.parametrize(
    ("report", "figures_of"),
    [("chains", study_figures), ("results", chain_figures_json), ("spending-bound", bound_figures)],
)
def test_the_committed_reports_are_what_the_code_computes(
    report: str, figures_of: Callable[[Path, tuple[str, ...]], Awaitable[Any]]
) -> None:
    committed = recorded(RESULTS).get(report)
    assert committed is not None, f"docs/results/provenance.json records no {report!r}: run {REGENERATE[report]}"
    assert asyncio.run(probe(figures_of)) == committed, (
        f"the code no longer computes the figures the committed {report!r} report was made with (the probe on the "
        f"bundled trace moved): run {REGENERATE[report]} on the full trace set, and update the docs that quote it"
    )


def test_the_fingerprint_ignores_float_noise_but_not_a_moved_figure() -> None:
    figures = {"accuracy": 0.3, "by_benchmark": {"mmlu": (0.5, 1)}}
    assert fingerprint({"accuracy": 0.1 + 0.2, "by_benchmark": {"mmlu": [0.5, 1]}}) == fingerprint(figures)
    assert fingerprint({"accuracy": 0.3 + 1e-7, "by_benchmark": {"mmlu": (0.5, 1)}}) != fingerprint(figures)
    assert fingerprint({"accuracy": 0.3, "by_benchmark": {"mmlu": (0.5, 2)}}) != fingerprint(figures)


def test_the_probe_is_the_bundled_trace_split_in_two_with_its_recorded_answers(tmp_path: Path) -> None:
    probe_set = TraceSet.load(write_probe_traces(tmp_path))
    bundled = TraceSet.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    assert probe_set.models == BUNDLED_CHAIN
    benchmarks = {q.benchmark for q in bundled.queries if q.split == "test"}
    for benchmark in benchmarks:
        for split, parity in (("train", 0), ("test", 1)):
            qids = sorted(q.qid for q in probe_set.queries if q.benchmark == benchmark and q.split == split)
            assert qids == list(range(parity, PROBE_QUERIES, 2))
    bundled_queries = set(bundled.queries)
    for query in probe_set.queries:
        assert replace(query, split="test") in bundled_queries
        assert probe_set.answers[query.key] == bundled.answers[(query.benchmark, "test", query.qid)]


def test_each_report_records_its_fingerprint_and_keeps_the_others(tmp_path: Path) -> None:
    assert recorded(tmp_path) == {}
    record(tmp_path, "chains", "a")
    record(tmp_path, "results", "b")
    record(tmp_path, "chains", "c")
    assert recorded(tmp_path) == {"chains": "c", "results": "b"}
