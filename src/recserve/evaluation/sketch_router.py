"""Held-back accuracy of the sketch router (recserve.policies.sketch_router) against a majority-class baseline and a
hand-written keyword rule, on the 80 labelled Vicuna questions.

    python -m recserve.evaluation.sketch_router [--folds 10] [--seed 0] [--repeats 10] [--write]

Three estimates, each fitting only on what it does not score:

- stratified k-fold cross-validation with a fixed seed: pooled accuracy with a 95% Wilson interval, and the
  spread over folds;
- the same repeated with other seeds: how much the figure moves with the split alone;
- leave one Vicuna category out (generic, knowledge, role play, ...): every question scored by a router that saw
  no question of its kind, the harder and more honest test of a router meeting new traffic.

The learned routers choose their ridge strength by an inner cross-validation on the training folds alone (nested
cross-validation). The keyword rule and the router's cues were written after reading all 80 questions, so their
figures flatter them; the words-alone router has no such help. 80 questions is small: one question is 1.25
points, and the intervals are wide.

`--write` refits the bundled weights on all 80 questions (the strength chosen by cross-validation on them) and
writes them into the package.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recserve.policies.sketch_router import (
    BUNDLED_ROUTER,
    LabelledQuestion,
    keyword_rule,
    load_questions,
    split,
    stratified_folds,
    train_bundled,
    train_router,
)

# The Vicuna set's categories, by question id (0-based, as in the bundled file): FastChat's question.jsonl lists
# them in these blocks.
CATEGORIES = (
    ("generic", range(0, 10)),
    ("knowledge", range(10, 20)),
    ("roleplay", range(20, 30)),
    ("common-sense", range(30, 40)),
    ("fermi", range(40, 50)),
    ("counterfactual", range(50, 60)),
    ("coding", range(60, 67)),
    ("math", range(67, 70)),
    ("writing", range(70, 80)),
)
METHODS = ("majority class", "keyword rule", "router: words", "router: words + cues (shipped)")
# The per-category table's column heads, in METHODS order.
SHORT_NAMES = ("majority", "rule", "words", "words+cues")
Z_95 = 1.959964

# Fits a method on the training questions and returns its predictor.
Trainer = Callable[[Sequence[LabelledQuestion], int], Callable[[str], bool]]


def category(qid: int) -> str:
    for name, ids in CATEGORIES:
        if qid in ids:
            return name
    raise ValueError(f"no Vicuna category holds question {qid}")


def _majority(train: Sequence[LabelledQuestion], seed: int) -> Callable[[str], bool]:
    answer = 2 * sum(e.suits_sketch for e in train) >= len(train)
    return lambda question: answer


def _rule(train: Sequence[LabelledQuestion], seed: int) -> Callable[[str], bool]:
    return keyword_rule


def _learned(use_cues: bool) -> Trainer:
    def trainer(train: Sequence[LabelledQuestion], seed: int) -> Callable[[str], bool]:
        router = train_router(
            [e.question for e in train], [e.suits_sketch for e in train], seed=seed, use_cues=use_cues
        )
        return router.suits

    return trainer


TRAINERS: dict[str, Trainer] = dict(zip(METHODS, (_majority, _rule, _learned(False), _learned(True)), strict=True))


@dataclass(frozen=True)
class Scores:
    """A method's held-back verdicts: right or wrong per question, grouped by the fold that held it back."""

    folds: tuple[tuple[bool, ...], ...]

    @property
    def correct(self) -> int:
        return sum(sum(fold) for fold in self.folds)

    @property
    def total(self) -> int:
        return sum(len(fold) for fold in self.folds)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def fold_accuracies(self) -> list[float]:
        return [sum(fold) / len(fold) for fold in self.folds]


