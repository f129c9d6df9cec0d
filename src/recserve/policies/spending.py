"""What a byte budget buys and what it is measured against: per-link forward rates, and the first tier's
estimate of what cloud-only serving would spend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


class WindowMean(SlidingWindow):
    """The mean of the last `window` values added (0 before the first), each capped at `outlier_factor` times the
    90th percentile of those before it."""

    def __init__(self, window: int, outlier_factor: float = math.inf) -> None:
        super().__init__(window)
        self.outlier_factor = outlier_factor
        self._total = 0.0

    def add(self, value: float) -> None:
        if self._sorted and self.outlier_factor < math.inf:
            value = min(value, self.outlier_factor * max(self.quantile_at(0.9), 1))
        if len(self) == self.window:
            self._total -= self._arrivals[0]  # the value the window is about to forget
        super().add(value)
        self._total += value

    @property
    def mean(self) -> float:
        return self._total / max(len(self), 1)


@dataclass(frozen=True)
class BytePrior:
    """What a family's requests cost in cloud-only serving, measured on a calibration set: the mean bytes of each
    tier's answer (lowest first) and of the framing of a request that crosses every link (`ByteLedger.prior`)."""

    answers: tuple[float, ...]
    framing: float

    def __post_init__(self) -> None:
        if not self.answers or any(not 0 <= value < math.inf for value in (*self.answers, self.framing)):
            raise ValueError("a byte prior needs each tier's mean answer bytes and the framing, all finite, >= 0")

    def __str__(self) -> str:
        return ":".join(repr(value) for value in (*self.answers, self.framing))  # exact: live tiers match offline

    @classmethod
    def parse(cls, text: str) -> BytePrior:
        """ "31:45:60:118" -> each tier's mean answer bytes, lowest first, then the framing's."""
        try:
            values = [float(part) for part in text.split(":")]
        except ValueError:
            values = []
        if len(values) < 3:
            raise ValueError(
                f"a byte prior is each tier's mean answer bytes, lowest first, then the framing's, e.g. "
                f"'31:45:60:118' for three tiers; got {text!r}"
            )
        return cls(tuple(values[:-1]), values[-1])


