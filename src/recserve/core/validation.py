"""What a tier accepts: the limits of a request, and the checks that reject what it cannot serve with a message a
person can act on."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from recserve.core.engine import CHAT_ROLES
from recserve.core.errors import InvalidRequest
from recserve.core.sketch import SKETCH_MAX_POINTS
from recserve.core.untrusted import excerpt
from recserve.v1 import tier_pb2 as pb

DEFAULT_FAMILY = "default"
# Tier and family names: they become metric labels and window keys, so they are short and plain.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
NAME_RULE = "1-64 letters, digits, '_', '.' or '-'"


@dataclass(frozen=True)
class TierLimits:
    """What a tier accepts; anything beyond is INVALID_ARGUMENT with the limit named."""

    max_prompt_chars: int = 32_768  # prompt and system prompt together, or every chat message's content
    max_messages: int = 256
    max_tokens: int = 4096
    default_max_tokens: int = 64
    max_options: int = 26
    max_option_chars: int = 256
    max_stop_sequences: int = 8
    max_hops: int = 8
    max_families: int = 64
    max_request_id_chars: int = 128
    max_answer_chars: int = 32_768  # a hop's answer, as a lower tier records it
    # Progressive inference: a sketch's points, and the words of each, as a tier asks for them.
    max_sketch_points: int = SKETCH_MAX_POINTS
    max_point_words: int = 16
    max_point_chars: int = 256

    @property
    def max_request_bytes(self) -> int:
        """The largest InferRequest these limits allow: every string at its limit in 4-byte UTF-8, plus room for
        the numbers and field tags. The server refuses bigger messages before parsing them."""
        hop_chars = 64 + self.max_answer_chars
        chars = (
            2 * self.max_prompt_chars  # prompt and system prompt together (or the messages), and the reference
            + 16 * self.max_messages  # roles
            + self.max_request_id_chars
            + 64  # family
            + self.max_options * self.max_option_chars
            + self.max_stop_sequences * 64
            + self.max_hops * hop_chars
            + 2 * self.max_sketch_points * self.max_point_chars  # expand.points, and a progressive hop's points
        )
        return 4 * chars + 64 * 1024


class RequestValidator:
    """Checks every request a tier receives against its limits, and its hops against the tiers allowed to send them
    (`callers`: none for a first tier, which takes requests from clients alone)."""

    def __init__(self, tier: str, limits: TierLimits, callers: Iterable[str] = ()) -> None:
        self.name = tier
        self.limits = limits
        self.callers = frozenset(callers)

    def validate(self, request: pb.InferRequest) -> str:
        """Reject what cannot be served, with a message that says what to change; return the family."""
        limits = self.limits
        if request.messages:
            self._check_messages(request)
        elif not request.prompt.strip():
            raise InvalidRequest("prompt is empty: put the text to answer in `prompt`, or chat turns in `messages`")
        size = len(request.prompt) + len(request.system_prompt) + sum(len(m.content) for m in request.messages)
        if size > limits.max_prompt_chars:
            raise InvalidRequest(
                f"the prompt has {size} characters; tier {self.name} accepts at most {limits.max_prompt_chars}"
            )
        if len(request.request_id) > limits.max_request_id_chars:
            raise InvalidRequest(f"request_id is longer than {limits.max_request_id_chars} characters")
        if not request.request_id.isprintable():
            raise InvalidRequest("request_id may not contain line breaks or other control characters")
        if len(request.reference) > limits.max_prompt_chars:
            raise InvalidRequest(f"reference is longer than {limits.max_prompt_chars} characters")
        self._check_task(request)
        self._check_sampling(request.sampling)
        if request.offload not in (pb.OFFLOAD_MODE_AUTO, pb.OFFLOAD_MODE_LOCAL_ONLY, pb.OFFLOAD_MODE_LAST_TIER):
            raise InvalidRequest(
                f"unknown offload mode {request.offload}: use OFFLOAD_MODE_AUTO, OFFLOAD_MODE_LOCAL_ONLY or "
                "OFFLOAD_MODE_LAST_TIER"
            )
        self._check_requirement(request)
        self._check_hops(request.hops)
        return self._check_family(request.family)

    @staticmethod
    def _check_requirement(request: pb.InferRequest) -> None:
        if request.HasField("requirement_seconds"):
            requirement = request.requirement_seconds
            if not math.isfinite(requirement) or requirement <= 0:
                raise InvalidRequest(
                    f"requirement_seconds {requirement} is not a positive number of seconds: give the time the answer "
                    "may take, or leave it unset for none"
                )
        if request.service_class and not NAME_PATTERN.fullmatch(request.service_class):
            raise InvalidRequest(f"service_class {excerpt(request.service_class)} must be {NAME_RULE}")

    def _check_messages(self, request: pb.InferRequest) -> None:
        if request.prompt or request.system_prompt:
            raise InvalidRequest("send either `prompt` (with `system_prompt`) or chat `messages`, not both")
        if len(request.messages) > self.limits.max_messages:
            raise InvalidRequest(
                f"{len(request.messages)} messages; tier {self.name} accepts at most {self.limits.max_messages}"
            )
        for index, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"messages[{index}] has role {excerpt(message.role)}: use one of {', '.join(CHAT_ROLES)}"
                )
        if not any(m.role == "user" and m.content.strip() for m in request.messages):
            raise InvalidRequest("messages hold no user turn with text: add one with role 'user'")

    def _check_hops(self, hops: Sequence[pb.Hop]) -> None:
        """Hops are written by tiers: only a request from one of this tier's callers carries them, and they are
        bounded like any other input."""
        if not hops:
            return
        if not self.callers:
            raise InvalidRequest(
                f"tier {self.name} takes requests from clients, which send no hops: hops are written by the tiers "
                "that forward a request (a tier behind another names it with --callers)"
            )
        limits = self.limits
        if len(hops) >= limits.max_hops:
            raise InvalidRequest(
                f"request has already crossed {len(hops)} tiers; the limit is {limits.max_hops} "
                "(check the tiers' --next addresses for a loop)"
            )
        for hop in hops:
            if not NAME_PATTERN.fullmatch(hop.tier):
                raise InvalidRequest(f"hop tier {excerpt(hop.tier)} is not a tier name ({NAME_RULE})")
            if len(hop.answer) > limits.max_answer_chars:
                raise InvalidRequest(
                    f"the answer of hop {hop.tier} is longer than {limits.max_answer_chars} characters"
                )
            if not math.isfinite(hop.confidence):
                raise InvalidRequest(f"the confidence of hop {hop.tier} is not a finite number")
            if hop.HasField("byte_price") and not (math.isfinite(hop.byte_price) and hop.byte_price >= 0):
                raise InvalidRequest(f"the byte price of hop {hop.tier} must be a finite number of at least 0")
        if hops[-1].tier not in self.callers:
            raise InvalidRequest(
                f"tier {self.name} takes forwarded requests from {', '.join(sorted(self.callers))} only, "
                f"not from {hops[-1].tier}"
            )
        if any(hop.tier == self.name for hop in hops):
            path = " -> ".join(hop.tier for hop in hops)
            raise InvalidRequest(f"forwarding loop: request came through {path} back to tier {self.name}")

    def _check_task(self, request: pb.InferRequest) -> None:
        limits = self.limits
        if request.task == pb.TASK_KIND_CHOICE:
            options = list(request.options)
            if len(options) < 2:
                raise InvalidRequest('a CHOICE task needs at least two options, e.g. options ["A", "B", "C", "D"]')
            if len(options) > limits.max_options:
                raise InvalidRequest(f"{len(options)} options given; at most {limits.max_options} are accepted")
            if any(not option.strip() or len(option) > limits.max_option_chars for option in options):
                raise InvalidRequest(f"every option must be non-blank and at most {limits.max_option_chars} characters")
            if len(set(options)) != len(options):
                raise InvalidRequest("options must be distinct")
        elif request.task == pb.TASK_KIND_GENERATE:
            if request.options:
                raise InvalidRequest("options are only for CHOICE tasks: set task to TASK_KIND_CHOICE or drop them")
        elif request.task == pb.TASK_KIND_SKETCH:
            if not 1 <= request.sketch.max_points <= limits.max_sketch_points:
                raise InvalidRequest(
                    f"sketch.max_points {request.sketch.max_points} is out of range: "
                    f"use 1 to {limits.max_sketch_points}"
                )
            if request.sketch.max_words > limits.max_point_words:
                raise InvalidRequest(
                    f"sketch.max_words {request.sketch.max_words} is out of range: use 1 to "
                    f"{limits.max_point_words} (0 for the default)"
                )
        elif request.task == pb.TASK_KIND_EXPAND:
            points = request.expand.points
            if not 1 <= len(points) <= limits.max_sketch_points:
                raise InvalidRequest(f"expand.points has {len(points)} points: give 1 to {limits.max_sketch_points}")
            if any(not point.strip() or len(point) > limits.max_point_chars for point in points):
                raise InvalidRequest(
                    f"every sketch point must be non-blank and at most {limits.max_point_chars} characters"
                )
            if request.expand.index >= len(points):
                raise InvalidRequest(f"expand.index {request.expand.index} names no point: use 0 to {len(points) - 1}")
        elif request.task == pb.TASK_KIND_UNSPECIFIED:
            raise InvalidRequest("task is unspecified: set it to TASK_KIND_GENERATE or TASK_KIND_CHOICE")
        else:
            raise InvalidRequest(f"unknown task kind {request.task}: use TASK_KIND_GENERATE or TASK_KIND_CHOICE")
        if request.task != pb.TASK_KIND_SKETCH and request.HasField("sketch"):
            raise InvalidRequest("sketch parameters are only for TASK_KIND_SKETCH")
        if request.task != pb.TASK_KIND_EXPAND and request.HasField("expand"):
            raise InvalidRequest("expand parameters are only for TASK_KIND_EXPAND")

    def _check_sampling(self, sampling: pb.SamplingParams) -> None:
        limits = self.limits
        if sampling.max_tokens > limits.max_tokens:
            raise InvalidRequest(
                f"max_tokens {sampling.max_tokens} is out of range: use 1 to {limits.max_tokens} (0 for the default)"
            )
        if not 0.0 <= sampling.temperature <= 2.0:  # also rejects NaN
            raise InvalidRequest(f"temperature {sampling.temperature} is out of range: use 0 (greedy) to 2")
        if len(sampling.stop) > limits.max_stop_sequences or any(not s or len(s) > 64 for s in sampling.stop):
            raise InvalidRequest(
                f"stop takes at most {limits.max_stop_sequences} non-empty sequences of up to 64 characters"
            )

    @staticmethod
    def _check_family(family: str) -> str:
        family = family or DEFAULT_FAMILY
        if not NAME_PATTERN.fullmatch(family):
            raise InvalidRequest(f"family {excerpt(family)} must be {NAME_RULE} (e.g. 'mmlu')")
        return family
