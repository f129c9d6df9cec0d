"""What a run of the progressive judge is given and what it finds, and the report made of it: wins, ties and losses
per group of pairs, the judge's reliability, the answers' lengths and paths, and loud caveats where the figures can
measure nothing."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from recserve.evaluation.pairwise import Outcome, PairJudgement, Tally, Verdict, wilson_interval

# The progressive scheduler answers locally below 200 expected tokens (ProgressiveConfig.min_answer_tokens): a
# shorter limit would never see the progressive path.
DEFAULT_MAX_TOKENS = 512
# Room for a judge's reasons before its verdict line.
DEFAULT_JUDGE_MAX_TOKENS = 1024


@dataclass(frozen=True)
class Question:
    qid: int
    question: str
    suits_sketch: bool | None = None  # the human label, where the file has one


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server: its base URL (ending in /v1), the model to ask for (empty: the first it lists),
    its API key, and extra request fields (the `recserve` extension object)."""

    base_url: str
    model: str = ""
    api_key: str = "none"
    extra_body: dict[str, Any] | None = None


@dataclass(frozen=True)
class HarnessConfig:
    progressive: Endpoint
    direct: Endpoint
    judge: Endpoint
    questions: Sequence[Question]
    max_tokens: int = DEFAULT_MAX_TOKENS
    judge_max_tokens: int = DEFAULT_JUDGE_MAX_TOKENS
    concurrency: int = 4  # requests in flight at once, over all three servers
    timeout: float = 600.0  # seconds per request
    questions_name: str = ""  # for the report


@dataclass
class Answer:
    text: str = ""
    error: str = ""
    completion_tokens: int | None = None
    path: str = ""  # how it was served: "progressive", "answered by cloud", ..., "no recserve metadata"
    degraded: bool = False

    @property
    def words(self) -> int:
        return len(self.text.split())


@dataclass
class JudgeReply:
    text: str = ""
    error: str = ""
    finish_reason: str = ""
    verdict: Verdict | None = None


@dataclass
class Record:
    question: Question
    progressive: Answer
    direct: Answer
    # The judge's replies: progressive shown as A, then as B; empty where an answer failed.
    replies: list[JudgeReply] = field(default_factory=list)
    judgement: PairJudgement = field(default_factory=lambda: PairJudgement(Outcome.FAILED))


@dataclass
class Report:
    config: HarnessConfig
    models: dict[str, str]  # the model asked of each server: progressive, direct, judge
    records: list[Record]

    def tally(self, keep: Callable[[Record], bool] = lambda record: True) -> Tally:
        tally = Tally()
        for record in self.records:
            if keep(record):
                tally.add(record.judgement, tuple(r.verdict for r in record.replies if not r.error))
        return tally

    def groups(self) -> dict[str, Tally]:
        """All pairs; those whose question suits a sketch (the human label); those the progressive server actually
        answered progressively, and the rest (served cloud-direct or locally by the scheduler's choice)."""
        groups = {"all questions": self.tally()}
        if any(r.question.suits_sketch is not None for r in self.records):
            groups["suits a sketch"] = self.tally(lambda r: r.question.suits_sketch is True)
            groups["does not suit a sketch"] = self.tally(lambda r: r.question.suits_sketch is False)
        groups["answered progressively"] = self.tally(lambda r: r.progressive.path == "progressive")
        groups["answered otherwise"] = self.tally(lambda r: r.progressive.path != "progressive")
        return groups

    def as_json(self) -> dict[str, Any]:
        config = self.config
        return {
            "models": self.models,
            "questions": config.questions_name,
            "max_tokens": config.max_tokens,
            "groups": {name: tally.as_json() for name, tally in self.groups().items()},
            "answers": {name: lengths(self.records, name) for name in ("progressive", "direct")},
            "caveats": caveats(self),
            "records": [_record_json(record) for record in self.records],
        }


def lengths(records: Sequence[Record], side: str) -> dict[str, Any]:
    """Mean words and completion tokens of one side's answers, and how they were served."""
    answers = [getattr(record, side) for record in records]
    done = [a for a in answers if not a.error]
    tokens = [a.completion_tokens for a in done if a.completion_tokens is not None]
    paths: dict[str, int] = {}
    for answer in done:
        paths[answer.path] = paths.get(answer.path, 0) + 1
    return {
        "answers": len(done),
        "failed": len(answers) - len(done),
        "degraded": sum(a.degraded for a in done),
        "mean_words": sum(a.words for a in done) / len(done) if done else None,
        "mean_completion_tokens": sum(tokens) / len(tokens) if tokens else None,
        "paths": dict(sorted(paths.items())),
    }


def _record_json(record: Record) -> dict[str, Any]:
    return {
        "qid": record.question.qid,
        "question": record.question.question,
        "suits_sketch": record.question.suits_sketch,
        "progressive": asdict(record.progressive),
        "direct": asdict(record.direct),
        "replies": [asdict(reply) for reply in record.replies],
        "outcome": record.judgement.outcome.value,
        "consistent": record.judgement.consistent,
    }


# Names that say a model is one of the generated test models (or a random-weight one like them): such a model cannot
# judge, and its answers are noise. Serve them under such a name (the gateway's --served-model-name) to be warned.
_TINY_NAME = re.compile(r"tiny|random", re.IGNORECASE)
SIDES = {"progressive": "progressive", "direct": "cloud-direct"}


