"""Sketch router: does a question suit a sketch of independent points expanded in parallel (PICE, Skeleton-of-Thought)?

A ridge logistic regression on the question's words and word bigrams plus a few hand-written cues (code, maths,
"how many", a text to compose, role play, a request for a list), fitted with numpy on the 80 labelled Vicuna
questions bundled in `recserve/data/longform` (origin and licence in its README). The fitted weights ship as a
small JSON beside them; `train_router` refits them, and `python -m recserve.evaluation.sketch_router --write`
writes them again after reporting held-back accuracy.

Pure and deterministic: the only randomness (the folds that choose the ridge strength) comes from a seed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from recserve.core.calibration import sigmoid

LONGFORM_DATA = Path(__file__).resolve().parent.parent / "data" / "longform"
BUNDLED_QUESTIONS = LONGFORM_DATA / "vicuna80.jsonl"
BUNDLED_ROUTER = LONGFORM_DATA / "sketch_router.json"
FORMAT = 1  # of the JSON; bumped when its fields change meaning

# A term (word or bigram) must occur in at least this many training questions to get a weight: a term seen once
# fits that one question's label and says nothing about others. Fixed, not tuned: with 64-72 training questions a
# second tuned knob would be chosen on noise.
MIN_DOCUMENTS = 2
# Ridge strengths the inner cross-validation chooses from (penalty strength·|θ|²/2 on binary features); ties go to
# the stronger, the simpler model.
STRENGTHS = (0.3, 1.0, 3.0, 10.0)
# Folds of the inner cross-validation that chooses the strength (stratified).
INNER_FOLDS = 5
# Newton steps of the fit: it converges in fewer on these features; the cap only bounds the time.
FIT_STEPS = 50

# Hand-written cues, each a regular expression on the lower-cased question. Written after reading the questions,
# so their held-back figures flatter them (the evaluation says so and also reports words alone).
CUES: dict[str, str] = {
    # Code to write: one program is one dependent whole, not a list of points.
    "code": r"\b(implement|program|function|algorithm|regular expression|data structure)\b",
    # Maths: an equation or a value to find, answered by dependent steps.
    "maths": r"\b(solve|equation|calculate|compute|find the value)\b|\d\s*[-+*/^=]\s*\d|\b[a-z]\([a-z0-9]\)"
    r"|\(\s*-?\d+\s*,\s*-?\d+\s*\)",
    # Estimates asked step by step (Fermi questions): each step rests on the one before.
    "how_many": r"\bhow (many|much)\b|step[- ]by[- ]step",
    # A text to compose in one voice (an email, a letter, a script): its parts are not independent points.
    "compose": r"^(can you help me )?(write|draft|compose|structure|use an appropriate format)\b",
    # Role play: a monologue in character.
    "role_play": r"^as an?\b|\byourself as\b|\b(pretend|you are|if you were)\b",
    # Asks for several things: ways, factors, differences, implications...
    "asks_list": r"\b(ways|factors|strategies|differences|challenges|tips|steps|implications|advantages"
    r"|benefits|reasons|clues|applications)\b",
    # A counterfactual: its consequences are largely independent points.
    "what_if": r"^what if\b",
    # A digit anywhere (numbers, equations, years).
    "number": r"\d",
}
_CUE_PATTERNS = {name: re.compile(pattern) for name, pattern in CUES.items()}
# The cues that, alone, make the hand-written keyword rule say "no sketch".
RULE_CUES = ("code", "maths", "how_many", "compose", "role_play")

_WORD = re.compile(r"[a-z0-9+#]+")


def terms(question: str) -> set[str]:
    """The question's lower-cased words and word bigrams ("what if")."""
    words = _WORD.findall(question.lower())
    return set(words) | {f"{first} {second}" for first, second in pairwise(words)}


def cues(question: str) -> dict[str, bool]:
    text = question.lower().strip()
    return {name: pattern.search(text) is not None for name, pattern in _CUE_PATTERNS.items()}


def keyword_rule(question: str) -> bool:
    """The hand-written baseline: suits a sketch unless it asks for code, maths, a count, a composed text or role
    play."""
    found = cues(question)
    return not any(found[name] for name in RULE_CUES)


@dataclass(frozen=True)
class LabelledQuestion:
    qid: int
    question: str
    suits_sketch: bool


