"""Benchmark metrics: hand-worked values, and the same results from two DDP ranks as from one process."""

from __future__ import annotations

import datetime
import math
import os
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pore.metrics import (
    METRICS,
    ExactMatch,
    MMEMetrics,
    MultipleChoiceAccuracy,
    POPEMetrics,
    SpatialAccuracy,
    VQAAccuracy,
    extract_choice,
    normalize_exact,
    normalize_vqa,
    parse_mme_answer,
    parse_pope_answer,
    stable_hash,
    vqa_score,
)

# --------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("prediction", "answer"),
    [
        ("Two", "2"),  # number word -> digit, after lowercasing
        ("the dog", "dog"),  # article dropped
        ("dont", "don't"),  # contraction table
        ("yes.", "yes"),  # period not followed by a digit is removed
        ("1,000", "1000"),  # a comma between digits switches punctuation to deletion
        ("A red car.", "red car"),  # article, case and final period
        ("black/white", "black white"),  # "/" touching no space becomes a space
    ],
)
def test_normalize_vqa_makes_equivalent_answers_equal(prediction: str, answer: str) -> None:
    assert normalize_vqa(prediction) == normalize_vqa(answer)


def test_normalize_vqa_official_details() -> None:
    assert normalize_vqa("1,000") == "1000"
    assert normalize_vqa("3.5") == "3.5"  # a decimal point is followed by a digit and stays
    assert normalize_vqa("black / white") == "black white"  # "/" next to a space is deleted
    assert normalize_vqa("  Yes,\tit is! ") == "yes it is"
    assert normalize_vqa("none") == "0"
    assert normalize_vqa("red car") != normalize_vqa("red cars")


def test_normalize_exact() -> None:
    assert normalize_exact("  Red   Car. ") == "red car"
    assert normalize_exact("Yes!") == "yes"
    assert normalize_exact("t-shirt") == normalize_exact("tshirt")
    assert normalize_exact("the dog") != normalize_exact("dog")  # no article removal in exact match


# ---------------------------------------------------------------------------------------- VQA accuracy


def ten_answers(matching: int) -> list[str]:
    """Ten annotator answers of which `matching` say "two" (normalised "2"), the rest other things."""
    others = ["3", "4", "three", "5", "6", "seven", "8", "9", "10", "many"]
    return ["two"] * matching + others[: 10 - matching]


@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        # Leave-one-out by hand, k matching answers out of 10: leaving out a match leaves k - 1 matches (k
        # subsets), leaving out a non-match leaves k (10 - k subsets); each subset scores min(1, m / 3).
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, (4 * 1 + 6 * 1) / 10),  # 1.0
        (10, 1.0),
    ],
)
def test_vqa_score_with_ten_answers(matching: int, expected: float) -> None:
    assert vqa_score("2", ten_answers(matching)) == pytest.approx(expected)


def test_vqa_score_official_values() -> None:
    assert [round(vqa_score("Two", ten_answers(k)), 10) for k in (1, 2, 3, 4)] == [0.3, 0.6, 0.9, 1.0]