def caveats(report: Report) -> list[str]:
    """Why the report's figures may measure nothing: a judge or answering model named as a tiny random-weight one, a
    judge that mostly gives no verdict or follows the answers' order. Empty when none of that shows."""
    notes = []
    judge = report.models.get("judge", "")
    if _TINY_NAME.search(judge):
        notes.append(f"the judge, {judge!r}, is named as a tiny or random-weight model: its verdicts measure nothing")
    for side, label in SIDES.items():
        if _TINY_NAME.search(report.models.get(side, "")):
            notes.append(f"the {label} model, {report.models[side]!r}, is named as a tiny or random-weight model: its "
                         "answers are noise")  # fmt: skip
    tally = report.tally()
    if tally.replies and 2 * tally.unparseable_replies >= tally.replies:
        notes.append(
            f"{tally.unparseable_replies} of {tally.replies} judge replies end in no verdict line: the judge does not "
            "follow the prompt"
        )
    if tally.judged >= 4 and 2 * tally.inconsistent >= tally.judged:
        notes.append(
            f"the judge's verdict changed with the answers' order in {tally.inconsistent} of {tally.judged} pairs: it "
            "follows the position more than the answers"
        )
    if tally.judged == 0:
        notes.append("no pair got a verdict in both orders: there is no quality figure here")
    if notes:
        notes.append("QUALITY IS UNMEASURED: these figures show that the harness runs, not how progressive answers "
                     "compare with cloud-direct ones; run it with real models and a capable judge")  # fmt: skip
    return notes


def _loud(notes: Sequence[str]) -> list[str]:
    rule = "!" * 100
    lines = [rule]
    for note in notes:
        lines += textwrap.wrap(note, 94, initial_indent="!! ", subsequent_indent="!!   ")
    return [*lines, rule]


def _share(count: int, total: int) -> str:
    if not total:
        return "-"
    low, high = wilson_interval(count, total)
    return f"{count} {count / total:.0%} [{low:.0%}, {high:.0%}]"


def _endpoint_line(label: str, endpoint: Endpoint, model: str) -> str:
    extra = f", extra body {json.dumps(endpoint.extra_body)}" if endpoint.extra_body else ""
    return f"  {label + ':':<14}{endpoint.base_url} (model {model!r}){extra}"


def format_report(report: Report) -> str:
    config = report.config
    notes = caveats(report)
    lines = [*_loud(notes), ""] if notes else []
    lines += [
        "Progressive against cloud-direct answers, judged pairwise in both orders",
        _endpoint_line("progressive", config.progressive, report.models.get("progressive", "")),
        _endpoint_line("cloud-direct", config.direct, report.models.get("direct", "")),
        _endpoint_line("judge", config.judge, report.models.get("judge", "")),
        f"  {'questions:':<14}{len(config.questions)} of {config.questions_name or 'the questions'}; max_tokens "
        f"{config.max_tokens} per answer, {config.judge_max_tokens} per judge reply",
        "",
        f"{'pairs':<24}{'n':>4}{'judged':>8}  {'progressive wins':<20}{'ties':<20}{'losses':<20}"
        f"{'inconsistent':<20}{'no verdict':>11}{'failed':>8}",
    ]
    for name, tally in report.groups().items():
        lines.append(
            f"{name:<24}{tally.pairs:>4}{tally.judged:>8}  {_share(tally.wins, tally.judged):<20}"
            f"{_share(tally.ties, tally.judged):<20}{_share(tally.losses, tally.judged):<20}"
            f"{_share(tally.inconsistent, tally.judged):<20}{tally.unparseable:>11}{tally.failed:>8}"
        )
    tally = report.tally()
    lines.append("")
    cut = sum(r.finish_reason == "length" for record in report.records for r in record.replies)
    lines += [
        "Wins, ties and losses: of the pairs with a verdict in both orders, with 95% Wilson intervals. A pair whose",
        "two orders disagree counts as a tie (inconsistent: how many did); a pair with a reply that ends in no",
        "verdict line is counted under 'no verdict', not judged; 'failed': an answer or a judge call failed.",
        "",
        f"judge replies: {tally.replies}; without a verdict line: {_share(tally.unparseable_replies, tally.replies)}; "
        f"cut at max_tokens: {cut}; pairs with the same position preferred in both orders: {tally.same_position}",
        "",
        f"{'answers':<14}{'n':>4}{'failed':>8}{'mean words':>12}{'mean tokens':>13}  served",
    ]
    for side, label in SIDES.items():
        figures = lengths(report.records, side)
        words, tokens = figures["mean_words"], figures["mean_completion_tokens"]
        served = ", ".join(f"{path} {count}" for path, count in figures["paths"].items())
        degraded = f" ({figures['degraded']} degraded)" if figures["degraded"] else ""
        lines.append(
            f"{label:<14}{figures['answers']:>4}{figures['failed']:>8}"
            f"{'-' if words is None else f'{words:.1f}':>12}{'-' if tokens is None else f'{tokens:.1f}':>13}"
            f"  {served}{degraded}"
        )
    if notes:
        lines += ["", *_loud(notes)]
    return "\n".join(lines)
