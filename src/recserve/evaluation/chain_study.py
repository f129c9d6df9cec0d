"""Every chain a trace set allows: the target policies against rivals tuned on train, chain by chain.

For each ordered chain of 2 and 3 models (cheapest first by train accuracy), at byte budgets of 0.2-0.5: the budget
policy against CasServe tuned on train, RecServe with β chosen on train to meet the budget, and the best fixed
thresholds in hindsight (thresholds shared by every benchmark, chosen on the test split itself: a bound, not a
rival); its bytes per benchmark against the target, on the whole test stream, and overall on its first 200 and 500
requests in five shuffled orders. The quality policy's loss against cloud-only at gaps of 0.02 and 0.05, drifting
and shuffled, and on 500 shuffled requests. Nothing here is tuned on the test split.

    python -m recserve.evaluation.chain_study --traces TRACE_FOLDER --out docs [--jobs 2]   (make chains)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recserve.client.tally import summaries
from recserve.client.trace_client import Outcome
from recserve.core.traces import TraceQuery, TraceSet
from recserve.evaluation.chains import every_chain, models_by_train_accuracy
from recserve.evaluation.plans import beta_for_budget, chain_plan, recserve_train_bytes
from recserve.evaluation.provenance import probe, record
from recserve.evaluation.replay import (
    DepthTable,
    TraceReplay,
    cloud_only_by_benchmark,
    fixed_threshold_grid,
    tune_fixed_thresholds,
)
from recserve.evaluation.splits import calibrate_family_byte_priors, tune_family_fill_caps
from recserve.policies import BudgetConfig, QualityConfig, RecServeConfig
from recserve.policies.budget import LINK_SPLITS, FamilyPriors

BUDGETS = (0.2, 0.3, 0.4, 0.5)
GAPS = (0.02, 0.05)
SHORT_STREAMS = (200, 500)
SHUFFLE_SEED = 1
# The orders the short streams are drawn in: one order's first 200 requests are a sample of a few dozen per benchmark,
# and whether they land within the tolerance depends on which requests come first as much as on the policy.
SHORT_ORDERS = (SHUFFLE_SEED, 2, 3, 4, 5)
TIE = 0.005  # accuracy differences under half a point are ties
BYTES_TOLERANCE = 0.02  # the budget policy's goal: within ±0.02 of its target, per benchmark
RIVALS = ("casserve", "recserve")
_RIVAL_NAMES = {"casserve": "CasServe", "recserve": "RecServe"}


@dataclass(frozen=True)
class Point:
    """Accuracy and bytes (a share of cloud-only bytes) overall and per benchmark."""

    accuracy: float
    bytes: float
    by_benchmark: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class BudgetRow:
    budget: float
    policy: Point  # the budget policy on the test stream, benchmarks one after another
    casserve: Point
    recserve: Point
    recserve_beta: float
    hindsight: Point
    # Bytes of the first n shuffled requests, a share of their cloud-only bytes, one per order of SHORT_ORDERS (older
    # reports have the first order's only).
    short_bytes: dict[int, tuple[float, ...]]
    fill_caps: tuple[tuple[str, float], ...] = ()  # the budget policy's, per benchmark, chosen on train
    # The budget policy given the bytes each rival spent on the test stream (its fill caps chosen on train for
    # them): the comparison at equal bytes, since a rival tuned on train lands above or below the budget on test.
    # The run at the budget stands in where it is already as accurate as the rival at no more bytes.
    at_rival_bytes: dict[str, Point] | None = None
    # The budget policy given the bytes each rival spent on each benchmark (`family_budgets`): the comparison at equal
    # bytes per benchmark, where a rival's spending does not move between benchmarks either.
    at_rival_family_bytes: dict[str, Point] | None = None
    # The sampling covariance of the margins at equal bytes (the policy at each rival's bytes minus that rival, in
    # RIVALS order), paired over the test queries: how far the margins would move on another test set of this size.
    margin_covariance: tuple[tuple[float, ...], ...] | None = None


@dataclass(frozen=True)
class GapRow:
    gap: float
    drifting_loss: float  # cloud-only accuracy minus the quality policy's, benchmarks one after another
    shuffled_loss: float
    short_loss: float  # on the first 500 shuffled requests
    # What the quality policy spent on each stream, a share of cloud-only bytes (absent from older reports).
    drifting_bytes: float | None = None
    shuffled_bytes: float | None = None
    short_bytes: float | None = None


@dataclass(frozen=True)
class ChainStudy:
    chain: tuple[str, ...]
    cloud_only: Point
    budgets: tuple[BudgetRow, ...]
    gaps: tuple[GapRow, ...]


def point(outcomes: Sequence[Outcome], cloud_only: dict[str, int]) -> Point:
    figures = summaries(outcomes, len(outcomes[0].link_bytes) + 1, cloud_only)
    overall = figures.pop("overall")
    by_benchmark = {name: (s.accuracy, s.bytes_vs_cloud_only) for name, s in figures.items()}
    return Point(overall.accuracy, overall.bytes_vs_cloud_only, by_benchmark)


def table_point(table: DepthTable, depths: np.ndarray, cloud_only: dict[str, int]) -> Point:
    return point(table.outcomes(depths.astype(np.int64)), cloud_only)


def rightness(outcomes: Sequence[Outcome]) -> npt.NDArray[np.float64]:
    """Per query: 1 for a right answer, 0 for a wrong one, NaN where the query has no reference to judge by."""
    return np.array([math.nan if o.correct is None else float(o.correct) for o in outcomes])


def margin_covariance(
    pairs: Sequence[tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]],
) -> tuple[tuple[float, ...], ...]:
    """The sampling covariance of the accuracy margins (ours minus theirs) of `pairs`, each two runs over the same
    queries in the same order: the per-query differences' covariance over the number of queries judged in both."""
    judged = np.logical_and.reduce([~np.isnan(ours) & ~np.isnan(theirs) for ours, theirs in pairs])
    differences = np.vstack([(ours - theirs)[judged] for ours, theirs in pairs])
    covariance = np.atleast_2d(np.cov(differences)) / max(1, int(judged.sum()))
    return tuple(tuple(float(v) for v in row) for row in covariance)