def test_vqa_score_with_few_answers() -> None:
    assert vqa_score("The Dog.", ["dog"]) == 1.0  # one answer: exact match of the normalised strings
    assert vqa_score("cat", ["dog"]) == 0.0
    # Three answers, two match: the subsets without a "cat" hold one match (1/3), the one without "dog" two.
    assert vqa_score("cat", ["cat", "cat", "dog"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_vqa_accuracy_batch_mean() -> None:
    metric = VQAAccuracy()
    metric.update(["2", "two"], [ten_answers(1), ten_answers(2)])
    metric.update(["2", "Two.", "blue"], [ten_answers(3), ten_answers(4), ten_answers(4)])
    result = metric.compute()
    assert set(result) == {"acc"}
    assert result["acc"].item() == pytest.approx((0.3 + 0.6 + 0.9 + 1.0 + 0.0) / 5)


def test_metrics_reject_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="one entry per sample"):
        VQAAccuracy().update(["a", "b"], [["a"]])
    with pytest.raises(TypeError, match="list of strings"):
        ExactMatch().update("yes", [["yes"]])


# ----------------------------------------------------------------------------------------- exact match


def test_exact_match() -> None:
    metric = ExactMatch()
    metric.update(
        ["Yes.", "red car", "The red car", "blue", "Teal!"],
        [["yes"], ["Red Car"], ["red car"], ["green", "teal"], ["green", "teal"]],
    )
    # right: "yes", "red car", "teal" (second of two answers); wrong: extra article, "blue".
    assert metric.compute()["acc"].item() == pytest.approx(3 / 5)


# ------------------------------------------------------------------------------------------------ POPE


def test_parse_pope_answer() -> None:
    assert parse_pope_answer("Yes, there is a dog.") == "yes"
    assert parse_pope_answer("No.") == "no"
    assert parse_pope_answer("NO") == "no"
    assert parse_pope_answer("There is not a cat.") == "no"
    assert parse_pope_answer("Yes. It is not red.") == "yes"  # only the first sentence counts
    assert parse_pope_answer("I don't see one") == "yes"  # "don't" is not the word "not"
    assert parse_pope_answer("a dog") == "yes"  # neither: counted as yes, as in POPE


def test_pope_metrics_by_hand() -> None:
    predictions = [
        "Yes, there is a dog.",  # truth yes -> TP
        "No.",  # truth no -> TN
        "There is no cat in the image.",  # truth yes -> FN
        "Yes",  # truth no -> FP
        "The image does not contain a car.",  # truth no -> TN
        "yes",  # truth "Yes" -> TP
        "Yes. There is not a bus.",  # truth yes -> TP (first sentence only)
        "I don't see one",  # truth no -> read as yes -> FP
    ]
    answers = [["yes"], ["no"], ["yes"], ["no"], ["no"], ["Yes"], ["yes"], ["no"]]
    metric = POPEMetrics()
    metric.update(predictions[:3], answers[:3])
    metric.update(predictions[3:], answers[3:])
    # TP = 3, FP = 2, TN = 2, FN = 1
    assert (metric.tp.item(), metric.fp.item(), metric.tn.item(), metric.fn.item()) == (3, 2, 2, 1)
    result = {name: value.item() for name, value in metric.compute().items()}
    precision, recall = 3 / 5, 3 / 4
    assert result == pytest.approx(
        {
            "acc": 5 / 8,
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall),  # = 2/3
            "yes_ratio": 5 / 8,
        }
    )
    assert result["f1"] == pytest.approx(2 / 3)


