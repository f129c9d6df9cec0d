"""The sketch router beats the majority class on held-back questions, ships weights that its own refit reproduces,
and decides the same way every time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recserve.core.calibration import fit_logistic
from recserve.evaluation import sketch_router as evaluation
from recserve.policies.sketch_router import (
    BUNDLED_ROUTER,
    CUES,
    SketchRouter,
    fit_ridge_logistic,
    keyword_rule,
    load_questions,
    stratified_folds,
    train_bundled,
)

SHIPPED = "router: words + cues (shipped)"
SUITED = ("What are the best ways to save money on groceries?", "What if the Roman Empire had never fallen?")
UNSUITED = ("Implement a linked list in Python.", "Draft a thank-you email to a colleague.")


def test_the_bundled_questions_are_the_80_labelled_vicuna_questions() -> None:
    examples = load_questions()
    assert [e.qid for e in examples] == list(range(80))
    assert sum(e.suits_sketch for e in examples) == 37


def test_the_router_beats_the_majority_class_in_cross_validation() -> None:
    scores = evaluation.cross_validate(load_questions(), folds=5, seed=0, methods=("majority class", SHIPPED))
    majority, router = scores["majority class"], scores[SHIPPED]
    assert majority.total == router.total == 80
    # Not just better: the router's 95% interval lies above the majority class's accuracy.
    low, _ = evaluation.wilson(router.correct, router.total)
    assert low > majority.accuracy, (router.correct, majority.correct)


def test_the_bundled_router_loads_and_tells_lists_from_code_and_letters() -> None:
    router = SketchRouter.load()
    assert router.cue_weights.keys() == CUES.keys()
    for question in SUITED:
        assert router.suits(question), question
    for question in UNSUITED:
        assert not router.suits(question), question
    assert 0.0 < router.probability("") < 1.0


def test_predictions_are_deterministic() -> None:
    first, second = SketchRouter.load(), SketchRouter.load()
    questions = [e.question for e in load_questions()] + list(SUITED + UNSUITED)
    assert [first.score(q) for q in questions] == [second.score(q) for q in questions]


def test_refitting_reproduces_the_shipped_weights() -> None:
    shipped, refitted = SketchRouter.load(), train_bundled(seed=0)
    assert refitted.strength == shipped.strength
    assert refitted.term_weights.keys() == shipped.term_weights.keys()
    assert refitted.cue_weights.keys() == shipped.cue_weights.keys()
    terms = sorted(shipped.term_weights)
    np.testing.assert_allclose(
        [refitted.term_weights[t] for t in terms], [shipped.term_weights[t] for t in terms], atol=1e-9
    )
    np.testing.assert_allclose(
        [refitted.cue_weights[c] for c in CUES], [shipped.cue_weights[c] for c in CUES], atol=1e-9
    )
    assert refitted.intercept == pytest.approx(shipped.intercept, abs=1e-9)


def test_the_woodbury_newton_fit_matches_the_core_logistic_fit() -> None:
    rng = np.random.default_rng(3)
    design = (rng.random((20, 40)) < 0.2).astype(np.int64)
    design[:, 0] = 1
    outcomes = rng.random(20) < 0.5
    for strength in (0.3, 3.0):
        np.testing.assert_allclose(
            fit_ridge_logistic(design, outcomes, strength), fit_logistic(design, outcomes, strength=strength), atol=1e-9
        )


def test_stratified_folds_partition_the_questions_in_class_proportion() -> None:
    labels = [e.suits_sketch for e in load_questions()]
    folds = stratified_folds(labels, 10, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(80))
    assert all(3 <= sum(labels[i] for i in fold) <= 4 for fold in folds)
    assert all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 10, seed=0), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(folds, stratified_folds(labels, 10, seed=1), strict=True))
    with pytest.raises(ValueError, match="folds must be within"):
        stratified_folds(labels, 1, seed=0)


def test_the_keyword_rule_turns_down_code_maths_counts_letters_and_role_play() -> None:
    assert keyword_rule("What are the main causes of inflation?")
    for question in (
        "Write a program to reverse a string.",
        "Solve for x in 2x + 1 = 5.",
        "How many stars are in the Milky Way?",
        "Draft a cover letter for a nursing job.",
        "As a pirate, describe your ship.",
    ):
        assert not keyword_rule(question), question


def test_the_wilson_interval_matches_known_values() -> None:
    low, high = evaluation.wilson(75, 80)
    assert (round(low, 3), round(high, 3)) == (0.862, 0.973)
    assert evaluation.wilson(0, 10)[0] == 0.0
    assert evaluation.wilson(10, 10)[1] == pytest.approx(1.0)


def test_weights_of_another_format_or_unknown_cues_are_refused(tmp_path: Path) -> None:
    data = json.loads(BUNDLED_ROUTER.read_text(encoding="utf-8"))
    path = tmp_path / "router.json"
    path.write_text(json.dumps({**data, "format": 99}), encoding="utf-8")
    with pytest.raises(ValueError, match="format 99"):
        SketchRouter.load(path)
    with pytest.raises(ValueError, match="unknown cues"):
        SketchRouter({}, {"poetry": 1.0}, 0.0, 1.0)


def test_every_question_belongs_to_one_vicuna_category() -> None:
    names = [evaluation.category(e.qid) for e in load_questions()]
    assert len(set(names)) == len(evaluation.CATEGORIES)
    with pytest.raises(ValueError, match="no Vicuna category"):
        evaluation.category(80)


def test_the_evaluation_command_prints_every_method_and_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    evaluation.main(["--folds", "5", "--repeats", "2"])
    table = capsys.readouterr().out
    assert "Stratified 5-fold cross-validation, seed 0" in table
    assert "seeds 0..1" in table
    assert "Leave one Vicuna category out" in table
    names = [line[2:36].rstrip() for line in table.splitlines()]  # a row: two spaces, the name padded to 34
    for method in evaluation.METHODS:
        assert names.count(method) == 3, method
