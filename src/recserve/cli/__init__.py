"""The `recserve` command: serve a tier, ask a question, run the OpenAI-compatible HTTP gateway, evaluate on
traces, calibrate a policy for a deployment, judge progressive answers against cloud-direct ones, make tiny models,
run the demo.

The top layer: may import every package; none imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from recserve.core.engine import EngineError
from recserve.core.untrusted import escape_controls
from recserve.evaluation import calibrate, progressive_judge
from recserve.evaluation import command as eval_command
from recserve.gateway import settings as gateway_settings
from recserve.server import settings as tier_settings
from recserve.server.health import add_health_command, check_health
from recserve.server.security import bearer_metadata, channel_credentials, token
from recserve.v1 import tier_pb2 as pb
from recserve.v1 import tier_pb2_grpc as pb_grpc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recserve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one tier as a gRPC server")
    try:
        tier_settings.add_arguments(serve)
    except ValueError as exc:
        parser.exit(2, f"recserve: {exc}\n")

    ask = commands.add_parser("ask", help="send one prompt to a tier and print the answer and its hops")
    ask.add_argument("prompt")
    ask.add_argument("--target", default="127.0.0.1:50051", help="HOST:PORT of the tier to ask (usually the device)")
    ask.add_argument("--choice", default="", help="comma-separated options, e.g. A,B,C,D (makes it a CHOICE task)")
    ask.add_argument("--family", default="", help="task family, e.g. mmlu")
    ask.add_argument("--reference", default="", help="the correct answer, for the tiers' accuracy metrics")
    ask.add_argument("--system", default="", help="system prompt")
    ask.add_argument("--max-tokens", type=int, default=0, help="0: the tier's default")
    ask.add_argument("--local-only", action="store_true", help="answer at the first tier, never forward")
    ask.add_argument(
        "--requirement",
        type=float,
        default=None,
        help="seconds the answer may take: a processing-time requirement the placement meets where it can "
        "(apart from --timeout, past which the call fails)",
    )
    ask.add_argument("--service-class", default="", help="e.g. interactive or batch")
    ask.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds, propagated up every hop")
    ask.add_argument("--json", action="store_true", help="print the whole response as JSON")
    ask.add_argument("--stream", action="store_true", help="print the answer as the answering tier streams it")
    ask.add_argument("--ca", default="", help="PEM CA bundle that signed the tier's certificate (TLS)")
    ask.add_argument("--cert", default="", help="PEM client certificate, for a tier that requires mTLS")
    ask.add_argument("--key", default="", help="PEM private key for --cert")
    ask.add_argument(
        "--token",
        default="",
        help="bearer token, for a tier started with --auth-token (shows in `ps`: see --token-file)",
    )
    ask.add_argument("--token-file", default="", help="file holding the bearer token")

    gateway = commands.add_parser(
        "gateway", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) in front of a tier"
    )
    try:
        tier_settings.add_arguments(gateway, options=gateway_settings.OPTIONS)
    except ValueError as exc:
        parser.exit(2, f"recserve: {exc}\n")

    add_health_command(commands)

    models = commands.add_parser("models", help="tiny generated models for tests and the offline demo")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    make = models_commands.add_parser("make", help="write device < edge < cloud models as GGUF and HF folders")
    make.add_argument("dir", type=Path)
    make.add_argument("--seed", type=int, default=0)

    certs = commands.add_parser("certs", help="development TLS certificates (a private CA, one per tier)")
    certs_commands = certs.add_subparsers(dest="certs_command", required=True)
    certs_make = certs_commands.add_parser("make", help="write a CA, device/edge/cloud and client certificates")
    certs_make.add_argument("dir", type=Path)
    certs_make.add_argument("--names", default="device,edge,cloud", help="tier names (certificate DNS names)")

    evaluation = commands.add_parser("eval", help="replay a trace set: accuracy and bytes of an offloading policy")
    eval_command.add_arguments(evaluation)

    calibration = commands.add_parser(
        "calibrate",
        help="choose a policy's split, priors or thresholds on labelled queries of a chain, and write each tier's "
        "settings",
    )
    calibrate.add_arguments(calibration)

    judge = commands.add_parser(
        "progressive-judge",
        help="progressive against cloud-direct answers over the long-form questions, judged pairwise by an LLM "
        "in both orders (any OpenAI-compatible servers)",
    )
    progressive_judge.add_arguments(judge)

    demo = commands.add_parser("demo", help="three local tiers, benchmark questions through the device tier")
    demo.add_argument(
        "--engine",
        choices=("replay", "llama_cpp", "vllm"),
        default=None,
        help="default: replay for the questions, llama_cpp for --serve (the tiny models answer any prompt)",
    )
    demo.add_argument(
        "--limit", type=int, default=None, help="questions per benchmark (default: all; 20 for llama_cpp)"
    )
    demo.add_argument("--concurrency", type=int, default=1, help="requests in flight (1 keeps runs reproducible)")
    demo.add_argument("--models-dir", type=Path, default=Path("models"), help="where llama_cpp models are made")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="instead of the questions: keep the tiers running behind the OpenAI-compatible gateway until Ctrl-C",
    )
    demo.add_argument("--port", type=int, default=8000, help="--serve: the gateway's port on 127.0.0.1")

    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if args.command == "eval":
        return eval_command.run(args)
    if args.command == "calibrate":
        return calibrate.run(args)
    if args.command == "progressive-judge":
        return progressive_judge.run(args)
    if args.command == "serve":
        return _serve(parser, args, sys.argv[1:] if argv is None else argv)
    if args.command == "ask":
        return _ask(args)
    if args.command == "gateway":
        return _gateway(parser, args, sys.argv[1:] if argv is None else argv)
    if args.command == "health":
        return check_health(args)
    if args.command == "certs":
        from recserve.tools.certs import make_certificates

        for name, path in make_certificates(args.dir, args.names.split(",")).items():
            print(f"{name}: {path}")
        return 0
    if args.command == "models":
        from recserve.tools.models import make_tiny_models

        for tier, paths in make_tiny_models(args.dir, seed=args.seed).items():
            print(f"{tier}: {paths.gguf} (llama.cpp), {paths.hf_dir} (Hugging Face)")
        return 0
    from recserve.tools.demo import run_demo, serve_demo

    if args.serve:
        return serve_demo(args.engine or "llama_cpp", port=args.port, model_dir=args.models_dir)
    run_demo(args.engine or "replay", limit=args.limit, concurrency=args.concurrency, model_dir=args.models_dir)
    return 0


class OneLineFormatter(logging.Formatter):
    """One log record, one line: line breaks and control characters in a message (an id or a peer's error text
    quoted in it) are escaped, so no input can forge log lines. Tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from recserve.server.app import StartupError, serve

    try:
        settings = tier_settings.from_namespace(args)
    except ValueError as exc:
        parser.exit(2, f"recserve serve: {exc}\n")
    if any(arg.split("=", 1)[0] in ("--auth-token", "--upstream-auth-token") for arg in argv):
        print(
            "recserve serve: warning: a token given as a flag shows in `ps`: use its variable or file", file=sys.stderr
        )
    try:
        return asyncio.run(serve(settings))
    except (StartupError, EngineError) as exc:
        print(f"recserve serve: tier {settings.tier}: {exc}", file=sys.stderr)
        return 1


