"""The demo and the command line, as a user runs them: real processes on loopback."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.server.processes import TierProcesses
from recserve.tools.demo import tier_arguments

pytestmark = [pytest.mark.integration, pytest.mark.processes]


README = Path(__file__).resolve().parents[2] / "README.md"


def test_replay_demo_prints_the_summary_and_stops_its_tiers() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recserve", "demo"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "4348 questions" in out
    assert "tier exit codes [0, 0, 0]" in out
    for benchmark in ("gsm8k", "medmcqa", "mmlu", "triviaqa", "truthfulqa", "overall"):
        assert re.search(rf"^\s*{benchmark}\s+\d+\s+0\.\d{{3}}", out, re.MULTILINE), out
    # The Prometheus counters at both ends of each link agree.
    for link in ("device->edge", "edge->cloud"):
        lower, upper = link.split("->")
        match = re.search(rf"{link}: (\d+) at {lower}, (\d+) at {upper}", out)
        assert match, out
        assert match.group(1) == match.group(2)
        assert int(match.group(1)) > 0
    # The quick start shows this run's tables as printed: one client sends the questions in order, so they do not
    # vary between runs, and a change to the policy or the framing shows here until the README is brought up to date.
    readme = README.read_text()
    start = readme.index(" benchmark     n")
    sample = readme[start : readme.index("\n```", start)]
    assert sample in out, "README's demo sample differs from what `make demo` prints now: paste the new tables in"


def test_ask_prints_the_answer_and_hops(tmp_path: Path) -> None:
    from tests.conftest import write_trace_folder

    folder = write_trace_folder(tmp_path / "traces")
    args = [
        ["--tier", tier, "--engine", "replay", "--traces", str(folder), "--trace-model", model,
         "--policy", "forward-all" if tier != "cloud" else "recserve"]
        for tier, model in (("device", "small"), ("edge", "medium"), ("cloud", "large"))
    ]  # fmt: skip
    stack = TierProcesses(args, tmp_path)
    stack.start()
    try:
        target = f"127.0.0.1:{stack.ports[0]}"
        ask = [sys.executable, "-m", "recserve", "ask", "--target", target, "--choice", "A,B,C,D", "--family", "quiz"]
        plain = subprocess.run([*ask, "quiz question number 3?"], capture_output=True, text=True, check=True)
        assert "answered by cloud" in plain.stdout
        assert re.search(r"device: confidence \d\.\d{4} threshold inf\s+forwarded", plain.stdout), plain.stdout
        as_json = subprocess.run(
            [*ask, "--json", "quiz question number 3?"], capture_output=True, text=True, check=True
        )
        response = json.loads(as_json.stdout)
        assert [hop["tier"] for hop in response["hops"]] == ["device", "edge", "cloud"]
        assert int(response["hops"][0]["bytes_sent"]) > 0
        streamed = subprocess.run(
            [*ask, "--stream", "quiz question number 3?"], capture_output=True, text=True, check=True
        )
        assert streamed.stdout.splitlines()[0] == response["answer"]
        assert "answered by cloud" in streamed.stdout
        bad = subprocess.run([*ask, ""], capture_output=True, text=True, check=False)
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT: prompt is empty" in bad.stderr
    finally:
        assert stack.stop() == [0, 0, 0]


def test_serve_rejects_bad_settings_with_a_clear_message() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "recserve", "serve", "--tier", "device", "--engine", "replay", "--beta", "3"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "beta must be within [0, 1]" in result.stderr
    assert "the replay engine needs --traces DIR and --trace-model MODEL" in result.stderr


def test_tier_arguments_cover_every_tier() -> None:
    assert [a[1] for a in tier_arguments("replay", None)] == ["device", "edge", "cloud"]


def test_a_tier_whose_port_was_taken_while_the_tiers_above_started_gets_another(
    tmp_path: Path, trace_folder: Path
) -> None:
    """A vLLM engine binds ports of its own at random while it starts, and can take one chosen for a tier below."""
    from recserve.server.processes import replay_tiers

    stack = TierProcesses(replay_tiers(["edge", "cloud"], ["small", "medium"], trace_folder), tmp_path)
    chosen = stack.metrics_ports[0]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", chosen))
        squatter.listen()
        try:
            stack.start()
            assert stack.metrics_ports[0] != chosen
            assert stack.scrape_bytes(0) is not None  # its metrics answer on the port it took instead
        finally:
            assert stack.stop() == [0, 0]
