"""llama.cpp engine: GGUF models on CPU with exact token log-probs computed from each step's logits.

Log-probs are the model's own distribution (log-softmax of the raw logits, temperature 1), whatever
sampling temperature is asked, as vLLM reports them. They are computed in numpy from logits captured
by a logits processor, so `logits_all` stays off (measured 15-40x faster than
`create_completion(logprobs=...)`, without a context x vocabulary table).

Prompt format: `GenerationRequest.full_prompt` (the user prompt alone, or "SYSTEM\n\nUSER" when a system
prompt is given), sent as a plain completion prompt (with the model's BOS). The chat template is deliberately
not applied: it keeps the tiny generated models and real checkpoints on the same code path, and the cascade
compares tiers by confidence, not by chat fidelity.

What is reported, and how it matches vLLM's conventions:
- token_logprobs covers every generated token, including an end-of-generation token and the token that
  completes a stop string; the text excludes both (it is cut where the stop string starts);
- CHOICE option log-probs are log-softmax values at the first generated position of each option's
  first token, the option tokenized on its own ("A", not " A"): the answer is expected to start the
  completion, as with a system prompt like "Answer with A, B, C or D.". A CHOICE request asking for 0
  tokens still generates 1, since only sampling produces the first position's logits.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import numpy.typing as npt

from recserve.core.engine import EngineError, Generation, GenerationRequest

if TYPE_CHECKING:
    from recserve.engines.config import EngineConfig

T = TypeVar("T")


def _log_softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """Log-softmax in float64: float32 loses digits in the log-sum-exp over large vocabularies."""
    x = np.asarray(logits, dtype=np.float64)
    peak = float(np.max(x))
    return x - (peak + math.log(float(np.sum(np.exp(x - peak)))))


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

    @classmethod
    def from_config(cls, config: EngineConfig) -> LlamaCppEngine:
        return cls(
            config.model,
            threads=config.threads,
            context_length=config.context_length,
            seed=config.seed,
        )

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-cpp")
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

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
            return llama_cpp.Llama(
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
        async with self._lock:
            if self._llm is None:
                raise EngineError("llama_cpp engine not started")
            return await self._run(self._generate, self._llm, request)

    def _generate(self, llm: Any, request: GenerationRequest) -> Generation:
        import llama_cpp

        prompt = request.full_prompt
        prompt_tokens: list[int] = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
        room = self.context_length - len(prompt_tokens)
        if room <= 0:
            size = f"{len(prompt_tokens)} tokens"
            raise EngineError(f"prompt of {size} does not fit the context of {self.context_length} tokens")
        # Option log-probs need the first position's logits, which only sampling one token produces.
        max_tokens = min(max(request.max_tokens, 1 if request.options else 0), room)

        rows: list[npt.NDArray[np.float32]] = []

        def capture(_input_ids: Any, scores: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            # The array is a view of llama.cpp's candidate buffer, reused at the next step: copy it.
            rows.append(np.array(scores, dtype=np.float32, copy=True))
            return scores

        tokens: list[int] = []
        logprobs: list[float] = []
        text_bytes = b""
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
                token = int(next(stream))
                row = rows.pop()
                if first_row is None:
                    first_row = row
                tokens.append(token)
                logprobs.append(float(_log_softmax(row)[token]))
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                    finish = "stop"
                    break
                text_bytes += llm.detokenize([token])
                if _apply_stop(text_bytes.decode("utf-8", errors="ignore"), request.stop)[1]:
                    finish = "stop"
                    break
        finally:
            stream.close()
        text = _apply_stop(text_bytes.decode("utf-8", errors="replace"), request.stop)[0]
        top: tuple[tuple[str, float], ...] = ()
        options: tuple[float, ...] = ()
        if first_row is not None:
            first = _log_softmax(first_row)
            top = self._top(llm, first, request.top_logprobs)
            options = tuple(float(first[self._first_token(llm, option)]) for option in request.options)
        return Generation(
            text=text,
            token_logprobs=tuple(logprobs),
            first_top_logprobs=top,
            option_logprobs=options,
            chosen_option=None,
            prompt_tokens=len(prompt_tokens),
            completion_tokens=len(tokens),
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


def _apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut text where the earliest stop string starts; say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
