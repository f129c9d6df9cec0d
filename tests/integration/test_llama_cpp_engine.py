"""llama.cpp engine on generated tiny models: exact log-probs, determinism, CHOICE, errors, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recserve.core.engine import ChatMessage, EngineError, Generation, GenerationRequest, TextDelta
from recserve.engines import create_engine
from recserve.engines.config import EngineConfig
from recserve.engines.llama_cpp import LlamaCppEngine
from recserve.tools.models import TinyModelPaths
from tests.conftest import install_hint

pytestmark = pytest.mark.integration

llama_cpp = pytest.importorskip("llama_cpp", reason=install_hint("llama-cpp"))
load_file = pytest.importorskip("safetensors.numpy", reason=install_hint("models")).load_file
Tokenizer = pytest.importorskip("tokenizers", reason=install_hint("models")).Tokenizer

PROMPT = "What is the capital of France?"
SYSTEM = "Answer briefly."
CHAT = (ChatMessage("system", SYSTEM), ChatMessage("user", PROMPT))
# The tiny device model generates 200 tokens for this prompt without an end-of-generation token.
LONG = GenerationRequest(prompt="one two", max_tokens=200)


@pytest.fixture
async def engine(tiny_models: dict[str, TinyModelPaths]) -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(tiny_models["device"].gguf, threads=1, context_length=512)
    await engine.start()
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_models: dict[str, TinyModelPaths]) -> Iterator[Any]:
    """llama.cpp's own slow log-prob path: every position's logits kept (logits_all=True)."""
    llm = llama_cpp.Llama(
        model_path=str(tiny_models["device"].gguf), n_ctx=512, n_threads=1, logits_all=True, verbose=False
    )
    yield llm
    llm.close()


def _log_softmax(row: np.ndarray) -> np.ndarray:
    x: np.ndarray = row.astype(np.float64)
    lse = float(x.max() + np.log(np.exp(x - x.max()).sum()))
    out: np.ndarray = x - lse
    return out


def _first_position_logprobs(llm: Any, prompt: str) -> np.ndarray:
    tokens = llm.tokenize(prompt.encode(), add_bos=True)
    llm.reset()
    llm.eval(tokens)
    return _log_softmax(np.array(llm.scores[len(tokens) - 1]))


async def test_greedy_logprobs_are_valid_and_deterministic(engine: LlamaCppEngine) -> None:
    request = GenerationRequest(prompt=PROMPT, system_prompt=SYSTEM, max_tokens=8)
    first = await engine.generate(request)
    assert first.completion_tokens == len(first.token_logprobs) > 0
    assert first.prompt_tokens > 5
    assert all(isinstance(lp, float) and math.isfinite(lp) and lp <= 0 for lp in first.token_logprobs)
    assert json.dumps(first.token_logprobs)  # plain floats, not numpy scalars
    second = await engine.generate(request)
    assert second == first
    # Greedy takes the most likely token, so the best first alternative is the generated one.
    top = first.first_top_logprobs
    assert len(top) == 2
    assert top[0][1] == first.token_logprobs[0] >= top[1][1]
    assert first.text.startswith(top[0][0])


async def test_logprobs_match_llama_cpp_reference_path(engine: LlamaCppEngine, reference: Any) -> None:
    prompt = "The answer is"
    ours = await engine.generate(GenerationRequest(prompt=prompt, max_tokens=8))
    theirs = reference.create_completion(
        prompt,
        max_tokens=8,
        temperature=0.0,
        repeat_penalty=1.0,
        logprobs=1,
        seed=0,
    )
    choice = theirs["choices"][0]
    assert ours.text == choice["text"]
    expected = choice["logprobs"]["token_logprobs"]
    assert len(expected) == len(ours.token_logprobs) == 8
    assert np.allclose(ours.token_logprobs, expected, atol=1e-3, rtol=0)
    assert ours.first_top_logprobs[0][0] == choice["logprobs"]["tokens"][0]
    assert ours.first_top_logprobs[0][1] == pytest.approx(expected[0], abs=1e-3)


async def test_choice_option_logprobs_come_from_the_first_position(
    engine: LlamaCppEngine,
    reference: Any,
) -> None:
    options = ("A", "B", "C", "D")
    request = GenerationRequest(
        prompt="Which letter comes first? A) x B) y C) z D) w",
        system_prompt="Answer with A, B, C or D.",
        max_tokens=1,
        options=options,
        top_logprobs=3,
    )
    generation = await engine.generate(request)
    assert len(generation.option_logprobs) == 4
    assert all(math.isfinite(lp) and lp < 0 for lp in generation.option_logprobs)
    assert sum(math.exp(lp) for lp in generation.option_logprobs) <= 1.0
    assert len(set(generation.option_logprobs)) == 4
    assert generation.chosen_option is None
    assert generation.completion_tokens == 1
    assert len(generation.first_top_logprobs) == 3
    assert [lp for _, lp in generation.first_top_logprobs] == sorted(
        (lp for _, lp in generation.first_top_logprobs), reverse=True
    )
    expected = _first_position_logprobs(reference, f"{request.system_prompt}\n\n{request.prompt}")
    ids = [reference.tokenize(o.encode(), add_bos=False)[0] for o in options]
    assert np.allclose(generation.option_logprobs, expected[ids], atol=1e-3, rtol=0)
    # Asking for no tokens still scores the options (one token is generated to get the logits).
    bare = await engine.generate(dataclasses.replace(request, max_tokens=0))
    assert bare.option_logprobs == generation.option_logprobs


async def test_stop_string_cuts_the_text(engine: LlamaCppEngine) -> None:
    full = await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=8))
    assert full.metadata["finish_reason"] == "length"
    stop = full.text.strip()[2:4]
    assert stop.strip()
    cut = await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=8, stop=(stop, "never seen")))
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.metadata["finish_reason"] == "stop"
    assert cut.completion_tokens < full.completion_tokens
    assert cut.token_logprobs == full.token_logprobs[: cut.completion_tokens]


async def test_concurrent_requests_are_serialised(engine: LlamaCppEngine) -> None:
    prompts = ("one two", "The answer is", "hello there")
    requests = [GenerationRequest(prompt=p, max_tokens=6) for p in prompts]
    alone = [await engine.generate(r) for r in requests]
    together = await asyncio.gather(*(engine.generate(r) for r in requests * 2))
    assert list(together) == alone * 2


async def test_llama_cpp_calls_stay_on_one_thread(
    engine: LlamaCppEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenMP thread teams belong to the calling thread: hopping threads left teams spinning (10x slower).
    seen: set[int] = set()
    original = engine._generate

    def spy(*args: Any) -> Any:
        seen.add(threading.get_ident())
        return original(*args)

    monkeypatch.setattr(engine, "_generate", spy)
    busy = [asyncio.to_thread(time.sleep, 0.005) for _ in range(8)]
    calls = [engine.generate(GenerationRequest(prompt=f"{n} two", max_tokens=2)) for n in range(6)]
    await asyncio.gather(*busy, *calls)
    assert len(seen) == 1
    assert threading.get_ident() not in seen


async def test_sampling_with_temperature_reports_model_logprobs(engine: LlamaCppEngine) -> None:
    generation = await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=8, temperature=1.0))
    assert generation.completion_tokens == len(generation.token_logprobs) > 0
    assert all(math.isfinite(lp) and lp <= 0 for lp in generation.token_logprobs)


def _hf_numpy_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    """Reference Llama forward in Hugging Face conventions (rotate-half RoPE) on the safetensors weights."""
    config = json.loads((hf_dir / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    n_head, n_kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    eps, theta = float(config["rms_norm_eps"]), float(config["rope_theta"])
    d = config["hidden_size"] // n_head
    t = len(ids)

    def norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight
        return out

    angles = np.arange(t)[:, None] * theta ** (-np.arange(0, d, 2) / d)[None, :]
    cos, sin = np.tile(np.cos(angles), 2)[:, None, :], np.tile(np.sin(angles), 2)[:, None, :]

    def rope(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x * cos + np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1) * sin
        return out

    x = w["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, n_head, d))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, n_kv, d))
        k = np.repeat(k, n_head // n_kv, axis=1)
        v = np.repeat((h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, n_kv, d), n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        attn = np.exp(scores - scores.max(-1, keepdims=True))
        attn /= attn.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", attn, v).reshape(t, -1) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = (gate / (1 + np.exp(-gate))) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + up @ w[p + "mlp.down_proj.weight"].T
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.parametrize("tier", ["device", "cloud"])  # cloud has grouped-query attention
def test_gguf_and_hf_folder_compute_the_same_model(tiny_models: dict[str, TinyModelPaths], tier: str) -> None:
    # No torch here: a numpy forward in HF conventions checks the q/k permutation and the tokenizer.
    text = "The answer is B, because 42 is larger than 7."
    hf_ids = Tokenizer.from_file(str(tiny_models[tier].hf_dir / "tokenizer.json")).encode(text).ids
    # An F32 KV cache (llama.cpp defaults to F16) so only float32 arithmetic separates the two.
    llm = llama_cpp.Llama(
        model_path=str(tiny_models[tier].gguf), n_ctx=128, logits_all=True, type_k=0, type_v=0, verbose=False
    )
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
        assert ids == hf_ids
        llm.eval(ids)
        gguf_logprobs = np.array([_log_softmax(np.array(llm.scores[i])) for i in range(len(ids))])
    finally:
        llm.close()
    hf_logprobs = np.array([_log_softmax(row) for row in _hf_numpy_logits(tiny_models[tier].hf_dir, ids)])
    assert np.abs(gguf_logprobs - hf_logprobs).max() < 1e-4


async def test_create_engine_builds_llama_cpp(tiny_models: dict[str, TinyModelPaths]) -> None:
    engine = create_engine("llama_cpp", EngineConfig(model=str(tiny_models["edge"].gguf), context_length=256))
    assert isinstance(engine, LlamaCppEngine)
    assert engine.name == "llama_cpp"
    assert engine.threads >= 1
    assert not await engine.healthy()
    await engine.start()
    assert await engine.healthy()
    generation = await engine.generate(GenerationRequest(prompt="hello", max_tokens=3))
    assert generation.completion_tokens == len(generation.token_logprobs) >= 1
    await engine.shutdown()
    assert not await engine.healthy()
    with pytest.raises(EngineError, match="not started"):
        await engine.generate(GenerationRequest(prompt="hello"))
    await engine.shutdown()  # idempotent


async def test_missing_or_invalid_model_raises_engine_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(EngineError, match=str(missing)):
        await LlamaCppEngine(missing).start()
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 100)
    engine = LlamaCppEngine(garbage)
    with pytest.raises(EngineError, match=str(garbage)):
        await engine.start()
    assert not await engine.healthy()
    with pytest.raises(EngineError, match="GGUF"):
        LlamaCppEngine("")


async def test_prompt_longer_than_the_context_is_refused(tiny_models: dict[str, TinyModelPaths]) -> None:
    engine = LlamaCppEngine(tiny_models["device"].gguf, context_length=32)
    await engine.start()
    try:
        with pytest.raises(EngineError, match="context"):
            await engine.generate(GenerationRequest(prompt="one two three four five " * 20))
        # A prompt that fits still gets at most the room left in the context.
        fits = await engine.generate(GenerationRequest(prompt="one two three", max_tokens=100))
        assert fits.prompt_tokens + fits.completion_tokens <= 32
    finally:
        await engine.shutdown()


async def stream_events(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[list[TextDelta], Generation]:
    """A stream's deltas and its final Generation, checking that the Generation comes once and last."""
    events = [event async for event in engine.stream(request)]
    final = events.pop()
    assert isinstance(final, Generation)
    assert all(isinstance(event, TextDelta) for event in events)
    return events, final  # type: ignore[return-value]


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(prompt=PROMPT, system_prompt=SYSTEM, max_tokens=12),
        GenerationRequest(messages=CHAT, max_tokens=12),
        LONG,  # 200 tokens, all text
        GenerationRequest(prompt=PROMPT, max_tokens=200),  # ends with an end-of-generation token, which has no text
    ],
    ids=["prompt", "chat", "length", "eos"],
)
async def test_stream_adds_up_to_what_generate_returns(engine: LlamaCppEngine, request_: GenerationRequest) -> None:
    deltas, final = await stream_events(engine, request_)
    assert len(deltas) > 1
    assert "".join(delta.text for delta in deltas) == final.text
    assert len(final.tokens) == len(final.token_logprobs) == final.completion_tokens
    streamed_tokens = [token for delta in deltas for token in delta.tokens]
    assert streamed_tokens == list(zip(final.tokens, final.token_logprobs, strict=True))
    assert final == await engine.generate(request_)
    assert final.finish_reason == final.metadata["finish_reason"]
    if request_.max_tokens == 200:
        assert final.finish_reason == ("length" if final.completion_tokens == 200 else "stop")
    assert engine.aborted == 0


