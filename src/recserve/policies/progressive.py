"""Progressive inference scheduler (after PICE, arXiv 2501.09367): per long-form request, sketch at the cloud and
expand at the edge, send the question to the cloud whole, or answer it here.

The tier below the cloud (the edge) has three paths for a GENERATE request:

- ``progressive``: ask the cloud for a short sketch (at most `max_points` numbered points) and expand the points in
  parallel on the edge's own engine. The cloud decodes a few dozen tokens instead of the whole answer; the edge
  writes the bulk, in parallel.
- ``cloud-direct``: forward the question to the cloud, which answers in full.
- ``local``: the edge answers itself, as the plain RecServe cascade does (its confidence may still forward it).

`ProgressiveScheduler.decide` applies these rules, in this order; the first that applies decides:

1. Short answer → local. The expected answer length (`max_tokens`, lowered to the median of recent answers once
   `length_min_observations` have been seen) is below `min_answer_tokens`: a sketch costs a cloud round trip and
   a second prefill, which only pays back over a long answer written in parallel; short answers are the cascade's
   business.
2. The router says the question does not suit a sketch (P < `threshold`: maths, code, one-line answers, steps that
   build on each other, a text in one voice) → cloud-direct, the strongest model writing the dependent whole;
   but local when the cloud's pressure exceeds `direct_limit`, since a full answer is the heaviest work one can
   add to a busy cloud.
3. It suits a sketch → progressive, unless the pressure exceeds `sketch_limit` (→ local). A sketch is far less
   cloud work than a full answer, so it is kept longer: `sketch_limit` ≥ `direct_limit`.

Pressure is in-flight requests / capacity from the cloud's latest load report (its replies carry it): above 1,
requests queue. Unknown load (no report, or one older than the tier's load_max_age_seconds) counts as no pressure:
a report goes stale only when the cloud has answered nothing for that long, so this edge has sent it little; the
next reply brings a fresh report. Without the decay, an edge that went local because the cloud was overloaded
would never hear that it recovered. A cloud that cannot be reached at all is the breakers' business: the tier
falls back to its own answer at once.

Sketch length: `max_points` at pressure ≤ `light_load`, `min_points` at ≥ `heavy_load`, linear in between (rounded
to the nearest point): a busy cloud queues every sketch token behind its batch, so shorter sketches return sooner,
and the edge writes more of each point. It is also capped at expected tokens / `tokens_per_point`, so that each
point has room to be expanded; the configuration ensures the cap never falls below `min_points`.

Pure and deterministic: no clock, no randomness, no gRPC.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from recserve.core.progressive import ProgressiveDecision, ProgressivePath, UpstreamLoad
from recserve.policies.config import OptionConfig, at_least_one, not_negative, option, positive, share
from recserve.policies.sketch_router import SketchRouter


class SuitabilityRouter(Protocol):
    def probability(self, question: str) -> float:
        """P(the question suits a sketch of independent points)."""
        ...


@dataclass(frozen=True, kw_only=True)
class ProgressiveConfig(OptionConfig):
    """The progressive scheduler's settings; the module docstring says how the rules use them."""

    name = "progressive"
    kind = "scheduler"

    # A sketch pays back only over a long answer (a cloud round trip and a second prefill come first). 200 tokens,
    # about 150 words, is five points of a sentence or two: shorter answers leave too little to write in parallel.
    min_answer_tokens: int = option(
        200, "expected answer tokens below which a request is answered locally", check=at_least_one
    )
    # P(suits a sketch) at or above which the router's answer is yes; 0.5: the router's most likely label.
    threshold: float = option(0.5, "router probability at or above which a question suits a sketch", check=share)
    # Skeleton-of-Thought asked for 3 to 10 points: fewer than 3 is hardly a list, more than 10 a sketch too long
    # to be the cheap part.
    min_points: int = option(3, "points of a sketch when the cloud is busy", check=at_least_one)
    max_points: int = option(10, "points of a sketch when the cloud is idle", check=at_least_one)
    # A point expanded in a sentence or two (Skeleton-of-Thought's expansion prompt): about 40 tokens.
    tokens_per_point: int = option(40, "answer tokens each point needs at least", check=at_least_one)
    # Pressures, in-flight requests / capacity. Below half the batch the cloud has room: full sketches.
    light_load: float = option(0.5, "cloud pressure up to which sketches have max_points", check=not_negative)
    # A full batch: any more work queues, so sketches are cut to min_points.
    heavy_load: float = option(1.0, "cloud pressure from which sketches have min_points", check=positive)
    # Half a batch queued: a full answer sent now waits for half a batch's completions to start.
    direct_limit: float = option(
        1.5, "cloud pressure above which questions unsuited to a sketch stay local", check=positive
    )
    # A whole batch queued: even a sketch's few tokens wait for a batch to drain.
    sketch_limit: float = option(2.0, "cloud pressure above which every long-form request stays local", check=positive)
    # Batch slots assumed when a report omits its capacity; set it to the cloud engine's batch limit (vLLM:
    # --max-num-seqs).
    cloud_capacity: int = option(256, "cloud batch slots assumed when a load report omits them", check=at_least_one)
    # Recent long-form answers whose median lowers the expected length (0: learn nothing, use max_tokens alone).
    length_window: int = option(200, "recent answer lengths kept (0: expected length = max_tokens)", check=not_negative)
    # Answers seen before the median is trusted: fewer say little about the traffic.
    length_min_observations: int = option(20, "answer lengths seen before their median is used", check=at_least_one)

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if self.min_points > self.max_points:
            yield f"min_points ({self.min_points}) must not exceed max_points ({self.max_points})"
        if not self.light_load < self.heavy_load:
            yield f"light_load ({self.light_load}) must be below heavy_load ({self.heavy_load})"
        if self.direct_limit > self.sketch_limit:
            yield (
                f"direct_limit ({self.direct_limit}) must not exceed sketch_limit ({self.sketch_limit}): a sketch "
                "is less cloud work than a full answer"
            )
        if self.min_answer_tokens < self.min_points * self.tokens_per_point:
            yield (
                f"min_answer_tokens ({self.min_answer_tokens}) must be at least min_points * tokens_per_point "
                f"({self.min_points} * {self.tokens_per_point}), or a long enough answer could not hold a sketch"
            )
        if 0 < self.length_window < self.length_min_observations:
            yield (
                f"length_min_observations ({self.length_min_observations}) must not exceed length_window "
                f"({self.length_window})"
            )

    def build(self, router: SuitabilityRouter | None = None) -> ProgressiveScheduler:
        return ProgressiveScheduler(self, router)


