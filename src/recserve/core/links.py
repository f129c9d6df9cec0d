"""A tier's links to its next-tier candidates: each with its transport, circuit breaker, forward timeout and peer
label; and the choice of one for a forwarded request (a Placement, or the first usable link)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from recserve.core.breaker import BreakerState, CircuitBreaker
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.placement import Candidate, Placement, PlacementOutcome, PlacementRequest
from recserve.core.transport import Upstream
from recserve.core.validation import NAME_PATTERN

UNKNOWN_PEER = "next"


@dataclass
class Link:
    """One next-tier candidate. Its peer label is configured, or learned from its first reply."""

    upstream: Upstream
    breaker: CircuitBreaker | None = None
    forward_timeout: ForwardTimeout = field(default_factory=ForwardTimeout)
    level: int = 1  # tiers up: 1 the next tier, 2 one beyond it (a request sent there skips a tier)
    peer_name: str = UNKNOWN_PEER
    in_flight: int = 0

    def __post_init__(self) -> None:
        self._named = self.peer_name != UNKNOWN_PEER

    @property
    def candidate(self) -> Candidate:
        return Candidate(self.peer_name, self.level)

    def learn_peer_name(self, name: str) -> None:
        # Kept once learned, and only a tier name: the peer label takes one value, whatever later replies say.
        if not self._named and NAME_PATTERN.fullmatch(name):
            self.peer_name = name
            self._named = True


@dataclass(frozen=True)
class Slot:
    """Leave to send one request up `link` (the index into the tier's links)."""

    index: int
    link: Link
    breaker_probe: bool  # the call is the half-open breaker's probe
    load_at_send: int = 0  # this tier's other requests in flight on the link when the slot was taken


class Links:
    """The candidates of one tier and how a forwarded request picks one. Without a placement (or with one link),
    the first usable link: the plain cascade."""

    def __init__(self, links: Sequence[Link], placement: Placement | None = None, max_forwarding: int | None = None):
        self.links = list(links)
        self.placement = placement
        # Requests waiting on the next tiers at once (None: no cap). Beyond, they are answered here, so a hung next
        # tier cannot hold every slot this tier needs to answer by itself.
        self.max_forwarding = max_forwarding
        self.forwarding = 0

    def __bool__(self) -> bool:
        return bool(self.links)

    @property
    def candidates(self) -> list[Candidate]:
        return [link.candidate for link in self.links]

    @contextmanager
    def slot(self, request: PlacementRequest) -> Iterator[Slot | None]:
        """A link for `request` held while it is up there, or None when it must stay here (every slot taken, or
        every breaker open)."""
        if self.max_forwarding is not None and self.forwarding >= self.max_forwarding:
            yield None
            return
        usable = [link.breaker is None or link.breaker.could_allow() for link in self.links]
        if not any(usable):
            yield None
            return
        if self.placement is not None and len(self.links) > 1:
            index = self.placement.choose(request, self.candidates, usable)
            if not 0 <= index < len(self.links) or not usable[index]:
                raise ValueError(f"the placement chose candidate {index}, which is not usable")
        else:
            index = usable.index(True)
        link = self.links[index]
        # could_allow() said yes: allow() takes the half-open probe, if that is the state.
        if link.breaker is not None and not link.breaker.allow():  # pragma: no cover - checked just above
            yield None
            return
        breaker_probe = link.breaker is not None and link.breaker.state is BreakerState.HALF_OPEN
        load_at_send = link.in_flight
        self._count(index, link, +1)
        try:
            yield Slot(index, link, breaker_probe, load_at_send)
        finally:
            self._count(index, link, -1)

    async def close(self) -> None:
        for link in self.links:
            await link.upstream.close()

    def observe(self, request: PlacementRequest, slot: Slot, outcome: PlacementOutcome) -> None:
        if self.placement is not None:
            outcome = replace(outcome, load_at_send=slot.load_at_send)
            self.placement.observe(request, self.candidates, slot.index, outcome)

    def _count(self, index: int, link: Link, delta: int) -> None:
        self.forwarding += delta
        link.in_flight += delta
        if self.placement is not None:
            self.placement.in_flight(index, delta)
