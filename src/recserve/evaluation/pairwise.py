"""Pairwise LLM judging with the order swapped: the judge prompt, its verdict line, and how two verdicts on one pair
(the candidate shown first, then second) combine into a win, a tie or a loss.

Position bias control as in MT-Bench (Zheng et al., "Judging LLM-as-a-judge", arXiv 2306.05685): every pair is
judged twice with the answers' order swapped, and a verdict counts as a win only when both orders prefer the same
answer; any disagreement between the orders is a tie. A reply whose last line is not a verdict is unparseable: such
pairs are counted on their own, never dropped and never read as a tie.

Pure: text in, counts out; the harness (`recserve.evaluation.progressive_judge`) does the calls.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

# The project's own prompt. The answers are fenced by labelled markers so that an answer's own text (a list, a
# heading) cannot pass for the prompt's structure; the verdict must be the last line, in a fixed form, so that a
# reply is parsed without guessing and one that does not end so is counted as unparseable.
JUDGE_PROMPT = """\
You compare two answers to the same question and say which is better.

Better means more helpful to the person asking: correct, relevant, complete where it matters, and clear. Length \
is not a merit in itself. Which answer comes first, and the names A and B, must not sway you. If neither is \
better, the verdict is a tie.

[Question]
{question}

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]

Give your reasons in a few sentences. Then end your reply with a line that is exactly one of:
Verdict: A
Verdict: B
Verdict: tie"""

# The last line: "Verdict: A", forgiving case, markdown emphasis or quoting, brackets around the verdict and a full
# stop, which models add unasked; nothing else.
_DECORATION = re.compile(r"[*_`#>\[\]()\"']")
_VERDICT_LINE = re.compile(r"^verdict\s*[:=-]?\s*(a|b|tie)\s*\.?$", re.IGNORECASE)


class Verdict(enum.StrEnum):
    """What one judge reply says: the answer shown as A, the one shown as B, or neither."""

    A = "A"
    B = "B"
    TIE = "tie"


class Outcome(enum.StrEnum):
    """A pair judged in both orders, from the candidate's side."""

    WIN = "win"
    TIE = "tie"
    LOSS = "loss"
    UNPARSEABLE = "unparseable"  # a reply of either order has no verdict line
    FAILED = "failed"  # an answer or a judge call failed: nothing to judge


def judge_prompt(question: str, answer_a: str, answer_b: str) -> str:
    return JUDGE_PROMPT.format(question=question.strip(), answer_a=answer_a.strip(), answer_b=answer_b.strip())


def parse_verdict(reply: str | None) -> Verdict | None:
    """The verdict on the reply's last non-empty line; None when that line is not one."""
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    if not lines:
        return None
    match = _VERDICT_LINE.match(_DECORATION.sub("", lines[-1]).strip())
    if match is None:
        return None
    word = match.group(1).lower()
    return Verdict.TIE if word == "tie" else Verdict(word.upper())


@dataclass(frozen=True)
class PairJudgement:
    outcome: Outcome
    # Both orders named the same answer, or both a tie. False where they differ; None where one had no verdict.
    consistent: bool | None = None
    # Both orders named the same position (A twice, or B twice): the judge followed the order, not the answers.
    same_position: bool = False


def combine(candidate_first: Verdict | None, candidate_second: Verdict | None) -> PairJudgement:
    """One pair's outcome from its two verdicts: `candidate_first` when the candidate was shown as A,
    `candidate_second` when it was shown as B. A win or a loss needs both orders to agree; a disagreement is a tie."""
    if candidate_first is None or candidate_second is None:
        return PairJudgement(Outcome.UNPARSEABLE)
    first = _from_candidate(candidate_first, shown_as="A")
    second = _from_candidate(candidate_second, shown_as="B")
    same_position = candidate_first == candidate_second != Verdict.TIE
    if first != second:
        return PairJudgement(Outcome.TIE, consistent=False, same_position=same_position)
    return PairJudgement(first, consistent=True)


def _from_candidate(verdict: Verdict, shown_as: str) -> Outcome:
    if verdict == Verdict.TIE:
        return Outcome.TIE
    return Outcome.WIN if verdict.value == shown_as else Outcome.LOSS


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default); [0, 1] without trials. Unlike the normal
    approximation it stays within [0, 1] and is sound for the few dozen pairs a run judges."""
    if trials <= 0:
        return 0.0, 1.0
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    """The outcomes of many pairs, and how the judge's replies behaved."""

    wins: int = 0
    ties: int = 0
    losses: int = 0
    unparseable: int = 0  # pairs with a reply of no verdict
    failed: int = 0  # pairs not judged: an answer or a judge call failed
    inconsistent: int = 0  # judged pairs whose two orders disagreed (counted as ties)
    same_position: int = 0  # of those, the same position preferred in both orders
    replies: int = 0  # judge replies received
    unparseable_replies: int = 0

    def add(self, judgement: PairJudgement, replies: tuple[Verdict | None, ...] = ()) -> None:
        """One pair's judgement and the verdicts of the replies received for it (None: no verdict line)."""
        match judgement.outcome:
            case Outcome.WIN:
                self.wins += 1
            case Outcome.TIE:
                self.ties += 1
            case Outcome.LOSS:
                self.losses += 1
            case Outcome.UNPARSEABLE:
                self.unparseable += 1
            case Outcome.FAILED:
                self.failed += 1
        self.inconsistent += judgement.consistent is False
        self.same_position += judgement.same_position
        self.replies += len(replies)
        self.unparseable_replies += sum(verdict is None for verdict in replies)

    @property
    def judged(self) -> int:
        """Pairs with a verdict in both orders: the denominator of the win, tie and loss shares."""
        return self.wins + self.ties + self.losses

    @property
    def pairs(self) -> int:
        return self.judged + self.unparseable + self.failed

    def as_json(self) -> dict[str, object]:
        def share(count: int, total: int) -> dict[str, object]:
            low, high = wilson_interval(count, total)
            return {"count": count, "share": count / total if total else None, "ci95": [low, high]}

        return {
            "pairs": self.pairs,
            "judged": self.judged,
            "wins": share(self.wins, self.judged),
            "ties": share(self.ties, self.judged),
            "losses": share(self.losses, self.judged),
            "inconsistent": share(self.inconsistent, self.judged),
            "same_position": self.same_position,
            "unparseable_pairs": self.unparseable,
            "failed_pairs": self.failed,
            "replies": self.replies,
            "unparseable_replies": share(self.unparseable_replies, self.replies),
        }