def load_questions(path: Path = BUNDLED_QUESTIONS) -> list[LabelledQuestion]:
    """Labelled questions from a JSON-lines file of `qid`, `question`, `suits_sketch` (the bundled 80 by
    default)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [LabelledQuestion(int(row["qid"]), str(row["question"]), bool(row["suits_sketch"])) for row in rows]


class SketchRouter:
    """P(a question suits a sketch) = sigmoid(intercept + Σ weights of its terms + Σ weights of its cues)."""

    def __init__(
        self,
        term_weights: Mapping[str, float],
        cue_weights: Mapping[str, float],
        intercept: float,
        strength: float,
    ) -> None:
        unknown = set(cue_weights) - set(CUES)
        if unknown:
            raise ValueError(f"sketch router: unknown cues {sorted(unknown)}; known: {sorted(CUES)}")
        self.term_weights = dict(term_weights)
        self.cue_weights = dict(cue_weights)
        self.intercept = float(intercept)
        self.strength = float(strength)

    def score(self, question: str) -> float:
        """The log-odds that the question suits a sketch."""
        total = self.intercept + sum(self.term_weights.get(term, 0.0) for term in terms(question))
        found = cues(question)
        return total + sum(weight for name, weight in self.cue_weights.items() if found[name])

    def probability(self, question: str) -> float:
        return float(sigmoid(self.score(question)))

    def suits(self, question: str, threshold: float = 0.5) -> bool:
        return self.probability(question) >= threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "about": "sketch router weights (recserve.policies.sketch_router), fitted on vicuna80.jsonl",
            "strength": self.strength,
            "intercept": self.intercept,
            "cues": dict(sorted(self.cue_weights.items())),
            "terms": dict(sorted(self.term_weights.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SketchRouter:
        if data.get("format") != FORMAT:
            raise ValueError(f"sketch router: weights of format {data.get('format')!r}, this code reads {FORMAT}")
        return cls(data["terms"], data["cues"], data["intercept"], data["strength"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path = BUNDLED_ROUTER) -> SketchRouter:
        """The router whose weights `path` holds (the bundled ones by default)."""
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))


# --- fitting ---------------------------------------------------------------------------------------------------


def _vocabulary(questions: Sequence[str]) -> list[str]:
    documents: dict[str, int] = {}
    for question in questions:
        for term in terms(question):
            documents[term] = documents.get(term, 0) + 1
    return sorted(term for term, count in documents.items() if count >= MIN_DOCUMENTS)


def _design(questions: Sequence[str], vocabulary: Sequence[str], use_cues: bool) -> npt.NDArray[np.int64]:
    """Rows of 0/1: an intercept, then the vocabulary's terms, then the cues (when used)."""
    index = {term: column for column, term in enumerate(vocabulary)}
    cue_names = list(CUES) if use_cues else []
    design = np.zeros((len(questions), 1 + len(vocabulary) + len(cue_names)), dtype=np.int64)
    design[:, 0] = 1
    for row, question in enumerate(questions):
        for term in terms(question):
            if term in index:
                design[row, 1 + index[term]] = 1
        found = cues(question)
        for offset, name in enumerate(cue_names):
            design[row, 1 + len(vocabulary) + offset] = int(found[name])
    return design


def fit_ridge_logistic(
    design: npt.NDArray[np.int64], outcomes: npt.ArrayLike, strength: float, steps: int = FIT_STEPS
) -> npt.NDArray[np.float64]:
    """θ of P(y | x) = sigmoid(x·θ) with the ridge penalty strength·|θ|²/2: the optimum of
    `recserve.core.calibration.fit_logistic` (same Newton steps, same trust region), for designs with more columns
    than rows.

    Each Newton step solves (strength·I + XᵀWX) δ = g through the Woodbury identity, an n-by-n system (n
    questions) instead of d-by-d (d terms): a few matrix-vector products and one small solve, with the Gram matrix
    XXᵀ computed once in integers. No floating-point matrix-matrix product: those go to a multi-threaded BLAS,
    which on a loaded machine made a fit of 80 questions take up to a second instead of milliseconds.
    """
    if strength <= 0:
        raise ValueError(f"sketch router: the ridge strength must be positive, got {strength}")
    x = np.asarray(design, dtype=np.float64)
    gram = (design @ design.T).astype(np.float64)  # integer product: numpy's own loop, no BLAS threads
    y = np.asarray(outcomes, dtype=np.float64)
    theta = np.zeros(x.shape[1])
    identity = np.eye(len(y))
    for _ in range(steps):
        p = sigmoid(x @ theta)
        gradient = (p - y) @ x + strength * theta
        root = np.sqrt(p * (1.0 - p))
        inner = np.linalg.solve(strength * identity + gram * np.outer(root, root), root * (x @ gradient))
        step = (gradient - (root * inner) @ x) / strength
        largest = float(np.abs(step).max())
        if largest > 1.0:  # the trust region of fit_logistic
            step /= largest
        theta -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return theta


