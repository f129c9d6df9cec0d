"""Settings: flags over RECSERVE_* variables over defaults, validated with clear messages, all documented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from recserve.policies import BudgetConfig, FixedConfig, QualityConfig, RecServeConfig
from recserve.server.settings import TierSettings, add_arguments, from_namespace, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def parse(argv: list[str], env: dict[str, str]) -> TierSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env)
    return from_namespace(parser.parse_args(argv))


def test_environment_gives_defaults_and_flags_override_them() -> None:
    env = {"RECSERVE_TIER": "edge", "RECSERVE_BETA": "0.2", "RECSERVE_TRACES": "t", "RECSERVE_TRACE_MODEL": "m",
           "RECSERVE_PLAINTEXT": "yes"}  # fmt: skip
    settings = parse(["--beta", "0.4", "--next", "cloud:50051"], env)
    assert settings.plaintext is True
    assert parse(["--plaintext", "false", "--tls-cert", __file__, "--tls-key", __file__], env).plaintext is False
    assert (settings.tier, settings.next, settings.policy) == ("edge", "cloud:50051", RecServeConfig(beta=0.4))
    assert parse([], env).policy == RecServeConfig(beta=0.2)


def test_the_policy_options_come_from_flags_and_variables() -> None:
    env = {"RECSERVE_TIER": "edge", "RECSERVE_TRACES": "t", "RECSERVE_TRACE_MODEL": "m", "RECSERVE_PLAINTEXT": "1",
           "RECSERVE_POLICY": "casserve", "RECSERVE_FAMILY_THRESHOLDS": "mmlu=0.3", "RECSERVE_BETA": "0.9"}  # fmt: skip
    # Another policy's options (here RecServe's beta) are ignored.
    assert parse(["--threshold", "0.4"], env).policy == FixedConfig(threshold=0.4, family_thresholds=(("mmlu", 0.3),))
    budget = parse(["--policy", "budget", "--byte-budget", "0.3", "--links", "3"], env).policy
    assert budget == BudgetConfig(byte_budget=0.3, links=3)
    quality = parse(["--policy", "quality", "--probe-seed", "4"], env | {"RECSERVE_QUALITY_GAP": "0.05"}).policy
    assert quality == QualityConfig(quality_gap=0.05, probe_seed=4)
    with pytest.raises(ValueError, match=r"RECSERVE_FAMILY_THRESHOLDS='mmlu:0.3' is not valid: .*must look like"):
        parse([], env | {"RECSERVE_FAMILY_THRESHOLDS": "mmlu:0.3"})
    with pytest.raises(ValueError, match="invalid settings: unknown policy 'best'; choose one of: recserve, fixed"):
        parse([], env | {"RECSERVE_POLICY": "best"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tier": ""}, "a tier name is required"),
        ({"beta": 1.5}, "invalid settings: recserve policy: beta must be within [0, 1], got 1.5"),
        ({"policy": "quality", "window": 0}, "quality policy: window must be at least 1, got 0"),
        ({"policy": "budget", "fill_cap": 1.2}, "budget policy: fill_cap must be within (0, 1], got 1.2"),
        ({"policy": "fixed", "threshold": float("nan")}, "fixed policy: threshold must be a number, got nan"),
        ({"next": "cloud"}, "--next: 'cloud' is not [NAME=]HOST:PORT"),
        ({"next": "a=h:1,a=h:2"}, "--next: candidate names must be distinct"),
        ({"skip_to": "h:1"}, "--skip-to needs --next"),
        (
            {"next": "a=h:1,b=h:2", "placement": "pinned", "placement_pin": "c"},
            "--placement-pin 'c' names no candidate; they are a, b",
        ),
        ({"next": "a=h:1", "placement": "pinned"}, "pinned placement: placement_pin must name one of the candidates"),
        ({"port": 70_000}, "port must be within 0-65535"),
        ({"engine": "llama_cpp"}, "needs --model PATH.gguf"),
        ({"traces": ""}, "needs --traces DIR and --trace-model MODEL"),
        ({"plaintext": False}, "no TLS certificate given"),
        ({"plaintext": False, "tls_cert": __file__, "tls_key": __file__, "next": "e:1"}, "would forward unencrypted"),
        ({"tls_cert": __file__}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": __file__}, "mTLS"),
        ({"upstream_ca": "/nonexistent/ca.pem"}, "does not exist"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"forward_share": 0.0}, "forward_share"),
        ({"forward_timeout_min": 0.0}, "forward_timeout_min must be positive"),
        ({"tier": "edge tier"}, "tier name 'edge tier' must be 1-64 letters"),
        ({"callers": "device,bad name"}, "tier name 'bad name' must be"),
        ({"callers": "device, device"}, "cannot be its own caller"),
        ({"auth_token": "t", "auth_token_file": __file__}, "give auth_token or auth_token_file, not both"),
        ({"upstream_auth_token_file": "/nonexistent/token"}, "does not exist"),
    ],
)
def test_invalid_settings_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"tier": "device", "traces": "t", "trace_model": "m", "plaintext": True} | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        TierSettings.with_defaults(**values)


def test_the_policys_problems_and_the_others_come_in_one_message() -> None:
    message = "invalid settings: budget policy: byte_budget must be within [0, 1], got 2.0; the replay engine needs"
    with pytest.raises(ValueError, match=re.escape(message)):
        TierSettings.with_defaults(tier="t", plaintext=True, policy="budget", byte_budget=2.0)


def test_a_malformed_variable_names_itself() -> None:
    with pytest.raises(ValueError, match="RECSERVE_PORT='http' is not a valid int"):
        parse([], {"RECSERVE_PORT": "http"})


def test_the_readmes_settings_table_is_settings_table() -> None:
    lines = README.read_text().splitlines()
    start = lines.index("| variable | flag | default | meaning |")
    end = lines.index("", start)
    assert "\n".join(lines[start:end]) == settings_table()


def test_a_second_model_needs_the_progressive_path_and_runs_on_the_tiers_engine() -> None:
    with pytest.raises(ValueError, match="--progressive-ensemble-model needs --progressive on"):
        TierSettings.with_defaults(
            tier="t", plaintext=True, traces="x", trace_model="a", progressive_ensemble_model="b"
        )
    gguf = TierSettings.with_defaults(
        tier="t", plaintext=True, engine="llama_cpp", model="a.gguf", threads=3, progressive="on",
        progressive_ensemble_model="b.gguf",
    )  # fmt: skip
    second = gguf.ensemble_engine_config
    assert second is not None
    assert (second.model, second.threads) == ("b.gguf", 3)
    replay = TierSettings.with_defaults(
        tier="t", plaintext=True, traces="x", trace_model="a", progressive="on", progressive_ensemble_model="b"
    )
    assert replay.ensemble_engine_config is not None
    assert replay.ensemble_engine_config.trace_model == "b"
    assert (
        TierSettings.with_defaults(tier="t", plaintext=True, traces="x", trace_model="a").ensemble_engine_config is None
    )
