"""The every-chain study: chains in order, rivals tuned on train, figures that agree with `recserve eval`."""

from __future__ import annotations

import asyncio
import functools
import json
import math
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recserve.core.traces import TraceSet
from recserve.evaluation import chain_study
from recserve.evaluation.chain_study import (
    BUDGETS,
    SHORT_ORDERS,
    SHORT_STREAMS,
    TIE,
    BudgetRow,
    ChainStudy,
    Point,
    _equal_bytes_margin,
    _meets_goal_strictly,
    edge_needed,
    load_studies,
    main,
    margin_covariance,
    meets_goal,
    pass_probability,
    spendable,
    study_chain,
    summary_lines,
    verdict,
    write_report,
)
from recserve.evaluation.chains import every_chain, models_by_train_accuracy
from recserve.evaluation.plans import DEFAULT_BETAS, EvalRequest, evaluate
from recserve.evaluation.provenance import recorded
from recserve.evaluation.report import every_chain_section
from tests.conftest import write_trace_folder

CHAIN = ("small", "large")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trace_folder(tmp_path_factory.mktemp("traces"), n_per_family=40, splits=("train", "test"))


@pytest.fixture(scope="module")
def study(folder: Path) -> ChainStudy:
    return asyncio.run(study_chain(folder, CHAIN))


def test_models_go_cheapest_first_by_train_accuracy_and_chains_keep_that_order(folder: Path) -> None:
    traces = TraceSet.load(folder)
    train = [q for q in traces.queries if q.split == "train"]
    ordered = models_by_train_accuracy(traces)
    accuracy = [np.mean([traces.answers[q.key][m].correct for q in train]) for m in ordered]
    assert sorted(ordered) == sorted(traces.models)
    assert accuracy == sorted(accuracy)
    assert every_chain(("a", "b", "c")) == [("a", "b"), ("a", "c"), ("b", "c"), ("a", "b", "c")]
    assert every_chain(("a", "b", "c"), (3,)) == [("a", "b", "c")]


def test_ties_are_within_half_a_point() -> None:
    assert [verdict(0.806, 0.8), verdict(0.804, 0.8), verdict(0.796, 0.8), verdict(0.794, 0.8)] == [
        "win",
        "tie",
        "tie",
        "loss",
    ]


async def test_the_study_agrees_with_recserve_eval(folder: Path, study: ChainStudy) -> None:
    for row in study.budgets:
        figures = await evaluate(
            EvalRequest(traces=folder, chain=CHAIN, policy="budget", options={"byte_budget": row.budget})
        )
        assert (row.policy.accuracy, row.policy.bytes) == pytest.approx(
            (figures["overall"].accuracy, figures["overall"].bytes_vs_cloud_only)
        )
        casserve = await evaluate(
            EvalRequest(traces=folder, chain=CHAIN, policy="fixed", options={"byte_budget": row.budget})
        )
        assert row.casserve.accuracy == pytest.approx(casserve["overall"].accuracy)
        assert row.casserve.by_benchmark["quiz"][0] == pytest.approx(casserve["quiz"].accuracy)
        # `recserve eval --policy recserve --byte-budget B` chooses its β on train as the study does.
        recserve = await evaluate(
            EvalRequest(traces=folder, chain=CHAIN, policy="recserve", options={"byte_budget": row.budget})
        )
        assert (row.recserve.accuracy, row.recserve.bytes) == pytest.approx(
            (recserve["overall"].accuracy, recserve["overall"].bytes_vs_cloud_only)
        )
    cloud = await evaluate(EvalRequest(traces=folder, chain=CHAIN, policy="cloud-only"))
    assert study.cloud_only.accuracy == pytest.approx(cloud["overall"].accuracy)
    assert study.cloud_only.bytes == pytest.approx(1.0)


async def test_recserve_takes_the_largest_beta_whose_train_bytes_meet_the_budget(
    folder: Path, study: ChainStudy
) -> None:
    for row in study.budgets:
        at = await evaluate(EvalRequest(traces=folder, chain=CHAIN, split="train", options={"beta": row.recserve_beta}))
        assert at["overall"].bytes_vs_cloud_only <= row.budget + 1e-12
        if row.recserve_beta < 1.0:
            larger = DEFAULT_BETAS[DEFAULT_BETAS.index(row.recserve_beta) + 1]
            above = await evaluate(EvalRequest(traces=folder, chain=CHAIN, split="train", options={"beta": larger}))
            assert above["overall"].bytes_vs_cloud_only > row.budget


