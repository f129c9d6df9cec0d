"""Trace queries as the InferRequests a client sends, and responses as bytes per link."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from recserve.core.traces import TraceQuery
from recserve.v1 import tier_pb2 as pb

# The multiple-choice benchmarks of the trace format answer with one of these letters.
CHOICE_OPTIONS = ("A", "B", "C", "D")
GENERATE_MAX_TOKENS = 48


def link_bytes(response: pb.InferResponse) -> Iterator[tuple[int, str]]:
    """(bytes, "lower->upper") for every link a response's request crossed, from its hop records."""
    hops = response.hops
    for lower, upper in itertools.pairwise(hops):
        yield lower.bytes_sent + lower.bytes_received, f"{lower.tier}->{upper.tier}"


def build_request(query: TraceQuery, *, choice: bool, request_id: str, reference: bool) -> pb.InferRequest:
    return pb.InferRequest(
        request_id=request_id,
        prompt=query.user_prompt,
        system_prompt=query.system_prompt,
        task=pb.TASK_KIND_CHOICE if choice else pb.TASK_KIND_GENERATE,
        options=CHOICE_OPTIONS if choice else (),
        family=query.benchmark,
        sampling=pb.SamplingParams(max_tokens=1 if choice else GENERATE_MAX_TOKENS),
        reference=query.gold if reference else "",
    )
