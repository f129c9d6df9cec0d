"""Settings: flags over RECSERVE_* variables over defaults, validated with clear messages, all documented."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recserve.settings import OPTIONS, TierSettings, add_arguments, from_namespace

README = Path(__file__).resolve().parents[2] / "README.md"


def parse(argv: list[str], env: dict[str, str]) -> TierSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env)
    return from_namespace(parser.parse_args(argv))


def test_environment_gives_defaults_and_flags_override_them() -> None:
    env = {"RECSERVE_TIER": "edge", "RECSERVE_BETA": "0.2", "RECSERVE_TRACES": "t", "RECSERVE_TRACE_MODEL": "m"}
    settings = parse(["--beta", "0.4", "--next", "cloud:50051"], env)
    assert (settings.tier, settings.beta, settings.next, settings.window) == ("edge", 0.4, "cloud:50051", 10_000)
    assert parse([], env).beta == 0.2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tier": ""}, "a tier name is required"),
        ({"beta": 1.5}, "beta must be within [0, 1]"),
        ({"window": 0}, "window must be at least 1"),
        ({"next": "cloud"}, "--next must be HOST:PORT"),
        ({"port": 70_000}, "port must be within 0-65535"),
        ({"engine": "llama_cpp"}, "needs --model PATH.gguf"),
        ({"traces": ""}, "needs --traces DIR and --trace-model MODEL"),
    ],
)
def test_invalid_settings_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"tier": "device", "traces": "t", "trace_model": "m"} | overrides
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TierSettings.with_defaults(**values)


def test_a_malformed_variable_names_itself() -> None:
    with pytest.raises(ValueError, match="RECSERVE_PORT='http' is not a valid int"):
        parse([], {"RECSERVE_PORT": "http"})


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for option in OPTIONS:
        assert f"| `{option.env}` | `{option.flag}` |" in readme, option.env
