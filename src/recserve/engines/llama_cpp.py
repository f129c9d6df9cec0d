"""llama.cpp engine: GGUF models on CPU with exact token log-probs computed from each step's logits.

Log-probs are the model's own distribution (log-softmax of the raw logits, temperature 1), whatever
sampling temperature is asked, as vLLM reports them. They are computed in numpy from logits captured
by a logits processor, so `logits_all` stays off (measured 15-40x faster than
`create_completion(logprobs=...)`, without a context x vocabulary table).

Prompt format: a prompt request sends `GenerationRequest.full_prompt` (the user prompt alone, or "SYSTEM\n\nUSER"
when a system prompt is given) as a plain completion prompt (with the model's BOS): no chat template, which keeps
the tiny generated models and real checkpoints on the same code path. A chat request (`messages`) is rendered with
the chat template stored in the GGUF (`tokenizer.chat_template`, with the generation prompt), as Hugging Face
renders it, and tokenized with its special tokens; a template that writes the BOS itself does not get a second one.

Streaming: tokens are generated on the engine's one thread (see `_executor`) and handed to the event loop as they
come. The engine's lock is held until that thread is done, and closing the stream (or cancelling its consumer)
sets an event the thread checks before every token, so an abandoned generation stops within one token. Deltas
never split a UTF-8 character nor show text a stop string later cuts away (see `streaming.StreamText`);
`generate` is the stream collected.

What is reported, and how it matches vLLM's conventions:
- token_logprobs covers every generated token, including an end-of-generation token and the token that
  completes a stop string; the text excludes both (it is cut where the stop string starts); `tokens` holds
  each token's text (special tokens by name), and the deltas' tokens add up to them;
- CHOICE option log-probs are log-softmax values at the first generated position of each option's
  first token, the option tokenized on its own ("A", not " A"): the answer is expected to start the
  completion, as with a system prompt like "Answer with A, B, C or D." (for a chat: the first position after
  the rendered template). A CHOICE request asking for 0 tokens still generates 1, since only sampling produces
  the first position's logits.

Grammars (`GenerationRequest.grammar`, GBNF): the logits processor masks every token llama.cpp's grammar sampler
rejects (logit -inf) before the token is chosen, and the log-probs are taken from the masked logits: renormalised
over the admitted tokens, as vLLM reports them under structured outputs, so both engines give the same tokens and
log-probs for a constrained request (a token the grammar forces has log-prob 0). The grammar is not handed to
`Llama.generate(grammar=...)`, which applies it after the logits processor, where the log-probs are read. Each
request gets its own grammar sampler (it holds the parse state); llama.cpp parses a grammar of a few rules in
about 20 microseconds, so a cache of parsed grammars would save nothing. A grammar that does not parse is an
EngineError before anything is generated; one that admits no token where the model must go on ends the request
with an EngineError rather than a token outside it.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta
from recserve.engines.streaming import StreamText, collect

if TYPE_CHECKING:
    from recserve.engines.config import EngineConfig

T = TypeVar("T")


def _log_softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Log-softmax in float64: float32 loses digits in the log-sum-exp over large vocabularies."""
    x = np.asarray(logits, dtype=np.float64)
    peak = float(np.max(x))
    return x - (peak + math.log(float(np.sum(np.exp(x - peak)))))


