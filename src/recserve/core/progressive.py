"""Progressive inference (PICE, arXiv 2501.09367) at a tier: the interface to the scheduler that picks each long
request's path, and what the tier keeps of the load the tier above reports.

At a tier with a next tier, a GENERATE request takes one of three paths, chosen per request by the scheduler:
- local: served as any other request: this tier answers, and forwards when its confidence is low (the cascade);
- cloud-direct: forwarded without generating here, for the next tier to answer in full;
- progressive: the next tier writes a sketch (TASK_KIND_SKETCH); this tier expands the sketch's points concurrently
  on its own engine, scores each, has the next tier write again each point it is unsure of (TASK_KIND_EXPAND), and
  assembles the answer.

Plain Python, as the placement interface: the scheduler sees the question, the answer length asked, and the load the
next tier last reported, so the live tiers and the benchmarks drive the same objects.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Protocol

from recserve.core.engine import ChatMessage
from recserve.core.threshold import SlidingWindow
from recserve.v1 import tier_pb2 as pb


class ProgressivePath(enum.StrEnum):
    LOCAL = "local"
    CLOUD_DIRECT = "cloud-direct"
    PROGRESSIVE = "progressive"


@dataclass(frozen=True)
class UpstreamLoad:
    """How busy the next tier said it was in its last reply, and how long ago that was."""

    in_flight: int  # requests it was serving
    capacity: int  # requests it serves at once (0: unknown)
    age_seconds: float = 0.0

    @property
    def utilisation(self) -> float | None:
        """In-flight requests over capacity (above 1: requests wait); None when the capacity is unknown."""
        return self.in_flight / self.capacity if self.capacity > 0 else None


@dataclass(frozen=True)
class ProgressiveDecision:
    path: ProgressivePath
    max_points: int = 0  # the sketch's longest list of points; 0 unless the path is progressive
    reason: str = ""  # for logs and tests: which rule decided, with the figures it used


class ProgressiveScheduler(Protocol):
    """Picks the path of each GENERATE request at a tier that may serve progressively. One object per tier, shared by
    all its requests; must not block."""

    def decide(self, question: str, max_tokens: int, load: UpstreamLoad | None) -> ProgressiveDecision:
        """The path for `question`, which may be answered in up to `max_tokens` tokens, given the next tier's last
        reported `load` (None: none reported yet, or too long ago)."""

    def observe_answer(self, completion_tokens: int, max_tokens: int) -> None:
        """The length of an answer this tier returned to a GENERATE request that allowed `max_tokens`."""


@dataclass(frozen=True)
class ProgressiveOptions:
    """How a tier serves the progressive path, beside the scheduler that chooses it."""

    max_words: int = 0  # words per sketch point (0: the sketch's default)
    point_beta: float = 0.2  # share of points, the least confident, that the next tier writes again
    point_window: int = 200  # recent point confidences the threshold is the quantile of
    point_max_tokens: int = 0  # tokens per expanded point (0: the request's max_tokens over its points)
    load_max_age_seconds: float = 10.0  # an older load report counts as none


def conversation_of(request: pb.InferRequest) -> str | tuple[ChatMessage, ...]:
    """What a sketch or a point is written for: the prompt, or the chat (ending in the user's question), with the
    request's system prompt as a system turn."""
    if request.messages:
        return tuple(ChatMessage(m.role, m.content) for m in request.messages)
    if request.system_prompt:
        return (ChatMessage("system", request.system_prompt), ChatMessage("user", request.prompt))
    return request.prompt


def question_of(request: pb.InferRequest) -> str:
    """The question a sketch answers: the prompt, or the last user turn of a chat (earlier turns are the chat's
    history; a sketch outlines the answer to the turn being asked)."""
    if not request.messages:
        return request.prompt
    return next(m.content for m in reversed(request.messages) if m.role == "user")


class PointWindows:
    """The confidences of recently expanded points, per task family: a point below the `beta`-quantile of its
    family's window is written again above, as RecServe forwards the least confident share of answers."""

    def __init__(self, beta: float, window: int) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"point beta must be within [0, 1], got {beta}")
        self.beta = beta
        self.window = window
        self._windows: dict[str, SlidingWindow] = {}

    def judge(self, family: str, confidence: float) -> tuple[bool, float]:
        """(unsure, threshold) for a point of `family` with `confidence`; a confidence that is not a number is
        unsure."""
        if not math.isfinite(confidence):
            return True, math.nan
        window = self._windows.get(family)
        if window is None:  # not setdefault: that would build a window for every point
            window = self._windows[family] = SlidingWindow(self.window)
        window.add(confidence)
        return window.forward_at(confidence, self.beta)

    def threshold(self, family: str) -> float:
        """The current point threshold of `family`, without adding a point: a confidence below it is unsure. +inf
        before the family has two points (as `judge` compares nothing with a lone value, nothing clears it)."""
        window = self._windows.get(family)
        if window is None or len(window) < 2:
            return math.inf
        return window.threshold_at(self.beta)