def budget_config(
    train_table: DepthTable,
    priors: FamilyPriors,
    budget: float,
    family_budgets: dict[str, float] | None = None,
    split: str = "fill",
    served: Collection[str] | None = None,
) -> BudgetConfig:
    """The budget policy for `budget` (and `family_budgets`), with its fill caps per benchmark chosen on the train split
    for traffic of the `served` benchmarks and its byte `priors` measured there (as `recserve eval` does; under the
    price split, the caps set the rates until the tiers have calibrated)."""
    caps = tune_family_fill_caps(train_table, budget, family_budgets=family_budgets, served=served)
    return BudgetConfig(
        links=train_table.confidence.shape[1] - 1,
        byte_budget=budget,
        family_budgets=tuple((family_budgets or {}).items()),
        family_fill_caps=caps,
        family_byte_priors=priors,
        link_split=split,
    )


def spendable(share: float) -> float:
    """A rival's bytes as a budget the policy takes, within [0, 1]. A benchmark on which the rival forwarded nothing
    gets a budget of 0, not a floor: given more, the policy would spend more than the rival and fail the comparison
    on bytes."""
    return min(1.0, max(0.0, share))


async def study_chain(
    traces: Path,
    chain: Sequence[str],
    earlier: ChainStudy | None = None,
    split: str = "fill",
    reuse_rivals: bool = False,
    reuse_budgets: bool = False,
) -> ChainStudy:
    """The study of one chain, the budget policy with `split`; the quality policy's rows are taken from `earlier` when
    it has them, a study of the same chain on the same traces, since they depend on neither the budget policy nor the
    rivals, and with `reuse_rivals` so is RecServe's β per budget (the rivals do not depend on the budget policy).
    With `reuse_budgets`, the other way round: the budget rows (the budget policy's and the rivals') are taken from
    `earlier`, and the quality policy's studied again."""
    replay = TraceReplay.load(traces, chain)
    tiers = len(chain)
    test = replay.queries("test")
    table = await replay.depth_table(test)
    cloud_only = cloud_only_by_benchmark(table)
    served = set(cloud_only)  # the benchmarks the test stream carries (the train split has one more)
    orders = [replay.queries("test", seed) for seed in SHORT_ORDERS]
    shuffled = orders[0]
    row_of = {q.key: row for row, q in enumerate(test)}

    async def answered(
        config: BudgetConfig | QualityConfig | RecServeConfig, queries: Sequence[TraceQuery]
    ) -> tuple[Point, npt.NDArray[np.float64]]:
        plan = chain_plan(config, tiers)
        outcomes = await replay.run_offline(queries, plan.offline, feedback=plan.feedback)
        return point(outcomes, cloud_only_by_benchmark(table, [row_of[q.key] for q in queries])), rightness(outcomes)

    async def run(config: BudgetConfig | QualityConfig | RecServeConfig, queries: Sequence[TraceQuery]) -> Point:
        return (await answered(config, queries))[0]

    async def study_budgets() -> list[BudgetRow]:
        """The budget policy's rows, and the rivals', at each budget: the only part that needs the train split."""
        train = replay.queries("train")
        train_table = await replay.depth_table(train)
        priors = await calibrate_family_byte_priors(replay, train)
        betas = [row.recserve_beta for row in earlier.budgets] if reuse_rivals and earlier is not None else None
        budgets = []
        for rival, rival_answers in await _rival_rows(replay, table, train_table, betas):
            budget = rival.budget
            config = budget_config(train_table, priors, budget, split=split, served=served)
            policy, policy_answers = await answered(config, test)
            matched, pairs, per_benchmark = {}, [], {}
            for name in RIVALS:
                theirs: Point = getattr(rival, name)
                if policy.bytes <= theirs.bytes + TIE and policy.accuracy > theirs.accuracy - TIE:
                    # Already as accurate at no more bytes: nothing to match.
                    matched[name], ours = policy, policy_answers
                else:
                    config_at = budget_config(train_table, priors, spendable(theirs.bytes), split=split, served=served)
                    matched[name], ours = await answered(config_at, test)
                pairs.append((ours, rival_answers[name]))
                spent = {benchmark: spendable(share) for benchmark, (_, share) in theirs.by_benchmark.items()}
                config_spent = budget_config(train_table, priors, spendable(theirs.bytes), spent, split, served)
                per_benchmark[name] = await run(config_spent, test)
            budgets.append(
                BudgetRow(
                    budget=budget,
                    policy=policy,
                    casserve=rival.casserve,
                    recserve=rival.recserve,
                    recserve_beta=rival.recserve_beta,
                    hindsight=rival.hindsight,
                    short_bytes={
                        n: tuple([(await run(config, order[:n])).bytes for order in orders]) for n in SHORT_STREAMS
                    },
                    fill_caps=config.family_fill_caps,
                    at_rival_bytes=matched,
                    at_rival_family_bytes=per_benchmark,
                    margin_covariance=margin_covariance(pairs),
                )
            )
        return budgets

    budgets = list(earlier.budgets) if reuse_budgets and earlier is not None else []
    if not budgets:
        budgets = await study_budgets()
    full = table_point(table, np.full(len(test), tiers - 1), cloud_only)
    if earlier is not None and earlier.gaps:
        return ChainStudy(tuple(chain), full, tuple(budgets), earlier.gaps)
    gaps = []
    for gap in GAPS:
        quality = QualityConfig(quality_gap=gap)
        short = shuffled[: SHORT_STREAMS[-1]]
        short_cloud = float(np.mean([table.correct[row_of[q.key], -1] for q in short]))
        drifting, mixed, first = await run(quality, test), await run(quality, shuffled), await run(quality, short)
        gaps.append(
            GapRow(
                gap=gap,
                drifting_loss=full.accuracy - drifting.accuracy,
                shuffled_loss=full.accuracy - mixed.accuracy,
                short_loss=short_cloud - first.accuracy,
                drifting_bytes=drifting.bytes,
                shuffled_bytes=mixed.bytes,
                short_bytes=first.bytes,
            )
        )
    return ChainStudy(tuple(chain), full, tuple(budgets), tuple(gaps))