class ProgressiveScheduler:
    """Chooses a path per long-form request (module docstring); learns the typical answer length from
    `observe_answer`."""

    def __init__(self, config: ProgressiveConfig | None = None, router: SuitabilityRouter | None = None) -> None:
        self.config = config or ProgressiveConfig()
        self.router: SuitabilityRouter = router if router is not None else SketchRouter.load()
        self._lengths: deque[int] = deque(maxlen=self.config.length_window or None)

    def observe_answer(self, completion_tokens: int, max_tokens: int) -> None:
        """The length of a finished answer; only long-form requests (max_tokens ≥ min_answer_tokens) count, so
        short cascade answers do not drag the median down."""
        if completion_tokens < 0:
            raise ValueError(f"progressive scheduler: completion_tokens must not be negative, got {completion_tokens}")
        if self.config.length_window and max_tokens >= self.config.min_answer_tokens:
            self._lengths.append(completion_tokens)

    def expected_tokens(self, max_tokens: int) -> int:
        """`max_tokens`, or the median of recent answer lengths when lower and enough have been seen."""
        if len(self._lengths) >= self.config.length_min_observations and self.config.length_window:
            return min(max_tokens, statistics.median_low(self._lengths))
        return max_tokens

    def sketch_points(self, pressure: float, expected_tokens: int) -> int:
        """Points of a sketch at this cloud pressure, for an answer of about `expected_tokens`."""
        config = self.config
        if pressure <= config.light_load:
            points = config.max_points
        elif pressure >= config.heavy_load:
            points = config.min_points
        else:
            share_of_range = (pressure - config.light_load) / (config.heavy_load - config.light_load)
            points = math.floor(config.max_points - share_of_range * (config.max_points - config.min_points) + 0.5)
        return max(config.min_points, min(points, expected_tokens // config.tokens_per_point))

    def pressure(self, load: UpstreamLoad | None) -> float:
        """In-flight requests over capacity (`cloud_capacity` where the report has none); 0 when unknown."""
        if load is None:
            return 0.0
        return load.in_flight / (load.capacity or self.config.cloud_capacity)

    def decide(self, question: str, max_tokens: int, load: UpstreamLoad | None) -> ProgressiveDecision:
        """The path for this request, given the cloud's latest load (None: unknown)."""
        config = self.config
        if max_tokens < 1:
            raise ValueError(f"progressive scheduler: max_tokens must be at least 1, got {max_tokens}")
        expected = self.expected_tokens(max_tokens)
        if expected < config.min_answer_tokens:
            return _local(f"short answer: {expected} expected tokens < {config.min_answer_tokens}")
        pressure = self.pressure(load)
        load_text = "load unknown" if load is None else f"cloud pressure {pressure:.2f}"
        probability = self.router.probability(question)
        if probability < config.threshold:
            unsuited = f"unsuited to a sketch (p={probability:.2f} < {config.threshold:.2f})"
            if pressure > config.direct_limit:
                return _local(f"{unsuited}, {load_text} > direct_limit {config.direct_limit}")
            return ProgressiveDecision(ProgressivePath.CLOUD_DIRECT, 0, f"{unsuited}, {load_text}")
        suited = f"suits a sketch (p={probability:.2f} ≥ {config.threshold:.2f})"
        if pressure > config.sketch_limit:
            return _local(f"{suited}, {load_text} > sketch_limit {config.sketch_limit}")
        points = self.sketch_points(pressure, expected)
        return ProgressiveDecision(ProgressivePath.PROGRESSIVE, points, f"{suited}, {load_text}: {points} points")


def _local(reason: str) -> ProgressiveDecision:
    return ProgressiveDecision(ProgressivePath.LOCAL, 0, reason)
