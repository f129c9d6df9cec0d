"""The budget policy: hold a byte budget (a share of cloud-only bytes) with per-link forward rates."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from sortedcontainers import SortedList

from recserve.core.offload import Verdict
from recserve.policies.controller import ControlledQuantile


def split_budget(budget: float, links: int = 2, fill_cap: float = 0.85) -> list[float]:
    """Per-link forward rates (each conditional on reaching that tier) that spend `budget` of cloud-only bytes.

    Every link is taken to carry about the same bytes per request (each hop sends the prompt up and the answer
    down), so a request that crosses k links costs k/links of cloud-only. Lower links are filled first, up to
    `fill_cap` (the rest stays on the cheapest tier that answers it confidently): on the recorded traces the best
    fixed thresholds in hindsight spend the budget that way (forward most of what the device doubts to the edge
    before sending anything on to the cloud).
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"the byte budget is a share of cloud-only bytes within [0, 1], got {budget}")
    if links < 1 or not 0.0 < fill_cap <= 1.0:
        raise ValueError("links must be at least 1 and fill_cap within (0, 1]")
    remaining = budget * links  # in units of "one link crossed by every request"
    reach = 1.0  # share of requests arriving at the current tier
    rates: list[float] = []
    for index in range(links):
        cap = 1.0 if index == links - 1 else fill_cap
        rate = min(cap, remaining / reach) if reach > 0 else 0.0
        rates.append(rate)
        reach *= rate
        remaining -= reach
    if remaining > 1e-9:
        # The caps leave budget over (budget > fill_cap): forward everything past the first tier, and buy the
        # rest with the first link's rate; continuous with the capped split at budget = fill_cap.
        rates = [budget] + [1.0] * (links - 1)
    return rates


class ByteLedger:
    """A first tier's estimate of what cloud-only serving would spend on its requests, from measured replies.

    Every link carries the request up (its size, plus the hops below) and a reply down whose size depends on
    the answers rather than on the prompt, so cloud-only bytes are taken as `links` times size plus an overhead:
    the mean, over the last `window` requests that crossed every link, of what they took beyond `links` times size
    (their bytes are exactly what cloud-only serving spends on them). Until `min_samples` such requests have
    come back there is no estimate.
    """

    def __init__(self, links: int, window: int = 1000, min_samples: int = 5, outlier_factor: float = 4.0) -> None:
        if links < 1 or window < 1 or min_samples < 1:
            raise ValueError("links, window and min_samples must be at least 1")
        self.links = links
        self.min_samples = min_samples
        self.outlier_factor = outlier_factor
        self._overheads: deque[int] = deque(maxlen=window)
        self._sorted = SortedList()
        self._pending: list[tuple[int, int]] = []  # (size, bytes taken) of requests not yet booked
        self._overhead_total = 0
        self._requests = 0
        self._reference_total = 0.0

    @property
    def ready(self) -> bool:
        return len(self._overheads) >= self.min_samples

    def cloud_only_estimate(self, size: int) -> float:
        return self.links * size + self._overhead_total / max(len(self._overheads), 1)

    def record(self, size: int, spent: Sequence[int]) -> list[tuple[float, float]]:
        """Book one served request, and return what can now be booked: (estimated cloud-only bytes, bytes taken)
        per request, in units of the mean estimate so far (so errors weigh alike whatever the message sizes).
        Requests served before there is an estimate are kept and returned together once there is one."""
        if len(spent) == self.links:
            if len(self._overheads) == self._overheads.maxlen:
                self._overhead_total -= self._overheads[0]
                self._sorted.remove(self._overheads[0])
            overhead = sum(spent) - self.links * size
            if self._sorted:
                # A rare giant reply (a model rambling on) would otherwise inflate every later estimate: the
                # requests that cross every link are the ones most doubted, where such replies concentrate.
                overhead = min(overhead, self.outlier_factor * max(self._sorted[len(self._sorted) // 2], 1))
            self._overheads.append(overhead)
            self._sorted.add(overhead)
            self._overhead_total += overhead
        self._pending.append((size, sum(spent)))
        if not self.ready:
            return []
        booked = []
        for pending_size, cost in self._pending:
            reference = self.cloud_only_estimate(pending_size)
            self._requests += 1
            self._reference_total += reference
            mean = self._reference_total / self._requests
            booked.append((reference / mean, cost / mean))
        self._pending.clear()
        return booked


@dataclass
class _FamilyBudget:
    controller: ControlledQuantile
    ledger: ByteLedger
    holding_bytes: bool = False  # whether the last decision left the controller to the measured bytes


class BudgetPolicy:
    """Hold a byte budget (share of cloud-only bytes): each tier holds its link's forward rate per family, and
    the first tier, which sees the bytes of every link in its replies, holds the measured bytes.

    A tier knows its place in the chain from the confidences of the tiers below (`lower`), so every tier
    takes the same settings. Needs no feedback: the rates are what the budget buys. The rates alone land a few
    points under the budget (requests answered below the last tier carry shorter replies than cloud-only
    ones), so once its replies give an estimate of cloud-only bytes (`ByteLedger`) the first tier's controller
    integrates the byte error instead of the rate error, and spends what the tiers above leave unspent.
    """

    def __init__(
        self,
        budget: float,
        *,
        links: int = 2,
        fill_cap: float = 0.85,
        window: int = 10_000,
        min_rate: float = 0.02,
    ) -> None:
        if not 0.0 <= min_rate <= 1.0:
            raise ValueError(f"min_rate is a share of requests within [0, 1], got {min_rate}")
        self.rates = split_budget(budget, links, fill_cap)
        self.budget = budget
        self.links = links
        self.window = window
        self.min_rate = min_rate
        ControlledQuantile(window)  # validates before any request arrives
        self._families: dict[str, _FamilyBudget] = {}
        self._depth = 0  # this tier's place in the chain, learned from the first request

    def target_rate(self, depth: int) -> float:
        if depth >= len(self.rates):
            return 0.0
        # The links above the first forward at least `min_rate`: the first tier needs some requests to cross
        # every link to know what cloud-only serving costs, and these are the ones the tiers above doubt most.
        return max(self.rates[depth], self.min_rate) if depth > 0 else self.rates[depth]

    def _family(self, family: str) -> _FamilyBudget:
        state = self._families.get(family)
        if state is None:
            state = self._families[family] = _FamilyBudget(ControlledQuantile(self.window), ByteLedger(self.links))
        return state

    def decide(self, family: str, confidence: float, *, is_last: bool, lower: Sequence[float] = ()) -> Verdict:
        state = self._family(family)
        self._depth = len(lower)
        state.holding_bytes = self._depth == 0 and not is_last and state.ledger.ready
        target = self.target_rate(self._depth)
        forward, threshold = state.controller.decide(confidence, target, hold_rate=not state.holding_bytes)
        return Verdict(forward and not is_last, threshold)

    def holds_bytes(self, family: str) -> bool:
        """Whether this tier's last decision for `family` was held to measured bytes rather than a rate."""
        state = self._families.get(family)
        return state is not None and state.holding_bytes

    def observe_cost(self, family: str, *, size: int, spent: Sequence[int]) -> None:
        state = self._family(family)
        if self._depth > 0:
            return
        for reference, cost in state.ledger.record(size, spent):
            state.controller.correct(self.budget * reference - cost)

    def threshold(self, family: str) -> float | None:
        state = self._families.get(family)
        if state is None or not len(state.controller):
            return None
        return state.controller.quantile(self.target_rate(self._depth) + state.controller.integral)

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        return None
