"""Property-based fuzzing of the real request handling: malformed and adversarial requests never crash a tier."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recserve.server.processes import TierProcesses
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc
from tests.conftest import write_trace_folder

pytestmark = [pytest.mark.integration, pytest.mark.processes]

# What a caller may legitimately see; INTERNAL, UNKNOWN or a hang would be a bug.
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
KNOWN_PROMPTS = [f"quiz question number {i}?" for i in range(3)] + [f"chat question number {i}?" for i in range(3)]
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    folder = tmp_path_factory.mktemp("fuzz")
    traces = write_trace_folder(folder / "traces", n_per_family=3)
    args = [
        ["--tier", tier, "--engine", "replay", "--traces", str(traces), "--trace-model", model, "--policy", "recserve"]
        for tier, model in (("device", "small"), ("cloud", "large"))
    ]
    stack = TierProcesses(args, folder)
    stack.start()
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports[0]}") as opened:
        yield opened
        # Still serving after everything the fuzzer threw at it.
        assert (
            pb_grpc.TierServiceStub(opened)
            .Infer(pb.InferRequest(prompt=KNOWN_PROMPTS[0], task=pb.TASK_KIND_CHOICE, options=["A", "B"]), timeout=10)
            .answer
        )
    assert stack.stop() == [0, 0]


text = st.one_of(st.sampled_from(KNOWN_PROMPTS), st.text(max_size=300), st.just(""))
hops = st.lists(
    st.builds(pb.Hop, tier=st.text(max_size=20), confidence=st.floats(), threshold=st.floats()), max_size=10
)
requests = st.builds(
    pb.InferRequest,
    request_id=st.text(max_size=200),
    prompt=text,
    system_prompt=st.one_of(st.just(""), st.text(max_size=50)),
    task=st.integers(min_value=-5, max_value=2**31 - 1) | st.sampled_from([1, 2]),
    options=st.lists(st.text(max_size=300), max_size=40) | st.just(["A", "B", "C", "D"]),
    family=st.text(max_size=80) | st.sampled_from(["quiz", "chat", ""]),
    sampling=st.builds(
        pb.SamplingParams,
        max_tokens=st.integers(min_value=0, max_value=2**32 - 1),
        temperature=st.floats(width=32),
        stop=st.lists(st.text(max_size=100), max_size=12),
    ),
    reference=st.text(max_size=50),
    offload=st.integers(min_value=-3, max_value=2**31 - 1) | st.sampled_from([0, 1]),
    hops=hops,
)


def check(invoke: object, payload: object) -> None:
    try:
        invoke(payload, timeout=10)  # type: ignore[operator]
    except grpc.RpcError as exc:
        error = exc
    else:
        return
    details = error.details() or ""
    assert error.code() in ACCEPTABLE, (error.code(), details)
    assert "Traceback" not in details
    assert details, "an error must say what is wrong"


@FUZZ
@given(request=requests)
def test_fuzzed_requests_get_an_answer_or_a_clear_error(channel: grpc.Channel, request: pb.InferRequest) -> None:
    check(pb_grpc.TierServiceStub(channel).Infer, request)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_fuzzed_bytes_get_an_answer_or_a_clear_error(channel: grpc.Channel, data: bytes) -> None:
    check(channel.unary_unary("/recserve.v1.TierService/Infer"), data)
