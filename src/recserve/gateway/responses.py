"""OpenAI response objects (chat.completion, text_completion, and their stream chunks) built from the tiers'
InferResponse and TokenDelta messages, plus the `recserve` object and headers that say how the cascade served.

Log-probs: the tiers report each generated token's own log-prob, no alternatives. Chat completions give it as
`logprobs.content[i].logprob` with `top_logprobs` empty whatever `top_logprobs` asked; text completions give
`tokens`, `token_logprobs`, `text_offset` and, when `logprobs` >= 1, `top_logprobs` holding the sampled token
alone (vLLM too puts the sampled token in that dict). Imports the generated messages only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from recserve.v1 import tier_pb2 as pb

MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps there too
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _logprob(value: float) -> float:
    return max(value, MIN_LOGPROB) if not math.isnan(value) else MIN_LOGPROB


def _number(value: float) -> float | None:
    # JSON has no infinities: a policy that forwards everything has an infinite threshold (shown as null).
    return value if math.isfinite(value) else None


def recserve_object(response: pb.InferResponse, request_id: str) -> dict[str, Any]:
    """How the cascade served the request: who answered, how confident, and every hop."""
    return {
        "answered_by": response.answered_by,
        "confidence": _number(response.confidence.value),
        "degraded": response.degraded,
        "request_id": response.request_id or request_id,
        "chosen_option": response.chosen_option or None,
        "hops": [_hop(hop) for hop in response.hops],
    }


def _hop(hop: pb.Hop) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "tier": hop.tier,
        "decision": pb.Decision.Name(hop.decision).removeprefix("DECISION_").lower(),
        "confidence": _number(hop.confidence),
        "threshold": _number(hop.threshold),
        "engine_seconds": hop.engine_seconds,
        "bytes_sent": hop.bytes_sent,
        "bytes_received": hop.bytes_received,
    }
    if hop.HasField("progressive"):
        progressive = hop.progressive
        fields["progressive"] = {
            "points": list(progressive.points),
            "sketched_by": progressive.sketched_by,
            "sketch_tokens": progressive.sketch_tokens,
            "expansions": [
                {
                    "engine_seconds": e.engine_seconds,
                    "confidence": _number(e.confidence),
                    "threshold": _number(e.threshold),
                    "repaired_by": e.repaired_by or None,
                    "completion_tokens": e.completion_tokens,
                    "ensemble_confidence": _number(e.ensemble_confidence)
                    if e.HasField("ensemble_confidence")
                    else None,
                    "ensemble_kept": e.ensemble_kept,
                }
                for e in progressive.expansions
            ],
        }
    return fields


def recserve_headers(response: pb.InferResponse, request_id: str) -> dict[str, str]:
    """The same, for a client that reads headers only (non-streamed responses)."""
    return {
        "x-recserve-answered-by": response.answered_by,
        "x-recserve-confidence": f"{response.confidence.value:.6g}",
        "x-recserve-degraded": "true" if response.degraded else "false",
        "x-recserve-request-id": response.request_id or request_id,
        "x-recserve-bytes": ",".join(f"{h.tier}={h.bytes_sent}/{h.bytes_received}" for h in response.hops),
    }


def usage(response: pb.InferResponse) -> dict[str, int]:
    prompt, completion = response.usage.prompt_tokens, response.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Format:
    """One endpoint's response objects; a stream's state (what is sent so far) lives here too."""

    id: str
    created: int
    model: str
    logprobs: bool
    sent_text_chars: int = 0
    sent_chunks: int = field(default=0)

    object = ""
    chunk_object = ""

    def response(self, response: pb.InferResponse, request_id: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [self._choice(response.answer, response.logprobs, response.finish_reason or "stop")],
            "usage": usage(response),
            "recserve": recserve_object(response, request_id),
        }

    def chunk(
        self, delta: pb.TokenDelta | None, finish_reason: str | None, recserve: dict[str, Any] | None = None
    ) -> str:
        """One chunk: a delta's text and the tier it came from, or (the last) an empty delta with the finish reason."""
        text = delta.text if delta is not None else ""
        tokens = delta.logprobs if delta is not None else ()
        payload = self._envelope([self._chunk_choice(text, tokens, finish_reason)])
        payload["recserve"] = {"tier": delta.tier if delta is not None else "", **(recserve or {})}
        self.sent_chunks += 1
        return sse(payload)

    def usage_chunk(self, response: pb.InferResponse, recserve: dict[str, Any]) -> str:
        """The usage chunk of `stream_options.include_usage`: no choices."""
        return sse(self._envelope([]) | {"usage": usage(response), "recserve": recserve})

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def _choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish_reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk_choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish: str | None) -> dict[str, Any]:
        raise NotImplementedError


class ChatFormat(Format):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, tokens: Iterable[pb.TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "content": [
                {"token": t.token, "logprob": _logprob(t.logprob), "bytes": list(t.token.encode()), "top_logprobs": []}
                for t in tokens
            ]
        }

    def _choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish_reason: str | None) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": self._logprobs(tokens),
            "finish_reason": finish_reason,
        }

    def _chunk_choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {"role": "assistant"} if self.sent_chunks == 0 else {}
        if text or finish is None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": self._logprobs(tokens), "finish_reason": finish}


@dataclass
class CompletionFormat(Format):
    top_logprobs: bool = False

    object = "text_completion"
    chunk_object = "text_completion"

    def _logprobs(self, tokens: Sequence[pb.TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offsets, offset = [], self.sent_text_chars
        for t in tokens:
            offsets.append(offset)
            offset += len(t.token)
        return {
            "tokens": [t.token for t in tokens],
            "token_logprobs": [_logprob(t.logprob) for t in tokens],
            "top_logprobs": [{t.token: _logprob(t.logprob)} for t in tokens] if self.top_logprobs else None,
            "text_offset": offsets,
        }

    def _choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}

    def _chunk_choice(self, text: str, tokens: Sequence[pb.TokenLogprob], finish: str | None) -> dict[str, Any]:
        choice = self._choice(text, tokens, finish)
        self.sent_text_chars += len(text)
        return choice
