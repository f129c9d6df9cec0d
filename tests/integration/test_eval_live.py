"""`recserve eval --live` gives the same decisions, accuracy and bytes as the offline replay."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from recserve.core.traces import BUNDLED_CHAIN, BUNDLED_TRACE
from recserve.evaluation.calibrate import calibrate
from recserve.evaluation.plans import EvalRequest, PolicyPlan, chain_plan
from recserve.evaluation.replay import TraceReplay
from recserve.policies.budget import BudgetConfig, BudgetPolicy
from recserve.policies.quality import QualityConfig, QualityPolicy
from recserve.policies.simple import RecServeConfig
from tests.conftest import read_env_file, write_trace_folder

pytestmark = [pytest.mark.integration, pytest.mark.processes]


def eval_json(folder: Path, chain: str, out: Path, *extra: str) -> dict:
    command = [sys.executable, "-m", "recserve", "eval", "--traces", str(folder), "--chain", chain, "--json", str(out)]
    result = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overall" in result.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "policy",
    [
        ["--policy", "recserve", "--beta", "0.4", "--window", "7"],
        ["--policy", "recserve", "--shuffle", "11"],
        ["--policy", "casserve", "--thresholds", "0.6,0.5"],
        ["--policy", "cloud-only"],
        ["--policy", "budget", "--budget", "0.45", "--window", "9"],
        ["--policy", "quality", "--gap", "0.02", "--shuffle", "4"],
    ],
)
def test_live_equals_offline(tmp_path: Path, policy: list[str]) -> None:
    folder = write_trace_folder(tmp_path / "traces", n_per_family=25, seed=5)
    offline = eval_json(folder, "small,medium,large", tmp_path / "offline.json", *policy)
    live = eval_json(folder, "small,medium,large", tmp_path / "live.json", *policy, "--live")
    assert live == offline
    assert offline["overall"]["n"] == 50


def test_live_equals_offline_per_query_on_real_traces(tmp_path: Path) -> None:
    """Query by query on 60 real questions per benchmark: same answering tier, verdict and bytes per link."""
    replay = TraceReplay.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    queries = [q for b in ("mmlu", "triviaqa") for q in replay.queries("test") if q.benchmark == b][:120]
    plan = chain_plan(RecServeConfig(), 3)
    offline = asyncio.run(replay.run_offline(queries, plan.offline))
    live = replay.run_live(queries, plan.flags, tmp_path)
    assert live == offline
    assert {o.depth for o in offline} == {0, 1, 2}


def test_bad_chain_is_a_clear_error(tmp_path: Path) -> None:
    folder = write_trace_folder(tmp_path / "traces", n_per_family=3)
    command = [sys.executable, "-m", "recserve", "eval", "--traces", str(folder), "--chain", "small,gpt-9"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "gpt-9" in result.stderr


def test_quality_policy_with_feedback_live_equals_offline_once_calibrated(tmp_path: Path) -> None:
    """Feedback goes back identically in both modes, so the calibrated thresholds and decisions match. At the default
    cold rate (0.9) 240 requests bring too few verdicts to calibrate; 0.5 gets there within them."""
    replay = TraceReplay.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    queries = [q for q in replay.queries("test") if q.benchmark == "mmlu"][:240]
    plan = chain_plan(QualityConfig(quality_gap=0.02, cold_rate=0.5), 3)
    offline = asyncio.run(replay.run_offline(queries, plan.offline, feedback=True))
    live = replay.run_live(queries, plan.flags, tmp_path, feedback=True)
    assert live == offline
    device = plan.offline[0]
    assert isinstance(device, QualityPolicy)
    assert device.calibrated("mmlu")


def test_budget_policy_holding_measured_bytes_live_equals_offline(tmp_path: Path) -> None:
    """The device learns reply bytes in both modes alike, so once it holds measured bytes the decisions match."""
    replay = TraceReplay.load(BUNDLED_TRACE, BUNDLED_CHAIN)
    queries = [q for q in replay.queries("test") if q.benchmark == "mmlu"][:240]
    plan = chain_plan(BudgetConfig(byte_budget=0.6), 3)
    offline = asyncio.run(replay.run_offline(queries, plan.offline))
    live = replay.run_live(queries, plan.flags, tmp_path)
    assert live == offline
    device = plan.offline[0]
    assert isinstance(device, BudgetPolicy)
    assert device.holds_bytes("mmlu")


def test_budget_policy_with_fill_caps_chosen_on_train_live_equals_offline(tmp_path: Path) -> None:
    """With a train split, eval chooses the budget policy's fill caps there and hands them to the live tiers as
    --family-fill-caps: the live tiers take the same decisions."""
    folder = write_trace_folder(tmp_path / "traces", n_per_family=40, seed=5, splits=("train", "test"))
    policy = ["--policy", "budget", "--budget", "0.35", "--window", "9"]
    offline = eval_json(folder, "small,medium,large", tmp_path / "offline.json", *policy)
    live = eval_json(folder, "small,medium,large", tmp_path / "live.json", *policy, "--live")
    assert live == offline


def test_tiers_set_up_by_calibrate_files_alone_serve_as_the_offline_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recserve calibrate`'s files are the tiers' only policy settings (RECSERVE_* variables, no policy flag): the
    live tiers take the same decisions as the offline replay of the configuration it chose on train."""
    folder = write_trace_folder(tmp_path / "traces", n_per_family=40, seed=5, splits=("train", "test"))
    chain = ("small", "medium", "large")
    out = tmp_path / "calibrated"
    command = [sys.executable, "-m", "recserve", "calibrate", "--traces", str(folder), "--chain", ",".join(chain),
               "--byte-budget", "0.35", "--out", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    request = EvalRequest(traces=folder, chain=chain, split="train", policy="budget", options={"byte_budget": 0.35})
    configs, _ = asyncio.run(calibrate(request))
    assert isinstance(configs[0], BudgetConfig)
    assert configs[0].family_fill_caps  # a split chosen on train is in the files
    # The budget policy runs alike on every tier (each finds its link from the hops), so the tiers may share them.
    (settings,) = {frozenset(read_env_file(out / f"{tier}.env").items()) for tier in ("device", "edge", "cloud")}
    for name, value in settings:
        monkeypatch.setenv(name, value)  # the tier processes inherit them
    replay = TraceReplay.load(folder, chain)
    queries = replay.queries("test")
    offline = asyncio.run(replay.run_offline(queries, PolicyPlan.of(configs).offline))
    assert replay.run_live(queries, [[], [], []], tmp_path) == offline
    assert {outcome.depth for outcome in offline} == {0, 1, 2}
