"""The engine interface every tier generates through: async generation with token log-probs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat; `role` is one of CHAT_ROLES."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What a tier asks of its engine; engine-neutral so every engine sees the same thing.

    A request holds either a prompt (with an optional system prompt), sent as plain completion text
    (`full_prompt`), or chat `messages`, which each engine renders with its model's chat template.

    `grammar`, when given, constrains the text to a GBNF grammar (llama.cpp's syntax, which vLLM's xgrammar backend
    also reads; root rule `root`): llama.cpp and vLLM mask every token the grammar does not admit, and report
    log-probs renormalised over the admitted tokens. An OpenAI-compatible server may ignore it, and a replay engine
    cannot apply it, so whoever needs the shape checks the text as well (recserve.core.sketch.parse_sketch does).
    """

    prompt: str = ""
    system_prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    # For CHOICE tasks: the option strings whose first-token log-probs the engine must report.
    options: tuple[str, ...] = ()
    # How many alternatives to report at the first generated position (for the top-2 margin).
    top_logprobs: int = 2
    # A GBNF grammar the generated text must follow; empty: unconstrained.
    grammar: str = ""

    @property
    def full_prompt(self) -> str:
        """The one prompt string a completion model sees: the system prompt, a blank line, then the prompt.

        Every engine sends this same text, so a trace recorded through one engine replays through another.
        """
        return f"{self.system_prompt}\n\n{self.prompt}" if self.system_prompt else self.prompt


@dataclass(frozen=True)
class TextDelta:
    """Text an engine generated since its previous delta, with the tokens that completed it."""

    text: str
    # (token text, natural-log probability) of each token this delta completes, in order. The deltas' tokens add
    # up to the Generation's tokens and token_logprobs; they may run ahead of the text (a tail held back in case it
    # starts a stop string, an end-of-generation token without text), so the last delta may carry tokens only.
    tokens: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    """An engine's answer with the log-probabilities the confidence scorers need."""

    text: str
    # Natural-log probability of each generated token, in order.
    token_logprobs: tuple[float, ...]
    # The most likely alternatives at the first generated position, best first: (token, logprob).
    first_top_logprobs: tuple[tuple[str, float], ...] = ()
    # For CHOICE: log-prob of each option as the first answer token, aligned with request.options.
    option_logprobs: tuple[float, ...] = ()
    # Set when the engine itself knows which option it chose (a replayed answer); otherwise the
    # scorer picks the most likely option.
    chosen_option: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Text of each generated token, aligned with token_logprobs; empty where the engine does not know them.
    tokens: tuple[str, ...] = ()
    # "stop": the model ended or a stop string was met; "length": max_tokens was reached.
    finish_reason: str = "stop"
    metadata: dict[str, str] = field(default_factory=dict)


class EngineError(Exception):
    """An engine could not serve a request for a reason the caller can act on."""


class UnknownPromptError(EngineError):
    """A replay engine was asked a prompt its trace does not hold."""


@runtime_checkable
class Engine(Protocol):
    """Async generation engine. Implementations must be safe to call concurrently."""

    name: str
    # Generations stopped before their end: streams closed early, calls cancelled (the client went away, a deadline).
    aborted: int

    async def start(self) -> None:
        """Load the model; the tier reports NOT_SERVING until this returns."""

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate an answer with token log-probs (and option log-probs when options are given)."""

    def stream(self, request: GenerationRequest) -> AsyncIterator[TextDelta | Generation]:
        """Yield text deltas as the tokens are generated, then the whole Generation, last; the deltas' texts add up
        to its text. Closing the iterator early (the client went away, a deadline passed) aborts the generation."""

    async def healthy(self) -> bool:
        """Whether the engine can serve requests now."""

    async def shutdown(self) -> None:
        """Release the model and any worker threads or processes."""