def test_pope_metrics_guard_empty_denominators() -> None:
    metric = POPEMetrics()
    metric.update(["No", "no."], [["no"], ["no"]])
    result = {name: value.item() for name, value in metric.compute().items()}
    assert result == {"acc": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        metric.update(["yes"], [["maybe"]])


# ------------------------------------------------------------------------------------------------- MME


def test_parse_mme_answer() -> None:
    assert parse_mme_answer("Yes") == "yes"
    assert parse_mme_answer(" no.") == "no"
    assert parse_mme_answer("Yes, there is.") == "yes"
    assert parse_mme_answer("Not sure") is None
    assert parse_mme_answer("yesterday") is None
    assert parse_mme_answer("") is None


# Two categories. existence: e1 all right; e2 one wrong; e3 one unreadable. code_reasoning: all right.
# The file "000.jpg" is used by e2 and by a code_reasoning image: images are grouped per category, so e2's
# mistake must not spoil that code_reasoning image.
MME_PREDICTIONS = ["Yes", "No", "Yes.", "Yes", "Not sure", "no, there is none", "yes", "No", "Yes", "no"]
MME_ANSWERS = [["Yes"], ["No"], ["Yes"], ["No"], ["Yes"], ["No"], ["Yes"], ["No"], ["Yes"], ["No"]]
MME_CATEGORIES = ["existence"] * 6 + ["code_reasoning"] * 4
MME_IMAGES = ["e1.jpg", "e1.jpg", "000.jpg", "000.jpg", "e3.jpg", "e3.jpg", "000.jpg", "000.jpg", "c2", "c2"]
MME_EXPECTED = {
    "existence/acc": 4 / 6 * 100,
    "existence/acc_plus": 1 / 3 * 100,
    "existence/score": 100.0,
    "code_reasoning/acc": 100.0,
    "code_reasoning/acc_plus": 100.0,
    "code_reasoning/score": 200.0,
    "perception": 100.0,
    "cognition": 200.0,
    "total": 300.0,
}


def test_mme_by_hand() -> None:
    metric = MMEMetrics()
    metric.update(
        MME_PREDICTIONS[:5], MME_ANSWERS[:5], categories=MME_CATEGORIES[:5], image_ids=MME_IMAGES[:5]
    )
    metric.update(
        MME_PREDICTIONS[5:], MME_ANSWERS[5:], categories=MME_CATEGORIES[5:], image_ids=MME_IMAGES[5:]
    )
    result = {name: value.item() for name, value in metric.compute().items()}
    assert result == pytest.approx(MME_EXPECTED)  # also: no keys for categories that were not seen


def test_mme_rejects_unknown_category() -> None:
    with pytest.raises(ValueError, match="existence, count, position"):
        MMEMetrics().update(["yes"], [["yes"]], categories=["colour"], image_ids=["x"])


def test_stable_hash_is_fixed() -> None:
    # Fixed across processes and runs (unlike the salted built-in hash), and signed 64-bit.
    assert stable_hash("000.jpg") == stable_hash("000.jpg") != stable_hash("001.jpg")
    assert -(2**63) <= stable_hash("000.jpg") < 2**63


# ------------------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A", "A"),
        ("A.", "A"),
        ("(A)", "A"),
        ("A) cat", "A"),
        ("B. dog", "B"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("b", "B"),
        ("(c) red", "C"),
        ("I think D is right", "D"),
        ("dog", "B"),  # no letter: option text
        ("Red.", "C"),
        ("A cat", None),  # the article "A", not the letter
        ("the answer is a cat", None),
        ("E", None),  # not one of the four options
        ("", None),
    ],
)
def test_extract_choice(prediction: str, expected: str | None) -> None:
    assert extract_choice(prediction, "ABCD", ["cat", "dog", "red", "blue"]) == expected


def test_extract_choice_without_options() -> None:
    assert extract_choice("The answer is E.", "ABCDE", None) == "E"
    assert extract_choice("dog", "ABCD", None) is None


# Three questions asked in rotated copies: group 7 (4 copies, all right), group 3 (2 copies: the first
# right, the second answers "dog", which is option A of that copy while the truth "cat" is B), group 5 (one
# copy, right). acc = 6 / 7 copies, circular_acc = 2 / 3 groups.
MC_PREDICTIONS = ["A", "(B)", "The answer is C.", "D", "A", "dog", "B"]
MC_ANSWERS = [["A"], ["B"], ["C"], ["D"], ["A"], ["B"], ["B"]]
MC_OPTIONS = [["w", "x", "y", "z"]] * 4 + [["cat", "dog"], ["dog", "cat"], ["p", "q"]]
MC_GROUPS = [7, 7, 7, 7, 3, 3, 5]
MC_EXPECTED = {"acc": 6 / 7, "circular_acc": 2 / 3}


def test_multiple_choice_accuracy_and_circular() -> None:
    metric = MultipleChoiceAccuracy()
    metric.update(MC_PREDICTIONS[:3], MC_ANSWERS[:3], options=MC_OPTIONS[:3], groups=MC_GROUPS[:3])
    metric.update(MC_PREDICTIONS[3:], MC_ANSWERS[3:], options=MC_OPTIONS[3:], groups=MC_GROUPS[3:])
    result = {name: value.item() for name, value in metric.compute().items()}
    assert result == pytest.approx(MC_EXPECTED)


