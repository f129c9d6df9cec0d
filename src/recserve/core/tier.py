"""A tier: validate → generate → score → decide → answer or forward. Plain Python, no gRPC."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import TypeVar

from recserve.core.breaker import CircuitBreaker
from recserve.core.confidence import Score, choice_scorer, generate_scorer
from recserve.core.energy import EnergyModel, PowerReader
from recserve.core.engine import (
    ChatMessage,
    Engine,
    EngineError,
    Generation,
    GenerationRequest,
    TextDelta,
    UnknownPromptError,
)
from recserve.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    RecServeError,
    StreamInterrupted,
    Unavailable,
    UpstreamTimedOut,
    UpstreamUnavailable,
)
from recserve.core.forward_timeout import ForwardTimeout
from recserve.core.judge import is_correct
from recserve.core.links import UNKNOWN_PEER, Link, Links, Slot
from recserve.core.metrics import TierMetrics
from recserve.core.offload import OffloadPolicy, Verdict
from recserve.core.placement import Placement, PlacementOutcome, PlacementRequest
from recserve.core.progressive import (
    PointWindows,
    ProgressiveDecision,
    ProgressiveOptions,
    ProgressivePath,
    ProgressiveScheduler,
    UpstreamLoad,
    conversation_of,
    question_of,
)
from recserve.core.sketch import (
    SKETCH_MAX_WORDS,
    SketchParseError,
    assemble_point,
    expand_request,
    parse_sketch,
    sketch_request,
)
from recserve.core.transport import Reply, Upstream
from recserve.core.untrusted import excerpt
from recserve.core.validation import RequestValidator, TierLimits
from recserve.v1 import tier_pb2 as pb

logger = logging.getLogger(__name__)
T = TypeVar("T")
# The window (and metric series) shared by the families beyond a tier's max_families; outside NAME_PATTERN, so no
# client can name it.
OVERFLOW_FAMILY = "(overflow)"
PROBE_WAIT_SECONDS = 2.0
# A streaming tier sends the deltas its engine made within this long as one message (the first at once): every
# message costs every hop's CPU, and at 32 streams relayed tokens/s was 43% (20 ms), 82% (50 ms) and 99% (100 ms) of
# the engine's own server (bench/stream_bench.py). 100 ms is ten updates a second, faster than anyone reads; vLLM's
# --stream-interval makes the same trade, in tokens.
STREAM_INTERVAL_SECONDS = 0.1
# Requests a tier serves at once, as its replies report it, unless told (recserve serve: --max-in-flight, or the
# engine's batch). The same figure offline and live, so that replies are the same size both ways.
DEFAULT_CAPACITY = 256


@dataclass
class _Served:
    """What a tier remembers of a recent request, to route its Feedback."""

    family: str
    answered_here: bool
    sender: str  # the previous tier, or "client"
    confidence: float  # this tier's own confidence, for the policy to learn from verdicts
    probe_rate: float | None = None  # the policy's Verdict.probe_rate, handed back with the verdict
    judged: bool = False
    learns: bool = True  # False for a request the policy did not decide (sent straight to the last tier)
    link: int = 0  # the next-tier candidate it went to, for its Feedback
    arrived: float = 0.0  # when this tier received it (the tier's clock)


@dataclass
class _Point:
    """One sketch point as it goes into the answer."""

    text: str
    expansion: pb.PointExpansion
    prompt_tokens: int
    completion_tokens: int
    confidence: float  # as the model that wrote it scored it
    repair: pb.InferResponse | None = None  # the next tier's reply, when it wrote the point


class _ProgressiveFallback(Exception):
    """The progressive path cannot give a whole answer; the tier answers the request as any other."""

    def __init__(self, outcome: str, *, degraded: bool) -> None:
        super().__init__(outcome)
        self.outcome = outcome  # for the metric: sketch_failed, unparsable, point_failed
        self.degraded = degraded  # the next tier failed: do not forward the request to it again


# Tasks a tier below asks of this one to answer progressively: always answered here.
PART_TASKS = (pb.TASK_KIND_SKETCH, pb.TASK_KIND_EXPAND)


def new_request_id() -> str:
    return uuid.uuid4().hex


class Tier:
    """One tier of the cascade. It forwards to `upstream`, or to one of `links` (several next-tier candidates, chosen
    by `placement`); with neither it is the last tier, which never forwards."""

    def __init__(
        self,
        name: str,
        engine: Engine,
        policy: OffloadPolicy,
        metrics: TierMetrics,
        upstream: Upstream | None = None,
        *,
        limits: TierLimits | None = None,
        scorer: str = "perplexity",
        choice_scorer_name: str = "option_probability",
        feedback_memory: int = 100_000,
        breaker: CircuitBreaker | None = None,
        forward_timeout: ForwardTimeout | None = None,
        max_forwarding: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_request_id: Callable[[], str] = new_request_id,
        callers: Iterable[str] = (),
        links: Sequence[Link] = (),
        placement: Placement | None = None,
        energy: EnergyModel | None = None,
        power: PowerReader | None = None,
        stream_interval: float = STREAM_INTERVAL_SECONDS,
        progressive: ProgressiveScheduler | None = None,
        progressive_options: ProgressiveOptions | None = None,
        capacity: int = DEFAULT_CAPACITY,
        ensemble: Engine | None = None,
    ) -> None:
        self.name = name
        self.engine = engine
        # Progressive: a second model that writes again the points the first is unsure of, before the next tier is
        # asked (PICE's ensemble of edge models).
        self.ensemble = ensemble
        self.policy = policy
        self.metrics = metrics
        if upstream is not None:
            links = [Link(upstream, breaker, forward_timeout or ForwardTimeout()), *links]
        self.links = Links(links, placement, max_forwarding)
        self.energy = energy or EnergyModel()
        self.power = power
        self.limits = limits or TierLimits()
        self.stream_interval = stream_interval
        self.progressive = progressive
        self.progressive_options = progressive_options or ProgressiveOptions()
        self._point_windows = PointWindows(self.progressive_options.point_beta, self.progressive_options.point_window)
        self.capacity = capacity  # reported in each reply's load, for the tiers below
        self._in_flight = 0
        self._upstream_load: tuple[UpstreamLoad, float] | None = None  # the next tier's last report, and when
        self._score_generation = generate_scorer(scorer)
        self._score_choice = choice_scorer(choice_scorer_name)
        self._feedback_memory = feedback_memory
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._ids_in_flight: set[str] = set()
        self._families: set[str] = set()
        self._clock = clock
        self._new_request_id = new_request_id
        # The tiers that forward to this one: only their requests carry hops. Empty for the first tier, whose callers
        # are clients, and clients send no hops.
        self.callers = frozenset(callers)
        self._validator = RequestValidator(name, self.limits, self.callers)
        self._idle_since: float | None = None  # from the first request on

    @property
    def is_last(self) -> bool:
        return not self.links

    # The first candidate's link, for a tier with one next tier (and the tests that look at it).
    @property
    def upstream(self) -> Upstream | None:
        return self.links.links[0].upstream if self.links else None

    @property
    def breaker(self) -> CircuitBreaker | None:
        return self.links.links[0].breaker if self.links else None

    @property
    def peer_name(self) -> str:
        return self.links.links[0].peer_name if self.links else UNKNOWN_PEER

    async def infer(self, request: pb.InferRequest, timeout: float | None = None) -> pb.InferResponse:
        started = self._clock()
        try:
            with self._request_id_held(request), self._counted_in_flight():
                response = await self._infer(request, None if timeout is None else started + timeout, started)
                self._finish(request, response)
        except BaseException:
            self.metrics.count_outcome("error")
            raise
        self.metrics.observe_request_seconds(self._clock() - started)
        return response

    async def infer_stream(
        self, request: pb.InferRequest, timeout: float | None = None
    ) -> AsyncGenerator[pb.InferStreamResponse, None]:
        """Serve `request` as a stream: the answering tier's text deltas, then one final response (answer empty).

        A tier finishes its own answer before it decides, since its confidence needs every token. If it answers, it
        sends that answer as one delta; if it forwards, it relays the next tier's events as they arrive. A tier that
        answers whatever its confidence (the last tier, or any tier for a local-only request) streams as its engine
        generates. A next tier that fails before its first event gets this tier's degraded answer; one that fails
        after ends the stream with StreamInterrupted, never a silently truncated answer.
        """
        started = self._clock()
        try:
            with self._request_id_held(request), self._counted_in_flight():
                deadline = None if timeout is None else started + timeout
                # Closed explicitly, here and below: `async for` leaves a generator it stops early to the garbage
                # collector, and a client that hangs up must stop the engines now.
                async with aclosing(self._infer_stream(request, deadline, started)) as events:
                    async for event in events:
                        if event.HasField("final"):
                            self._finish(request, event.final)
                        yield event
        except BaseException:
            self.metrics.count_outcome("error")
            raise
        self.metrics.observe_request_seconds(self._clock() - started)

    async def _infer(self, request: pb.InferRequest, deadline: float | None, arrived: float) -> pb.InferResponse:
        family = self._validator.validate(request)
        self._check_requirement(request, deadline, arrived)
        if request.task in PART_TASKS:
            return await self._write_part(request, family, deadline, arrived)
        degraded = False
        decision = self._progressive_decision(request)
        if decision is not None and decision.path is ProgressivePath.PROGRESSIVE:
            texts: list[str] = []
            try:
                async with aclosing(self._progressive(request, family, decision, deadline, arrived)) as parts:
                    async for part in parts:
                        if isinstance(part, str):
                            texts.append(part)
                        else:
                            part.answer = "".join(texts)
                            return part
            except _ProgressiveFallback as fallback:
                self.metrics.count_progressive(decision.path, fallback.outcome)
                degraded = fallback.degraded
        direct = self._count_path(decision)
        if (self._skips_engine(request) or direct) and not degraded:
            try:
                response = await self._forward_unscored(request, family, deadline, arrived)
            except UpstreamUnavailable as exc:
                logger.warning("tier %s answers request %s itself: %s", self.name, request.request_id, exc)
                degraded = True
            else:
                return response
        generation, engine_seconds = await self._generate(self._generation_request(request), deadline)
        family = self._family_window(family)
        score, verdict, hop = self._decide(request, family, generation, engine_seconds)
        if verdict.forward and not degraded:
            served = _Served(family, False, sender(request), score.value, verdict.probe_rate, arrived=arrived)
            placing = self._placement_request(request, family, arrived, generation)
            with self.links.slot(placing) as slot:
                if slot is not None:
                    try:
                        return await self._forward(request, hop, served, deadline, slot, placing)
                    except UpstreamUnavailable as exc:
                        logger.warning("tier %s answers request %s itself: %s", self.name, request.request_id, exc)
            degraded = True
        return self._answer_here(request, family, generation, score, hop, degraded=degraded, arrived=arrived)

    async def _infer_stream(
        self, request: pb.InferRequest, deadline: float | None, arrived: float
    ) -> AsyncGenerator[pb.InferStreamResponse, None]:
        family = self._validator.validate(request)
        self._check_requirement(request, deadline, arrived)
        if request.task in PART_TASKS:
            response = await self._write_part(request, family, deadline, arrived)
            yield self._delta(request, response.answer, ())
            response.answer = ""
            yield pb.InferStreamResponse(final=response)
            return
        degraded = False
        decision = self._progressive_decision(request)
        if decision is not None and decision.path is ProgressivePath.PROGRESSIVE:
            sent = 0
            try:
                async with aclosing(self._progressive(request, family, decision, deadline, arrived)) as parts:
                    async for part in parts:
                        if isinstance(part, str):
                            sent += 1
                            yield self._delta(request, part, ())
                        else:
                            yield pb.InferStreamResponse(final=part)
                            return
            except _ProgressiveFallback as fallback:
                self.metrics.count_progressive(decision.path, fallback.outcome)
                if sent:
                    raise StreamInterrupted(
                        f"tier {self.name}: a point of the answer could be written neither here nor above after "
                        f"{sent} points were sent; the answer is incomplete"
                    ) from None
                degraded = fallback.degraded
        direct = self._count_path(decision)
        if (self._skips_engine(request) or direct) and not degraded:
            served = _Served(family, False, sender(request), 0.0, learns=False, arrived=arrived)
            placing = self._placement_request(request, family, arrived)
            relayed = False
            async with aclosing(self._relay(request, self._unscored_hop(), served, deadline, placing)) as events:
                async for event in events:
                    relayed = True
                    yield event
            if relayed:
                return
            degraded = True
        if degraded or self._answers_whatever(request):
            # The answer stays here whatever the confidence: stream it as the engine generates.
            generation: Generation | None = None
            started = self._clock()
            held: list[TextDelta] = []
            sent_at: float | None = None
            try:
                async with aclosing(self._engine_stream(request, deadline)) as items:
                    async for item in items:
                        if isinstance(item, Generation):
                            generation = item
                            continue
                        held.append(item)
                        now = self._clock()
                        # The first delta goes at once; later ones at most every stream_interval, merged.
                        if sent_at is None or now - sent_at >= self.stream_interval:
                            yield self._held_delta(request, held)
                            held, sent_at = [], now
            except RecServeError:
                if held:  # what was generated before the failure still goes out, then the error
                    yield self._held_delta(request, held)
                raise
            if held:
                yield self._held_delta(request, held)
            if generation is None:
                raise Unavailable(f"tier {self.name}: the engine's stream ended without its generation")
            family = self._family_window(family)
            score, _, hop = self._decide(request, family, generation, self._clock() - started)
            response = self._answer_here(request, family, generation, score, hop, degraded=degraded, arrived=arrived)
            response.answer = ""
            yield pb.InferStreamResponse(final=response)
            return
        generation, engine_seconds = await self._generate(self._generation_request(request), deadline)
        family = self._family_window(family)
        score, verdict, hop = self._decide(request, family, generation, engine_seconds)
        if verdict.forward:
            served = _Served(family, False, sender(request), score.value, verdict.probe_rate, arrived=arrived)
            placing = self._placement_request(request, family, arrived, generation)
            relayed = False
            async with aclosing(self._relay(request, hop, served, deadline, placing)) as events:
                async for event in events:
                    relayed = True
                    yield event
            if relayed:
                return
            degraded = True
        response = self._answer_here(request, family, generation, score, hop, degraded=degraded, arrived=arrived)
        yield self._delta(request, response.answer, _tokens(generation))
        response.answer = ""
        yield pb.InferStreamResponse(final=response)

    async def _relay(
        self, request: pb.InferRequest, hop: pb.Hop, served: _Served, deadline: float | None, placing: PlacementRequest
    ) -> AsyncGenerator[pb.InferStreamResponse, None]:
        """The next tier's stream through a candidate the placement picks; nothing at all when no candidate may be
        used or the chosen one failed before its first event: the caller then answers degraded."""
        with self.links.slot(placing) as slot:
            if slot is None:
                return
            try:
                async with aclosing(self._forward_stream(request, hop, served, deadline, slot, placing)) as events:
                    async for event in events:
                        yield event
            except UpstreamUnavailable as exc:  # raised before any event: later failures are StreamInterrupted
                logger.warning("tier %s answers request %s itself: %s", self.name, request.request_id, exc)

    # Progressive inference (PICE): see recserve.core.progressive.

    def _progressive_decision(self, request: pb.InferRequest) -> ProgressiveDecision | None:
        """The scheduler's path for a GENERATE request this tier decides on; None where there is no choice to make."""
        if (
            self.progressive is None
            or request.task != pb.TASK_KIND_GENERATE
            or request.offload != pb.OFFLOAD_MODE_AUTO
            or not self.links
        ):
            return None
        max_tokens = request.sampling.max_tokens or self.limits.default_max_tokens
        return self.progressive.decide(question_of(request), max_tokens, self._last_upstream_load())

    def _count_path(self, decision: ProgressiveDecision | None) -> bool:
        """Count a local or cloud-direct decision; whether the request goes to the next tier without generating."""
        if decision is None or decision.path is ProgressivePath.PROGRESSIVE:
            return False
        self.metrics.count_progressive(decision.path, "served")
        return decision.path is ProgressivePath.CLOUD_DIRECT

    async def _progressive(
        self,
        request: pb.InferRequest,
        family: str,
        decision: ProgressiveDecision,
        deadline: float | None,
        arrived: float,
    ) -> AsyncGenerator[str | pb.InferResponse, None]:
        """Answer by a sketch from the next tier, its points expanded here concurrently: each point's text in order as
        it is ready, then the response (its answer empty). Raises _ProgressiveFallback where no whole answer can be
        had this way; points already yielded are then all the caller has."""
        options = self.progressive_options
        question = conversation_of(request)
        own = len(request.hops)
        hop = pb.Hop(tier=self.name, decision=pb.DECISION_PROGRESSIVE)
        ask = self._part_request(request, hop, arrived, pb.TASK_KIND_SKETCH, "sketch")
        ask.sketch.max_points = min(decision.max_points, self.limits.max_sketch_points)
        ask.sketch.max_words = options.max_words
        try:
            sketch = await self._ask_up(ask, request, family, hop, deadline, arrived)
        except UpstreamUnavailable as exc:
            logger.warning("tier %s answers request %s itself: no sketch: %s", self.name, request.request_id, exc)
            raise _ProgressiveFallback("sketch_failed", degraded=True) from None
        points = tuple(sketch.points)
        if not points:
            raise _ProgressiveFallback("unparsable", degraded=False)
        hop.progressive.points.extend(points)
        hop.progressive.sketched_by = sketch.answered_by
        hop.progressive.sketch_tokens = sketch.usage.completion_tokens
        max_tokens = request.sampling.max_tokens or self.limits.default_max_tokens
        point_tokens = options.point_max_tokens or max(16, max_tokens // len(points))
        started = self._clock()
        # Every point at once: the engine batches them (vLLM) or queues them (llama.cpp's one context).
        tasks = [
            asyncio.ensure_future(
                self._point(request, family, question, points, index, point_tokens, hop, deadline, arrived)
            )
            for index in range(len(points))
        ]
        written: list[_Point] = []
        try:
            for index, task in enumerate(tasks):
                point = await task
                written.append(point)
                hop.progressive.expansions.append(point.expansion)
                yield assemble_point(index, points[index], point.text)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        hop.engine_seconds = self._clock() - started
        # The answer is as sure as its least sure point, each as the tier that wrote it scored it.
        hop.confidence = min(p.repair.confidence.value if p.repair else p.confidence for p in written)
        repairs = [p.repair for p in written if p.repair is not None]
        response = pb.InferResponse(
            request_id=request.request_id,
            answered_by=self.name,
            confidence=pb.Confidence(value=hop.confidence),
            hops=[*request.hops, hop, *sketch.hops[own + 1 :], *(h for r in repairs for h in r.hops[own + 1 :])],
            usage=pb.Usage(
                prompt_tokens=sum(p.prompt_tokens for p in written),
                completion_tokens=sum(p.completion_tokens for p in written),
            ),
            finish_reason="stop",
        )
        kept = [p for p in written if p.repair is None]
        self.metrics.count_progressive(decision.path, "served")
        ensemble = sum(p.expansion.ensemble_kept for p in kept)
        self.metrics.count_points(kept=len(kept) - ensemble, repaired=len(repairs), ensemble=ensemble)
        self.metrics.count_cloud_tokens_saved(sum(p.completion_tokens for p in kept) - hop.progressive.sketch_tokens)
        self.metrics.count_outcome("answered")
        served = _Served(family, answered_here=True, sender=sender(request), confidence=hop.confidence)
        self._remember(request.request_id, served)
        self._count_requirement(request, arrived)
        yield response

    async def _point(
        self,
        request: pb.InferRequest,
        family: str,
        question: str | tuple[ChatMessage, ...],
        points: Sequence[str],
        index: int,
        max_tokens: int,
        hop: pb.Hop,
        deadline: float | None,
        arrived: float,
    ) -> _Point:
        """Point `index` of the sketch: expanded here, and written again when this tier's expansion is among the least
        confident (PointWindows) or failed: first by the second model (`ensemble`), when there is one, whose
        expansion is kept if it clears the same threshold; else by the next tier. A failed repair keeps the more
        confident of this tier's expansions; with none, _ProgressiveFallback: the answer never has a hole."""
        wanted = expand_request(
            question, points, index, max_tokens=max_tokens, temperature=request.sampling.temperature
        )
        expansion = pb.PointExpansion()
        window = self._family_window(family)
        local = await self._expand(wanted, expansion, hop, deadline, request, index)
        if local is not None:
            expansion.confidence = _finite(local.confidence)
            expansion.completion_tokens = local.completion_tokens
            unsure, threshold = self._point_windows.judge(window, local.confidence)
            expansion.threshold = _finite(threshold)
            if not unsure and local.text.strip():
                return local
        best = local if local is not None and local.text.strip() else None
        if self.ensemble is not None:
            second = await self._expand(wanted, expansion, hop, deadline, request, index, self.ensemble)
            if second is not None and second.text.strip():
                expansion.ensemble_confidence = _finite(second.confidence)
                threshold = self._point_windows.threshold(window)
                expansion.threshold = _finite(threshold)
                if second.confidence >= threshold:
                    expansion.ensemble_kept = True
                    return second
                if best is None or second.confidence > best.confidence:
                    best = second
        ask = self._part_request(request, hop, arrived, pb.TASK_KIND_EXPAND, f"point-{index}")
        ask.expand.points.extend(points)
        ask.expand.index = index
        ask.sampling.max_tokens = max_tokens
        try:
            repair = await self._ask_up(ask, request, family, hop, deadline, arrived)
        except UpstreamUnavailable as exc:
            if best is not None:
                expansion.ensemble_kept = best is not local
                return best
            logger.warning("tier %s: point %d of request %s was written nowhere: %s", self.name, index,
                           request.request_id, exc)  # fmt: skip
            raise _ProgressiveFallback("point_failed", degraded=True) from None
        expansion.repaired_by = repair.answered_by
        return _Point(
            repair.answer,
            expansion,
            repair.usage.prompt_tokens,
            repair.usage.completion_tokens,
            repair.confidence.value,
            repair,
        )

    async def _expand(
        self,
        wanted: GenerationRequest,
        expansion: pb.PointExpansion,
        hop: pb.Hop,
        deadline: float | None,
        request: pb.InferRequest,
        index: int,
        engine: Engine | None = None,
    ) -> _Point | None:
        """One point written by this tier's engine (or `engine`), its time and energy booked in `expansion` and
        `hop`; None when the engine failed."""
        started = self._clock()
        try:
            generation, seconds = await self._generate(wanted, deadline, engine)
        except RecServeError as exc:
            logger.warning("tier %s could not expand point %d of request %s%s: %s", self.name, index,
                           request.request_id, " on its second model" if engine else "", exc)  # fmt: skip
            expansion.engine_seconds += self._clock() - started
            return None
        expansion.engine_seconds += seconds
        joules = self._inference_joules(generation, seconds)
        hop.inference_joules += joules
        self.metrics.count_energy("inference", joules)
        score = self._score_generation(generation)
        return _Point(generation.text, expansion, generation.prompt_tokens, generation.completion_tokens, score.value)

    def _part_request(
        self, request: pb.InferRequest, hop: pb.Hop, arrived: float, task: pb.TaskKind, part: str
    ) -> pb.InferRequest:
        """A sketch or a point to ask of the next tier for `request`, under an id of its own (the parts are asked
        at once, and a tier serves one request an id at a time)."""
        ask = self._forwarded_request(request, hop, arrived)
        ask.request_id = f"{request.request_id[: self.limits.max_request_id_chars - len(part) - 1]}/{part}"
        ask.task = task
        ask.ClearField("reference")  # a part is not the answer the reference is for
        ask.sampling.ClearField("stop")
        ask.sampling.ClearField("max_tokens")
        ask.sampling.logprobs = False
        return ask

    async def _ask_up(
        self,
        ask: pb.InferRequest,
        request: pb.InferRequest,
        family: str,
        hop: pb.Hop,
        deadline: float | None,
        arrived: float,
    ) -> pb.InferResponse:
        """Send a part up a candidate the placement picks; its bytes and energy go into `hop` and the metrics."""
        placing = self._placement_request(request, family, arrived)
        with self.links.slot(placing) as slot:
            if slot is None:
                raise UpstreamUnavailable(f"tier {self.name} may not forward now (breakers open or every slot taken)")
            sent_at = self._clock()
            try:
                # A part is a fraction of an answer's work: its quick reply must not teach the forward timeout, which
                # whole answers (cloud-direct, the cascade) then could not meet.
                reply = await self._call_upstream(slot, ask, deadline, learns=False)
            except UpstreamUnavailable:
                self.links.observe(placing, slot, _failed(self._clock() - sent_at))
                raise
            response = reply.response
            # The hop stands for the sketch and every repair: each call's bytes and energy add up in it.
            hop.bytes_sent += reply.bytes_sent
            hop.bytes_received += reply.bytes_received
            hop.transmission_joules += self._count_link(
                slot.link, response.answered_by, reply.bytes_sent, reply.bytes_received
            )
            self._note_load(response)
            # A part's quick reply is not what the candidate takes to answer a request, which is what the placement
            # learns its processing time and energy from: only its failures are told.
            return response

    async def _write_part(
        self, request: pb.InferRequest, family: str, deadline: float | None, arrived: float
    ) -> pb.InferResponse:
        """A sketch or one point of it, for a tier below that answers progressively: written here, never forwarded,
        and kept out of the offload policy's windows (a part is not an answer to a client)."""
        question = conversation_of(request)
        temperature = request.sampling.temperature
        if request.task == pb.TASK_KIND_SKETCH:
            max_words = request.sketch.max_words or self.progressive_options.max_words or SKETCH_MAX_WORDS
            wanted = sketch_request(question, request.sketch.max_points, max_words, temperature=temperature)
        else:
            max_tokens = request.sampling.max_tokens or self.limits.default_max_tokens
            points = tuple(request.expand.points)
            wanted = expand_request(question, points, request.expand.index, max_tokens=max_tokens,
                                    temperature=temperature)  # fmt: skip
        generation, engine_seconds = await self._generate(wanted, deadline)
        score = self._score_generation(generation)
        hop = pb.Hop(
            tier=self.name,
            confidence=_finite(score.value),
            engine_seconds=engine_seconds,
            decision=pb.DECISION_ANSWERED,
            inference_joules=self._inference_joules(generation, engine_seconds),
        )
        self.metrics.count_energy("inference", hop.inference_joules)
        response = pb.InferResponse(
            request_id=request.request_id,
            answer=generation.text,
            answered_by=self.name,
            confidence=_confidence_message(score),
            hops=[*request.hops, hop],
            usage=pb.Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
            finish_reason=generation.finish_reason,
        )
        if request.task == pb.TASK_KIND_SKETCH:
            try:
                truncated = generation.finish_reason == "length"
                response.points.extend(parse_sketch(generation.text, request.sketch.max_points, truncated=truncated))
            except SketchParseError as exc:
                # The tier below answers the request itself; the count says how often a model's sketches fail.
                logger.warning("tier %s wrote a sketch that does not parse: %s", self.name, exc)
            self.metrics.count_sketch(parsed=bool(response.points))
        self.metrics.count_outcome("answered")
        self._count_requirement(request, arrived)
        return response

    @contextmanager
    def _counted_in_flight(self) -> Iterator[None]:
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    def _finish(self, request: pb.InferRequest, response: pb.InferResponse) -> None:
        """Stamp this tier's load on its reply, what a tier below weighs before it sends more (each tier stamps over
        the load of the tier above, which it noted); tell the progressive scheduler how long the answer was."""
        response.load.in_flight = self._in_flight
        response.load.capacity = self.capacity
        if self.progressive is not None and request.task == pb.TASK_KIND_GENERATE:
            max_tokens = request.sampling.max_tokens or self.limits.default_max_tokens
            self.progressive.observe_answer(response.usage.completion_tokens, max_tokens)

    def _note_load(self, response: pb.InferResponse) -> None:
        if response.HasField("load"):
            load = UpstreamLoad(response.load.in_flight, response.load.capacity)
            self._upstream_load = (load, self._clock())

    def _last_upstream_load(self) -> UpstreamLoad | None:
        if self._upstream_load is None:
            return None
        load, at = self._upstream_load
        age = self._clock() - at
        if age > self.progressive_options.load_max_age_seconds:
            return None
        return UpstreamLoad(load.in_flight, load.capacity, age)

    def _check_requirement(self, request: pb.InferRequest, deadline: float | None, arrived: float) -> None:
        """A client's requirement must be one the call's deadline leaves room for; a forwarded one was checked below
        (and is cut to this tier's deadline if the link took a little of it)."""
        if not request.HasField("requirement_seconds") or request.hops:
            return
        requirement = request.requirement_seconds
        if deadline is not None and requirement > deadline - arrived:
            raise InvalidRequest(
                f"requirement_seconds {requirement:g} is beyond the call's deadline of {deadline - arrived:.3g} s: "
                "ask for an answer within the time the call may take, or give the call a later deadline"
            )

    def _placement_request(
        self, request: pb.InferRequest, family: str, arrived: float, generation: Generation | None = None
    ) -> PlacementRequest:
        return PlacementRequest(
            family=family,
            requirement_seconds=self._requirement_left(request, arrived),
            service_class=request.service_class,
            prompt_tokens=generation.prompt_tokens if generation is not None else 0,
            max_tokens=request.sampling.max_tokens or self.limits.default_max_tokens,
        )

    def _requirement_left(self, request: pb.InferRequest, arrived: float) -> float | None:
        if not request.HasField("requirement_seconds"):
            return None
        return request.requirement_seconds - (self._clock() - arrived)

    def _skips_engine(self, request: pb.InferRequest) -> bool:
        """A request for the last tier passes the tiers below without their engines."""
        return request.offload == pb.OFFLOAD_MODE_LAST_TIER and bool(self.links)

    def _answers_whatever(self, request: pb.InferRequest) -> bool:
        return self.is_last or request.offload == pb.OFFLOAD_MODE_LOCAL_ONLY

    async def _generate(
        self, wanted: GenerationRequest, deadline: float | None, engine: Engine | None = None
    ) -> tuple[Generation, float]:
        """The engine's (or `engine`'s) generation within the deadline, and its seconds; its failures as the tier's
        errors."""
        started = self._clock()
        remaining = self._remaining(deadline)
        try:
            generation = await asyncio.wait_for((engine or self.engine).generate(wanted), remaining)
        except TimeoutError:
            raise DeadlineExceeded(f"tier {self.name}: the deadline passed while the engine was generating") from None
        except EngineError as exc:
            raise self._engine_error(exc) from None
        return generation, self._clock() - started

    async def _engine_stream(
        self, request: pb.InferRequest, deadline: float | None
    ) -> AsyncGenerator[TextDelta | Generation, None]:
        """The engine's stream within the deadline; closing this closes the engine's, which aborts the generation."""
        stream = self.engine.stream(self._generation_request(request))
        finished = False
        try:
            while True:
                try:
                    item = await _next_within(stream, self._remaining(deadline))
                except StopAsyncIteration:
                    finished = True
                    return
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"tier {self.name}: the deadline passed while the engine was generating"
                    ) from None
                except EngineError as exc:
                    finished = True  # failed, not stopped: Unavailable says so
                    raise self._engine_error(exc) from None
                yield item
        finally:
            await _close(stream)
            if not finished:
                self.metrics.count_aborted_generation()

    def _engine_error(self, exc: EngineError) -> RecServeError:
        if isinstance(exc, UnknownPromptError):
            return NotFound(str(exc))
        return Unavailable(f"tier {self.name}: engine failed: {exc}")

    def _decide(
        self, request: pb.InferRequest, family: str, generation: Generation, engine_seconds: float
    ) -> tuple[Score, Verdict, pb.Hop]:
        choice = request.task == pb.TASK_KIND_CHOICE
        score = self._score_choice(generation, list(request.options)) if choice else self._score_generation(generation)
        lower = tuple(hop.confidence for hop in request.hops)
        first = request.hops[0] if request.hops else None
        verdict = self.policy.decide(
            family,
            score.value,
            is_last=self._answers_whatever(request),
            lower=lower,
            byte_price=first.byte_price if first is not None and first.HasField("byte_price") else None,
        )
        self.metrics.observe_decision(family, score.value, verdict.threshold, engine_seconds)
        hop = pb.Hop(
            tier=self.name,
            confidence=score.value,
            threshold=verdict.threshold,
            engine_seconds=engine_seconds,
            answer=generation.text[: self.limits.max_answer_chars],
            decision=pb.DECISION_FORWARDED if verdict.forward and self.links else pb.DECISION_ANSWERED,
            inference_joules=self._inference_joules(generation, engine_seconds),
        )
        if verdict.byte_price is not None:
            hop.byte_price = verdict.byte_price
        self.metrics.count_energy("inference", hop.inference_joules)
        return score, verdict, hop

    def _inference_joules(self, generation: Generation, engine_seconds: float) -> float:
        # An emulated server knows its request's share of its busy time and energy (its wall time includes its queue
        # and steps shared with other requests): recserve.engines.emulated.
        if "emulated_joules" in generation.metadata:
            return float(generation.metadata["emulated_joules"])
        watts = self.power.watts() if self.power is not None else None
        return self.energy.inference_joules(engine_seconds, generation.completion_tokens, watts)

    def _answer_here(
        self,
        request: pb.InferRequest,
        family: str,
        generation: Generation,
        score: Score,
        hop: pb.Hop,
        *,
        degraded: bool,
        arrived: float,
    ) -> pb.InferResponse:
        # The next tier is down, hung, too slow or overloaded, or enough requests already wait on it: the client
        # still gets this tier's answer, marked degraded.
        hop.decision = pb.DECISION_DEGRADED if degraded else pb.DECISION_ANSWERED
        lower = tuple(h.confidence for h in request.hops)
        self.policy.observe_cost(
            family,
            size=request.ByteSize() + hop.ByteSize(),
            spent=(),
            lower=lower,
            answer_sizes=(len(hop.answer.encode()),),
        )
        response = pb.InferResponse(
            request_id=request.request_id,
            answer=generation.text,
            chosen_option=score.chosen_option or "",
            answered_by=self.name,
            confidence=_confidence_message(score),
            hops=[*request.hops, hop],
            usage=pb.Usage(prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens),
            degraded=degraded,
            finish_reason=generation.finish_reason,
        )
        if request.sampling.logprobs:
            response.logprobs.extend(_token_logprobs(_tokens(generation)))
        served = _Served(family, answered_here=True, sender=sender(request), confidence=score.value)
        self._remember(request.request_id, served)
        if request.reference:
            self._record_verdict(served, _judge(request, response))
        self.metrics.count_outcome("degraded" if degraded else "answered")
        self._count_requirement(request, arrived)
        return response

    def _count_requirement(self, request: pb.InferRequest, arrived: float) -> None:
        left = self._requirement_left(request, arrived)
        if left is not None:
            self.metrics.count_requirement(met=left >= 0)
        self._account_idle()

    def _account_idle(self) -> None:
        """Idle power over the time since the last request ended: the tier's share of PerLLM's E_idle."""
        if not self.energy.idle_watts:
            return
        now = self._clock()
        if self._idle_since is not None:
            self.metrics.count_energy("idle", self.energy.idle_watts * max(now - self._idle_since, 0.0))
        self._idle_since = now

    def _delta(
        self, request: pb.InferRequest, text: str, tokens: Iterable[tuple[str, float]]
    ) -> pb.InferStreamResponse:
        delta = pb.TokenDelta(text=text, tier=self.name)
        if request.sampling.logprobs:
            delta.logprobs.extend(_token_logprobs(tokens))
        return pb.InferStreamResponse(delta=delta)

    def _held_delta(self, request: pb.InferRequest, held: list[TextDelta]) -> pb.InferStreamResponse:
        return self._delta(request, "".join(d.text for d in held), [token for d in held for token in d.tokens])

    def _unscored_hop(self) -> pb.Hop:
        return pb.Hop(tier=self.name, decision=pb.DECISION_FORWARDED)

    async def _forward_unscored(
        self, request: pb.InferRequest, family: str, deadline: float | None, arrived: float
    ) -> pb.InferResponse:
        """Pass a request for the last tier on without generating; the policy neither decides nor learns from it."""
        served = _Served(family, False, sender(request), 0.0, learns=False, arrived=arrived)
        placing = self._placement_request(request, family, arrived)
        with self.links.slot(placing) as slot:
            if slot is None:
                raise UpstreamUnavailable(f"tier {self.name} may not forward now (breakers open or every slot taken)")
            return await self._forward(request, self._unscored_hop(), served, deadline, slot, placing)

    def _forwarded_request(self, request: pb.InferRequest, hop: pb.Hop, arrived: float) -> pb.InferRequest:
        """The request as the next tier gets it: with this tier's hop, and what is left of its requirement."""
        forwarded = pb.InferRequest()
        forwarded.CopyFrom(request)
        forwarded.hops.append(hop)
        left = self._requirement_left(request, arrived)
        if left is not None and left > 0:
            forwarded.requirement_seconds = left
        else:
            forwarded.ClearField("requirement_seconds")  # none, or already missed: nothing left to meet
        return forwarded

    async def _forward(
        self,
        request: pb.InferRequest,
        hop: pb.Hop,
        served: _Served,
        deadline: float | None,
        slot: Slot,
        placing: PlacementRequest,
    ) -> pb.InferResponse:
        forwarded = self._forwarded_request(request, hop, served.arrived)
        sent_at = self._clock()
        try:
            reply = await self._call_upstream(slot, forwarded, deadline)
        except UpstreamUnavailable:
            self.links.observe(placing, slot, _failed(self._clock() - sent_at))
            raise
        response = self._forwarded(request, hop, served, slot, reply.response, reply.bytes_sent, reply.bytes_received)
        self.links.observe(placing, slot, self._outcome(placing, response, len(request.hops), self._clock() - sent_at))
        return response

    def _outcome(
        self, placing: PlacementRequest, response: pb.InferResponse, own: int, seconds: float
    ) -> PlacementOutcome:
        """What the candidate gave: its time as seen here, and the energy of this link and every hop above."""
        above = response.hops[own + 1 :]
        transmission = response.hops[own].transmission_joules + sum(hop.transmission_joules for hop in above)
        energy = transmission + sum(hop.inference_joules for hop in above)
        met = placing.requirement_seconds is None or seconds <= placing.requirement_seconds
        return PlacementOutcome(seconds=seconds, energy_joules=energy, met=met, transmission_joules=transmission)

    def _forwarded(
        self,
        request: pb.InferRequest,
        hop: pb.Hop,
        served: _Served,
        slot: Slot,
        response: pb.InferResponse,
        bytes_sent: int,
        bytes_received: int,
        answer: str | None = None,
    ) -> pb.InferResponse:
        """Record what the next tier's answer cost and showed: this tier's hop bytes and energy, metrics, and the
        policy's lessons. `answer`: the streamed text, where the response itself leaves it out."""
        own = len(request.hops)
        if len(response.hops) <= own or response.hops[own].tier != self.name:
            raise Unavailable(f"tier {self.name}: the next tier returned a response without this tier's hop")
        self._note_load(response)
        mine = response.hops[own]
        mine.bytes_sent = bytes_sent
        mine.bytes_received = bytes_received
        above = response.hops[own + 1].tier if len(response.hops) > own + 1 else ""
        mine.transmission_joules = self._count_link(slot.link, above, bytes_sent, bytes_received)
        if served.learns:
            # Each hop below the answering one records the bytes of the link above it: what this request cost. A tier
            # that answered progressively asked the tier above for parts: those bytes count, but the request did not
            # cross that link (it is not a cloud-only reply), so they go to the last link it crossed.
            hops = response.hops
            answering = next(
                (i for i in range(own + 1, len(hops)) if hops[i].tier == response.answered_by), len(hops) - 1
            )
            spent = [h.bytes_sent + h.bytes_received for h in hops[own:answering]]
            if spent:
                spent[-1] += hops[answering].bytes_sent + hops[answering].bytes_received
            lower = tuple(h.confidence for h in request.hops)
            self.policy.observe_cost(
                served.family,
                size=request.ByteSize() + hop.ByteSize(),
                spent=spent,
                lower=lower,
                answer_sizes=[len(h.answer.encode()) for h in hops[own : answering + 1]],
            )
        served.link = slot.index
        self._remember(request.request_id, served)
        if request.reference and served.learns:
            # Judged here too, so this tier's policy learns how the tiers above fare on what it forwards.
            judged = response if answer is None else _with_answer(response, answer)
            self._observe_upstream_verdict(served, _judge(request, judged))
        self.metrics.count_outcome("forwarded")
        self._count_requirement(request, served.arrived)
        return response

    def _count_link(self, link: Link, above: str, sent: int, received: int) -> float:
        """Count one call up `link` in the metrics (bytes under the link's peer label, learned from `above`, the tier
        that answered) and return its transmission energy, counted too."""
        link.learn_peer_name(above)
        self.metrics.count_bytes(link.peer_name, sent=sent, received=received)
        transmission = self.energy.transmission_joules(sent + received)
        self.metrics.count_energy("transmission", transmission)
        return transmission

    async def _forward_stream(
        self,
        request: pb.InferRequest,
        hop: pb.Hop,
        served: _Served,
        deadline: float | None,
        slot: Slot,
        placing: PlacementRequest,
    ) -> AsyncGenerator[pb.InferStreamResponse, None]:
        """Relay the next tier's answer stream. Before its first event, a failure is UpstreamUnavailable (the caller
        answers degraded); after, StreamInterrupted, or DeadlineExceeded when the caller's deadline ran out."""
        link = slot.link
        forwarded = self._forwarded_request(request, hop, served.arrived)
        remaining = self._remaining(deadline)
        timeout = link.forward_timeout.seconds
        limit = min(timeout, PROBE_WAIT_SECONDS) if slot.breaker_probe else timeout
        # The first event must come within the forward timeout, leaving a little of the caller's time to answer
        # here; the stream as a whole may take all the caller's time.
        first_limit = min(limit, remaining * 0.9) if remaining is not None else limit
        sent_at = self._clock()
        stream = link.upstream.infer_stream(forwarded, remaining, wait_for_ready=slot.breaker_probe)
        received = 0
        texts: list[str] = []
        judged = False
        try:
            try:
                event = await _next_within(stream, first_limit)
                received += event.size
                while event.message.WhichOneof("event") == "delta":
                    texts.append(event.message.delta.text)
                    yield event.message
                    event = await _next_within(stream, self._remaining(deadline))
                    received += event.size
            except TimeoutError:
                if texts:
                    raise DeadlineExceeded(f"tier {self.name}: the deadline passed while the answer streamed") from None
                raise UpstreamTimedOut(f"next tier sent nothing within {first_limit:.2f} s") from None
            except StopAsyncIteration:
                raise UpstreamUnavailable("the next tier ended its stream without a final response") from None
            if event.message.WhichOneof("event") != "final":
                raise UpstreamUnavailable("the next tier sent a stream event of an unknown kind")
        except UpstreamUnavailable as exc:
            caller_ran_out = deadline is not None and deadline - self._clock() <= 0
            if not caller_ran_out:
                self._judge_upstream(link, ok=False)
                judged = True
            self.links.observe(placing, slot, _failed(self._clock() - sent_at))
            if texts:
                if caller_ran_out:
                    raise DeadlineExceeded(f"tier {self.name}: the deadline passed while the answer streamed") from None
                raise StreamInterrupted(
                    f"tier {self.name}: the next tier failed after {len(texts)} parts of its answer were sent; "
                    f"the answer is incomplete: {exc}"
                ) from None
            raise
        finally:
            await _close(stream)  # when the caller went away, so does the call up
            if slot.breaker_probe and not judged and link.breaker is not None:
                link.breaker.release_probe()
        self._judge_upstream(link, ok=True)
        judged = True
        final = event.message.final
        response = self._forwarded(
            request, hop, served, slot, final, forwarded.ByteSize(), received, answer="".join(texts)
        )
        self.links.observe(placing, slot, self._outcome(placing, response, len(request.hops), self._clock() - sent_at))
        yield pb.InferStreamResponse(final=response)

    async def _call_upstream(
        self, slot: Slot, forwarded: pb.InferRequest, deadline: float | None, *, learns: bool = True
    ) -> Reply:
        """Send `forwarded` up `slot`'s link within its forward timeout, and tell the breaker and the timeout what the
        call showed of the next tier. Only the next tier's own failures and slowness count against it: not a timeout
        that the caller's deadline set, nor a verdict on the request, nor a cancelled call. `learns`: the reply's
        latency counts toward the forward timeout (False for a part of an answer, far shorter than a whole one)."""
        link = slot.link
        limit = link.forward_timeout.seconds
        if slot.breaker_probe:
            # A breaker's probe waits a little for the link to come up instead of failing at once on a
            # connection still backing off; otherwise a tier that came back could be missed for a long time.
            limit = min(limit, PROBE_WAIT_SECONDS)
        call: asyncio.Future[Reply] | None = None
        judged = False  # whether the breaker has counted this call
        callers_budget = False
        try:
            remaining = self._remaining(deadline)
            # Keep a little of the caller's time to answer locally if the next tier does not answer in time.
            callers_budget = remaining is not None and remaining * 0.9 < limit
            budget = remaining * 0.9 if remaining is not None and callers_budget else limit
            started = self._clock()
            call = asyncio.ensure_future(link.upstream.infer(forwarded, budget, wait_for_ready=slot.breaker_probe))
            if link.breaker is not None:
                # Counted as slow as soon as it is, while still waiting: a hung next tier opens the breaker after
                # half the timeout, before the calls it holds time out.
                await asyncio.wait((call,), timeout=link.forward_timeout.slow_after)
                if not call.done():
                    self._judge_upstream(link, ok=False)
                    judged = True
            reply = await call
        except UpstreamUnavailable as exc:
            if not judged and not (isinstance(exc, UpstreamTimedOut) and callers_budget):
                self._judge_upstream(link, ok=False)
                judged = True
            raise
        else:
            if learns:
                link.forward_timeout.observe(self._clock() - started)
            if not judged:
                self._judge_upstream(link, ok=True)
                judged = True
            return reply
        finally:
            if call is not None:
                call.cancel()  # when the caller went away, so does the call up
            if slot.breaker_probe and not judged and link.breaker is not None:
                link.breaker.release_probe()

    def _judge_upstream(self, link: Link, *, ok: bool) -> None:
        if link.breaker is None:
            return
        if ok:
            link.breaker.record_success()
        else:
            link.breaker.record_failure()
        # Open while any candidate's breaker is: the gauge says the tier cannot reach all it may forward to.
        breakers = [candidate.breaker for candidate in self.links.links if candidate.breaker is not None]
        self.metrics.set_breaker_open(any(not breaker.closed for breaker in breakers))

    async def feedback(self, request: pb.FeedbackRequest) -> pb.FeedbackResponse:
        if not request.request_id:
            raise InvalidRequest("request_id is empty: name the request whose answer you are judging")
        if len(request.request_id) > self.limits.max_request_id_chars:
            raise InvalidRequest(f"request_id is longer than {self.limits.max_request_id_chars} characters")
        served = self._served.get(request.request_id)
        if served is None:
            raise NotFound(
                f"tier {self.name} has no record of request {excerpt(request.request_id)}: feedback must name a "
                f"request id returned by this stack, among the last {self._feedback_memory}"
            )
        if not served.answered_here:
            if served.link >= len(self.links.links):  # pragma: no cover - a last tier answers everything it serves
                raise FailedPrecondition(f"tier {self.name} forwarded a request but has no next tier")
            link = self.links.links[served.link]
            reply = await link.upstream.feedback(request, None)
            self.metrics.count_bytes(link.peer_name, sent=reply.bytes_sent, received=reply.bytes_received)
            self._observe_upstream_verdict(served, request.correct)
            return reply.response
        if served.judged:
            raise FailedPrecondition(
                f"request {excerpt(request.request_id)} was already judged (from its reference or earlier feedback)"
            )
        self._record_verdict(served, request.correct)
        return pb.FeedbackResponse(recorded_by=self.name)

    def _observe_upstream_verdict(self, served: _Served, correct: bool) -> None:
        if not served.learns:
            return
        self.policy.observe_verdict(
            served.family, served.confidence, correct, answered_here=False, probe_rate=served.probe_rate
        )

    def _record_verdict(self, served: _Served, correct: bool) -> None:
        served.judged = True
        self.metrics.count_verdict(served.family, correct)
        self.policy.observe_verdict(served.family, served.confidence, correct, answered_here=True)

    def sender_of(self, request_id: str) -> str:
        served = self._served.get(request_id)
        return served.sender if served else "client"

    @contextmanager
    def _request_id_held(self, request: pb.InferRequest) -> Iterator[None]:
        """Give the request a fresh id, or refuse the caller's if this tier already serves or remembers a request
        by it; hold the id while the request is served.

        Refused rather than replaced: the id is the caller's handle for Feedback, and a verdict sent under a reused
        id would judge the earlier request again.
        """
        request_id = request.request_id
        if not request_id:
            request_id = request.request_id = self._new_request_id()
        elif request_id in self._ids_in_flight or request_id in self._served:
            raise InvalidRequest(
                f"request_id {excerpt(request_id)} is already in use at tier {self.name}: send a fresh id, "
                "or none to get one"
            )
        self._ids_in_flight.add(request_id)
        try:
            yield
        finally:
            self._ids_in_flight.discard(request_id)

    def _family_window(self, family: str) -> str:
        """The policy window and metric series of a family whose request was served: its own for the first
        max_families families, kept for the life of the tier; the shared overflow window for any other."""
        if family in self._families:
            return family
        if len(self._families) < self.limits.max_families:
            self._families.add(family)
            return family
        return OVERFLOW_FAMILY

    def _remember(self, request_id: str, served: _Served) -> _Served:
        self._served[request_id] = served
        self._served.move_to_end(request_id)
        while len(self._served) > self._feedback_memory:
            self._served.popitem(last=False)
        return served

    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise DeadlineExceeded(f"tier {self.name}: the caller's deadline has passed")
        return remaining

    def _generation_request(self, request: pb.InferRequest) -> GenerationRequest:
        sampling = request.sampling
        return GenerationRequest(
            prompt=request.prompt,
            system_prompt=request.system_prompt,
            messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
            max_tokens=sampling.max_tokens or self.limits.default_max_tokens,
            temperature=sampling.temperature,
            stop=tuple(sampling.stop),
            options=tuple(request.options),
        )


