"""Where a forwarded request goes: the interface between a tier and the placement policy that picks one of its
next-tier candidates (after PerLLM, arXiv 2405.14636).

The offload policy decides *whether* a request leaves the tier; the placement decides *where*: which of several
next-tier candidates (edge sites, cloud regions, or a tier further up, skipping one) serves it. It learns each
candidate's processing time (queueing included, as this tier sees it) and energy from the replies, online.
Plain Python: time comes in the outcomes, randomness from a seed, so the live tiers and the discrete-event
simulator drive the same objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    """One place a tier may send a request to."""

    name: str  # the peer label of its link, e.g. "edge-a"
    level: int = 1  # tiers up from this one: 1 the next tier, 2 one beyond it (the request skips a tier)


@dataclass(frozen=True)
class PlacementRequest:
    """What a placement knows of a request before it is sent."""

    family: str
    # Seconds the request may take from its arrival at this tier to its answer (None: no requirement). What is left
    # of the client's requirement when the request reaches this tier.
    requirement_seconds: float | None = None
    service_class: str = ""
    prompt_tokens: int = 0  # an estimate (this tier's own count)
    max_tokens: int = 0


@dataclass(frozen=True)
class PlacementOutcome:
    """What came back from the chosen candidate."""

    seconds: float  # from sending to the answer, as this tier measured it (queueing and the link included)
    energy_joules: float  # inference and transmission the reply's hops report, from the candidate up
    met: bool  # whether `seconds` stayed within the request's requirement (True when it had none)
    failed: bool = False  # the candidate failed or timed out (seconds then is the time lost)
    transmission_joules: float = 0.0  # the part of energy_joules spent on links (the rest is inference)
    # This tier's other requests in flight at the candidate when this one was sent: the queue it joined (None: not
    # known; a placement then takes its count when the answer came, which after a burst understates it).
    load_at_send: int | None = None


class Placement(Protocol):
    """Picks a candidate for each forwarded request and learns from what came back. One object per tier, shared by
    all its requests; must not block."""

    def choose(self, request: PlacementRequest, candidates: Sequence[Candidate], usable: Sequence[bool]) -> int:
        """The index of the candidate to send `request` to, among those `usable` (breaker closed, a slot free);
        at least one is usable."""

    def observe(self, request: PlacementRequest, candidates: Sequence[Candidate], chosen: int,
                outcome: PlacementOutcome) -> None:  # fmt: skip
        """What the candidate `chosen` (an index into `candidates`) gave for `request`."""

    def in_flight(self, chosen: int, delta: int) -> None:
        """Requests this tier has in flight at candidate `chosen` went up (+1) or down (-1): for load-aware
        placements (least-loaded)."""