async def test_stop_strings_never_leak_into_streamed_text(engine: LlamaCppEngine) -> None:
    full = await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=40))
    for start in (3, 10, 20):
        stop = full.text[start : start + 4]
        request = GenerationRequest(prompt=PROMPT, max_tokens=40, stop=(stop,))
        deltas, final = await stream_events(engine, request)
        assert final.text == full.text[: full.text.index(stop)]
        assert final.finish_reason == "stop"
        shown = ""
        for delta in deltas:
            shown += delta.text
            assert final.text.startswith(shown)  # never text that is taken back later
        assert shown == final.text


async def test_chat_is_rendered_with_the_gguf_template_as_transformers_renders_it(
    engine: LlamaCppEngine, tiny_models: dict[str, TinyModelPaths], reference: Any
) -> None:
    transformers = pytest.importorskip("transformers", reason=install_hint("models"))
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_models["device"].hf_dir))
    messages = [{"role": m.role, "content": m.content} for m in CHAT]
    rendered = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert engine.render_chat(CHAT) == rendered
    assert rendered.startswith("<s>system: ")
    ids = engine._prompt_tokens(engine._llm, GenerationRequest(messages=CHAT))
    assert ids == hf.encode(rendered, add_special_tokens=False)
    assert ids.count(engine._llm.token_bos()) == 1  # the template's BOS, no second one
    # CHOICE over a chat: option log-probs at the first position after the rendered template.
    options = ("A", "B", "C", "D")
    generation = await engine.generate(GenerationRequest(messages=CHAT, max_tokens=1, options=options))
    assert generation.prompt_tokens == len(ids)
    reference.reset()
    reference.eval(ids)
    expected = _log_softmax(np.array(reference.scores[len(ids) - 1]))
    option_ids = [reference.tokenize(o.encode(), add_bos=False)[0] for o in options]
    assert np.allclose(generation.option_logprobs, expected[option_ids], atol=1e-3, rtol=0)


