"""The emulated engine answers as its inner engine does, in the time a server of its profile would take.

Time is virtual: the engine's clock and sleep are a small discrete-event clock, so the tests check exact emulated
times without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncGenerator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from recserve.core.engine import Generation, GenerationRequest, TextDelta
from recserve.core.traces import TraceSet
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.engines.emulated import EmulatedEngine
from recserve.engines.profiles import PROFILES, ServerProfile, get_profile

T = TypeVar("T")

# 1000 prompt tokens a second, 10 ms a step alone, 4 at once, each more sequence adding half a step.
PROFILE = ServerProfile(
    name="test",
    prefill_tokens_per_s=1000.0,
    decode_tokens_per_s=100.0,
    batch_limit=4,
    batch_slowdown=0.5,
    busy_watts=110.0,
    busy_watts_at_limit=140.0,
    idle_watts=10.0,
)


class VirtualClock:
    """Sleeping tasks wake in order of their deadlines; time jumps to the next deadline once all are waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self._wakes: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._wakes, (self.now + max(seconds, 0.0), next(self._seq), future))
        await future

    async def run(self, awaitable: Awaitable[T]) -> T:
        task: asyncio.Future[T] = asyncio.ensure_future(awaitable)
        while not task.done():
            for _ in range(50):  # let every runnable task reach its next sleep
                await asyncio.sleep(0)
            if task.done() or not self._wakes:
                continue
            when = self._wakes[0][0]
            self.now = max(self.now, when)
            while self._wakes and self._wakes[0][0] <= when:
                future = heapq.heappop(self._wakes)[2]
                if not future.done():
                    future.set_result(None)
        return task.result()


class FakeEngine:
    """Answers every request with the same deltas and generation, at once."""

    name = "fake"

    def __init__(self, deltas: list[TextDelta], generation: Generation) -> None:
        self.deltas, self.generation = deltas, generation
        self.aborted = 0
        self.started = False
        self.requests: list[GenerationRequest] = []  # what was asked, in order

    async def start(self) -> None:
        self.started = True

    async def generate(self, request: GenerationRequest) -> Generation:
        return self.generation

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        self.requests.append(request)
        for delta in self.deltas:
            yield delta
        yield self.generation

    async def healthy(self) -> bool:
        return self.started

    async def shutdown(self) -> None:
        self.started = False


ANSWER = Generation(
    text="one two three four",
    token_logprobs=(-0.1, -0.2, -0.3, -0.4),
    first_top_logprobs=(("one", -0.1), ("won", -2.5)),
    option_logprobs=(-0.7, -1.2),
    chosen_option=None,
    prompt_tokens=200,
    completion_tokens=4,
    tokens=("one", " two", " three", " four"),
    finish_reason="length",
    metadata={"engine": "fake"},
)
DELTAS = [TextDelta("one", (("one", -0.1),)), TextDelta(" two three", ((" two", -0.2), (" three", -0.3)))]
# The fourth token comes after the last delta with text: the engine still spends its step.
DELTAS.append(TextDelta(" four", ((" four", -0.4),)))


def emulated(clock: VirtualClock, profile: ServerProfile = PROFILE, answer: Generation = ANSWER) -> EmulatedEngine:
    return EmulatedEngine(FakeEngine(DELTAS, answer), profile, clock=clock.time, sleep=clock.sleep)


async def timed_stream(
    clock: VirtualClock, engine: EmulatedEngine, request: GenerationRequest
) -> list[tuple[float, TextDelta | Generation]]:
    return [(clock.now, event) async for event in engine.stream(request)]


async def test_one_request_takes_prefill_then_a_step_per_token() -> None:
    clock = VirtualClock()
    engine = emulated(clock)
    generation = await clock.run(engine.generate(GenerationRequest(prompt="q")))
    # 200 prompt tokens at 1000/s, then 4 steps of 10 ms alone.
    assert clock.now == pytest.approx(0.2 + 4 * 0.01)
    assert float(generation.metadata["emulated_seconds"]) == pytest.approx(0.24)
    assert float(generation.metadata["emulated_queue_seconds"]) == 0.0
    assert float(generation.metadata["emulated_busy_seconds"]) == pytest.approx(0.24)
    # Power above idle at batch 1: 100 W for 0.24 s.
    assert float(generation.metadata["emulated_joules"]) == pytest.approx(24.0)
    assert generation.metadata["emulated_profile"] == "test"
    assert engine.busy_seconds == pytest.approx(0.24)
    assert engine.running == 0


