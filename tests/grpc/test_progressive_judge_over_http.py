"""The progressive judge end to end over real local HTTP: an edge tier with `--progressive on` and a cloud tier,
in process on loopback, behind the gateway on uvicorn; a judge played deterministically by a small
OpenAI-compatible FastAPI server in this test. The command runs as a user runs it, and its report is checked."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from recserve.evaluation import progressive_judge
from recserve.server.app import start_tier
from recserve.server.settings import TierSettings
from tests.conftest import TRACE_MODELS
from tests.grpc.gateway_server import running_gateway
from tests.unit.test_progressive_tier import SketchingEngine

# Each question, and how the judge treats it. The router sends the first four to the progressive path and the
# maths question to the cloud whole (cloud-direct), so both of its answers are the cloud's.
QUESTIONS = {
    "How can I improve my time management skills?": "prefers progressive",
    "What are the most effective ways to deal with stress?": "prefers cloud-direct",
    "What if the Suez Canal had never been constructed?": "always A",
    "What are the primary factors that influence consumer behavior?": "no verdict",
    "Solve for x in the equation 3x + 10 = 5(x - 2).": "same answers",
}
PROGRESSIVE = "on point"  # the edge's expansions, "edge on point N." (or the cloud's repairs of them)
DIRECT = "cloud answers in full."
_PROMPT = re.compile(r"\[Question\]\n(.*?)\n\n\[Answer A\]\n(.*?)\n\[End of answer A\]\n\n\[Answer B\]\n(.*?)\n", re.S)


def judge_app(seen: list[tuple[str, str, str]]) -> FastAPI:
    """A judge that reads the prompt and answers as QUESTIONS says: it knows the progressive answer by its text."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "test-judge", "object": "model", "created": 0, "owned_by": "test"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> dict[str, Any]:
        match = _PROMPT.search(body["messages"][-1]["content"])
        assert match is not None
        question, answer_a, answer_b = match.groups()
        seen.append((question, answer_a, answer_b))
        progressive_slot = "A" if PROGRESSIVE in answer_a else "B"
        other = "B" if progressive_slot == "A" else "A"
        reply = {
            "prefers progressive": f"Verdict: {progressive_slot}",
            "prefers cloud-direct": f"Verdict: {other}",
            "always A": "Verdict: A",
            "no verdict": "qz!x 7",
            "same answers": "Verdict: tie" if answer_a == answer_b else "Verdict: A",
        }[QUESTIONS[question]]
        return {
            "id": "judge-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": f"Reasons.\n{reply}"},
                         "finish_reason": "stop"}],
        }  # fmt: skip

    return app


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def gateway_url(trace_folder: Path) -> AsyncIterator[str]:
    # The settings name a replay engine, which they check; the tiers run the sketching engines given instead.
    engine = {"engine": "replay", "traces": str(trace_folder), "trace_model": TRACE_MODELS[-1]}
    cloud = await start_tier(
        TierSettings.with_defaults(tier="cloud", host="127.0.0.1", port=0, callers="edge", plaintext=True, **engine),
        engine=SketchingEngine("cloud"),
    )
    edge = await start_tier(
        TierSettings.with_defaults(tier="edge", host="127.0.0.1", port=0, next=cloud.address, plaintext=True,
                                   progressive="on", **engine),
        engine=SketchingEngine("edge"),
    )  # fmt: skip
    try:
        async with running_gateway(edge.address) as gateway:
            yield gateway.base_url + "/v1"
    finally:
        await edge.stop(grace=1)
        await cloud.stop(grace=1)


async def test_the_command_judges_both_orders_and_reports_what_it_saw(
    gateway_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"qid": i, "question": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    seen: list[tuple[str, str, str]] = []
    async with serving(judge_app(seen)) as judge_url:
        parser = progressive_judge.argparse.ArgumentParser()
        progressive_judge.add_arguments(parser)
        args = parser.parse_args([
            "--progressive-url", gateway_url, "--judge-url", judge_url, "--questions", str(questions),
            "--max-tokens", "256", "--json", str(tmp_path / "report.json"),
        ])  # fmt: skip
        # In a thread, as from a shell: the command runs its own event loop; the servers run in this one.
        assert await asyncio.to_thread(progressive_judge.run, args) == 0
    text = capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())

    # Every pair was judged twice, the progressive answer once in each slot.
    assert len(seen) == 2 * len(QUESTIONS)
    for question, behaviour in QUESTIONS.items():
        shown = [(a, b) for q, a, b in seen if q == question]
        if behaviour == "same answers":
            assert shown == [(DIRECT, DIRECT)] * 2
        else:
            assert sorted(PROGRESSIVE in a for a, _ in shown) == [False, True]
            assert all(DIRECT in b for a, b in shown if PROGRESSIVE in a)

    outcomes = {record["question"]: record["outcome"] for record in report["records"]}
    assert outcomes == {
        "How can I improve my time management skills?": "win",
        "What are the most effective ways to deal with stress?": "loss",
        "What if the Suez Canal had never been constructed?": "tie",  # the order decided: no win
        "What are the primary factors that influence consumer behavior?": "unparseable",
        "Solve for x in the equation 3x + 10 = 5(x - 2).": "tie",
    }
    everything = report["groups"]["all questions"]
    assert (everything["pairs"], everything["judged"], everything["unparseable_pairs"]) == (5, 4, 1)
    assert [everything[k]["count"] for k in ("wins", "ties", "losses", "inconsistent")] == [1, 2, 1, 1]
    assert everything["same_position"] == 1
    assert (everything["replies"], everything["unparseable_replies"]["count"]) == (10, 2)
    assert report["groups"]["answered progressively"]["pairs"] == 4

    # What the gateway's recserve object said of each answer.
    assert report["answers"]["progressive"]["paths"] == {"answered by cloud": 1, "progressive": 4}
    assert report["answers"]["direct"]["paths"] == {"answered by cloud": 5}
    assert report["models"] == {"progressive": "recserve", "direct": "recserve", "judge": "test-judge"}
    assert report["answers"]["progressive"]["mean_words"] > report["answers"]["direct"]["mean_words"] == 4

    # The text report: the groups, the figures and, since one verdict in five had no line, no loud caveat.
    assert "all questions" in text
    assert "answered progressively" in text
    assert "1 25% [5%, 70%]" in text  # one win of the four judged pairs, with its interval
    assert "!!" not in text
    assert '"offload": "last_tier"' in text
