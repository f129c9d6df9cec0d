"""What a byte budget buys and what it is measured against: per-link forward rates, and the first tier's
estimate of what cloud-only serving would spend."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from sortedcontainers import SortedList


def split_budget(budget: float, links: int, fill_cap: float) -> list[float]:
    """Per-link forward rates (each conditional on reaching that tier) that spend `budget` of cloud-only bytes.

    Every link is taken to carry about the same bytes per request (each hop sends the prompt up and the answer
    down), so a request that crosses k links costs k/links of cloud-only. Lower links are filled first, up to
    `fill_cap` (the rest stays on the cheapest tier that answers it confidently): on the recorded traces the best
    fixed thresholds in hindsight spend the budget that way (forward most of what the device doubts to the edge
    before sending anything on to the cloud). `BudgetConfig` checks the arguments.
    """
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