def fit_router(
    questions: Sequence[str], labels: Sequence[bool], strength: float, use_cues: bool = True
) -> SketchRouter:
    """The router fitted on these questions with this ridge strength (`use_cues=False`: words and bigrams
    alone)."""
    if len(questions) != len(labels) or not questions:
        raise ValueError("sketch router: needs as many labels as questions, and at least one")
    vocabulary = _vocabulary(questions)
    theta = fit_ridge_logistic(_design(questions, vocabulary, use_cues), np.asarray(labels, float), strength)
    term_weights = {term: float(theta[1 + column]) for column, term in enumerate(vocabulary)}
    cue_weights = dict(zip(CUES, (float(w) for w in theta[1 + len(vocabulary) :]), strict=False)) if use_cues else {}
    return SketchRouter(term_weights, cue_weights, float(theta[0]), strength)


def stratified_folds(labels: Sequence[bool], folds: int, seed: int) -> list[npt.NDArray[np.int_]]:
    """The held-back indices of each of `folds` folds: each class shuffled by `seed` and dealt round the folds, so
    every fold holds the classes in about their overall proportion."""
    if not 2 <= folds <= len(labels):
        raise ValueError(f"sketch router: folds must be within [2, {len(labels)}], got {folds}")
    generator = np.random.default_rng(seed)
    held: list[list[int]] = [[] for _ in range(folds)]
    dealt = 0
    for value in (True, False):
        members = np.flatnonzero(np.asarray(labels, bool) == value)
        for index in generator.permutation(members):
            held[dealt % folds].append(int(index))
            dealt += 1
    return [np.sort(np.asarray(fold, dtype=np.int_)) for fold in held]


def split(held: npt.NDArray[np.int_], size: int) -> tuple[npt.NDArray[np.int_], npt.NDArray[np.int_]]:
    """(training indices, held-back indices) of a fold among `size` examples."""
    mask = np.ones(size, bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def _folds(labels: Sequence[bool], folds: int, seed: int) -> Iterator[tuple[npt.NDArray[np.int_], ...]]:
    for held in stratified_folds(labels, folds, seed):
        yield split(held, len(labels))


def choose_strength(
    questions: Sequence[str],
    labels: Sequence[bool],
    *,
    seed: int = 0,
    strengths: Sequence[float] = STRENGTHS,
    folds: int = INNER_FOLDS,
    use_cues: bool = True,
) -> float:
    """The ridge strength with the best stratified cross-validated accuracy on these questions alone (ties: the
    strongest)."""
    best, best_correct = max(strengths), -1
    for strength in sorted(strengths, reverse=True):
        correct = 0
        for train, held in _folds(labels, folds, seed):
            router = fit_router([questions[i] for i in train], [labels[i] for i in train], strength, use_cues)
            correct += sum(router.suits(questions[i]) == labels[i] for i in held)
        if correct > best_correct:
            best, best_correct = strength, correct
    return best


def train_router(
    questions: Sequence[str], labels: Sequence[bool], *, seed: int = 0, use_cues: bool = True
) -> SketchRouter:
    """The strength chosen by cross-validation on these questions, then the router fitted on all of them: the
    bundled weights are `train_router` on the bundled questions with seed 0."""
    strength = choose_strength(questions, labels, seed=seed, use_cues=use_cues)
    return fit_router(questions, labels, strength, use_cues)


def train_bundled(seed: int = 0) -> SketchRouter:
    """The bundled router, refitted from the bundled questions."""
    examples = load_questions()
    return train_router([e.question for e in examples], [e.suits_sketch for e in examples], seed=seed)