async def test_the_inner_answer_and_log_probs_pass_through_unchanged() -> None:
    clock = VirtualClock()
    generation = await clock.run(emulated(clock).generate(GenerationRequest(prompt="q", options=("A", "B"))))
    assert {k: v for k, v in generation.metadata.items() if not k.startswith("emulated_")} == {"engine": "fake"}
    unchanged = [f for f in Generation.__dataclass_fields__ if f != "metadata"]
    assert all(getattr(generation, f) == getattr(ANSWER, f) for f in unchanged)


async def test_the_request_reaches_the_inner_engine_as_sent_grammar_included() -> None:
    clock = VirtualClock()
    engine = emulated(clock)
    request = GenerationRequest(prompt="q", stop=("\n",), grammar='root ::= "1. " [a-z]+')
    await clock.run(engine.generate(request))
    assert isinstance(engine.inner, FakeEngine)
    assert engine.inner.requests == [request]


async def test_the_stream_is_paced_by_the_decode_steps() -> None:
    clock = VirtualClock()
    events = await clock.run(timed_stream(clock, emulated(clock), GenerationRequest(prompt="q")))
    times = [round(t, 6) for t, _ in events]
    # Each delta after its own tokens' steps: 1 token, 2 tokens, 1 token; the generation last.
    assert times == [0.21, 0.23, 0.24, 0.24]
    assert [e.text for _, e in events[:-1] if isinstance(e, TextDelta)] == ["one", " two three", " four"]
    assert isinstance(events[-1][1], Generation)


async def test_a_replayed_answer_spreads_its_recorded_tokens_over_the_words() -> None:
    clock = VirtualClock()
    # Word deltas without tokens (a trace), 10 tokens recorded: 3, 3, 4 steps (integer spread).
    answer = Generation(text="a b c", token_logprobs=(-0.5,), prompt_tokens=0, completion_tokens=10)
    inner = FakeEngine([TextDelta("a"), TextDelta(" b"), TextDelta(" c")], answer)
    engine = EmulatedEngine(inner, PROFILE, clock=clock.time, sleep=clock.sleep)
    request = GenerationRequest(prompt="x" * 400)  # no prompt count reported: 4 characters a token, 100 tokens
    events = await clock.run(timed_stream(clock, engine, request))
    assert [round(t, 6) for t, _ in events] == [0.13, 0.16, 0.2, 0.2]


async def test_concurrent_requests_beyond_the_batch_limit_queue() -> None:
    clock = VirtualClock()
    engine = emulated(clock, ServerProfile("flat", 1000.0, 100.0, batch_limit=2, batch_slowdown=0.0, busy_watts=1.0,
                                           idle_watts=0.0))  # fmt: skip
    results = await clock.run(asyncio.gather(*(engine.generate(GenerationRequest(prompt="q")) for _ in range(5))))
    queued = sorted(float(g.metadata["emulated_queue_seconds"]) for g in results)
    # Two at a time, 0.24 s each (no slowdown): three waves.
    assert queued == pytest.approx([0.0, 0.0, 0.24, 0.24, 0.48])
    assert clock.now == pytest.approx(0.72)
    assert engine.running == 0
    assert engine.queued == 0
    # Shares of busy time add up to the time the server was busy, not to the requests' summed durations:
    # prefill counts whole, each step is shared by the sequences decoding (two, and the last one alone).
    assert engine.busy_seconds == pytest.approx(4 * (0.2 + 4 * 0.01 / 2) + (0.2 + 4 * 0.01))


async def test_replicas_serve_side_by_side_each_at_its_own_batch() -> None:
    clock = VirtualClock()
    engine = EmulatedEngine(FakeEngine(DELTAS, ANSWER), PROFILE, clock=clock.time, sleep=clock.sleep, replicas=2)
    await clock.run(asyncio.gather(*(engine.generate(GenerationRequest(prompt="q")) for _ in range(8))))
    # Eight at once on two servers of four: no queue, each step at a batch of four, 25 ms.
    assert clock.now == pytest.approx(0.2 + 4 * 0.025)
    assert engine.queued == 0


async def test_a_slowed_server_takes_longer_in_wall_time_but_spends_the_profiles_energy() -> None:
    clock = VirtualClock()
    engine = EmulatedEngine(FakeEngine(DELTAS, ANSWER), PROFILE, clock=clock.time, sleep=clock.sleep, speed=0.5)
    generation = await clock.run(engine.generate(GenerationRequest(prompt="q")))
    assert clock.now == pytest.approx(2 * 0.24)
    assert float(generation.metadata["emulated_busy_seconds"]) == pytest.approx(0.24)
    assert float(generation.metadata["emulated_joules"]) == pytest.approx(24.0)


