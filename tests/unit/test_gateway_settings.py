"""The gateway's settings (flags and RECSERVE_GATEWAY_* variables) and request models."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from recserve.gateway import settings as gateway_settings
from recserve.gateway.protocol import ChatCompletionRequest, CompletionRequest
from recserve.gateway.settings import GatewaySettings
from recserve.server.settings import add_arguments, settings_table
from recserve.v1 import tier_pb2 as pb

DOC = Path(__file__).resolve().parents[2] / "docs" / "gateway.md"


def parse(argv: list[str], env: dict[str, str]) -> GatewaySettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser, env, gateway_settings.OPTIONS)
    return gateway_settings.from_namespace(parser.parse_args(argv))


def test_flags_win_over_variables_which_win_over_defaults() -> None:
    env = {"RECSERVE_GATEWAY_PORT": "9000", "RECSERVE_GATEWAY_TARGET": "device:50051", "RECSERVE_PORT": "1"}
    settings = parse(["--port", "9001"], env)
    assert settings.port == 9001
    assert settings.target == "device:50051"
    assert settings.request_timeout == 120.0
    assert settings.served_model_name == "recserve"


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"target": "nohost"}, "--target must be HOST:PORT"),
        ({"request_timeout": 0}, "request_timeout must be positive"),
        ({"cert": "c.pem"}, "--cert and --key go together"),
        ({"api_keys": "k", "api_key_file": __file__}, "give api_keys or api_key_file, not both"),
        ({"token_file": "/nonexistent/token"}, "token_file file '/nonexistent/token' does not exist"),
    ],
)
def test_invalid_settings_say_what_is_wrong(overrides: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match="invalid gateway settings: ") as caught:
        GatewaySettings.with_defaults(**overrides)
    assert problem in str(caught.value)


def test_api_keys_from_a_variable_or_a_file(tmp_path: Path) -> None:
    assert GatewaySettings.with_defaults(api_keys=" a, b ,").client_api_keys() == ("a", "b")
    keys = tmp_path / "keys"
    keys.write_text("# comment\n\nkey-1\n  key-2  \n")
    assert GatewaySettings.with_defaults(api_key_file=str(keys)).client_api_keys() == ("key-1", "key-2")
    keys.write_text("# none\n")
    with pytest.raises(ValueError, match="holds no API key"):
        GatewaySettings.with_defaults(api_key_file=str(keys)).client_api_keys()


def test_the_docs_settings_table_is_settings_table() -> None:
    lines = DOC.read_text().splitlines()
    start = lines.index("| variable | flag | default | meaning |")
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    assert "\n".join(lines[start:end]) == settings_table(gateway_settings.OPTIONS)


def test_a_chat_request_becomes_an_infer_request() -> None:
    request = ChatCompletionRequest.model_validate(
        {
            "model": "recserve", "max_tokens": 10, "max_completion_tokens": 20, "stop": "\n", "logprobs": True,
            "temperature": 0.5, "frequency_penalty": 1,
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "recserve": {"task": "choice", "options": ["A", "B"], "offload": "last_tier", "family": "quiz"},
        }
    )  # fmt: skip
    infer = request.infer_request("r1")
    assert [(m.role, m.content) for m in infer.messages] == [("system", "Be brief."), ("user", "Hi there")]
    assert infer.sampling.max_tokens == 20
    assert list(infer.sampling.stop) == ["\n"]
    assert infer.sampling.logprobs
    assert infer.offload == pb.OFFLOAD_MODE_LAST_TIER
    assert infer.task == pb.TASK_KIND_CHOICE
    assert infer.request_id == "r1"
    assert not infer.prompt


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"prompt": "x", "n": 3}, "n must be 1"),
        ({"prompt": [1, 2]}, "lists of prompts"),
        ({"prompt": "x", "recserve": {"tsk": "choice"}}, "Extra inputs are not permitted"),
        ({"prompt": "x", "recserve": {"task": "choice"}}, "at least two options"),
        ({"prompt": "x", "recserve": {"request_id": "a\nb"}}, "printable ASCII"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"prompt": "x", "echo": True}, "echo is not supported"),
    ],
)
def test_invalid_completion_requests(body: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        CompletionRequest.model_validate(body)
