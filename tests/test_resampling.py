"""Every benchmark metric resampled by its own code (pore.metrics.resampling / uncertainty): the value of any
resample equals the metric computed from scratch on that multiset of questions, units (MME images, MMBench
circular groups) move whole, strata (MME categories, POPE subsets) keep their sizes, and paired
comparisons give McNemar's counts of a hand-made pair of runs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from pore.metrics import METRICS, MME_CATEGORIES
from pore.metrics.resampling import metric_parts
from pore.metrics.uncertainty import binary_outcomes, metric_intervals, paired_differences
from pore.stats.bootstrap import BootstrapSettings, iter_draws

WORDS = ["red", "blue", "two", "yes", "no", "a cat", "Red.", "2"]


def questions(name: str, n: int, seed: int = 0) -> dict[str, Any]:
    """Random predictions, answers, update extras and metas in the metric's own schema."""
    rng = random.Random(seed)
    metas: list[dict[str, Any]] = [{} for _ in range(n)]
    extras: dict[str, list[Any]] = {}
    if name in ("vqa_accuracy", "exact_match"):
        answers = [[rng.choice(WORDS) for _ in range(rng.choice([1, 3, 10]))] for _ in range(n)]
        predictions = [rng.choice(WORDS) for _ in range(n)]
    elif name == "pope":
        answers = [[rng.choice(["yes", "no"])] for _ in range(n)]
        predictions = [rng.choice(["yes", "No.", "no, there is not", "a dog", "Yes"]) for _ in range(n)]
        metas = [{"category": rng.choice(["random", "popular", "adversarial"])} for _ in range(n)]
    elif name == "mme":  # two questions per image, images within three categories
        answers = [["Yes" if i % 2 == 0 else "No"] for i in range(n)]
        predictions = [rng.choice(["Yes", "no", "maybe"]) for _ in range(n)]
        extras = {
            "categories": [MME_CATEGORIES[(i // 2) % 3] for i in range(n)],
            "image_ids": [f"img{(i // 2) % 5}" for i in range(n)],  # an image id reused across categories
        }
    elif name == "multiple_choice":  # circular groups of four copies
        answers = [[rng.choice("ABCD")] for _ in range(n)]
        predictions = [rng.choice(["A", "(b)", "C.", "the answer is D", "none"]) for _ in range(n)]
        extras = {"options": [["cat", "dog", "cow", "hen"]] * n, "groups": [i // 4 for i in range(n)]}
    else:  # spatial
        answers = [[rng.choice(["red", "2", "yes"])] for _ in range(n)]
        predictions = [rng.choice(["red", "2", "yes", "no"]) for _ in range(n)]
        extras = {
            "regions": [rng.choice(["top", "bottom", "all"]) for _ in range(n)],
            "types": [rng.choice(["colour", "shape", "exists", "count"]) for _ in range(n)],
        }
    return {"predictions": predictions, "answers": answers, "extras": extras, "metas": metas}


def scratch(
    name: str, data: dict[str, Any], picked: list[int], copies: list[int] | None = None
) -> dict[str, float]:
    """The metric computed the ordinary way on the questions `picked` (repeats allowed); with `copies`, the
    unit id of each question (MME's image, MMBench's group) becomes the number of its drawn copy."""
    metric = METRICS[name](sync_on_compute=False)
    extras = {key: [values[i] for i in picked] for key, values in data["extras"].items()}
    if copies is not None and name == "mme":
        extras["image_ids"] = [f"copy{c}" for c in copies]
    if copies is not None and name == "multiple_choice":
        extras["groups"] = list(copies)
    metric.update([data["predictions"][i] for i in picked], [data["answers"][i] for i in picked], **extras)
    return {key: float(value) for key, value in metric.compute().items()}


def expand(parts, draw: np.ndarray) -> tuple[list[int], list[int]]:
    """The questions of the drawn units, unit by unit, and the number of the drawn copy each belongs to."""
    picked, copies = [], []
    for copy, unit in enumerate(draw):
        members = np.flatnonzero(parts.unit_of == unit).tolist()
        picked += members
        copies += [copy] * len(members)
    return picked, copies


@pytest.mark.parametrize("name", sorted(METRICS))
def test_a_resample_equals_the_metric_from_scratch(name: str) -> None:
    data = questions(name, 48)
    parts = metric_parts(METRICS[name](sync_on_compute=False), name, **data)
    assert parts.value() == pytest.approx(scratch(name, data, list(range(48))), abs=1e-12)
    draws = next(iter_draws(parts.n_units, BootstrapSettings(6, seed=3), parts.unit_stratum))
    resampled = parts.values_on(draws)
    for r, draw in enumerate(draws):
        expected = scratch(name, data, *expand(parts, draw))
        assert {key: values[r] for key, values in resampled.items()} == pytest.approx(expected, abs=1e-12)


def test_mme_resamples_whole_images_within_categories() -> None:
    """Each image has one right and one wrong answer: every resample scores acc 50 and acc+ 0 in every
    category (split pairs would vary both); an image drawn twice counts as two images."""
    n = 24
    data = questions("mme", n)
    data["predictions"] = ["Yes"] * n  # right on each image's "Yes" question, wrong on its "No" one
    parts = metric_parts(METRICS["mme"](sync_on_compute=False), "mme", **data)
    assert parts.n_units == n // 2
    intervals = metric_intervals(parts, BootstrapSettings(200))
    for category in MME_CATEGORIES[:3]:
        acc, plus = intervals[f"{category}/acc"], intervals[f"{category}/acc_plus"]
        assert (acc.low, acc.high, plus.low, plus.high) == (50.0, 50.0, 0.0, 0.0)
    # Three images of one category, the first all right: drawing it twice and the second once scores 2 of 3.
    data = {
        "predictions": ["Yes", "No", "No", "Yes", "No", "Yes"],
        "answers": [["Yes"], ["No"], ["Yes"], ["No"], ["Yes"], ["No"]],
        "extras": {"categories": ["color"] * 6, "image_ids": ["a", "a", "b", "b", "c", "c"]},
        "metas": [{}] * 6,
    }
    parts = metric_parts(METRICS["mme"](sync_on_compute=False), "mme", **data)
    values = parts.values_on(np.array([[0, 0, 1]]))
    assert values["color/acc_plus"][0] == pytest.approx(200 / 3)
    assert values["color/acc"][0] == pytest.approx(100 * 4 / 6)


def test_circular_groups_move_whole_and_pope_subsets_keep_their_sizes() -> None:
    data = questions("multiple_choice", 40)
    data["answers"] = [["A"]] * 40
    data["predictions"] = ["A", "A", "A", "B"] * 10  # every group: three copies right, one wrong
    parts = metric_parts(METRICS["multiple_choice"](sync_on_compute=False), "multiple_choice", **data)
    intervals = metric_intervals(parts, BootstrapSettings(200))
    assert (intervals["acc"].low, intervals["acc"].high) == (0.75, 0.75)
    assert (intervals["circular_acc"].low, intervals["circular_acc"].high) == (0.0, 0.0)
    # POPE: every "random" question right, every other wrong; strata keep their sizes, so acc never moves.
    data = questions("pope", 60)
    data["answers"] = [["yes"]] * 60
    data["predictions"] = ["yes" if m["category"] == "random" else "no" for m in data["metas"]]
    parts = metric_parts(METRICS["pope"](sync_on_compute=False), "pope", **data)
    share = sum(m["category"] == "random" for m in data["metas"]) / 60
    acc = metric_intervals(parts, BootstrapSettings(200))["acc"]
    assert acc.low == pytest.approx(share) and acc.high == pytest.approx(share)


def test_paired_differences_count_mcnemars_pairs_of_a_hand_made_pair_of_runs() -> None:
    """Exact match on 60 questions: 40 both right, 1 only the first right, 9 only the second, 10 neither."""
    first = ["red"] * 41 + ["blue"] * 19
    second = ["red"] * 40 + ["blue"] + ["red"] * 9 + ["blue"] * 10
    answers = [["red"]] * 60

    def parts(predictions: list[str]):
        metric = METRICS["exact_match"](sync_on_compute=False)
        return metric_parts(metric, "exact_match", predictions, answers, {}, [{}] * 60)

    a, b = parts(first), parts(second)
    assert set(binary_outcomes(a)) == {"acc"}
    result = paired_differences(a, b, BootstrapSettings(1000))["acc"]
    assert (result.first, result.second) == (pytest.approx(41 / 60), pytest.approx(49 / 60))
    assert (result.mcnemar.only_first, result.mcnemar.only_second) == (1, 9)
    assert result.mcnemar.p_value == 0.021484375 and result.distinguishable(0.95)
    assert result.difference.estimate == pytest.approx(8 / 60)
    same = paired_differences(a, parts(first), BootstrapSettings(200))["acc"]
    assert (same.difference.low, same.difference.high, same.mcnemar.p_value) == (0.0, 0.0, 1.0)
    assert not same.distinguishable(0.95)


def test_only_accuracy_type_values_get_mcnemar() -> None:
    data = questions("vqa_accuracy", 30)
    data["answers"] = [["red"] * 2 + ["blue"] * 8] * 30  # a "red" answer scores 0.6: not right-or-wrong
    data["predictions"] = ["red", "blue", "cat"] * 10
    vqa = metric_parts(METRICS["vqa_accuracy"](sync_on_compute=False), "vqa_accuracy", **data)
    assert binary_outcomes(vqa) == {}
    pope = metric_parts(METRICS["pope"](sync_on_compute=False), "pope", **questions("pope", 30))
    # acc and the share of "yes" are means of 0 / 1 per question; precision, recall, F1 are ratios of counts
    assert set(binary_outcomes(pope)) == {"acc", "yes_ratio"}