def _gateway(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> int:
    from recserve.gateway.app import create_app, serve

    try:
        settings = gateway_settings.from_namespace(args)
        app = create_app(settings)  # reads the key and token files
    except (OSError, ValueError) as exc:
        parser.exit(2, f"recserve gateway: {exc}\n")
    if any(arg.split("=", 1)[0] in ("--token", "--api-keys") for arg in argv):
        print("recserve gateway: warning: a secret given as a flag shows in `ps`: use its variable or file",
              file=sys.stderr)  # fmt: skip
    return asyncio.run(serve(settings, app))


def _channel(target: str, ca: str, cert: str, key: str) -> grpc.aio.Channel:
    credentials = channel_credentials(ca, cert, key)
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


def _ask(args: argparse.Namespace) -> int:
    options = [o.strip() for o in args.choice.split(",") if o.strip()]
    request = pb.InferRequest(
        prompt=args.prompt,
        system_prompt=args.system,
        task=pb.TASK_KIND_CHOICE if options else pb.TASK_KIND_GENERATE,
        options=options,
        family=args.family,
        reference=args.reference,
        sampling=pb.SamplingParams(max_tokens=args.max_tokens),
        offload=pb.OFFLOAD_MODE_LOCAL_ONLY if args.local_only else pb.OFFLOAD_MODE_AUTO,
        requirement_seconds=args.requirement,
        service_class=args.service_class,
    )

    try:
        bearer = token(args.token, args.token_file)
    except (OSError, ValueError) as exc:
        print(f"recserve ask: cannot read the token: {exc}", file=sys.stderr)
        return 1

    async def call() -> pb.InferResponse:
        async with _channel(args.target, args.ca, args.cert, args.key) as channel:
            stub = pb_grpc.TierServiceStub(channel)
            if not args.stream:
                response: pb.InferResponse = await stub.Infer(
                    request, timeout=args.timeout, metadata=bearer_metadata(bearer)
                )
                return response
            # The answer as it comes, then the final message, which leaves the streamed text out.
            texts: list[str] = []
            final = pb.InferResponse()
            async for event in stub.InferStream(request, timeout=args.timeout, metadata=bearer_metadata(bearer)):
                if event.WhichOneof("event") == "delta":
                    texts.append(event.delta.text)
                    if not args.json:
                        print(event.delta.text, end="", flush=True)
                else:
                    final.CopyFrom(event.final)
            if not args.json:
                print()
            final.answer = "".join(texts)
            return final

    try:
        response = asyncio.run(call())
    except grpc.aio.AioRpcError as exc:
        print(f"recserve ask: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
        return 0
    chosen = f" (option {response.chosen_option})" if response.chosen_option else ""
    print(f"answer{chosen}: {response.answer}")
    print(f"answered by {response.answered_by} with confidence {response.confidence.value:.4f}")
    for hop in response.hops:
        decision = pb.Decision.Name(hop.decision).removeprefix("DECISION_").lower()
        print(
            f"  {hop.tier:>8}: confidence {hop.confidence:.4f} threshold {hop.threshold:.4f} {decision:<9} "
            f"engine {hop.engine_seconds * 1000:.1f} ms, sent {hop.bytes_sent} B, received {hop.bytes_received} B"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
