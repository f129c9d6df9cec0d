"""Fixtures shared by the engine tests: the generated tiny models, and a llama.cpp engine on the edge's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from recserve.engines.llama_cpp import LlamaCppEngine
from recserve.tools.models import TinyModelPaths, make_tiny_models


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModelPaths]:
    """Generated once a run (seeded, so the same weights every time) and only read by the tests."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llama_engine(tiny_models: dict[str, TinyModelPaths]) -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine(tiny_models["edge"].gguf, threads=1, context_length=512, f32_kv_cache=True)
    await engine.start()
    yield engine
    await engine.shutdown()