async def test_the_step_cost_grows_with_the_batch() -> None:
    clock = VirtualClock()
    engine = emulated(clock)
    results = await clock.run(asyncio.gather(*(engine.generate(GenerationRequest(prompt="q")) for _ in range(4))))
    # Four at once: each step 10 ms * (1 + 0.5 * 3) = 25 ms.
    assert clock.now == pytest.approx(0.2 + 4 * 0.025)
    generation = results[0]
    assert generation.metadata["emulated_batch_max"] == "4"
    # A step of 25 ms shared by 4 at the limit's 130 W above idle; the prefill at batch 1's 100 W.
    assert float(generation.metadata["emulated_busy_seconds"]) == pytest.approx(0.2 + 4 * 0.025 / 4)
    assert float(generation.metadata["emulated_joules"]) == pytest.approx(0.2 * 100 + 4 * 0.025 / 4 * 130)


async def test_closing_the_stream_early_aborts_and_frees_its_place() -> None:
    clock = VirtualClock()
    engine = emulated(clock, ServerProfile("one", 1000.0, 100.0, batch_limit=1, batch_slowdown=0.0, busy_watts=1.0,
                                           idle_watts=0.0))  # fmt: skip

    async def first_delta_then_close() -> str:
        stream = engine.stream(GenerationRequest(prompt="q"))
        async with contextlib.aclosing(stream):
            event = await anext(stream)
        assert isinstance(event, TextDelta)
        return event.text

    async def both() -> tuple[str, Generation]:
        first = asyncio.ensure_future(first_delta_then_close())
        second = asyncio.ensure_future(engine.generate(GenerationRequest(prompt="q")))
        return await first, await second

    text, generation = await clock.run(both())
    assert text == "one"
    assert engine.aborted == 1
    # The second waited only until the first closed (0.21 s), not for the first's whole answer.
    assert float(generation.metadata["emulated_queue_seconds"]) == pytest.approx(0.21)
    assert engine.running == 0


async def test_a_cancelled_request_leaves_the_queue() -> None:
    clock = VirtualClock()
    engine = emulated(clock, ServerProfile("one", 1000.0, 100.0, batch_limit=1, batch_slowdown=0.0, busy_watts=1.0,
                                           idle_watts=0.0))  # fmt: skip

    async def scenario() -> Generation:
        running = asyncio.ensure_future(engine.generate(GenerationRequest(prompt="q")))
        waiting = asyncio.ensure_future(engine.generate(GenerationRequest(prompt="q")))
        await asyncio.sleep(0)
        assert engine.queued == 1
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        return await running

    await clock.run(scenario())
    assert engine.aborted == 1
    assert engine.running == 0
    assert engine.queued == 0


async def test_create_engine_wraps_any_engine_in_the_named_profile(trace_folder: Path) -> None:
    config = EngineConfig(traces=str(trace_folder), trace_model="small", emulate="edge-box")
    engine = create_engine("replay", config)
    assert isinstance(engine, EmulatedEngine)
    assert engine.profile is PROFILES["edge-box"]
    await engine.start()
    query = TraceSet.load(trace_folder).queries[0]
    recorded = TraceSet.load(trace_folder).answers[query.key]["small"]
    # Real time here: shrink the profile so the recorded tokens take milliseconds.
    engine.profile = ServerProfile("fast", 1e6, 1e5, batch_limit=8, batch_slowdown=0.0, busy_watts=1, idle_watts=0)
    generation = await engine.generate(GenerationRequest(prompt=query.user_prompt, system_prompt=query.system_prompt))
    assert generation.text == recorded.answer
    assert generation.token_logprobs == (recorded.logprob,)
    assert generation.prompt_tokens == recorded.tokens_in
    assert generation.completion_tokens == recorded.tokens_out
    expected = recorded.tokens_in / 1e6 + recorded.tokens_out / 1e5
    assert float(generation.metadata["emulated_busy_seconds"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"unknown server profile 'moon'.*cloud-gpu"):
        create_engine("replay", EngineConfig(traces=str(trace_folder), trace_model="small", emulate="moon"))


def test_profiles_are_consistent() -> None:
    for name, profile in PROFILES.items():
        assert profile.name == name
        assert profile.source
        assert profile.model
        assert profile.step_seconds(profile.batch_limit) >= profile.step_seconds(1) == 1 / profile.decode_tokens_per_s
        assert profile.idle_watts < profile.watts(1) <= profile.watts(profile.batch_limit)
        energy = profile.energy_model()
        assert energy.busy_watts == pytest.approx(profile.busy_watts - profile.idle_watts)
    assert get_profile("phone").batch_limit == 1
    assert PROFILE.watts(0) == 10.0
    assert PROFILE.watts(4) == 140.0
    assert PROFILE.watts(9) == 140.0
    with pytest.raises(ValueError, match="rates must be positive"):
        ServerProfile("bad", 0.0, 1.0, batch_limit=1, batch_slowdown=0.0, busy_watts=1.0, idle_watts=0.0)
