"""An engine that answers as its inner engine does but takes the time a server of a given profile would.

`EmulatedEngine(inner, profile)` wraps any engine (replay included): the text, log-probs, token counts and finish
reason are the inner engine's, so confidence and accuracy stay real, while the timing is the profile's
(recserve.engines.profiles):

- admission: at most `batch_limit` requests run at once; the rest wait in a FIFO queue (queues form under load);
- prefill: prompt_tokens / prefill_tokens_per_s after admission;
- decode: each generated token takes step_seconds(b), b the number of requests running at that moment
  (continuous batching: a step of b sequences costs (1 + alpha * (b - 1)) times a step of one);
- streaming: each of the inner engine's deltas is yielded once its tokens' steps have passed. Deltas that carry
  tokens count those; otherwise (a replayed trace) the Generation's completion_tokens are spread evenly over them.

Token counts come from the inner Generation (prompt_tokens, completion_tokens: the replay engine reports the trace's
recorded tokens_in and tokens_out); where it reports none, the prompt counts one token per 4 characters and the
answer one token per delta. The inner engine runs right after admission, and its own time counts toward the
emulated time (a slower inner engine makes the emulated time a floor, not a sum).

Busy time and energy, for the tier's accounting: a request's share of the server's busy time is its prefill plus,
for each of its decode steps, the step's time divided by the sequences that shared it, so the shares of concurrent
requests add up to the server's busy time (not to a multiple of it). The final Generation's metadata carries
(as strings, seconds and joules):

- `emulated_busy_seconds`: that share; EnergyModel.inference_joules(busy_seconds, ...) with the profile's
  energy_model() gives the inference energy at the profile's batch-1 power;
- `emulated_joules`: the same share weighted by the profile's power above idle at the batch each step ran at;
- `emulated_seconds`: admission to the last token; `emulated_queue_seconds`: the wait before admission;
- `emulated_batch_max`: the most requests running at once during its decode; `emulated_profile`: the profile.

A simplification: prefills overlap other requests' decode steps without slowing them (a real server's prefill
holds up the batch while it runs), so under load the emulated latency is a little optimistic, and each prefill
counts in full to its request's busy share (the shares can then add up to slightly more than the wall time).

The engine keeps the totals: `busy_seconds`, `joules`, and `running` / `queued` now. Closing a stream early (the
client went away, a deadline) aborts it: counted in `aborted`, its place freed for the next in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import cast

from recserve.core.engine import Engine, EngineError, Generation, GenerationRequest, TextDelta
from recserve.engines.profiles import ServerProfile
from recserve.engines.streaming import collect

CHARS_PER_TOKEN = 4  # the prompt's size in tokens when the inner engine reports none


class EmulatedEngine:
    def __init__(
        self,
        inner: Engine,
        profile: ServerProfile,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        replicas: int = 1,
        speed: float = 1.0,
    ) -> None:
        """`replicas`: identical servers behind the tier, requests spread evenly over them (a device tier that stands
        for a fleet of phones, each serving its own user). `speed`: the server runs this many times as fast as its
        profile in wall time (0.25: four times as slow), while busy time and energy stay the profile's; a
        benchmark slows every tier alike to reach the servers' saturation at rates its own processes can drive."""
        if replicas < 1 or not speed > 0:
            raise ValueError("an emulated tier needs at least one replica and a positive speed")
        self.speed = speed
        self.inner = inner
        self.profile = profile
        self.replicas = replicas
        self.name = inner.name
        self.aborted = 0
        self.busy_seconds = 0.0  # the server's busy time so far: the sum of every request's share
        self.joules = 0.0  # inference energy above idle so far
        self.running = 0
        self._clock = clock
        self._sleep = sleep
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def start(self) -> None:
        await self.inner.start()

    async def healthy(self) -> bool:
        return await self.inner.healthy()

    async def shutdown(self) -> None:
        await self.inner.shutdown()

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request))

    async def _admit(self) -> None:
        if self.running < self.profile.batch_limit * self.replicas and not self._waiters:
            self.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # the request that leaves hands its place over: `running` already counts this one
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # admitted and cancelled at once: pass the place on
            else:
                self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    async def _until(self, deadline: float) -> None:
        delay = deadline - self._clock()
        if delay > 0:
            await self._sleep(delay)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        profile = self.profile
        arrived = self._clock()
        admitted_at: float | None = None
        try:
            await self._admit()
            admitted_at = self._clock()
            deltas: list[TextDelta] = []
            final: Generation | None = None
            # Every engine's stream is an async generator (the protocol says AsyncIterator); closing it aborts it.
            inner = cast(AsyncGenerator[TextDelta | Generation, None], self.inner.stream(request))
            async with contextlib.aclosing(inner) as events:
                async for event in events:
                    if isinstance(event, Generation):
                        final = event
                        break
                    deltas.append(event)
            if final is None:
                raise EngineError("the engine's stream ended without a final generation")
            prompt_tokens = final.prompt_tokens or -(-len(_prompt_text(request)) // CHARS_PER_TOKEN)
            prefill = profile.prefill_seconds(prompt_tokens)
            deadline = admitted_at + prefill / self.speed
            busy = prefill
            joules = prefill * max(profile.watts(1) - profile.idle_watts, 0.0)
            batch_max = 1
            await self._until(deadline)
            counts = _tokens_per_delta(deltas, final)
            # Steps after the last delta (tokens without text: an end-of-generation token, a held-back tail).
            for delta, tokens in [*zip(deltas, counts[:-1], strict=True), (None, counts[-1])]:
                for _ in range(tokens):
                    batch = max(-(-self.running // self.replicas), 1)  # on each replica
                    batch_max = max(batch_max, batch)
                    step = profile.step_seconds(batch)
                    deadline += step / self.speed
                    busy += step / batch
                    joules += step / batch * max(profile.watts(batch) - profile.idle_watts, 0.0)
                await self._until(deadline)
                if delta is not None:
                    yield delta
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted += 1
            raise
        finally:
            if admitted_at is not None:
                self._release()
        self.busy_seconds += busy
        self.joules += joules
        metadata = dict(final.metadata)
        metadata.update(
            emulated_profile=profile.name,
            emulated_queue_seconds=f"{admitted_at - arrived:.6f}",
            emulated_seconds=f"{self._clock() - admitted_at:.6f}",
            emulated_busy_seconds=f"{busy:.6f}",
            emulated_joules=f"{joules:.6f}",
            emulated_batch_max=str(batch_max),
        )
        yield dataclasses.replace(final, metadata=metadata)


def _prompt_text(request: GenerationRequest) -> str:
    if request.messages:
        return "\n".join(message.content for message in request.messages)
    return request.full_prompt


def _tokens_per_delta(deltas: list[TextDelta], final: Generation) -> list[int]:
    """Decode steps before each delta, and (last) after the last one: the deltas' own tokens where they add up to
    the answer's, else the answer's token count spread evenly over the deltas."""
    total = final.completion_tokens or len(final.token_logprobs) or len(deltas)
    own = [len(delta.tokens) for delta in deltas]
    if total and sum(own) == total:
        return [*own, 0]
    k = len(deltas)
    if k == 0:
        return [total]
    spread = [total * (i + 1) // k - total * i // k for i in range(k)]
    return [*spread, 0]