async def test_chat_without_a_template_is_a_clear_error(engine: LlamaCppEngine) -> None:
    engine._chat_template = None  # as loaded from a GGUF without tokenizer.chat_template
    with pytest.raises(EngineError, match="no chat template"):
        await engine.generate(GenerationRequest(messages=CHAT))
    assert (await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=2))).completion_tokens == 2


@pytest.fixture
def slow_tokens(engine: LlamaCppEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slows the model to ~200 tokens/s (so a stream is still generating when closed); counts tokens generated."""
    produced: list[int] = []
    original = engine._llm.generate

    def counting(*args: Any, **kwargs: Any) -> Iterator[int]:
        for token in original(*args, **kwargs):
            time.sleep(0.005)
            produced.append(token)
            yield token

    monkeypatch.setattr(engine._llm, "generate", counting)
    return produced


async def test_closing_a_stream_stops_the_generation_and_frees_the_engine(
    engine: LlamaCppEngine, slow_tokens: list[int]
) -> None:
    stream = engine.stream(LONG)
    first = await anext(stream)
    assert isinstance(first, TextDelta)
    await stream.aclose()
    assert engine.aborted == 1
    stopped_at = len(slow_tokens)
    assert stopped_at < 50  # of the 200 asked for
    assert not engine._lock.locked()
    await asyncio.sleep(0.05)
    assert len(slow_tokens) == stopped_at  # the generation loop has stopped
    # The next request runs at once: the lock and the thread are free.
    short = await asyncio.wait_for(engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=3)), timeout=5)
    assert short.completion_tokens == 3
    assert engine.aborted == 1


async def test_a_deadline_cancelling_generate_aborts_it(engine: LlamaCppEngine, slow_tokens: list[int]) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.generate(LONG), timeout=0.1)
    assert engine.aborted == 1
    assert len(slow_tokens) < 100
    assert not engine._lock.locked()
    assert (await engine.generate(GenerationRequest(prompt=PROMPT, max_tokens=3))).completion_tokens == 3