async def _rival_rows(
    replay: TraceReplay, table: DepthTable, train_table: DepthTable, betas: Sequence[float] | None = None
) -> list[tuple[BudgetRow, dict[str, npt.NDArray[np.float64]]]]:
    """Per budget, the rivals tuned on train and the best fixed thresholds in hindsight (the policy's fields empty),
    with each rival's right answers per test query. RecServe's β per budget is chosen on train unless `betas` gives
    the ones an earlier study of the chain chose there (the search replays the train split 21 times)."""
    tiers = len(replay.chain)
    test, train = replay.queries("test"), replay.queries("train")
    cloud_only = cloud_only_by_benchmark(table)
    # The search replays the train split once per β: skipped where an earlier study's choice is given.
    train_bytes = (
        await recserve_train_bytes(replay, train, cloud_only_by_benchmark(train_table)) if betas is None else {}
    )
    grid = fixed_threshold_grid(table, np.ones(len(test), dtype=bool), 21)
    rows = []
    for index, budget in enumerate(BUDGETS):
        tuned = tune_fixed_thresholds(train_table, budget)
        depths = np.full(len(test), tiers - 1)
        for benchmark, thresholds in tuned.items():
            mask = table.benchmarks == benchmark
            depths[mask] = table.fixed_threshold_depths(np.array(thresholds))[mask]
        beta = beta_for_budget(train_bytes, budget) if betas is None else betas[index]
        best = max((g for g in grid if g[2] <= budget + 1e-12), key=lambda g: (g[1], -g[2]))
        outcomes = await replay.run_offline(test, chain_plan(RecServeConfig(beta=beta), tiers).offline)
        casserve = table.outcomes(depths.astype(np.int64))
        empty = Point(0.0, 0.0, {})
        row = BudgetRow(
            budget=budget,
            policy=empty,
            casserve=point(casserve, cloud_only),
            recserve=point(outcomes, cloud_only),
            recserve_beta=beta,
            hindsight=table_point(table, table.fixed_threshold_depths(np.array(best[0])), cloud_only),
            short_bytes={},
        )
        rows.append((row, {"casserve": rightness(casserve), "recserve": rightness(outcomes)}))
    return rows


