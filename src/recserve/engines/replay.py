"""Replay engine: serves one model's recorded answers and confidence log-probs from a trace folder.

What a trace records, and so what this engine reports:
- multiple-choice rows record the log-prob p of the chosen answer letter. The engine reports it for
  that option and spreads the remaining mass 1 - p evenly over the other options, so the choice
  scorer's renormalised probability equals the recorded p;
- free-text rows record one log-prob (the model's self-assessed p("Y")). The engine reports it as a
  one-token sequence, so the perplexity scorer's exp(mean log-prob) equals the recorded p.
An answer that is none of the options gets equal log-probs on every option: maximally uncertain.

Chat requests: a chat of one user turn, after an optional system turn, is looked up as that (system prompt,
user prompt) pair; any other chat is not in a trace.

Grammars (`GenerationRequest.grammar`): a replay engine generates nothing, so it cannot make an answer follow one.
A recorded prompt replays its recorded answer as it was recorded (not checked against the grammar: whoever needs the
shape parses the text); an unrecorded one is an UnknownPromptError that says a grammar cannot change that.

Streaming is emulation: the recorded answer is yielded in word-sized deltas (each word with the whitespace
before it, so they concatenate to the answer), with `delay` seconds before each (EngineConfig
`replay_delay_seconds`, default 0) to emulate a model's generation speed in tests and benchmarks; `generate`
collects the same stream, so it takes as long. A trace records no per-token texts, so deltas carry no tokens
and `Generation.tokens` is empty; the finish reason is always "stop".
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import TYPE_CHECKING

from recserve.core.engine import EngineError, Generation, GenerationRequest, TextDelta, UnknownPromptError
from recserve.core.traces import TraceAnswer, TraceSet
from recserve.engines.streaming import collect

if TYPE_CHECKING:
    from recserve.engines.config import EngineConfig

# "B", "B.", "B:", "B) ..." all choose option B.
_LEADING_OPTION = re.compile(r"^\s*([^\s.:)]+)")
# A streamed word: the whitespace before it and the word; whitespace at the very end comes as its own delta.
_WORD = re.compile(r"\s*\S+|\s+$")


class ReplayEngine:
    name = "replay"

    def __init__(self, traces: str | Path, model: str, *, delay: float = 0.0) -> None:
        if not str(traces) or not model:
            raise EngineError("the replay engine needs a trace folder (--traces) and a model in it (--trace-model)")
        if delay < 0:
            raise EngineError(f"the replay engine's delay must be 0 or more seconds, not {delay}")
        self.traces = Path(traces)
        self.model = model
        self.delay = delay
        # Streams closed before their last delta (the client went away, a deadline passed).
        self.aborted = 0
        self._by_prompt: dict[str, list[tuple[str, TraceAnswer]]] = {}
        self._ready = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> ReplayEngine:
        return cls(config.traces, config.trace_model, delay=config.replay_delay_seconds)

    async def start(self) -> None:
        trace_set = await asyncio.to_thread(self._load)
        for query in trace_set.queries:
            answer = trace_set.answers[query.key].get(self.model)
            if answer is not None:
                self._by_prompt.setdefault(query.user_prompt, []).append((query.system_prompt, answer))
        self._ready = True

    def _load(self) -> TraceSet:
        try:
            return TraceSet.load(self.traces, [self.model])
        except (OSError, ValueError) as exc:
            raise EngineError(str(exc)) from exc

    def lookup(self, prompt: str, system_prompt: str = "") -> TraceAnswer:
        """The recorded answer to a user prompt (and system prompt, when one is given).

        A prompt recorded more than once resolves to its first occurrence in the trace's query order.
        """
        candidates = self._by_prompt.get(prompt, [])
        if system_prompt:
            candidates = [c for c in candidates if c[0] == system_prompt]
        if not candidates:
            preview = prompt[:60].replace("\n", " ")
            raise UnknownPromptError(
                f"replay engine ({self.model}) has no recorded answer for the prompt {preview!r}"
                f"{' with that system prompt' if system_prompt else ''}: the replay engine only answers "
                f"prompts of its trace folder {self.traces}"
            )
        return candidates[0][1]

    def lookup_request(self, request: GenerationRequest) -> TraceAnswer:
        """The recorded answer to a prompt request or a single-turn chat (an optional system turn, one user turn)."""
        if not request.messages:
            return self.lookup(request.prompt, request.system_prompt)
        roles = [message.role for message in request.messages]
        if roles not in (["user"], ["system", "user"]):
            raise UnknownPromptError(
                f"replay engine ({self.model}) has no recorded answer for a chat of turns {roles}: the replay engine "
                "only answers single-turn chats of its trace (an optional system turn, then one user turn)"
            )
        system = request.messages[0].content if roles[0] == "system" else ""
        return self.lookup(request.messages[-1].content, system)

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        if not self._ready:
            raise EngineError("replay engine not started")
        try:
            recorded = self.lookup_request(request)
        except UnknownPromptError as exc:
            if not request.grammar:
                raise
            raise UnknownPromptError(
                f"{exc}; it replays recorded answers only and cannot generate one that follows the request's grammar"
            ) from exc
        chosen, option_logprobs = _option_logprobs(recorded, request.options) if request.options else (None, ())
        generation = Generation(
            text=recorded.answer,
            token_logprobs=(recorded.logprob,),
            option_logprobs=option_logprobs,
            chosen_option=chosen,
            prompt_tokens=recorded.tokens_in,
            completion_tokens=recorded.tokens_out,
            finish_reason="stop",
        )
        try:
            for word in _WORD.findall(recorded.answer):
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                yield TextDelta(word)
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted += 1
            raise
        yield generation

    async def healthy(self) -> bool:
        return self._ready

    async def shutdown(self) -> None:
        self._ready = False
        self._by_prompt.clear()


def parse_option(answer: str, options: tuple[str, ...]) -> str | None:
    """The option an answer text names: the whole text, or its leading token ("B.", "B: ...")."""
    text = answer.strip()
    if text in options:
        return text
    match = _LEADING_OPTION.match(text)
    return match.group(1) if match and match.group(1) in options else None


def _option_logprobs(recorded: TraceAnswer, options: tuple[str, ...]) -> tuple[str | None, tuple[float, ...]]:
    chosen = parse_option(recorded.answer, options)
    if chosen is None:
        return None, tuple(-math.log(len(options)) for _ in options)
    p = math.exp(recorded.logprob)
    rest = math.log((1.0 - p) / (len(options) - 1)) if p < 1.0 else -math.inf
    return chosen, tuple(recorded.logprob if option == chosen else rest for option in options)
