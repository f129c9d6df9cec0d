"""Engines by name: each is imported only when chosen, so optional extras stay optional.

Implements `recserve.core.engine.Engine` (llama.cpp, vLLM, any OpenAI-compatible server, trace replay). May import
`recserve.core` only.
"""

from __future__ import annotations

import importlib.util

from recserve.core.engine import Engine
from recserve.engines.config import VLLM_INSTALL_HINT, EngineConfig

ENGINE_NAMES = ("replay", "llama_cpp", "vllm", "openai")


def create_engine(name: str, config: EngineConfig) -> Engine:
    """Build the engine called `name`, wrapped in an EmulatedEngine when `config.emulate` names a server profile;
    raise ValueError naming the choices, the missing extra or the unknown profile."""
    if not config.emulate:
        return _create_engine(name, config)
    from recserve.engines.emulated import EmulatedEngine
    from recserve.engines.profiles import get_profile

    profile = get_profile(config.emulate)  # before the engine is built: a wrong name fails fast
    return EmulatedEngine(
        _create_engine(name, config), profile, replicas=config.emulate_replicas, speed=config.emulate_speed
    )


def _create_engine(name: str, config: EngineConfig) -> Engine:
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