class ByteLedger:
    """A first tier's estimate of what cloud-only serving would spend on its requests, from measured replies.

    Cloud-only serving sends every request across every link, so its bytes follow the wire format: `links` times
    the request as the first tier would forward it (its `size`), plus every tier's answer in its hop (each hop
    travels down every link in the reply, and up every link above its tier), plus the last tier's answer down
    every link once more as the reply's, plus the rest of the messages (framing). A served request shows the
    answers of the tiers it reached; the answers of the tiers it did not reach are taken at their mean length over
    the last `window` requests that reached them, and the framing at its mean over those that crossed every link
    (whose bytes are exactly what cloud-only serving spends on them).

    Why not simply the mean of what the requests that crossed every link took beyond `links` times their size:
    those are the ones every tier doubted, and on free-text tasks the doubted questions draw markedly shorter (or
    longer) answers from every model, so they are a biased sample (on truthfulqa it put cloud-only bytes 3-14%
    low, and the budget underspent by as much). A lower tier's answer is measured on far more requests, and the
    first tier's own on all of them. A caller that gives no answers gets that plain mean (all in the framing).

    The estimate of the requests booked so far is revalued with the current means at every booking, not fixed at
    the means of the moment each was booked: a rare long answer seen early would otherwise weigh in every estimate
    booked while it dominated a short window, and one seen late in none. Each answer enters its mean capped at
    `outlier_factor` times its tier's 90th percentile. The cap only stops a degenerate output (a model looping for
    kilobytes, as llama3.2-1b did once on truthfulqa's train split, at 37 times its 90th percentile) from standing
    in for every unreached request. Free-text answers are skewed: on truthfulqa a fifth of some models' answers
    exceed 4 times their median, and a cap at 4 times the median (this ledger's until it was measured) put
    truthfulqa's estimate 4% low on average over 24 chains, 11% at worst. 20 clears every other answer of every
    model and benchmark of the train split (at most 19 times, but for one 23-byte answer to a multiple-choice
    question).
    Until `min_samples` requests have crossed every link there is no estimate, unless a `prior` measured on a
    calibration set stands in for them: its means enter each window as `min_samples` requests' worth, so the
    estimate holds from the first request (and needs no request to cross every link), and real ones outweigh it as
    they come.
    """

    def __init__(
        self,
        links: int,
        window: int = 1000,
        min_samples: int = 5,
        outlier_factor: float = 20.0,
        prior: BytePrior | None = None,
    ) -> None:
        if links < 1 or window < 1 or min_samples < 1:
            raise ValueError("links, window and min_samples must be at least 1")
        if prior is not None and len(prior.answers) != links + 1:
            raise ValueError(f"a byte prior for {links} links needs {links + 1} answer means, got {len(prior.answers)}")
        self.links = links
        self.min_samples = min_samples
        # How many times each tier's answer crosses a link in cloud-only serving: in its hop, down every link and
        # up the links above its tier (the first tier's way up is in `size`); the last tier's, down every link
        # once more as the reply's answer.
        self._multiplicity = [links + (links - tier if tier else 0) for tier in range(links + 1)]
        self._multiplicity[links] += links
        self._answers = [WindowMean(window, outlier_factor) for _ in range(links + 1)]
        self._framing = WindowMean(window)
        if prior is not None:
            for mean, value in zip([*self._answers, self._framing], [*prior.answers, prior.framing], strict=True):
                for _ in range(min_samples):
                    mean.add(value)
        self._pending: list[tuple[int, Sequence[int], int]] = []  # (size, answers, bytes taken) not yet booked
        # The booked requests: their bytes known exactly (sizes, the answers they reached), how many of them lack
        # each tier's answer, how many there are, and their estimate when last booked.
        self._known_bytes = 0.0
        self._unreached = [0] * (links + 1)
        self._booked = 0
        self._booked_estimate = 0.0

    @property
    def ready(self) -> bool:
        return len(self._framing) >= self.min_samples

    def prior(self) -> BytePrior:
        """The means this ledger holds, as the prior of another's (the calibration of a family's bytes)."""
        return BytePrior(tuple(mean.mean for mean in self._answers), self._framing.mean)

    def _answer_bytes(self, answers: Sequence[int]) -> float:
        """The bytes the answers add to a cloud-only request: those in `answers`, the rest at their means."""
        return sum(
            count * (answers[tier] if tier < len(answers) else self._answers[tier].mean)
            for tier, count in enumerate(self._multiplicity)
        )

    def cloud_only_estimate(self, size: int, answers: Sequence[int] = ()) -> float:
        """Cloud-only bytes of a request of `size` whose first tiers' answers (lowest first) had `answers` bytes."""
        return self.links * size + self._answer_bytes(answers) + self._framing.mean

    def record(self, size: int, spent: Sequence[int], answers: Sequence[int] = ()) -> tuple[float, float] | None:
        """Book one served request (`answers`: the bytes of the answers of the tiers it reached, lowest first).
        Returns what the estimate of cloud-only bytes of every request booked so far rose by (this request's, and
        the earlier ones' revalued) and the bytes taken since the last booking, both in units of the mean estimate
        per request (so errors weigh alike whatever the message sizes); None while there is no estimate: the
        requests served until there is one are booked together then."""
        for tier, length in enumerate(answers[: self.links + 1]):
            self._answers[tier].add(length)
        if len(spent) == self.links and len(answers) in (0, self.links + 1):
            self._framing.add(sum(spent) - self.links * size - self._answer_bytes(answers))
        self._pending.append((size, answers, sum(spent)))
        if not self.ready:
            return None
        taken = 0
        for pending_size, pending_answers, cost in self._pending:
            taken += cost
            self._booked += 1
            self._known_bytes += self.links * pending_size
            for tier, count in enumerate(self._multiplicity):
                if tier < len(pending_answers):
                    self._known_bytes += count * pending_answers[tier]
                else:
                    self._unreached[tier] += 1
        self._pending.clear()
        # As `cloud_only_estimate`, summed over the booked requests: the unreached answers and the framing at the
        # current means.
        unreached_bytes = sum(
            self._unreached[tier] * count * self._answers[tier].mean for tier, count in enumerate(self._multiplicity)
        )
        estimate = self._known_bytes + unreached_bytes + self._booked * self._framing.mean
        rise, self._booked_estimate = estimate - self._booked_estimate, estimate
        mean = estimate / self._booked
        return rise / mean, taken / mean