class _GrammarMask:
    """One request's grammar state in llama.cpp's grammar sampler: masks the logits, then follows the chosen token.

    Runs on the engine's thread, like every llama.cpp call.
    """

    _DTYPE = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)  # llama_token_data

    def __init__(self, llm: Any, grammar: str) -> None:
        import llama_cpp

        self._lib = llama_cpp
        # NULL when the grammar does not parse (llama.cpp logs why on stderr).
        self._sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
        if not self._sampler:
            raise EngineError("llama_cpp engine: the request's grammar is not valid GBNF with a `root` rule")
        size = llm.n_vocab()
        self._data = np.zeros(size, dtype=self._DTYPE)
        self._data["id"] = np.arange(size, dtype=np.intc)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p), size=size, selected=-1, sorted=False
        )

    def mask(self, logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The logits with -inf for every token the grammar does not admit next (the end of generation included)."""
        self._data["logit"] = logits
        self._array.size, self._array.selected, self._array.sorted = len(self._data), -1, False
        self._lib.llama_sampler_apply(self._sampler, ctypes.byref(self._array))
        return np.array(self._data["logit"], dtype=np.float32, copy=True)

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler:
            self._lib.llama_sampler_free(sampler)


class LlamaCppEngine:
    name = "llama_cpp"

    def __init__(
        self,
        model: str | Path,
        *,
        threads: int = 0,
        context_length: int = 2048,
        seed: int = 0,
        f32_kv_cache: bool = False,
    ) -> None:
        if not str(model):
            raise EngineError("the llama_cpp engine needs a GGUF model file (--model)")
        self.model = Path(model)
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.context_length = context_length
        self.seed = seed
        # llama.cpp keeps K and V in float16 by default, which moves log-probs by up to ~5e-3; float32 matches
        # engines that compute in float32 (the vLLM parity test) to ~1e-5, at twice the cache memory.
        self.f32_kv_cache = f32_kv_cache
        self._llm: Any = None
        # One llama.cpp context serves one request at a time: it is not thread-safe.
        self._lock = asyncio.Lock()
        # Every llama.cpp call runs on this one thread. llama.cpp parallelises with OpenMP, whose thread
        # team belongs to the calling thread and spins after each call: calls hopping between
        # asyncio.to_thread workers leave idle teams spinning, and 2 threads then ran 10x slower.
        self._executor: ThreadPoolExecutor | None = None
        # The GGUF's chat template, read when the model loads; None: the model has none.
        self._chat_template: Any = None
        # Generations stopped before their end (the client went away, a deadline passed).
        self.aborted = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LlamaCppEngine:
        return cls(
            config.model,
            threads=config.threads,
            context_length=config.context_length,
            seed=config.seed,
        )

    def _thread(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        return self._executor

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread(), func, *args)

    async def start(self) -> None:
        async with self._lock:
            if self._llm is None:
                self._llm = await self._run(self._load)

    def _load(self) -> Any:
        if not self.model.is_file():
            raise EngineError(f"llama_cpp engine: model file {self.model} does not exist")
        import llama_cpp

        cache_type = llama_cpp.GGML_TYPE_F32 if self.f32_kv_cache else None  # None: llama.cpp's float16
        try:
            llm = llama_cpp.Llama(
                model_path=str(self.model),
                n_ctx=self.context_length,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                seed=self.seed,
                logits_all=False,
                verbose=False,
                type_k=cache_type,
                type_v=cache_type,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama_cpp engine: cannot load model file {self.model}: {exc}") from exc
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            # The Jinja environment transformers renders chat templates in (trim_blocks, lstrip_blocks, tojson).
            self._chat_template = Jinja2ChatFormatter(
                template,
                eos_token=llm._model.token_get_text(llm.token_eos()),
                bos_token=llm._model.token_get_text(llm.token_bos()),
                add_generation_prompt=True,
            )
        return llm

    async def healthy(self) -> bool:
        return self._llm is not None

    async def shutdown(self) -> None:
        # Taking the lock lets a running generation finish before its model is freed.
        async with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await self._run(llm.close)
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    async def generate(self, request: GenerationRequest) -> Generation:
        return await collect(self.stream(request))

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextDelta | Generation, None]:
        # The lock is released when the generating thread is done, not when this generator is: a consumer that
        # goes away must not let the next request onto a llama.cpp context that is still generating.
        await self._lock.acquire()
        try:
            if self._llm is None:
                raise EngineError("llama_cpp engine not started")
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[TextDelta | Generation | Exception] = asyncio.Queue()
            cancel = threading.Event()

            def emit(event: TextDelta | Generation | Exception) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, event)
                except RuntimeError:  # the event loop is closed: nobody is listening any more
                    cancel.set()

            done = loop.run_in_executor(self._thread(), self._generate, self._llm, request, emit, cancel)
        except BaseException:
            self._lock.release()
            raise
        done.add_done_callback(lambda _: self._lock.release())
        finished = False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Exception):
                    raise event
                finished = isinstance(event, Generation)
                yield event
                if finished:
                    return
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:
                self.aborted += 1
            raise
        finally:
            cancel.set()
            # The thread stops within a token; waiting for it means a closed stream leaves the engine idle.
            await asyncio.shield(done)

    def _generate(
        self,
        llm: Any,
        request: GenerationRequest,
        emit: Callable[[TextDelta | Generation | Exception], None],
        cancel: threading.Event,
    ) -> None:
        """Run on the engine's thread: emit deltas as tokens come, then the Generation (or the error)."""
        try:
            generation = self._decode(llm, request, emit, cancel)
        except Exception as exc:
            emit(exc)
            return
        if generation is not None:
            emit(generation)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """The chat as the model's chat template renders it, ready for the assistant's answer."""
        if self._chat_template is None:
            raise EngineError(
                f"llama_cpp engine: {self.model} has no chat template (tokenizer.chat_template), so it cannot answer "
                "chat messages; send a prompt instead"
            )
        try:
            rendered = self._chat_template(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:  # jinja2 errors, and raise_exception() of templates refusing a chat
            raise EngineError(f"llama_cpp engine: the chat template cannot render this chat: {exc}") from exc
        return str(rendered.prompt)

    def _prompt_tokens(self, llm: Any, request: GenerationRequest) -> list[int]:
        if not request.messages:
            return list(llm.tokenize(request.full_prompt.encode("utf-8"), add_bos=True, special=False))
        rendered = self.render_chat(request.messages)
        ids: list[int] = llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
        # The model's BOS, unless the template wrote it itself ({{ bos_token }}): never a second one.
        bos = llm.token_bos()
        return [bos, *ids] if llm._model.add_bos_token() and ids[:1] != [bos] else ids

    def _decode(
        self,
        llm: Any,
        request: GenerationRequest,
        emit: Callable[[TextDelta | Generation | Exception], None],
        cancel: threading.Event,
    ) -> Generation | None:
        """Generate token by token; None when cancelled."""
        import llama_cpp

        prompt_tokens = self._prompt_tokens(llm, request)
        room = self.context_length - len(prompt_tokens)
        if room <= 0:
            size = f"{len(prompt_tokens)} tokens"
            raise EngineError(f"prompt of {size} does not fit the context of {self.context_length} tokens")
        # Option log-probs need the first position's logits, which only sampling one token produces.
        max_tokens = min(max(request.max_tokens, 1 if request.options else 0), room)

        rows: list[npt.NDArray[np.float32]] = []
        grammar = _GrammarMask(llm, request.grammar) if request.grammar else None

        def capture(_input_ids: Any, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            if grammar is not None:
                masked = grammar.mask(scores)
                rows.append(masked)
                return masked  # written back into llama.cpp's candidates, so the token is chosen among the admitted
            # The array is a view of llama.cpp's candidate buffer, reused at the next step: copy it.
            rows.append(np.array(scores, dtype=np.float32, copy=True))
            return scores

        tokens: list[int] = []
        logprobs: list[float] = []
        names: list[str] = []
        pending: list[tuple[str, float]] = []  # tokens generated since the last delta
        text = StreamText(request.stop)
        finish = "length"
        first_row: npt.NDArray[np.float32] | None = None
        sampling: dict[str, Any] = {"temp": max(request.temperature, 0.0)}  # 0: greedy
        if request.temperature > 0:
            # Plain temperature sampling: no top-k/top-p/min-p truncation of the model's distribution.
            sampling.update(top_k=0, top_p=1.0, min_p=0.0)
        # reset() empties the context so nothing (not even batch-shape-dependent rounding of a reused
        # prefix) carries between requests: the same request always yields the same tokens and log-probs.
        llm.reset()
        stream = llm.generate(
            prompt_tokens,
            reset=True,
            repeat_penalty=1.0,
            logits_processor=[capture],
            **sampling,
        )
        try:
            while len(tokens) < max_tokens:
                if cancel.is_set():
                    return None
                token = int(next(stream))
                row = rows.pop()
                if grammar is not None and not np.isfinite(row[token]):
                    # Every token was masked; llama.cpp aborts the process on accepting one its grammar rejects.
                    raise EngineError("llama_cpp engine: the request's grammar admits no token the model has here")
                if first_row is None:
                    first_row = row
                tokens.append(token)
                logprobs.append(float(_log_softmax(row)[token]))
                names.append(llm.detokenize([token], special=True).decode("utf-8", errors="replace"))
                pending.append((names[-1], logprobs[-1]))
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    finish = "stop"
                    break
                if grammar is not None:
                    grammar.accept(token)
                shown = text.feed(llm.detokenize([token]))
                if shown:
                    emit(TextDelta(shown, tuple(pending)))
                    pending = []
                if text.stopped:
                    finish = "stop"
                    break
        finally:
            stream.close()
            if grammar is not None:
                grammar.close()
        rest = text.finish()
        if rest or pending:
            emit(TextDelta(rest, tuple(pending)))
        top: tuple[tuple[str, float], ...] = ()
        options: tuple[float, ...] = ()
        if first_row is not None:
            first = _log_softmax(first_row)
            top = self._top(llm, first, request.top_logprobs)
            options = tuple(float(first[self._first_token(llm, option)]) for option in request.options)
        return Generation(
            text=text.text,
            token_logprobs=tuple(logprobs),
            first_top_logprobs=top,
            option_logprobs=options,
            chosen_option=None,
            prompt_tokens=len(prompt_tokens),
            completion_tokens=len(tokens),
            tokens=tuple(names),
            finish_reason=finish,
            metadata={"engine": self.name, "model": str(self.model), "finish_reason": finish},
        )

    @staticmethod
    def _top(llm: Any, logprobs: npt.NDArray[np.float64], k: int) -> tuple[tuple[str, float], ...]:
        k = min(k, logprobs.shape[0])
        if k <= 0:
            return ()
        # argpartition is O(vocab); only the k winners get sorted. Ties break by token id for stability.
        best = np.argpartition(-logprobs, k - 1)[:k]
        order = sorted(best.tolist(), key=lambda i: (-logprobs[i], i))
        names = [llm.detokenize([i], special=True).decode("utf-8", errors="replace") for i in order]
        return tuple((name, float(logprobs[i])) for name, i in zip(names, order, strict=True))

    @staticmethod
    def _first_token(llm: Any, option: str) -> int:
        ids: list[int] = llm.tokenize(option.encode("utf-8"), add_bos=False, special=False)
        if not ids:
            raise EngineError(f"option {option!r} tokenizes to nothing")
        return ids[0]