def wilson(correct: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: unlike p ± z·se it stays within [0, 1] near the ends."""
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def held_back(
    examples: Sequence[LabelledQuestion], held: Sequence[Sequence[int]], seed: int, methods: Sequence[str] = METHODS
) -> dict[str, Scores]:
    """Each method fitted on all but each group of `held` indices and scored on that group."""
    verdicts: dict[str, list[tuple[bool, ...]]] = {name: [] for name in methods}
    for group in held:
        train_idx, test_idx = split(np.asarray(group, dtype=np.int_), len(examples))
        train = [examples[i] for i in train_idx]
        for name in methods:
            predict = TRAINERS[name](train, seed)
            verdicts[name].append(tuple(predict(examples[i].question) == examples[i].suits_sketch for i in test_idx))
    return {name: Scores(tuple(folds)) for name, folds in verdicts.items()}


def cross_validate(
    examples: Sequence[LabelledQuestion], folds: int = 10, seed: int = 0, methods: Sequence[str] = METHODS
) -> dict[str, Scores]:
    """Stratified `folds`-fold cross-validation, the folds drawn from `seed` (also the inner folds' seed)."""
    held = stratified_folds([e.suits_sketch for e in examples], folds, seed)
    return held_back(examples, [list(fold) for fold in held], seed, methods)


def by_category(
    examples: Sequence[LabelledQuestion], seed: int = 0, methods: Sequence[str] = METHODS
) -> dict[str, Scores]:
    """Leave one Vicuna category out: the folds are the categories, in CATEGORIES order."""
    groups = [[i for i, e in enumerate(examples) if category(e.qid) == name] for name, _ in CATEGORIES]
    return held_back(examples, [group for group in groups if group], seed, methods)


def _row(name: str, scores: Scores) -> str:
    low, high = wilson(scores.correct, scores.total)
    folds = scores.fold_accuracies()
    return (
        f"  {name:<34} {scores.correct:>3}/{scores.total:<3} {scores.accuracy:6.1%}  [{low:5.1%}, {high:5.1%}]"
        f"  {np.mean(folds):6.1%} ± {np.std(folds, ddof=1):5.1%}  {min(folds):6.1%}-{max(folds):6.1%}"
    )


def report(examples: Sequence[LabelledQuestion], folds: int, seed: int, repeats: int) -> str:
    positives = sum(e.suits_sketch for e in examples)
    lines = [
        f"Sketch router, held-back accuracy on {len(examples)} labelled questions ({positives} suit a sketch, "
        f"{len(examples) - positives} do not). Small data: one question is {1 / len(examples):.2%}.",
        "",
        f"Stratified {folds}-fold cross-validation, seed {seed} (routers: ridge strength chosen by an inner 5-fold CV "
        "on the training folds only; words = words and bigrams)",
        f"  {'method':<34} {'right':>7}  {'acc':>6}  {'95% Wilson':<16}  {'fold mean ± sd':<15}  {'fold min-max'}",
    ]
    scores = cross_validate(examples, folds, seed)
    lines += [_row(name, scores[name]) for name in METHODS]
    if repeats > 1:
        lines += ["", f"The same with seeds {seed}..{seed + repeats - 1}: pooled accuracy, mean (min-max) over seeds"]
        pooled: dict[str, list[float]] = {name: [] for name in METHODS}
        for other in range(seed, seed + repeats):
            for name, result in cross_validate(examples, folds, other).items():
                pooled[name].append(result.accuracy)
        lines += [
            f"  {name:<34} {np.mean(values):6.1%} ({min(values):5.1%}-{max(values):5.1%})"
            for name, values in pooled.items()
        ]
    lines += ["", "Leave one Vicuna category out (a fold is a category; the router never saw a question of its kind)"]
    grouped = by_category(examples, seed)
    lines += [_row(name, grouped[name]) for name in METHODS]
    names = [name for name, _ in CATEGORIES]
    lines += ["", f"  {'category':<15} {'n':>3} {'suits':>6}  " + "  ".join(f"{m:>10}" for m in SHORT_NAMES)]
    for index, name in enumerate(names):
        members = [e for e in examples if category(e.qid) == name]
        cells = "  ".join(f"{grouped[m].fold_accuracies()[index]:>10.0%}" for m in METHODS)
        lines.append(f"  {name:<15} {len(members):>3} {sum(e.suits_sketch for e in members):>6}  {cells}")
    lines += [
        "",
        "The keyword rule and the cues were written after reading all the questions: their figures are optimistic.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--folds", type=int, default=10, help="folds of the cross-validation (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds (default 0)")
    parser.add_argument("--repeats", type=int, default=10, help="seeds to repeat the cross-validation with")
    parser.add_argument("--write", action="store_true", help="refit the bundled weights and write them")
    args = parser.parse_args(argv)
    print(report(load_questions(), args.folds, args.seed, args.repeats))
    if args.write:
        router = train_bundled()
        router.save(BUNDLED_ROUTER)
        print(f"\nwrote {BUNDLED_ROUTER.name}: strength {router.strength}, {len(router.term_weights)} terms")


if __name__ == "__main__":
    main()
