"""The engine interface every tier generates through: async generation with token log-probs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GenerationRequest:
    """What a tier asks of its engine; engine-neutral so every engine sees the same thing."""

    prompt: str
    system_prompt: str = ""
    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    # For CHOICE tasks: the option strings whose first-token log-probs the engine must report.
    options: tuple[str, ...] = ()
    # How many alternatives to report at the first generated position (for the top-2 margin).
    top_logprobs: int = 2

    @property
    def full_prompt(self) -> str:
        """The one prompt string a completion model sees: the system prompt, a blank line, then the prompt.

        Every engine sends this same text, so a trace recorded through one engine replays through another.
        """
        return f"{self.system_prompt}\n\n{self.prompt}" if self.system_prompt else self.prompt


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
    metadata: dict[str, str] = field(default_factory=dict)


class EngineError(Exception):
    """An engine could not serve a request for a reason the caller can act on."""


class UnknownPromptError(EngineError):
    """A replay engine was asked a prompt its trace does not hold."""


@runtime_checkable
class Engine(Protocol):
    """Async generation engine. Implementations must be safe to call concurrently."""

    name: str

    async def start(self) -> None:
        """Load the model; the tier reports NOT_SERVING until this returns."""

    async def generate(self, request: GenerationRequest) -> Generation:
        """Generate an answer with token log-probs (and option log-probs when options are given)."""

    async def healthy(self) -> bool:
        """Whether the engine can serve requests now."""

    async def shutdown(self) -> None:
        """Release the model and any worker threads or processes."""
