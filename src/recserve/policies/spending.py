"""What a byte budget buys and what it is measured against: per-link forward rates, and the first tier's
estimate of what cloud-only serving would spend."""

from __future__ import annotations

import math
from collections.abc import Sequence

from recserve.core.threshold import SlidingWindow


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


class _WindowMean(SlidingWindow):
    """The mean of the last `window` values added (0 before the first), each capped at `outlier_factor` times the
    median of those before it."""

    def __init__(self, window: int, outlier_factor: float = math.inf) -> None:
        super().__init__(window)
        self.outlier_factor = outlier_factor
        self._total = 0.0

    def add(self, value: float) -> None:
        if self._sorted and self.outlier_factor < math.inf:
            value = min(value, self.outlier_factor * max(self._sorted[len(self._sorted) // 2], 1))
        if len(self) == self.window:
            self._total -= self._arrivals[0]  # the value the window is about to forget
        super().add(value)
        self._total += value

    @property
    def mean(self) -> float:
        return self._total / max(len(self), 1)


class ByteLedger:
    """A first tier's estimate of what cloud-only serving would spend on its requests, from measured replies.

    Cloud-only serving sends every request across every link, so its bytes follow the wire format: `links` times
    the request as the first tier would forward it (its `size`), plus every tier's answer in its hop (each hop
    travels down every link in the reply, and up every link above its tier), plus the last tier's answer down
    every link once more as the reply's, plus the rest of the messages (framing). A served request shows the
    answers of the tiers it reached; the answers of the tiers it did not reach are taken at their mean length over
    the last `window` requests that reached them (each capped at `outlier_factor` times its tier's median: a model
    that rambles on now and then does so on the doubted requests, the ones that reach it), and the framing at its
    mean over those that crossed every link (whose bytes are exactly what cloud-only serving spends on them).

    Why not simply the mean of what the requests that crossed every link took beyond `links` times their size:
    those are the ones every tier doubted, and on free-text tasks the doubted questions draw markedly shorter (or
    longer) answers from every model, so they are a biased sample (on truthfulqa it put cloud-only bytes 3-14%
    low, and the budget underspent by as much). A lower tier's answer is measured on far more requests, and the
    first tier's own on all of them. A caller that gives no answers gets that plain mean (all in the framing).
    Until `min_samples` requests have crossed every link there is no estimate.
    """

    def __init__(self, links: int, window: int = 1000, min_samples: int = 5, outlier_factor: float = 4.0) -> None:
        if links < 1 or window < 1 or min_samples < 1:
            raise ValueError("links, window and min_samples must be at least 1")
        self.links = links
        self.min_samples = min_samples
        # How many times each tier's answer crosses a link in cloud-only serving: in its hop, down every link and
        # up the links above its tier (the first tier's way up is in `size`); the last tier's, down every link
        # once more as the reply's answer.
        self._multiplicity = [links + (links - tier if tier else 0) for tier in range(links + 1)]
        self._multiplicity[links] += links
        self._answers = [_WindowMean(window, outlier_factor) for _ in range(links + 1)]
        self._framing = _WindowMean(window)
        self._pending: list[tuple[int, Sequence[int], int]] = []  # (size, answers, bytes taken) not yet booked
        self._requests = 0
        self._reference_total = 0.0

    @property
    def ready(self) -> bool:
        return len(self._framing) >= self.min_samples

    def _answer_bytes(self, answers: Sequence[int]) -> float:
        """The bytes the answers add to a cloud-only request: those in `answers`, the rest at their means."""
        return sum(
            count * (answers[tier] if tier < len(answers) else self._answers[tier].mean)
            for tier, count in enumerate(self._multiplicity)
        )

    def cloud_only_estimate(self, size: int, answers: Sequence[int] = ()) -> float:
        """Cloud-only bytes of a request of `size` whose first tiers' answers (lowest first) had `answers` bytes."""
        return self.links * size + self._answer_bytes(answers) + self._framing.mean

    def record(self, size: int, spent: Sequence[int], answers: Sequence[int] = ()) -> list[tuple[float, float]]:
        """Book one served request (`answers`: the bytes of the answers of the tiers it reached, lowest first), and
        return what can now be booked: (estimated cloud-only bytes, bytes taken) per request, in units of the mean
        estimate so far (so errors weigh alike whatever the message sizes). Requests served before there is an
        estimate are kept and returned together once there is one."""
        for tier, length in enumerate(answers[: self.links + 1]):
            self._answers[tier].add(length)
        if len(spent) == self.links and len(answers) in (0, self.links + 1):
            self._framing.add(sum(spent) - self.links * size - self._answer_bytes(answers))
        self._pending.append((size, answers, sum(spent)))
        if not self.ready:
            return []
        booked = []
        for pending_size, pending_answers, cost in self._pending:
            reference = self.cloud_only_estimate(pending_size, pending_answers)
            self._requests += 1
            self._reference_total += reference
            mean = self._reference_total / self._requests
            booked.append((reference / mean, cost / mean))
        self._pending.clear()
        return booked