async def _next_within(stream: AsyncIterator[T], timeout: float | None) -> T:
    """The stream's next item, or TimeoutError after `timeout` seconds (None: no limit)."""
    # asyncio.timeout, not wait_for: no task for every item of every stream, which under load cost each hop's CPU.
    # It spans the await alone, never a yield, so it only ever cancels the stream's own step.
    async with asyncio.timeout(timeout):
        return await anext(stream)


async def _close(stream: AsyncIterator[object]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _failed(seconds: float) -> PlacementOutcome:
    return PlacementOutcome(seconds=seconds, energy_joules=0.0, met=False, failed=True)


def _tokens(generation: Generation) -> tuple[tuple[str, float], ...]:
    # Engines that do not know their tokens' texts (a replayed answer) report none.
    return tuple(zip(generation.tokens, generation.token_logprobs, strict=True)) if generation.tokens else ()


def _token_logprobs(tokens: Iterable[tuple[str, float]]) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token=token, logprob=_finite(logprob)) for token, logprob in tokens]


def _with_answer(response: pb.InferResponse, answer: str) -> pb.InferResponse:
    whole = pb.InferResponse()
    whole.CopyFrom(response)
    whole.answer = answer
    return whole


def _judge(request: pb.InferRequest, response: pb.InferResponse) -> bool:
    chosen = response.chosen_option if request.task == pb.TASK_KIND_CHOICE else None
    return is_correct(request.reference, answer=response.answer, chosen_option=chosen)


def sender(request: pb.InferRequest) -> str:
    """Who passed this request to the current tier: the last hop's tier (once validated, one of the tier's
    callers), or the client."""
    return request.hops[-1].tier if request.hops else "client"


def _confidence_message(score: Score) -> pb.Confidence:
    return pb.Confidence(
        value=score.value,
        mean_logprob=_finite(score.mean_logprob),
        min_logprob=_finite(score.min_logprob),
        first_token_margin=_finite(score.first_token_margin),
    )


def _finite(value: float) -> float:
    # -inf log-probs (a token the model deemed impossible) are clamped so JSON clients can read them.
    return value if math.isfinite(value) else -1e9