def test_multiple_choice_without_groups() -> None:
    metric = MultipleChoiceAccuracy()
    metric.update(["A", "b", "Answer: D"], [["A"], ["C"], ["D"]])
    result = metric.compute()
    assert set(result) == {"acc"}
    assert result["acc"].item() == pytest.approx(2 / 3)


def test_metric_registry() -> None:
    expected = {
        "vqa_accuracy": VQAAccuracy,
        "exact_match": ExactMatch,
        "pope": POPEMetrics,
        "mme": MMEMetrics,
        "multiple_choice": MultipleChoiceAccuracy,
        "spatial": SpatialAccuracy,
    }
    assert expected == METRICS


# ------------------------------------------------------------------------------------------------- DDP

# Per-sample columns of each case; rank r takes the samples i with i % 2 == r, which splits every MME image
# and every multiple-choice group across the two ranks.
VQA_CASE = {
    "predictions": ["2", "two", "2", "Two.", "blue", "The Dog."],
    "answers": [ten_answers(1), ten_answers(2), ten_answers(3), ten_answers(4), ten_answers(4), ["dog"]],
}
MME_CASE = {
    "predictions": MME_PREDICTIONS,
    "answers": MME_ANSWERS,
    "categories": MME_CATEGORIES,
    "image_ids": MME_IMAGES,
}
MC_CASE = {"predictions": MC_PREDICTIONS, "answers": MC_ANSWERS, "options": MC_OPTIONS, "groups": MC_GROUPS}
# name -> (metric class, data, which ranks update: a rank that never calls `update` must not break the gather)
DDP_CASES = {
    "vqa": (VQAAccuracy, VQA_CASE, (0, 1)),
    "mme": (MMEMetrics, MME_CASE, (0, 1)),
    "multiple_choice": (MultipleChoiceAccuracy, MC_CASE, (0, 1)),
    "mme_rank0_only": (MMEMetrics, MME_CASE, (0,)),
}


def _shard(case: dict[str, list], rank: int, updating: tuple[int, ...]) -> dict[str, list]:
    if len(updating) == 1:
        return case
    return {name: column[rank :: len(updating)] for name, column in case.items()}


def _ddp_worker(rank: int, world_size: int, port: int, expected: dict[str, dict[str, float]]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        for name, (metric_class, case, updating) in DDP_CASES.items():
            metric = metric_class()
            local = metric_class(sync_on_compute=False)  # this rank's samples only
            if rank in updating:
                metric.update(**_shard(case, rank, updating))
                local.update(**_shard(case, rank, updating))
            if len(updating) == 2:  # the test is only meaningful if one rank's half gives other numbers
                local_result = {key: value.item() for key, value in local.compute().items()}
                assert local_result != pytest.approx(expected[name]), (name, rank, local_result)
            result = {key: value.item() for key, value in metric.compute().items()}
            assert result.keys() == expected[name].keys(), (name, rank, result)
            for key, value in result.items():
                assert math.isclose(value, expected[name][key], rel_tol=1e-12, abs_tol=1e-12), (
                    name,
                    rank,
                    key,
                    value,
                    expected[name][key],
                )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_ranks_equal_single_process() -> None:
    expected = {}
    for name, (metric_class, case, _) in DDP_CASES.items():
        metric = metric_class()
        metric.update(**case)
        expected[name] = {key: value.item() for key, value in metric.compute().items()}
    assert expected["mme"] == pytest.approx(MME_EXPECTED)
    assert expected["multiple_choice"] == pytest.approx(MC_EXPECTED)
    # Each rank asserts that its own compute() equals the single-process result; a failure is re-raised here.
    mp.spawn(_ddp_worker, args=(2, _free_port(), expected), nprocs=2, join=True)
