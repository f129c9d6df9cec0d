"""The vllm and openai engines without a server: settings, engine arguments, option log-probs from top tokens.

vLLM itself is needed only to build the vllm engine by name (`create_engine` checks it is installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from recserve.core.engine import ChatMessage, EngineError, GenerationRequest
from recserve.engines import create_engine
from recserve.engines.config import VLLM_INSTALL_HINT, EngineConfig
from recserve.engines.openai import OpenAIEngine, option_logprobs_from_top
from recserve.engines.vllm import VllmEngine
from recserve.server.settings import TierSettings


def test_vllm_engine_arguments_have_cpu_defaults() -> None:
    engine = VllmEngine("models/edge/hf", max_num_seqs=8)
    cpu, gpu = engine.engine_args(on_cpu=True), engine.engine_args(on_cpu=False)
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["kv_cache_memory_bytes"], cpu["max_num_seqs"]) == (
        "float32", True, 1 << 30, 8
    )  # fmt: skip
    assert (gpu["dtype"], gpu["enforce_eager"], gpu["max_model_len"]) == ("auto", False, 2048)
    assert "kv_cache_memory_bytes" not in gpu
    explicit = VllmEngine("org/model", dtype="bfloat16", gpu_memory_utilization=0.5, tensor_parallel_size=2)
    args = explicit.engine_args(on_cpu=True)
    assert (args["dtype"], args["gpu_memory_utilization"], args["tensor_parallel_size"]) == ("bfloat16", 0.5, 2)
    assert "kv_cache_memory_bytes" not in args
    assert "max_num_seqs" not in args


VLLM_SETTINGS = {"tier": "edge", "engine": "vllm", "model": "org/model", "plaintext": True}


def test_settings_reach_the_engines() -> None:
    settings = TierSettings.with_defaults(**VLLM_SETTINGS, dtype="bfloat16", context_length=4096, max_num_seqs=16)
    engine = VllmEngine.from_config(settings.engine_config)
    assert (engine.model, engine.dtype, engine.max_model_len, engine.max_num_seqs) == (
        "org/model",
        "bfloat16",
        4096,
        16,
    )
    remote = TierSettings.with_defaults(
        tier="edge",
        engine="openai",
        base_url="http://127.0.0.1:8000/v1/",
        api_key="k",
        request_timeout=5.0,
        plaintext=True,
    )
    client = create_engine(remote.engine, remote.engine_config)
    assert isinstance(client, OpenAIEngine)
    assert (client.base_url, client.api_key, client.timeout, client.model) == (
        "http://127.0.0.1:8000/v1/",
        "k",
        5.0,
        "",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"engine": "vllm"}, "the vllm engine needs --model"),
        ({"engine": "openai"}, "the openai engine needs --base-url"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be within [0, 1]"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be at least 1"),
        ({"max_num_seqs": -1}, "max_num_seqs must not be negative"),
        ({"request_timeout": 0.0}, "request_timeout must be positive"),
    ],
)
def test_invalid_engine_settings_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"tier": "edge", "traces": "t", "trace_model": "m"} | overrides
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TierSettings.with_defaults(**values)


def test_engines_without_their_target_refuse_to_start() -> None:
    with pytest.raises(EngineError, match="needs a model"):
        VllmEngine.from_config(EngineConfig())
    with pytest.raises(EngineError, match="needs the server's base URL"):
        create_engine("openai", EngineConfig())


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason=f"needs vLLM: {VLLM_INSTALL_HINT}")
def test_the_vllm_engine_is_built_by_name() -> None:
    engine = create_engine("vllm", TierSettings.with_defaults(**VLLM_SETTINGS).engine_config)
    assert isinstance(engine, VllmEngine)
    assert engine.model == "org/model"
    with pytest.raises(EngineError, match="needs a model"):
        create_engine("vllm", EngineConfig())


def test_without_vllm_the_vllm_engine_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "vllm" else find_spec(name, *args)
    )
    with pytest.raises(ValueError, match=r"engine 'vllm' needs vLLM: pip install 'recserve\[vllm\]'"):
        create_engine("vllm", TierSettings.with_defaults(**VLLM_SETTINGS).engine_config)


async def test_an_unreachable_server_fails_start_with_its_address() -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused at once.
    engine = OpenAIEngine("http://127.0.0.1:9/v1", timeout=1.0)
    with pytest.raises(EngineError, match=r"http://127.0.0.1:9/v1/ not reachable within 1s"):
        await engine.start()
    assert not await engine.healthy()


def test_options_found_among_the_top_tokens_keep_their_logprobs() -> None:
    top = {"A": -0.5, " B": -1.5, "Par": -2.0, "P": -3.0}
    assert option_logprobs_from_top(("A", "Paris"), top) == (-0.5, -2.0)  # the longest token the option starts with
    assert option_logprobs_from_top((), top) == ()


def test_missing_options_get_a_bounding_estimate() -> None:
    top = {"A": math.log(0.5), "B": math.log(0.3)}
    lps = option_logprobs_from_top(("A", "B", "C", "D"), top)
    assert lps[:2] == (top["A"], top["B"])
    # 0.2 of the mass is left for two missing options: 0.1 each, below the least likely reported token (0.3).
    assert lps[2] == lps[3] == pytest.approx(math.log(0.1))
    crowded = {"A": math.log(0.05), "B": math.log(0.01)}
    assert option_logprobs_from_top(("A", "B", "C"), crowded)[2] == pytest.approx(math.log(0.01))
    assert option_logprobs_from_top(("C",), {"A": 0.0})[0] == -math.inf


def test_the_openai_engine_sends_a_grammar_in_the_fields_vllm_and_llama_cpp_servers_read() -> None:
    engine = OpenAIEngine("http://127.0.0.1:1/v1", model="m")
    grammar = 'root ::= "1. " [a-z]+'
    for request in (
        GenerationRequest(prompt="q", grammar=grammar),
        GenerationRequest(messages=(ChatMessage("user", "q"),), grammar=grammar),
    ):
        _, body = engine._request(request, stream=False)
        assert body["structured_outputs"] == {"grammar": grammar}
        assert body["grammar"] == grammar
    _, plain = engine._request(GenerationRequest(prompt="q"), stream=True)
    assert "structured_outputs" not in plain
    assert "grammar" not in plain
