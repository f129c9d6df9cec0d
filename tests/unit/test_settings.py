"""Settings: flags over RECSERVE_* variables over defaults, validated with clear messages, all documented."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from recserve.server.settings import OPTIONS, TierSettings, add_arguments, from_namespace

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
        ({"plaintext": False}, "no TLS certificate given"),
        ({"plaintext": False, "tls_cert": __file__, "tls_key": __file__, "next": "e:1"}, "would forward unencrypted"),
        ({"tls_cert": __file__}, "--tls-cert and --tls-key go together"),
        ({"tls_client_ca": __file__}, "mTLS"),
        ({"upstream_ca": "/nonexistent/ca.pem"}, "does not exist"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"tier": "edge tier"}, "tier name 'edge tier' must be 1-64 letters"),
        ({"callers": "device,bad name"}, "tier name 'bad name' must be"),
        ({"callers": "device, device"}, "cannot be its own caller"),
        ({"auth_token": "t", "auth_token_file": __file__}, "give auth_token or auth_token_file, not both"),
        ({"upstream_auth_token_file": "/nonexistent/token"}, "does not exist"),
    ],
)
def test_invalid_settings_say_what_is_wrong(overrides: dict[str, object], message: str) -> None:
    values: dict[str, object] = {"tier": "device", "traces": "t", "trace_model": "m", "plaintext": True} | overrides
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TierSettings.with_defaults(**values)


def test_a_malformed_variable_names_itself() -> None:
    with pytest.raises(ValueError, match="RECSERVE_PORT='http' is not a valid int"):
        parse([], {"RECSERVE_PORT": "http"})


def test_every_variable_is_documented_in_the_readme() -> None:
    readme = README.read_text()
    for option in OPTIONS:
        assert f"| `{option.env}` | `{option.flag}` |" in readme, option.env
