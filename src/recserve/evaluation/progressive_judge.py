"""The progressive quality harness: progressive answers against cloud-direct ones, judged pairwise by an LLM with the
order swapped, over the long-form questions.

Three OpenAI-compatible servers, any of them ours or not: one serving progressive answers (`recserve gateway` in
front of a tier started with `--progressive on`), one serving cloud-direct answers (by default the same gateway
with `extra_body={"recserve": {"offload": "last_tier"}}`; or vLLM's OpenAI server on the cloud model), and a judge.
Each question is asked of both; the judge sees the two answers twice, each order once (`recserve.evaluation.pairwise`
says how the verdicts combine). The report gives wins, ties and losses of progressive with 95% intervals, how often
the judge's verdict changed with the order or could not be parsed, the answers' mean lengths, and, from the
gateway's `recserve` object, how many answers were served progressively at all (the scheduler may pick cloud-direct
or local for a question; those pairs are reported apart).

Run it with real models: a tiny random-weight judge, or tiny answering models, measure nothing, and the report says
so loudly when it can tell.

    python -m recserve.evaluation.progressive_judge --progressive-url http://127.0.0.1:8000/v1 \\
        --judge-url http://127.0.0.1:8100/v1 --judge-model JUDGE --limit 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recserve.evaluation.pairwise import combine, judge_prompt, parse_verdict
from recserve.evaluation.progressive_report import (
    DEFAULT_JUDGE_MAX_TOKENS,
    DEFAULT_MAX_TOKENS,
    Answer,
    Endpoint,
    HarnessConfig,
    JudgeReply,
    Question,
    Record,
    Report,
    format_report,
)
from recserve.policies.sketch_router import BUNDLED_QUESTIONS

logger = logging.getLogger(__name__)

LAST_TIER = {"recserve": {"offload": "last_tier"}}


def load_questions(path: Path, *, suits_sketch_only: bool = False, limit: int | None = None) -> list[Question]:
    """The questions of a JSON-lines file (`qid`, `question`, optionally `suits_sketch`). `limit`: that many, spread
    evenly over the file, since files like the bundled one come in blocks of one category each."""
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ValueError(f"{path}:{number}: each line must be an object with a non-empty string `question`")
        suits = row.get("suits_sketch")
        questions.append(
            Question(int(row.get("qid", number - 1)), row["question"], None if suits is None else bool(suits))
        )
    if suits_sketch_only:
        questions = [q for q in questions if q.suits_sketch]
    if limit is not None and 0 < limit < len(questions):
        questions = [questions[index * len(questions) // limit] for index in range(limit)]
    return questions


def served_path(body: dict[str, Any] | None, headers: Any) -> tuple[str, bool]:
    """How a response was served, from the gateway's `recserve` object (a hop that decided `progressive` expanded
    a sketch), else its x-recserve-answered-by header; and whether it was degraded."""
    if isinstance(body, dict):
        hops = body.get("hops") or []
        degraded = bool(body.get("degraded"))
        if any(isinstance(hop, dict) and hop.get("decision") == "progressive" for hop in hops):
            return "progressive", degraded
        return f"answered by {body.get('answered_by') or '?'}", degraded
    answered_by = headers.get("x-recserve-answered-by") if headers is not None else None
    if answered_by:
        return f"answered by {answered_by}", headers.get("x-recserve-degraded") == "true"
    return "no recserve metadata", False


class Harness:
    def __init__(self, config: HarnessConfig) -> None:
        import openai  # here, not atop: every `recserve` command imports this module, few need the SDK

        self._sdk_error = openai.OpenAIError
        self.config = config
        self._slots = asyncio.Semaphore(config.concurrency)
        self._clients = {
            name: openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key, timeout=config.timeout)
            for name, endpoint in (("progressive", config.progressive), ("direct", config.direct),
                                   ("judge", config.judge))
        }  # fmt: skip
        self._models: dict[str, str] = {}

    async def run(self) -> Report:
        try:
            for name in self._clients:
                self._models[name] = await self._model(name)
            done = 0

            async def one(question: Question) -> Record:
                nonlocal done
                record = await self._pair(question)
                done += 1
                logger.info("%d/%d questions: qid %s %s", done, len(self.config.questions), question.qid,
                            record.judgement.outcome.value)  # fmt: skip
                return record

            records = await asyncio.gather(*(one(q) for q in self.config.questions))
        finally:
            for client in self._clients.values():
                await client.close()
        return Report(self.config, dict(self._models), list(records))

    def _endpoint(self, name: str) -> Endpoint:
        endpoint: Endpoint = getattr(self.config, name)
        return endpoint

    async def _model(self, name: str) -> str:
        """The model to ask for: the one given, else the first the server lists."""
        if self._endpoint(name).model:
            return self._endpoint(name).model
        async with self._slots:
            models = await self._clients[name].models.list()
        if not models.data:
            raise ValueError(f"the {name} server ({self._endpoint(name).base_url}) lists no model: give its model")
        return models.data[0].id

    async def _pair(self, question: Question) -> Record:
        progressive, direct = await asyncio.gather(
            self._answer("progressive", question), self._answer("direct", question)
        )
        record = Record(question, progressive, direct)
        if progressive.error or direct.error:
            return record
        record.replies = list(
            await asyncio.gather(
                self._judge(judge_prompt(question.question, progressive.text, direct.text)),
                self._judge(judge_prompt(question.question, direct.text, progressive.text)),
            )
        )
        if any(reply.error for reply in record.replies):
            return record
        record.judgement = combine(record.replies[0].verdict, record.replies[1].verdict)
        return record

    async def _answer(self, name: str, question: Question) -> Answer:
        endpoint = self._endpoint(name)
        try:
            async with self._slots:
                raw = await self._clients[name].chat.completions.with_raw_response.create(
                    model=self._models[name], messages=[{"role": "user", "content": question.question}],
                    max_tokens=self.config.max_tokens, temperature=0.0, extra_body=endpoint.extra_body,
                )  # fmt: skip
        except self._sdk_error as exc:
            logger.warning("the %s server failed on qid %s: %s", name, question.qid, exc)
            return Answer(error=f"{type(exc).__name__}: {exc}")
        completion = raw.parse()
        path, degraded = served_path((completion.model_extra or {}).get("recserve"), raw.headers)
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        tokens = completion.usage.completion_tokens if completion.usage is not None else None
        return Answer(text=text, completion_tokens=tokens, path=path, degraded=degraded)

    async def _judge(self, prompt: str) -> JudgeReply:
        try:
            async with self._slots:
                completion = await self._clients["judge"].chat.completions.create(
                    model=self._models["judge"], messages=[{"role": "user", "content": prompt}],
                    max_tokens=self.config.judge_max_tokens, temperature=0.0, extra_body=self.config.judge.extra_body,
                )  # fmt: skip
        except self._sdk_error as exc:
            logger.warning("the judge failed: %s", exc)
            return JudgeReply(error=f"{type(exc).__name__}: {exc}")
        if not completion.choices:
            return JudgeReply(error="the judge's reply has no choices")
        choice = completion.choices[0]
        text = choice.message.content or ""
        return JudgeReply(text=text, finish_reason=choice.finish_reason or "", verdict=parse_verdict(text))


async def run_harness(config: HarnessConfig) -> Report:
    return await Harness(config).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def endpoint(name: str, what: str, required: bool) -> None:
        variable = f"RECSERVE_{name.upper()}_API_KEY"
        parser.add_argument(f"--{name}-url", required=required, help=f"base URL (…/v1) of {what}")
        parser.add_argument(f"--{name}-model", default="", help="model to ask for (default: the first it lists)")
        parser.add_argument(
            f"--{name}-api-key", default=None,
            help=f"its API key (default: ${variable}, else $OPENAI_API_KEY; a flag shows in `ps`)",
        )  # fmt: skip
        parser.add_argument(f"--{name}-extra-body", type=_json_object, default=None, metavar="JSON",
                            help="extra request fields, e.g. the recserve extension object")  # fmt: skip

    endpoint("progressive", "the server of progressive answers (the gateway in front of a --progressive on tier)", True)
    endpoint(
        "direct",
        "the server of cloud-direct answers (default: the progressive server, with extra body "
        f"{json.dumps(LAST_TIER)} unless --direct-extra-body is given; or e.g. vLLM's server of the cloud model)",
        False,
    )
    endpoint("judge", "the judge's server", True)
    parser.add_argument("--questions", type=Path, default=BUNDLED_QUESTIONS, help="JSON lines: qid, question, "
                        "suits_sketch (default: the bundled 80 Vicuna questions)")  # fmt: skip
    parser.add_argument("--suits-sketch-only", action="store_true", help="only the questions labelled suits_sketch")
    parser.add_argument("--limit", type=int, default=None, help="this many questions, spread evenly over the file")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="max_tokens of each answer (the scheduler answers locally below 200)")  # fmt: skip
    parser.add_argument("--judge-max-tokens", type=int, default=DEFAULT_JUDGE_MAX_TOKENS)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once, over all servers")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", default=None, metavar="FILE|-", help="write the report and every pair as JSON "
                        "(-: to stdout, instead of the text report)")  # fmt: skip


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def config_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> HarnessConfig:
    environ = dict(os.environ) if environ is None else environ

    def endpoint(name: str) -> Endpoint:
        key = getattr(args, f"{name}_api_key")
        if key is None:
            key = environ.get(f"RECSERVE_{name.upper()}_API_KEY") or environ.get("OPENAI_API_KEY") or "none"
        return Endpoint(getattr(args, f"{name}_url"), getattr(args, f"{name}_model"), key,
                        getattr(args, f"{name}_extra_body"))  # fmt: skip

    if args.direct_url is None:
        args.direct_url = args.progressive_url
        if args.direct_extra_body is None:
            args.direct_extra_body = LAST_TIER
    for name in ("limit", "max_tokens", "judge_max_tokens", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    questions = load_questions(args.questions, suits_sketch_only=args.suits_sketch_only, limit=args.limit)
    if not questions:
        raise ValueError(f"no questions in {args.questions}")
    return HarnessConfig(
        endpoint("progressive"), endpoint("direct"), endpoint("judge"), questions, max_tokens=args.max_tokens,
        judge_max_tokens=args.judge_max_tokens, concurrency=args.concurrency, timeout=args.timeout,
        questions_name=args.questions.name + (" (suits_sketch only)" if args.suits_sketch_only else ""),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except (OSError, ValueError) as exc:
        print(f"progressive judge: {exc}", file=sys.stderr)
        return 2
    import openai

    # The SDK's HTTP client logs every request at INFO: hundreds of lines that bury the progress.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        report = asyncio.run(run_harness(config))
    except (openai.OpenAIError, ValueError) as exc:
        print(f"progressive judge: {exc}", file=sys.stderr)
        return 1
    if args.json != "-":
        print(format_report(report))
    if args.json:
        text = json.dumps(report.as_json(), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recserve.evaluation.progressive_judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
