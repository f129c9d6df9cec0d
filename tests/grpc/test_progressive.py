"""Progressive inference over three real gRPC tiers on loopback, and through the gateway with the official `openai`
client: the edge asks the cloud for a sketch and a repair over the wire, the bytes agree at both ends, and a stream
sends the points in order."""

from __future__ import annotations

from pathlib import Path

from recserve.core.progressive import ProgressivePath
from recserve.core.sketch import assemble
from recserve.engines.replay import ReplayEngine
from recserve.v1 import tier_pb2 as pb
from tests.grpc.gateway_server import running_gateway
from tests.grpc.test_three_tiers import NAMES, Stack, start_stack, stop_stack
from tests.unit.test_progressive_tier import POINTS, QUESTION, Always, SketchingEngine

EXPECTED = assemble(POINTS, ["edge on point 1.", "cloud on point 2.", "edge on point 3."])


async def progressive_stack(trace_folder: Path) -> Stack:
    """device → edge → cloud; the device forwards all, the edge serves long requests progressively and is unsure of
    its second point, which the cloud writes again."""
    stack = await start_stack(trace_folder, policy="forward-all", progressive_point_beta=0.34)
    device, edge, cloud = (running.tier for running in stack.tiers)
    device.engine = SketchingEngine("device")
    edge.engine = SketchingEngine("edge", logprobs={2: -3.0})
    cloud.engine = SketchingEngine("cloud")
    edge.progressive = Always(ProgressivePath.PROGRESSIVE)  # the device would sketch too with --progressive on
    return stack


def long_question() -> pb.InferRequest:
    request = pb.InferRequest(prompt=QUESTION, task=pb.TASK_KIND_GENERATE, family="advice")
    request.sampling.max_tokens = 600
    return request


async def test_the_sketch_and_the_repair_cross_the_wire_and_both_ends_count_the_bytes_of_the_hops(
    trace_folder: Path,
) -> None:
    stack = await progressive_stack(trace_folder)
    try:
        response = await stack.stub.Infer(long_question(), timeout=10)
        assert response.answer == EXPECTED
        assert response.answered_by == "edge"
        device_hop, edge_hop, *cloud_hops = response.hops
        assert edge_hop.decision == pb.DECISION_PROGRESSIVE
        assert [h.tier for h in cloud_hops] == ["cloud", "cloud"]  # the sketch, then the repaired point
        assert [e.repaired_by for e in edge_hop.progressive.expansions] == ["", "cloud", ""]
        assert response.load.in_flight == 1  # the device's own load, stamped on its reply
        for index, hop in enumerate((device_hop, edge_hop)):
            peer = NAMES[index + 1]
            assert stack.bytes_counted(index, peer, "sent") == hop.bytes_sent > 0
            assert stack.bytes_counted(index, peer, "received") == hop.bytes_received > 0
            assert stack.bytes_counted(index + 1, NAMES[index], "received") == hop.bytes_sent
            assert stack.bytes_counted(index + 1, NAMES[index], "sent") == hop.bytes_received
    finally:
        await stop_stack(stack)


async def test_a_progressive_answer_streams_point_by_point_through_the_gateway(trace_folder: Path) -> None:
    stack = await progressive_stack(trace_folder)
    try:
        async with running_gateway(stack.tiers[0].address) as gateway:
            client = gateway.client()
            chunks = await client.chat.completions.create(
                model="recserve",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=600,
                stream=True,
            )
            texts: list[str] = []
            recserve: dict[str, object] = {}
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    texts.append(chunk.choices[0].delta.content)
                recserve = (chunk.model_extra or {}).get("recserve") or recserve
            assert texts == [EXPECTED.split("\n")[0], *("\n" + line for line in EXPECTED.split("\n")[1:])]
            hops = recserve["hops"]
            assert isinstance(hops, list)
            assert hops[1]["decision"] == "progressive"
            assert hops[1]["progressive"]["points"] == list(POINTS)
            assert [e["repaired_by"] for e in hops[1]["progressive"]["expansions"]] == [None, "cloud", None]
            await client.close()
    finally:
        await stop_stack(stack)


async def test_a_tier_given_a_second_model_starts_it_and_its_points_cross_the_wire(trace_folder: Path) -> None:
    """--progressive-ensemble-model: the tier builds and starts a second engine of its kind; the point the edge's
    first model is unsure of is written by the second, and the cloud only sketches."""
    stack = await start_stack(
        trace_folder,
        policy="forward-all",
        progressive="on",
        progressive_point_beta=0.9,
        progressive_ensemble_model="large",
    )
    try:
        device, edge, cloud = (running.tier for running in stack.tiers)
        assert all(isinstance(t.ensemble, ReplayEngine) and t.ensemble.model == "large" for t in (device, edge, cloud))
        device.engine, edge.engine, cloud.engine = (
            SketchingEngine("device"),
            SketchingEngine("edge", logprobs={2: -3.0}),
            SketchingEngine("cloud"),
        )
        edge.ensemble = SketchingEngine("second", logprobs={2: -0.05})
        device.progressive, edge.progressive = None, Always(ProgressivePath.PROGRESSIVE)
        response = await stack.stub.Infer(long_question(), timeout=10)
        assert response.answer == assemble(POINTS, ["edge on point 1.", "second on point 2.", "edge on point 3."])
        edge_hop = response.hops[1]
        assert [e.ensemble_kept for e in edge_hop.progressive.expansions] == [False, True, False]
        assert [h.tier for h in response.hops[2:]] == ["cloud"]  # the sketch only
    finally:
        await stop_stack(stack)