def _study(
    traces: Path,
    chain: tuple[str, ...],
    earlier: ChainStudy | None,
    split: str,
    reuse_rivals: bool,
    reuse_budgets: bool,
) -> ChainStudy:
    started = time.monotonic()
    study = asyncio.run(study_chain(traces, chain, earlier, split, reuse_rivals, reuse_budgets))
    print(f"{' → '.join(chain)}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return study


async def study_figures(traces: Path, chain: Sequence[str], split: str = "fill") -> dict[str, Any]:
    """Every figure of one chain's study, as results/chains.json records them (what the provenance probe
    fingerprints)."""
    return asdict(await study_chain(traces, chain, split=split))


def load_studies(path: Path, with_quality: bool = True) -> dict[tuple[str, ...], ChainStudy]:
    """The studies of an earlier report (results/chains.json), by chain; with their quality rows unless `with_quality`
    is false."""
    studies = {}
    for entry in json.loads(path.read_text()):
        rows = tuple(
            BudgetRow(
                **{
                    **row,
                    **{k: _point(row[k]) for k in ("policy", "casserve", "recserve", "hindsight")},
                    "short_bytes": {int(n): _shares(shares) for n, shares in row["short_bytes"].items()},
                    "fill_caps": tuple(tuple(pair) for pair in row.get("fill_caps", ())),
                    "margin_covariance": _covariance(row.get("margin_covariance")),
                    **{
                        key: {rival: _point(p) for rival, p in row[key].items()} if row.get(key) else None
                        for key in ("at_rival_bytes", "at_rival_family_bytes")
                    },
                }
            )
            for row in entry["budgets"]
        )
        gaps = tuple(GapRow(**gap) for gap in entry["gaps"]) if with_quality else ()
        chain = tuple(entry["chain"])
        studies[chain] = ChainStudy(chain, _point(entry["cloud_only"]), rows, gaps)
    return studies


def _shares(data: float | list[float]) -> tuple[float, ...]:
    return (data,) if isinstance(data, float) else tuple(data)


def _covariance(data: list[list[float]] | None) -> tuple[tuple[float, ...], ...] | None:
    return tuple(tuple(line) for line in data) if data else None


def _point(data: dict[str, Any]) -> Point:
    by_benchmark = {str(k): (float(v[0]), float(v[1])) for k, v in data["by_benchmark"].items()}
    return Point(float(data["accuracy"]), float(data["bytes"]), by_benchmark)


def verdict(ours: float, theirs: float) -> str:
    """win, tie or loss of an accuracy against another, ties within TIE."""
    if ours >= theirs + TIE:
        return "win"
    return "tie" if ours > theirs - TIE else "loss"


def summary_lines(studies: Sequence[ChainStudy]) -> list[str]:
    """Markdown: the distribution over chains, per budget and per gap, and the worst cases named."""
    count = len(studies)
    lines = [
        f"{count} chains. Wins, ties and losses of the budget policy's overall accuracy against each rival at the "
        f"same budget (ties within {TIE} accuracy). 'Meets the goal at equal bytes': given the bytes each rival "
        "actually spent on the test stream as its budget, the budget policy is at least as accurate as that rival "
        "(within the tie), for both rivals; its worst margin is named. 'Per benchmark': the same, given the bytes each "
        "rival spent on each benchmark as that benchmark's budget, where a rival's spending does not move between "
        "benchmarks either. 'Strict': at the budget, at least as accurate "
        f"as both rivals at no more bytes than the more frugal of them plus {TIE}. Bytes of the budget policy per "
        f"benchmark within ±{BYTES_TOLERANCE} of the target on the whole stream, and overall on the first 200 and "
        "500 shuffled requests, over every chain and order (below).",
        "",
        "| budget | vs CasServe tuned on train: win / tie / loss | vs RecServe, β on train: win / tie / loss | meets "
        "the goal at equal bytes | worst margin at equal bytes | per benchmark: meets the goal | per benchmark: worst "
        "margin | strict | median bytes: budget / CasServe / RecServe | benchmarks within ±0.02 | first 200 / 500 "
        "within ±0.02 | gap to hindsight, median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, budget in enumerate(BUDGETS):
        rows = [(study.chain, study.budgets[index]) for study in studies]
        tallies = {rival: [verdict(r.policy.accuracy, getattr(r, rival).accuracy) for _, r in rows] for rival in RIVALS}
        goal = sum(meets_goal(r) for _, r in rows)
        strict = sum(_meets_goal_strictly(r) for _, r in rows)
        worst_chain, worst = min(rows, key=lambda item: _equal_bytes_margin(item[1]))
        family_key = "at_rival_family_bytes"
        family_goal = sum(meets_goal(r, family_key) for _, r in rows)
        family_chain, family_worst = min(rows, key=lambda item: _equal_bytes_margin(item[1], family_key))
        within = [
            abs(share - budget) <= BYTES_TOLERANCE for _, r in rows for _, share in r.policy.by_benchmark.values()
        ]
        short = [f"{_within_share([r for _, r in rows], n):.0%}" for n in SHORT_STREAMS]
        medians = [statistics.median(getattr(r, k).bytes for _, r in rows) for k in ("policy", *RIVALS)]
        hindsight = statistics.median(r.hindsight.accuracy - r.policy.accuracy for _, r in rows)
        lines.append(
            f"| {budget} | {' / '.join(str(tallies['casserve'].count(v)) for v in ('win', 'tie', 'loss'))} | "
            f"{' / '.join(str(tallies['recserve'].count(v)) for v in ('win', 'tie', 'loss'))} | "
            f"{goal} of {count} ({goal / count:.0%}) | "
            f"{_equal_bytes_margin(worst):+.3f} ({' → '.join(worst_chain)}) | "
            f"{family_goal} of {count} ({family_goal / count:.0%}) | "
            f"{_equal_bytes_margin(family_worst, family_key):+.3f} ({' → '.join(family_chain)}) | "
            f"{strict} of {count} ({strict / count:.0%}) | "
            f"{' / '.join(f'{m:.3f}' for m in medians)} | {sum(within) / len(within):.0%} | {' / '.join(short)} | "
            f"{hindsight:+.3f} |"
        )
    lines += ["", *_short_lines(studies), "", *_noise_lines(studies), "", *_benchmark_lines(studies)]
    lines += ["", *_quality_lines(studies)]
    return lines


def _short_errors(rows: Sequence[BudgetRow], n: int) -> list[float]:
    """The budget policy's bytes on the first `n` shuffled requests less its budget, every chain in every order."""
    return [share - row.budget for row in rows for share in row.short_bytes[n]]


def _within_share(rows: Sequence[BudgetRow], n: int) -> float:
    errors = _short_errors(rows, n)
    return sum(abs(error) <= BYTES_TOLERANCE for error in errors) / len(errors)


def _short_lines(studies: Sequence[ChainStudy]) -> list[str]:
    """Short streams: the budget policy's bytes on the first 200 and 500 shuffled requests, over chains and orders."""
    orders = min(len(shares) for study in studies for row in study.budgets for shares in row.short_bytes.values())
    lines = [
        f"Short streams: the budget policy's bytes on the first 200 and 500 requests of the test stream shuffled in "
        f"{orders} orders (every chain in each), a share of those requests' cloud-only bytes, less the budget. "
        f"'Within': runs within ±{BYTES_TOLERANCE}; 'under' and 'over': more than {BYTES_TOLERANCE} off; 'every "
        "order': chains within it in all orders.",
        "",
        "| budget | requests | within | under / over | error: median (quartiles) | every order |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for index, budget in enumerate(BUDGETS):
        rows = [study.budgets[index] for study in studies]
        for n in SHORT_STREAMS:
            errors = _short_errors(rows, n)
            under = sum(error < -BYTES_TOLERANCE for error in errors)
            over = sum(error > BYTES_TOLERANCE for error in errors)
            low, middle, high = np.quantile(errors, [0.25, 0.5, 0.75])
            steady = sum(_within_share([row], n) == 1.0 for row in rows)
            lines.append(
                f"| {budget} | {n} | {1 - (under + over) / len(errors):.0%} of {len(errors)} | {under} / {over} | "
                f"{middle:+.3f} ({low:+.3f} to {high:+.3f}) | {steady} of {len(rows)} |"
            )
    return lines


def pass_probability(margin: float, variance: float, tie: float = TIE) -> float:
    """P(a margin measured on a test set is above -tie) when it falls normally around a true `margin` with this
    sampling variance: the chance of passing the goal's accuracy test against one rival."""
    if variance <= 0:
        return float(margin > -tie)
    return 0.5 * math.erfc(-(margin + tie) / math.sqrt(2 * variance))


def edge_needed(variances: Sequence[float], share: float = 0.9) -> float:
    """The true margin, alike on every chain, at which the expected share of chains passing the accuracy test against
    a rival reaches `share`, given each chain's sampling variance of that margin."""
    low, high = -0.05, 0.05
    for _ in range(40):
        middle = (low + high) / 2
        expected = sum(pass_probability(middle, v) for v in variances) / len(variances)
        low, high = (low, middle) if expected >= share else (middle, high)
    return high


def _noise_lines(studies: Sequence[ChainStudy]) -> list[str]:
    """How much of the goal at equal bytes the sampling noise of one test set decides, rival by rival."""
    lines = [
        "How much of the goal at equal bytes one test set's sampling noise decides, rival by rival. Each margin at "
        "equal bytes is a paired difference over the same test queries; its standard error (from the chain's "
        "per-query answers, results/chains.json `margin_covariance`) says how far it would move on another test set "
        "of that size. 'Expected at no edge': the chains expected to pass the accuracy test against the rival (within "
        "the tie) if the budget policy were, in truth, exactly as accurate as it on every chain. 'Edge for 90%': the "
        "true margin, alike on every chain, at which 90% of chains are expected to pass. 'Misses beyond noise': "
        "chains behind the rival by more than the tie plus two standard errors.",
        "",
        "| budget | rival | passes the accuracy test | expected at no edge | margin, mean over chains | "
        "standard error, median | edge for 90% | misses beyond noise |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, budget in enumerate(BUDGETS):
        rows = [study.budgets[index] for study in studies]
        if any(r.margin_covariance is None or r.at_rival_bytes is None for r in rows):
            return [*lines[:1], "", "Not recorded in this report (it predates `margin_covariance`)."]
        for position, rival in enumerate(RIVALS):
            margins = [r.at_rival_bytes[rival].accuracy - getattr(r, rival).accuracy for r in rows if r.at_rival_bytes]
            variances = [r.margin_covariance[position][position] for r in rows if r.margin_covariance]
            passes = sum(verdict(margin, 0.0) != "loss" for margin in margins)
            expected = sum(pass_probability(0.0, v) for v in variances)
            beyond = sum(m + TIE < -2 * math.sqrt(v) for m, v in zip(margins, variances, strict=True))
            lines.append(
                f"| {budget} | {_RIVAL_NAMES[rival]} | {passes} of {len(rows)} | {expected:.1f} | "
                f"{100 * statistics.mean(margins):+.2f} points | "
                f"{100 * statistics.median(math.sqrt(v) for v in variances):.2f} points | "
                f"{100 * edge_needed(variances):+.2f} points | {beyond} |"
            )
    return lines


def _best_rival(row: BudgetRow) -> float:
    return max(row.casserve.accuracy, row.recserve.accuracy)


def _equal_bytes_margin(row: BudgetRow, key: str = "at_rival_bytes") -> float:
    """The budget policy's accuracy given each rival's bytes (overall, or per benchmark with `key`
    "at_rival_family_bytes"), minus that rival's, for the rival it does worst against (at the budget when the row has
    no such runs)."""
    runs: dict[str, Point] | None = getattr(row, key)
    if runs is None:
        return row.policy.accuracy - _best_rival(row)
    return min(runs[rival].accuracy - float(getattr(row, rival).accuracy) for rival in RIVALS)


def meets_goal(row: BudgetRow, key: str = "at_rival_bytes") -> bool:
    """At least as accurate as each rival (within the tie) given the bytes that rival spent (overall, or per benchmark
    with `key` "at_rival_family_bytes"), and spending no more than them (within the tie)."""
    runs: dict[str, Point] | None = getattr(row, key)
    if runs is None:
        return _meets_goal_strictly(row)
    return all(
        runs[rival].accuracy > getattr(row, rival).accuracy - TIE
        and runs[rival].bytes <= getattr(row, rival).bytes + TIE
        for rival in RIVALS
    )


def _meets_goal_strictly(row: BudgetRow) -> bool:
    frugal = min(row.casserve.bytes, row.recserve.bytes)
    return row.policy.accuracy > _best_rival(row) - TIE and row.policy.bytes <= frugal + TIE


def _benchmark_lines(studies: Sequence[ChainStudy]) -> list[str]:
    """Per benchmark, over chains and budgets: wins, ties, losses against CasServe tuned on train, the worst named."""
    lines = [
        "Per benchmark, over every chain and budget, the budget policy against CasServe tuned on train:",
        "",
        "| benchmark | win / tie / loss | worst loss |",
        "| --- | --- | --- |",
    ]
    benchmarks = sorted(studies[0].cloud_only.by_benchmark)
    for benchmark in benchmarks:
        cells = [
            (study.chain, row.budget, row.policy.by_benchmark[benchmark][0] - row.casserve.by_benchmark[benchmark][0])
            for study in studies
            for row in study.budgets
        ]
        tally = [verdict(margin, 0.0) for _, _, margin in cells]
        chain, budget, margin = min(cells, key=lambda cell: cell[2])
        lines.append(
            f"| {benchmark} | {' / '.join(str(tally.count(v)) for v in ('win', 'tie', 'loss'))} | "
            f"{margin:+.3f} ({' → '.join(chain)}, budget {budget}) |"
        )
    return lines


def _quality_lines(studies: Sequence[ChainStudy]) -> list[str]:
    count = len(studies)
    lines = [
        "The quality policy: chains whose loss against cloud-only accuracy stays within the gap plus 0.005 (whole "
        "test stream) and plus 0.02 (first 500 shuffled requests); the median and the worst loss.",
        "",
        "| gap | drifting within | shuffled within | 500 requests within | median loss (drifting / shuffled / 500) | "
        "worst loss (drifting / shuffled / 500) | median bytes (drifting / shuffled / 500) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, gap in enumerate(GAPS):
        rows = [study.gaps[index] for study in studies]
        losses = {k: [getattr(r, k) for r in rows] for k in ("drifting_loss", "shuffled_loss", "short_loss")}
        within = [
            sum(loss <= gap + slack for loss in losses[k])
            for k, slack in (("drifting_loss", 0.005), ("shuffled_loss", 0.005), ("short_loss", 0.02))
        ]
        lines.append(
            f"| {gap} | {' | '.join(f'{w} of {count} ({w / count:.0%})' for w in within)} | "
            f"{' / '.join(f'{statistics.median(v):.3f}' for v in losses.values())} | "
            f"{' / '.join(f'{max(v):.3f}' for v in losses.values())} | {_median_bytes(rows)} |"
        )
    return lines


def _median_bytes(rows: Sequence[GapRow]) -> str:
    spent = [[getattr(r, k) for r in rows] for k in ("drifting_bytes", "shuffled_bytes", "short_bytes")]
    if any(None in values for values in spent):
        return "not recorded"
    return " / ".join(f"{statistics.median(values):.3f}" for values in spent)


def write_report(studies: Sequence[ChainStudy], out: Path) -> Path:
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / "chains.json").write_text(json.dumps([asdict(s) for s in studies], indent=1) + "\n")
    header = [
        "# Every chain: the target policies against rivals tuned on train",
        "",
        "Produced by `make chains TRACES=TRACE_FOLDER` (`python -m recserve.evaluation.chain_study`), from the trace "
        "set of docs/results.md: every ordered chain of 2 and 3 of its models, cheapest first by train accuracy, "
        "replayed through the tier code on the test split (figures per chain in results/chains.json). The rivals "
        "are tuned on the train split: CasServe's thresholds per tier and benchmark by grid search for the byte "
        "budget, RecServe's β as the largest of 0, 0.05, ..., 1 whose bytes on train stay within the budget. The "
        "budget policy's split between links (a fill cap per benchmark, evaluation/splits.py) is chosen on the same "
        "train split for each budget it is run at, and its byte prior per benchmark (each tier's mean answer bytes "
        "and the framing's) is measured there; the policy then holds the bytes online. Its other constants, and "
        "the quality policy's, were chosen on three chains (docs/evaluation.md), but for the budget controller's "
        "gain, chosen on the train split of 24 chains here, the quality policy's cold rate, on the train split "
        "of the first 16 chains here, and how far each benchmark's choice of fill cap leans on the mean of the "
        "chain's benchmarks that the test split carries, chosen on the test splits of the other three-tier chains "
        "(leave one chain out: 1 for each of the 84). Nothing else is chosen on a test split. "
        "With `--reuse-quality`, the quality policy's rows come from an earlier report of the same traces and "
        "quality policy; with `--reuse-budgets`, the budget rows (the budget policy's and the rivals') come from an "
        "earlier report of the same traces, budget policy and rivals.",
        "",
    ]
    path = out / "chains.md"
    path.write_text("\n".join([*header, *summary_lines(studies)]) + "\n")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--jobs", type=int, default=2, help="chains studied at once, one process each")
    parser.add_argument("--sizes", default="2,3", help="chain lengths")
    parser.add_argument("--limit", type=int, default=None, help="only the first N chains (a quick look)")
    parser.add_argument(
        "--reuse-quality",
        type=Path,
        default=None,
        help="an earlier results/chains.json of the same traces and quality policy: take the quality policy's rows "
        "from it (they depend on neither the budget policy nor the rivals) and study the rest again",
    )
    parser.add_argument(
        "--reuse-rivals",
        action="store_true",
        help="with --reuse-quality, take RecServe's β per budget from that report too (chosen on train there)",
    )
    parser.add_argument(
        "--reuse-budgets",
        type=Path,
        default=None,
        help="an earlier results/chains.json of the same traces, budget policy and rivals: take the budget rows "
        "from it (they do not depend on the quality policy) and study the quality policy's again",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the chains a stopped run of the same settings left in OUT/results/chains.partial.json",
    )
    parser.add_argument(
        "--link-split", choices=LINK_SPLITS, default="fill", help="the budget policy's split between links"
    )
    args = parser.parse_args(argv)
    if args.reuse_rivals and not args.reuse_quality:
        parser.error("--reuse-rivals takes the rivals from the report given to --reuse-quality")
    if args.reuse_quality and args.reuse_budgets:
        parser.error("--reuse-quality and --reuse-budgets each study again what the other reuses: give one")
    models = models_by_train_accuracy(TraceSet.load(args.traces))
    chains = every_chain(models, [int(s) for s in args.sizes.split(",")])[: args.limit]
    if args.reuse_budgets:
        earlier = load_studies(args.reuse_budgets, with_quality=False)
    else:
        earlier = load_studies(args.reuse_quality) if args.reuse_quality else {}
    partial = args.out / "results" / "chains.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = load_studies(partial) if args.resume and partial.exists() else {}
    remaining = [c for c in chains if c not in done]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        studied = pool.map(
            _study,
            itertools.repeat(args.traces),
            remaining,
            [earlier.get(c) for c in remaining],
            itertools.repeat(args.link_split),
            itertools.repeat(args.reuse_rivals),
            itertools.repeat(args.reuse_budgets is not None),
        )
        for study in studied:
            done[study.chain] = study
            # What is done so far, should a long run be stopped (load_studies reads it back).
            partial.write_text(json.dumps([asdict(s) for s in done.values()]) + "\n")
    print(write_report([done[c] for c in chains], args.out))
    record(args.out / "results", "chains", asyncio.run(probe(functools.partial(study_figures, split=args.link_split))))
    partial.unlink()  # only once the report is written: a report that fails leaves the studies behind
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
