"""OpenAI engine: delegates generation to any OpenAI-compatible completions endpoint that returns log-probs.

The tier keeps its own confidence scoring and threshold; the server (vLLM's, llama.cpp's, SGLang) only
generates. Prompt requests go to `POST {base_url}/completions` with `logprobs` and the prompt every engine sends
(`GenerationRequest.full_prompt`: "SYSTEM\\n\\nUSER", no chat template); chat requests (`messages`) go to
`POST {base_url}/chat/completions` with `logprobs` and `top_logprobs`, and the server renders its model's chat
template. All over one pooled `httpx.AsyncClient`.

`stream` asks the same with `stream: true` (server-sent events, usage in the last event) and yields each event's
text and tokens as a delta; the server holds back text that could start a stop string. Closing the stream, or
cancelling it, closes the HTTP response, which makes the server abort the request; `aborted` counts them.
`generate` sends one non-streaming request; both build the Generation the same way (`_generation`).

Grammars (`GenerationRequest.grammar`, GBNF) go in two extra body fields: `structured_outputs: {"grammar": ...}`,
which vLLM's server (0.11 and later) applies, and `grammar`, which llama.cpp's server reads. vLLM ignores the
second one (it logs unknown fields at debug level), llama.cpp's server the first; other servers (and vLLM before
0.11, which named it `guided_grammar`) may ignore both and answer unconstrained, which is why whoever needs the
grammar's shape checks the text (recserve.core.sketch.parse_sketch).

What the completions API gives, and so what is reported:
- token_logprobs: the server's per-token log-probs (vLLM's are the model's raw log-softmax; other servers
  may report them after temperature), and `tokens` their token texts;
- first_top_logprobs: the first position's top log-probs, by the token text the server returns;
- option_logprobs (CHOICE): the API has no way to ask for given tokens, so each option is looked up among the
  first position's top-20 tokens, by the longest returned token that starts the option ("A" for "A",
  "Par" for "Paris"). An option outside the top 20 gets an estimate: the smaller of the least likely
  reported log-prob and an equal share of the probability mass the top 20 leave over. Both bound what
  the option can have, so the chosen option's renormalised confidence is, if anything, too low: the
  tier forwards a little more often, never less. The server must allow 20 log-probs (vLLM's default
  max_logprobs; OpenAI's own API allows 5 and rejects the request).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from recserve.core.engine import EngineError, Generation, GenerationRequest, TextDelta

if TYPE_CHECKING:
    from recserve.engines.config import EngineConfig

CHOICE_TOP_LOGPROBS = 20
# Connections kept open to the server: requests in flight beyond this wait for a free one.
MAX_CONNECTIONS = 64
# What a response is unexpected with: missing or mistyped fields, invalid JSON.
_MALFORMED = (ValueError, KeyError, IndexError, TypeError, AttributeError)

# One generated position: (token text, its log-prob, the position's top log-probs by token text).
Position = tuple[str, float, dict[str, float]]


class OpenAIEngine:
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "",
        api_key: str = "",
        timeout: float = 60.0,
        seed: int = 0,
    ) -> None:
        if not base_url:
            raise EngineError("the openai engine needs the server's base URL (--base-url), e.g. http://HOST:8000/v1")
        self.base_url = base_url.rstrip("/") + "/"
        self.model = model
        self.api_key = api_key
        self.timeout = timeout
        self.seed = seed
        self._client: httpx.AsyncClient | None = None
        # Generations stopped before their end (the client went away, a deadline passed).
        self.aborted = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> OpenAIEngine:
        return cls(
            config.base_url,
            model=config.model,
            api_key=config.api_key,
            timeout=config.request_timeout,
            seed=config.seed,
        )

    async def start(self) -> None:
        """Wait (up to the timeout) until the server lists its models; pick the first when none was named."""
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            # Connecting should be quick on a live server; generating may take the whole timeout.
            timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
            # Keep-alive connections are reused across requests instead of a TCP handshake per request.
            limits=httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=MAX_CONNECTIONS),
        )
        try:
            models = await self._wait_for_models(client)
        except BaseException:
            await client.aclose()
            raise
        if not self.model:
            if not models:
                await client.aclose()
                raise EngineError(f"openai engine: {self.base_url} serves no model")
            self.model = models[0]
        elif self.model not in models:
            await client.aclose()
            raise EngineError(f"openai engine: {self.base_url} does not serve {self.model!r} (it serves {models})")
        self._client = client

    async def _wait_for_models(self, client: httpx.AsyncClient) -> list[str]:
        # A server loading its model refuses connections or answers 503 for a while: the tier stays NOT_SERVING.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = await client.get("models")
                if reply.status_code != 503:
                    reply.raise_for_status()
                    return [str(entry["id"]) for entry in reply.json().get("data", [])]
                problem = "503 Service Unavailable"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except (httpx.HTTPStatusError, ValueError, KeyError, TypeError) as exc:
                raise EngineError(f"openai engine: {self.base_url}models did not list models: {exc}") from exc
            if time.monotonic() >= deadline:
                raise EngineError(f"openai engine: {self.base_url} not reachable within {self.timeout:.0f}s: {problem}")
            await asyncio.sleep(0.5)

    async def healthy(self) -> bool:
        return self._client is not None

    async def shutdown(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _request(self, request: GenerationRequest, *, stream: bool) -> tuple[str, dict[str, Any]]:
        """The endpoint and body for a request: completions for a prompt, chat completions for messages."""
        body: dict[str, Any] = {
            "model": self.model,
            # Option log-probs need the first position, which only generating one token produces.
            "max_tokens": max(request.max_tokens, 1 if request.options else 0),
            "temperature": max(request.temperature, 0.0),
            "seed": self.seed,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if request.grammar:
            body["structured_outputs"] = {"grammar": request.grammar}
            body["grammar"] = request.grammar
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if request.messages:
            body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
            body["logprobs"] = True
            body["top_logprobs"] = max(request.top_logprobs, CHOICE_TOP_LOGPROBS if request.options else 0)
            return "chat/completions", body
        body["prompt"] = request.full_prompt
        body["logprobs"] = max(request.top_logprobs, CHOICE_TOP_LOGPROBS if request.options else 1)
        return "completions", body

    async def generate(self, request: GenerationRequest) -> Generation:
        client = self._client
        if client is None:
            raise EngineError("openai engine not started")
        path, body = self._request(request, stream=False)
        try:
            reply = await client.post(path, json=body)
        except httpx.TimeoutException as exc:
            raise EngineError(f"openai engine: no answer from {self.base_url} within {self.timeout:.0f}s") from exc
        except httpx.TransportError as exc:
            raise EngineError(f"openai engine: {self.base_url}: {type(exc).__name__}: {exc}") from exc
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        if reply.status_code != 200:
            raise EngineError(f"openai engine: {self.base_url} answered {reply.status_code}: {reply.text[:500]}")
        try:
            data = reply.json()
            choice = data["choices"][0]
            text, positions = _choice_piece(choice, chat=bool(request.messages))
            return self._generation(request, text, positions, data.get("usage") or {}, choice.get("finish_reason"))
        except _MALFORMED as exc:
            raise EngineError(f"openai engine: unexpected {path} response: {exc!r}") from exc

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        client = self._client
        if client is None:
            raise EngineError("openai engine not started")
        path, body = self._request(request, stream=True)
        texts: list[str] = []
        positions: list[Position] = []
        usage: Mapping[str, Any] = {}
        finish_reason = None
        finished = False
        try:
            # Leaving this block early closes the response, so the server sees the client go and aborts.
            async with client.stream("POST", path, json=body) as reply:
                if reply.status_code != 200:
                    detail = (await reply.aread()).decode("utf-8", errors="replace")[:500]
                    raise EngineError(f"openai engine: {self.base_url} answered {reply.status_code}: {detail}")
                async for line in reply.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, comments, event names
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        break
                    try:
                        event = json.loads(data)
                        if event.get("error"):
                            raise EngineError(f"openai engine: {self.base_url} failed mid-stream: {event['error']}")
                        usage = event.get("usage") or usage
                        choices = event.get("choices") or ()
                        text, new = _choice_piece(choices[0], chat=bool(request.messages)) if choices else ("", [])
                        finish_reason = (choices[0].get("finish_reason") if choices else None) or finish_reason
                    except _MALFORMED as exc:
                        raise EngineError(f"openai engine: unexpected {path} stream event: {exc!r}") from exc
                    positions += new
                    if text or new:
                        texts.append(text)
                        yield TextDelta(text, tuple((token, lp) for token, lp, _ in new))
            generation = self._generation(request, "".join(texts), positions, usage, finish_reason)
            finished = True
            yield generation
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:
                self.aborted += 1
            raise
        except httpx.TimeoutException as exc:
            raise EngineError(f"openai engine: no answer from {self.base_url} within {self.timeout:.0f}s") from exc
        except httpx.TransportError as exc:
            raise EngineError(f"openai engine: {self.base_url}: {type(exc).__name__}: {exc}") from exc

    def _generation(
        self,
        request: GenerationRequest,
        text: str,
        positions: Sequence[Position],
        usage: Mapping[str, Any],
        finish_reason: Any,
    ) -> Generation:
        first = positions[0][2] if positions else {}
        ranked = sorted(first.items(), key=lambda item: -item[1])
        return Generation(
            text=text,
            token_logprobs=tuple(lp for _, lp, _ in positions),
            first_top_logprobs=tuple(ranked[: request.top_logprobs]),
            option_logprobs=option_logprobs_from_top(request.options, first),
            chosen_option=None,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or len(positions)),
            tokens=tuple(token for token, _, _ in positions),
            finish_reason="length" if finish_reason == "length" else "stop",
            metadata={"engine": self.name, "model": self.model, "finish_reason": str(finish_reason)},
        )


def _choice_piece(choice: Mapping[str, Any], *, chat: bool) -> tuple[str, list[Position]]:
    """A choice's text and generated positions, from a whole response or one stream event of either API."""
    positions: list[Position] = []
    if chat:
        # Chat: {"message" | "delta": {"content"}, "logprobs": {"content": [{token, logprob, top_logprobs}]}}.
        message = choice.get("message") or choice.get("delta") or {}
        for entry in (choice.get("logprobs") or {}).get("content") or ():
            if entry.get("logprob") is not None:
                top = {str(t["token"]): float(t["logprob"]) for t in entry.get("top_logprobs") or ()}
                positions.append((str(entry.get("token") or ""), float(entry["logprob"]), top))
        return str(message.get("content") or ""), positions
    # Completions: {"text", "logprobs": {"tokens", "token_logprobs", "top_logprobs"}}.
    logprobs = choice.get("logprobs") or {}
    token_logprobs = logprobs.get("token_logprobs") or ()
    tokens = logprobs.get("tokens") or [""] * len(token_logprobs)
    tops = logprobs.get("top_logprobs") or [None] * len(token_logprobs)
    for token, lp, top in zip(tokens, token_logprobs, tops, strict=True):
        if lp is not None:
            positions.append((str(token), float(lp), {str(k): float(v) for k, v in (top or {}).items()}))
    return str(choice.get("text") or ""), positions


def option_logprobs_from_top(options: Sequence[str], top: Mapping[str, float]) -> tuple[float, ...]:
    """Each option's log-prob from a position's top tokens; an option not among them gets a bounding estimate.

    An option matches the longest reported token it starts with. A missing option's estimate is the smaller
    of the least likely reported log-prob and log(leftover mass / missing options): neither can be exceeded by
    the option's true probability on average, so missing options are never favoured.
    """
    if not options:
        return ()
    found: list[float | None] = []
    for option in options:
        matches = [token for token in top if token and option.startswith(token)]
        found.append(top[max(matches, key=len)] if matches else None)
    missing = sum(lp is None for lp in found)
    if not missing:
        return tuple(lp for lp in found if lp is not None)
    leftover = max(0.0, 1.0 - math.fsum(math.exp(lp) for lp in top.values()))
    share = math.log(leftover / missing) if leftover > 0 else -math.inf
    estimate = min(min(top.values(), default=share), share)
    return tuple(estimate if lp is None else lp for lp in found)
