"""Engines by name: each is imported only when chosen, so optional extras stay optional."""

from __future__ import annotations

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

ENGINE_NAMES = ("replay", "llama_cpp")


@dataclass(frozen=True)
class EngineConfig:
    """Engine-neutral settings; each engine reads the fields that concern it."""

    model: str = ""  # a GGUF file (llama_cpp), a folder or hub id (vllm)
    traces: str = ""  # trace folder (replay)
    trace_model: str = ""  # which model of the trace folder to replay
    threads: int = 0  # 0: let the engine choose
    context_length: int = 2048
    seed: int = 0


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
    raise ValueError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINE_NAMES)}")