def test_the_summary_counts_every_chain_once_per_budget(study: ChainStudy) -> None:
    lines = summary_lines([study, study])
    rows = [line for line in lines if line.startswith("| 0.")][: len(BUDGETS)]
    assert [row.split(" | ")[0] for row in rows] == [f"| {b}" for b in BUDGETS]
    for row in rows:
        cells = row.split(" | ")
        assert sum(int(n) for n in cells[1].split(" / ")) == 2
        assert sum(int(n) for n in cells[2].split(" / ")) == 2


def test_short_streams_are_measured_in_every_order_and_counted_run_by_run(study: ChainStudy) -> None:
    for row in study.budgets:
        assert sorted(row.short_bytes) == list(SHORT_STREAMS)
        assert all(len(shares) == len(SHORT_ORDERS) for shares in row.short_bytes.values())

    def spending(offsets: tuple[float, ...]) -> ChainStudy:
        """The study with its short streams `offsets` off each budget, one per order."""
        rows = [
            replace(r, short_bytes={n: tuple(r.budget + o for o in offsets) for n in SHORT_STREAMS})
            for r in study.budgets
        ]
        return replace(study, budgets=tuple(rows))

    off = spending((-0.01, 0.03, -0.05))  # within, over and under the tolerance
    lines = summary_lines([off])
    start = next(i for i, line in enumerate(lines) if line.startswith("Short streams"))
    assert "in 3 orders" in lines[start]
    assert lines[start + 4] == "| 0.2 | 200 | 33% of 3 | 1 / 1 | -0.010 (-0.030 to +0.010) | 0 of 1 |"
    lines = summary_lines([off, spending((0.0, 0.012, -0.01))])
    cells = [line.split(" | ") for line in lines[start + 4 : start + 4 + 2 * len(BUDGETS)]]
    assert [(c[0], c[1], c[2], c[3], c[5]) for c in cells] == [
        (f"| {b}", str(n), "67% of 6", "1 / 1", "1 of 2 |") for b in BUDGETS for n in SHORT_STREAMS
    ]


def test_an_older_report_with_one_short_stream_order_reads_back(study: ChainStudy, tmp_path: Path) -> None:
    write_report([study], tmp_path)
    path = tmp_path / "results" / "chains.json"
    data = json.loads(path.read_text())
    for row in data[0]["budgets"]:
        row["short_bytes"] = {n: shares[0] for n, shares in row["short_bytes"].items()}
    path.write_text(json.dumps(data))
    (loaded,) = load_studies(path).values()
    assert [row.short_bytes for row in loaded.budgets] == [
        {n: shares[:1] for n, shares in row.short_bytes.items()} for row in study.budgets
    ]


def test_the_goal_compares_at_the_bytes_each_rival_spent() -> None:
    def at(accuracy: float, spent: float) -> Point:
        return Point(accuracy, spent, {})

    rival = {"casserve": at(0.80, 0.42), "recserve": at(0.78, 0.38)}
    row = BudgetRow(0.4, at(0.79, 0.40), **rival, recserve_beta=0.3, hindsight=at(0.8, 0.4), short_bytes={})
    assert not _meets_goal_strictly(row)  # less accurate than CasServe, and more bytes than RecServe
    # Given CasServe's 0.42 it is as accurate; given RecServe's 0.38, more accurate.
    matched = replace(row, at_rival_bytes={"casserve": at(0.797, 0.419), "recserve": at(0.785, 0.381)})
    assert meets_goal(matched)
    assert _equal_bytes_margin(matched) == pytest.approx(-0.003)
    overspent = replace(row, at_rival_bytes={"casserve": at(0.80, 0.43), "recserve": at(0.785, 0.381)})
    assert not meets_goal(overspent)


def test_a_rival_that_spent_nothing_on_a_benchmark_gives_the_policy_nothing_to_spend_there() -> None:
    """A floor would make the policy spend more than the rival on that benchmark and fail the comparison on bytes."""
    assert spendable(0.0) == 0.0
    assert (spendable(0.004), spendable(0.37), spendable(1.02)) == (0.004, 0.37, 1.0)


