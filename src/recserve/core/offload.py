"""The interface between a tier and its offload policy: the decision (Verdict) and the OffloadPolicy protocol."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    forward: bool
    threshold: float
    # Set when the forward is a probe: a request the policy would have kept, forwarded at this rate to measure
    # the tiers above. The tier hands it back with the request's verdict (`observe_verdict`).
    probe_rate: float | None = None
    # Set by a first tier that prices bytes (the budget policy's learned split): written into its hop
    # (`Hop.byte_price`), for the tiers above.
    byte_price: float | None = None


class OffloadPolicy(Protocol):
    def decide(
        self,
        family: str,
        confidence: float,
        *,
        is_last: bool,
        lower: Sequence[float] = (),
        byte_price: float | None = None,
    ) -> Verdict:
        """Record `confidence` and say whether to forward; `is_last` tiers must never forward.

        `lower` holds the confidences of the tiers below, first tier first (what they saw before forwarding);
        `byte_price` the first tier's price of bytes for this request (its `Verdict.byte_price`), if it set one.
        """

    def threshold(self, family: str) -> float | None:
        """The current threshold for `family`, None while there is none."""

    def observe_verdict(
        self, family: str, confidence: float, correct: bool, *, answered_here: bool, probe_rate: float | None = None
    ) -> None:
        """Learn that the answer to a request this tier scored at `confidence` was right or wrong: its own
        answer (`answered_here`) or, for a request it forwarded, the answer of a tier above; `probe_rate` is
        the decision's `Verdict.probe_rate`."""

    def observe_cost(
        self,
        family: str,
        *,
        size: int,
        spent: Sequence[int],
        lower: Sequence[float] = (),
        answer_sizes: Sequence[int] = (),
    ) -> None:
        """Learn what a request cost once it is served: `size` is its bytes as this tier received it, `spent`
        the bytes measured on each link from this tier up to the tier that answered (empty when this tier
        answered it, or when the next tier did not answer; a tier that answered progressively adds the bytes of
        the parts it asked above to the last entry, so that a request crossed every link only when the last tier
        answered it), `lower` what `decide` was given for it, `answer_sizes` the bytes of the answers of this tier
        and of the tiers above that the request reached (lowest first), as their hops carry them."""
