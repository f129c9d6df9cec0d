"""`recserve calibrate` writes each tier's settings, and a tier that reads them runs the policy `recserve eval`
evaluated."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from recserve.cli import main
from recserve.evaluation.plans import EvalRequest, plan_for, recserve_train_bytes
from recserve.evaluation.replay import TraceReplay, cloud_only_by_benchmark, tune_fixed_thresholds
from recserve.evaluation.splits import tune_family_fill_caps
from recserve.policies import BudgetConfig, FixedConfig, PolicyConfig, RecServeConfig
from recserve.server import settings as tier_settings
from tests.conftest import read_env_file, write_trace_folder

CHAIN = ("small", "medium", "large")


def served_policy(env_file: Path, tier: str, traces: Path) -> PolicyConfig:
    """The policy `recserve serve` builds from `env_file`'s variables (the tier's own settings around them)."""
    own = {"RECSERVE_TIER": tier, "RECSERVE_TRACES": str(traces), "RECSERVE_TRACE_MODEL": "small"}
    env = own | {"RECSERVE_PLAINTEXT": "true"} | read_env_file(env_file)
    parser = argparse.ArgumentParser()
    tier_settings.add_arguments(parser, env=env)
    return tier_settings.from_namespace(parser.parse_args([])).policy


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trace_folder(tmp_path_factory.mktemp("calibration"), n_per_family=40, splits=("train",))


def test_every_tier_reads_back_the_budget_policy_chosen_on_the_calibration_set(
    calibration_set: Path, tmp_path: Path
) -> None:
    assert main(["calibrate", "--traces", str(calibration_set), "--chain", ",".join(CHAIN), "--byte-budget", "0.3",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    request = EvalRequest(
        traces=calibration_set, chain=CHAIN, split="train", policy="budget", options={"byte_budget": 0.3}
    )
    chosen = asyncio.run(plan_for(request, TraceReplay.load(calibration_set, CHAIN))).configs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cloud.env", "device.env", "edge.env"]
    for tier, config in zip(("device", "edge", "cloud"), chosen, strict=True):
        assert served_policy(tmp_path / f"{tier}.env", tier, calibration_set) == config
    # What was chosen on the calibration set is in them: a split between links and byte priors for each family.
    assert isinstance(chosen[0], BudgetConfig)
    assert chosen[0].links == 2
    assert {family for family, _ in chosen[0].family_fill_caps} == {"quiz", "chat"}
    assert {family for family, _ in chosen[0].family_byte_priors} == {"quiz", "chat"}


def test_casserve_thresholds_are_tuned_per_tier_and_printed_without_out(
    calibration_set: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["calibrate", "--traces", str(calibration_set), "--chain", "small,large", "--policy", "casserve",
                 "--byte-budget", "0.4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    device, cloud = printed.split("\n\n")
    (tmp_path / "device.env").write_text(device)
    replay = TraceReplay.load(calibration_set, ("small", "large"))
    tuned = tune_fixed_thresholds(asyncio.run(replay.depth_table(replay.queries("train"))), 0.4)
    policy = served_policy(tmp_path / "device.env", "device", calibration_set)
    assert isinstance(policy, FixedConfig)
    assert dict(policy.family_thresholds) == {family: values[0] for family, values in tuned.items()}
    assert "the cloud tier (large)" in cloud
    assert "RECSERVE_FAMILY_THRESHOLDS=\n" in cloud  # the last tier never forwards


def test_the_split_is_chosen_for_the_families_the_deployment_serves(calibration_set: Path, tmp_path: Path) -> None:
    assert main(["calibrate", "--traces", str(calibration_set), "--chain", ",".join(CHAIN), "--byte-budget", "0.3",
                 "--families", "quiz", "--out", str(tmp_path)]) == 0  # fmt: skip
    policy = served_policy(tmp_path / "device.env", "device", calibration_set)
    assert isinstance(policy, BudgetConfig)
    replay = TraceReplay.load(calibration_set, CHAIN)
    table = asyncio.run(replay.depth_table(replay.queries("train")))
    assert policy.family_fill_caps == tune_family_fill_caps(table, 0.3, served={"quiz"})
    # Here the chat family's curve leans the quiz family's cap when both are served.
    assert policy.family_fill_caps != tune_family_fill_caps(table, 0.3)


def test_recserve_beta_for_a_byte_budget_is_chosen_on_the_calibration_set(
    calibration_set: Path, tmp_path: Path
) -> None:
    chain = ("small", "large")
    assert main(["calibrate", "--traces", str(calibration_set), "--chain", ",".join(chain), "--policy", "recserve",
                 "--byte-budget", "0.4", "--out", str(tmp_path)]) == 0  # fmt: skip
    policy = served_policy(tmp_path / "device.env", "device", calibration_set)
    assert isinstance(policy, RecServeConfig)
    # The largest β of the grid whose bytes on the calibration set stay within the budget.
    replay = TraceReplay.load(calibration_set, chain)
    train = replay.queries("train")
    spent = asyncio.run(
        recserve_train_bytes(replay, train, cloud_only_by_benchmark(asyncio.run(replay.depth_table(train))))
    )
    assert spent[policy.beta] <= 0.4 < spent[round(policy.beta + 0.05, 2)]
    assert policy.beta != RecServeConfig().beta  # chosen, not the default


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--chain", "small"], "at least two models"),
        (["--chain", "small,nosuch"], "nosuch not in trace folder"),
        (["--chain", "small,large", "--byte-budget", "1.5"], "byte_budget must be within [0, 1]"),
        (["--chain", "small,large", "--policy", "cloud-only", "--byte-budget", "0.3"], "takes no --byte-budget"),
        (["--chain", "small,large", "--families", "quiz,mmlu"], "no calibration queries of mmlu; the 'train' split"),
        (["--chain", "small,large", "--policy", "fixed", "--families", "quiz"], "the fixed policy has none"),
    ],
)
def test_bad_input_is_refused_with_what_to_change(
    calibration_set: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], complaint: str
) -> None:
    assert main(["calibrate", "--traces", str(calibration_set), *arguments]) == 2
    assert complaint in capsys.readouterr().err


def test_a_trace_set_without_labelled_calibration_queries_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_trace_folder(tmp_path / "test-only")
    assert main(["calibrate", "--traces", str(folder), "--chain", "small,large"]) == 2
    assert "no labelled queries in the 'train' split" in capsys.readouterr().err