def _normal_below(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def test_the_chance_of_passing_the_accuracy_test_is_that_of_a_normal_margin_beyond_the_tie() -> None:
    sd = 0.003
    assert pass_probability(0.0, sd**2) == pytest.approx(_normal_below(TIE / sd))
    assert pass_probability(-TIE, sd**2) == pytest.approx(0.5)
    assert pass_probability(0.002, sd**2) > pass_probability(0.0, sd**2) > pass_probability(-0.002, sd**2)
    # Measured without noise, the test passes or fails for sure.
    assert pass_probability(-0.004, 0.0) == 1.0
    assert pass_probability(-0.006, 0.0) == 0.0


def test_the_edge_for_a_share_of_chains_solves_the_expected_share() -> None:
    sd = 0.003
    z = 1.28155  # the standard normal quantile of 0.9
    assert edge_needed([sd**2, sd**2]) == pytest.approx(z * sd - TIE, abs=1e-6)
    assert edge_needed([(2 * sd) ** 2]) > edge_needed([sd**2])  # more noise needs a larger true edge
    mixed = [sd**2, (2 * sd) ** 2]
    edge = edge_needed(mixed, share=0.8)
    assert sum(pass_probability(edge, v) for v in mixed) / 2 == pytest.approx(0.8, abs=1e-6)


def test_the_margins_covariance_is_that_of_the_paired_differences_over_the_queries_judged_in_both() -> None:
    ours = np.array([1.0, 1.0, 0.0, 1.0, math.nan, 0.0])
    theirs = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    other = np.array([0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    covariance = margin_covariance([(ours, theirs), (ours, other)])
    judged = ~np.isnan(ours)
    first, second = (ours - theirs)[judged], (ours - other)[judged]
    assert covariance[0][0] == pytest.approx(np.var(first, ddof=1) / 5)
    assert covariance[1][1] == pytest.approx(np.var(second, ddof=1) / 5)
    assert covariance[0][1] == pytest.approx(covariance[1][0])
    assert covariance[0][1] == pytest.approx(np.cov(first, second)[0, 1] / 5)


def test_the_study_records_each_budgets_margin_covariance_and_reports_the_noise(study: ChainStudy) -> None:
    for row in study.budgets:
        assert row.margin_covariance is not None
        (var_a, cov), (cov_again, var_b) = row.margin_covariance
        assert var_a >= 0
        assert var_b >= 0
        assert cov == pytest.approx(cov_again)
        assert cov**2 <= var_a * var_b + 1e-15
    lines = summary_lines([study])
    start = next(i for i, line in enumerate(lines) if line.startswith("How much of the goal"))
    rows = [line.split(" | ")[:2] for line in lines[start + 4 : start + 4 + 2 * len(BUDGETS)]]
    assert rows == [[f"| {b}", rival] for b in BUDGETS for rival in ("CasServe", "RecServe")]


def test_the_results_report_summarises_the_every_chain_study_when_it_has_run(study: ChainStudy, tmp_path: Path) -> None:
    assert every_chain_section(tmp_path) == ""
    studies = [study, replace(study, chain=("large", "small"))]
    write_report(studies, tmp_path)
    section = every_chain_section(tmp_path)
    assert section.startswith("## Every chain")
    assert "\n".join(summary_lines(studies)) in section


async def test_a_study_reusing_an_earlier_ones_rivals_and_quality_rows_comes_out_the_same(
    folder: Path, study: ChainStudy
) -> None:
    assert await study_chain(folder, CHAIN, study, reuse_rivals=True) == study


async def test_a_study_reusing_an_earlier_ones_budget_rows_studies_the_quality_policy_again(
    folder: Path, study: ChainStudy
) -> None:
    # The earlier study's budget rows are taken as they are (one, marked), the quality policy's rows studied afresh.
    marked = replace(study.budgets[0], recserve_beta=0.123)
    reused = await study_chain(folder, CHAIN, replace(study, budgets=(marked,), gaps=()), reuse_budgets=True)
    assert reused == replace(study, budgets=(marked,))


def test_reusing_both_an_earlier_reports_budget_and_quality_rows_is_refused(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = str(tmp_path / "chains.json")
    with pytest.raises(SystemExit):
        main(["--traces", str(folder), "--reuse-quality", report, "--reuse-budgets", report])
    assert "--reuse-quality and --reuse-budgets each study again what the other reuses" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_chains_a_stopped_one_finished_and_records_its_probe(
    folder: Path, study: ChainStudy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def probed(figures_of: functools.partial[Awaitable[object]]) -> str:
        return f"probe of {figures_of.func.__name__}"  # the real probe is tested in test_provenance.py

    monkeypatch.setattr(chain_study, "probe", probed)
    marked = replace(study, cloud_only=Point(0.123, 1.0, study.cloud_only.by_benchmark))
    write_report([marked], tmp_path)  # as a stopped run leaves its partial file: the chains done, in order
    (tmp_path / "results" / "chains.json").rename(tmp_path / "results" / "chains.partial.json")
    assert main(["--traces", str(folder), "--out", str(tmp_path), "--sizes", "2", "--limit", "2", "--resume"]) == 0
    studies = load_studies(tmp_path / "results" / "chains.json")
    assert list(studies) == every_chain(models_by_train_accuracy(TraceSet.load(folder)), (2,))[:2]
    assert [s.cloud_only.accuracy == 0.123 for s in studies.values()] == [s.chain == CHAIN for s in studies.values()]
    assert not (tmp_path / "results" / "chains.partial.json").exists()
    assert recorded(tmp_path / "results") == {"chains": "probe of study_figures"}
