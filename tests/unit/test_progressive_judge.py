"""The progressive judge's pure parts: the verdict line, how the two orders of a pair combine (MT-Bench's position
bias control), the tallies and their intervals, the questions, the served path, the caveats and the flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from recserve.evaluation.pairwise import (
    JUDGE_PROMPT,
    Outcome,
    PairJudgement,
    Tally,
    Verdict,
    combine,
    judge_prompt,
    parse_verdict,
    wilson_interval,
)
from recserve.evaluation.progressive_judge import LAST_TIER, add_arguments, config_from, load_questions, served_path
from recserve.evaluation.progressive_report import (
    Answer,
    Endpoint,
    HarnessConfig,
    JudgeReply,
    Question,
    Record,
    Report,
    caveats,
    format_report,
)
from recserve.policies.sketch_router import BUNDLED_QUESTIONS

A, B, TIE = Verdict.A, Verdict.B, Verdict.TIE


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ("The first is clearer.\nVerdict: A", A),
        ("Reasons.\n\nverdict: b\n\n", B),
        ("Both are fine.\nVerdict: Tie.", TIE),
        ("**Verdict: A**", A),
        ("Verdict: [[B]]", B),
        ("> Verdict - tie", TIE),
        ("  VERDICT:A  ", A),
    ],
)
def test_a_verdict_on_the_last_line_is_read(reply: str, verdict: Verdict) -> None:
    assert parse_verdict(reply) == verdict


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "   \n  ",
        "Verdict: A\nOn reflection, B is better.",  # the verdict is not the last line
        "A",  # no "Verdict:"
        "Verdict: C",
        "Verdict: A or B",
        "Verdict: A because it is longer",
        "I prefer answer A. Verdict: A",  # the line must be the verdict alone
        "x7#k Verdict",
    ],
)
def test_anything_else_is_unparseable(reply: str | None) -> None:
    assert parse_verdict(reply) is None


def test_the_prompt_shows_both_answers_and_each_verdict_line_it_asks_for_parses() -> None:
    prompt = judge_prompt("  Why is the sky blue?\n", "Rayleigh scattering.", "Because it is.")
    assert "[Question]\nWhy is the sky blue?\n" in prompt
    assert "[Answer A]\nRayleigh scattering.\n[End of answer A]" in prompt
    assert "[Answer B]\nBecause it is.\n[End of answer B]" in prompt
    asked = JUDGE_PROMPT.splitlines()[-3:]
    assert [parse_verdict(line) for line in asked] == [A, B, TIE]


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        # The candidate is A in the first order and B in the second.
        (A, B, PairJudgement(Outcome.WIN, consistent=True)),
        (B, A, PairJudgement(Outcome.LOSS, consistent=True)),
        (TIE, TIE, PairJudgement(Outcome.TIE, consistent=True)),
        # Position bias: the same slot both times names different answers; never a win or a loss.
        (A, A, PairJudgement(Outcome.TIE, consistent=False, same_position=True)),
        (B, B, PairJudgement(Outcome.TIE, consistent=False, same_position=True)),
        # A preference in one order only: a tie.
        (A, TIE, PairJudgement(Outcome.TIE, consistent=False)),
        (TIE, A, PairJudgement(Outcome.TIE, consistent=False)),
        (TIE, B, PairJudgement(Outcome.TIE, consistent=False)),
        # No verdict in either order: counted apart, never a tie.
        (None, B, PairJudgement(Outcome.UNPARSEABLE)),
        (A, None, PairJudgement(Outcome.UNPARSEABLE)),
        (None, None, PairJudgement(Outcome.UNPARSEABLE)),
    ],
)
def test_a_win_needs_both_orders(first: Verdict | None, second: Verdict | None, expected: PairJudgement) -> None:
    assert combine(first, second) == expected


def test_the_tally_keeps_unparseable_and_failed_pairs_out_of_the_shares() -> None:
    tally = Tally()
    for first, second in [(A, B), (A, B), (B, A), (TIE, TIE), (A, A), (None, B), (None, None)]:
        tally.add(combine(first, second), (first, second))
    tally.add(PairJudgement(Outcome.FAILED))
    assert (tally.wins, tally.ties, tally.losses) == (2, 2, 1)
    assert (tally.unparseable, tally.failed, tally.judged, tally.pairs) == (2, 1, 5, 8)
    assert (tally.inconsistent, tally.same_position) == (1, 1)
    assert (tally.replies, tally.unparseable_replies) == (14, 3)
    figures = tally.as_json()
    assert figures["wins"] == {"count": 2, "share": 0.4, "ci95": list(wilson_interval(2, 5))}
    assert figures["unparseable_replies"]["share"] == pytest.approx(3 / 14)
    assert Tally().as_json()["wins"] == {"count": 0, "share": None, "ci95": [0.0, 1.0]}


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0), (1, 1, 0.2065, 1.0), (0, 0, 0.0, 1.0)],
)
def test_the_wilson_interval(successes: int, trials: int, low: float, high: float) -> None:
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=1e-4)


def test_the_bundled_questions_and_a_limit_spread_over_them() -> None:
    questions = load_questions(BUNDLED_QUESTIONS)
    assert len(questions) == 80
    assert sum(q.suits_sketch is True for q in questions) == 37
    assert [q.qid for q in load_questions(BUNDLED_QUESTIONS, limit=4)] == [0, 20, 40, 60]
    suited = load_questions(BUNDLED_QUESTIONS, suits_sketch_only=True, limit=5)
    assert len(suited) == 5
    assert all(q.suits_sketch for q in suited)


def test_questions_without_labels_and_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "One?"}\n\n{"qid": 7, "question": "Two?", "suits_sketch": false}\n')
    assert load_questions(path) == [Question(0, "One?", None), Question(7, "Two?", False)]
    path.write_text('{"qid": 1}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: .*question"):
        load_questions(path)


def test_the_served_path_from_the_recserve_object_or_the_headers() -> None:
    hops = [{"tier": "edge", "decision": "progressive"}, {"tier": "cloud", "decision": "answered"}]
    assert served_path({"answered_by": "edge", "hops": hops}, {}) == ("progressive", False)
    direct = {"answered_by": "cloud", "degraded": False, "hops": [{"decision": "forwarded"}, {"decision": "answered"}]}
    assert served_path(direct, {}) == ("answered by cloud", False)
    assert served_path({"answered_by": "edge", "degraded": True, "hops": []}, {}) == ("answered by edge", True)
    headers = {"x-recserve-answered-by": "cloud", "x-recserve-degraded": "false"}
    assert served_path(None, headers) == ("answered by cloud", False)
    assert served_path(None, {}) == ("no recserve metadata", False)


def _report(judge: str, verdicts: list[tuple[Verdict | None, Verdict | None]]) -> Report:
    endpoint = Endpoint("http://127.0.0.1:1/v1")
    questions = [Question(i, f"Question {i}?", i % 2 == 0) for i in range(len(verdicts))]
    records = []
    for question, (first, second) in zip(questions, verdicts, strict=True):
        answer = Answer(text="one two three", completion_tokens=4, path="progressive" if question.qid else "x")
        replies = [JudgeReply(text="", verdict=first), JudgeReply(text="", verdict=second)]
        records.append(Record(question, answer, Answer(text="one", path="answered by cloud"), replies,
                              combine(first, second)))  # fmt: skip
    config = HarnessConfig(endpoint, endpoint, endpoint, questions, questions_name="q.jsonl")
    return Report(config, {"progressive": "recserve", "direct": "recserve", "judge": judge}, records)


def test_a_capable_looking_judge_gets_no_caveat_and_the_report_has_every_group() -> None:
    report = _report("a-judge", [(A, B), (B, A), (TIE, TIE), (A, B), (A, B)])
    assert caveats(report) == []
    text = format_report(report)
    assert "!!" not in text
    for group in ("all questions", "suits a sketch", "does not suit a sketch", "answered progressively"):
        assert group in text
    assert "3 60% [23%, 88%]" in text  # wins of all questions, with the Wilson interval
    figures = report.as_json()
    assert figures["groups"]["answered progressively"]["pairs"] == 4
    assert figures["answers"]["progressive"]["mean_words"] == 3.0
    assert figures["answers"]["direct"]["paths"] == {"answered by cloud": 5}
    json.dumps(figures)


def test_a_tiny_judge_or_a_judge_that_follows_the_order_gets_a_loud_caveat() -> None:
    notes = caveats(_report("tiny-random-judge", [(A, B)] * 4))
    assert "tiny or random-weight" in notes[0]
    assert "QUALITY IS UNMEASURED" in notes[-1]
    text = format_report(_report("tiny-random-judge", [(None, None)] * 3))
    assert text.startswith("!" * 100)
    assert text.endswith("!" * 100)
    assert "6 of 6 judge replies end in no verdict line" in text
    assert "no pair got a verdict in both orders" in text
    biased = caveats(_report("a-judge", [(A, A)] * 4))
    assert any("changed with the answers' order in 4 of 4 pairs" in note for note in biased)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cloud_direct_defaults_to_the_same_gateway_asking_for_the_last_tier() -> None:
    args = _args("--progressive-url", "http://g/v1", "--judge-url", "http://j/v1", "--limit", "3")
    config = config_from(args, environ={"RECSERVE_JUDGE_API_KEY": "judge-key", "OPENAI_API_KEY": "openai-key"})
    assert config.direct == Endpoint("http://g/v1", "", "openai-key", LAST_TIER)
    assert config.progressive.extra_body is None
    assert config.judge.api_key == "judge-key"
    assert len(config.questions) == 3
    other = _args("--progressive-url", "http://g/v1", "--direct-url", "http://vllm/v1", "--judge-url", "http://j/v1",
                  "--direct-model", "cloud", "--judge-extra-body", '{"top_k": 1}')  # fmt: skip
    config = config_from(other, environ={})
    assert config.direct == Endpoint("http://vllm/v1", "cloud", "none", None)
    assert config.judge.extra_body == {"top_k": 1}


def test_bad_flags_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="--concurrency must be at least 1"):
        config_from(_args("--progressive-url", "u", "--judge-url", "j", "--concurrency", "0"), environ={})
    with pytest.raises(SystemExit):
        _args("--progressive-url", "u", "--judge-url", "j", "--judge-extra-body", "[1]")
