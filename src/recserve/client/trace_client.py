"""Trace queries played against a tier stack, in process or over gRPC: requests, verdicts, Feedback, outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from recserve.core.judge import is_correct
from recserve.core.traces import TraceQuery, TraceSet
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc

# The multiple-choice benchmarks of the trace format answer with one of these letters.
CHOICE_OPTIONS = ("A", "B", "C", "D")
GENERATE_MAX_TOKENS = 48


def tier_names(count: int) -> tuple[str, ...]:
    """The tiers of a chain of `count` models: device, edge, cloud for three; device, edge1..edgeN, cloud for more."""
    if count == 2:
        return ("device", "cloud")
    if count == 3:
        return ("device", "edge", "cloud")
    return ("device", *(f"edge{i}" for i in range(1, count - 1)), "cloud")


@dataclass(frozen=True)
class Outcome:
    """How one query was served: which tier answered, whether rightly, and the bytes on each link."""

    benchmark: str
    depth: int  # index in the chain of the tier that answered
    correct: bool | None  # None: the query has no reference to judge the answer by
    link_bytes: tuple[int, ...]  # one entry per link, lowest first; 0 on the links above the answering tier


class FirstTier(Protocol):
    """Where a client sends: the first tier of a stack (a core Tier in process, or `GrpcTier`)."""

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse: ...

    async def feedback(self, request: pb.FeedbackRequest) -> pb.FeedbackResponse: ...


class GrpcTier:
    """The first tier of a live stack, through a channel the caller opens and closes."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float = 120.0) -> None:
        self._stub: Any = pb_grpc.TierServiceStub(channel)
        self._timeout = timeout

    async def infer(self, request: pb.InferRequest) -> pb.InferResponse:
        response: pb.InferResponse = await self._stub.Infer(request, timeout=self._timeout)
        return response

    async def feedback(self, request: pb.FeedbackRequest) -> pb.FeedbackResponse:
        response: pb.FeedbackResponse = await self._stub.Feedback(request, timeout=self._timeout)
        return response


class TraceClient:
    """Plays queries of a trace set against tiers that answer as the models of `chain`, first tier first.

    Grading: the trace's recorded verdict on the answer of the model that answered (replay engines), or, with
    `judge_reference`, the query's reference answer through the judge (real engines); requests then carry the
    reference, so the tiers judge their answers themselves and take no Feedback. Request ids are `id_prefix`
    and the query's index in `id_digits` digits: fixed-width, so a message's size never depends on its position.
    """

    def __init__(
        self,
        trace_set: TraceSet,
        chain: Sequence[str],
        *,
        judge_reference: bool = False,
        id_prefix: str = "trace-",
        id_digits: int = 7,
    ) -> None:
        self.trace_set = trace_set
        self.chain = tuple(chain)
        self.names = tier_names(len(self.chain))
        self.judge_reference = judge_reference
        self.id_prefix = id_prefix
        self.id_digits = id_digits

    def request(self, query: TraceQuery, index: int | None = None) -> pb.InferRequest:
        """The query as the first tier receives it; without `index` the first tier names the request (for a
        request sent many times)."""
        choice = self.trace_set.answers[query.key][self.chain[0]].is_choice
        return pb.InferRequest(
            request_id="" if index is None else f"{self.id_prefix}{index:0{self.id_digits}d}",
            prompt=query.user_prompt,
            system_prompt=query.system_prompt,
            task=pb.TASK_KIND_CHOICE if choice else pb.TASK_KIND_GENERATE,
            options=CHOICE_OPTIONS if choice else (),
            family=query.benchmark,
            sampling=pb.SamplingParams(max_tokens=1 if choice else GENERATE_MAX_TOKENS),
            reference=query.gold if self.judge_reference else "",
        )

    def outcome(self, query: TraceQuery, response: pb.InferResponse) -> Outcome:
        depth = self.names.index(response.answered_by)
        # Each hop below the answering one records the bytes of the link above it.
        crossed = [hop.bytes_sent + hop.bytes_received for hop in response.hops[:-1]]
        sizes = crossed + [0] * (len(self.chain) - 1 - len(crossed))
        return Outcome(query.benchmark, depth, self._verdict(query, depth, response), tuple(sizes))

    def _verdict(self, query: TraceQuery, depth: int, response: pb.InferResponse) -> bool | None:
        if not self.judge_reference:
            return self.trace_set.answers[query.key][self.chain[depth]].correct
        if not query.gold:
            return None
        return is_correct(query.gold, answer=response.answer, chosen_option=response.chosen_option or None)

    async def serve(
        self, tier: FirstTier, query: TraceQuery, index: int, *, feedback: bool = False
    ) -> tuple[pb.InferResponse, Outcome]:
        """One query through `tier`; with `feedback`, its verdict goes back to the tiers before this returns."""
        if feedback and self.judge_reference:
            raise ValueError("requests that carry a reference are judged by the tiers; Feedback would judge them twice")
        response = await tier.infer(self.request(query, index))
        outcome = self.outcome(query, response)
        if feedback and outcome.correct is not None:
            await tier.feedback(pb.FeedbackRequest(request_id=response.request_id, correct=outcome.correct))
        return response, outcome

    async def run(
        self,
        tier: FirstTier,
        queries: Sequence[TraceQuery],
        *,
        feedback: bool = False,
        concurrency: int = 1,
        on_outcome: Callable[[Outcome], object] | None = None,
    ) -> list[Outcome]:
        """Serve `queries` through `tier` with at most `concurrency` in flight, each started in order; one at a
        time, every query (and its Feedback) is done before the next starts, so stateful policies see a fixed
        stream. Outcomes come back in the order of `queries`."""
        outcomes: list[Outcome | None] = [None] * len(queries)
        pending = iter(enumerate(queries))

        async def worker() -> None:
            for index, query in pending:
                _, outcome = await self.serve(tier, query, index, feedback=feedback)
                outcomes[index] = outcome
                if on_outcome is not None:
                    on_outcome(outcome)

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(queries))))))
        return [outcome for outcome in outcomes if outcome is not None]

    async def run_live(
        self,
        target: str,
        queries: Sequence[TraceQuery],
        *,
        feedback: bool = False,
        concurrency: int = 1,
        on_outcome: Callable[[Outcome], object] | None = None,
    ) -> list[Outcome]:
        """`run` against the first tier of a live stack at `target` (HOST:PORT, plaintext)."""
        async with grpc.aio.insecure_channel(target) as channel:
            tier = GrpcTier(channel)
            return await self.run(tier, queries, feedback=feedback, concurrency=concurrency, on_outcome=on_outcome)
