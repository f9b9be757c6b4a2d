"""Scoring equal to the official rules, per protocol (issue 20).

`default` and `llava` follow the official scorers (GQA's eval.py after LLaVA's convert_gqa_for_eval.py, the
VQA toolkit's vqaEval.py, MME's calculation.py, LLaVA's eval_science_qa.py / eval_pope.py); `lmms_eval`
follows lmms-eval 0.7 where it knowingly differs. Each case runs the metric with the answer rule that the
benchmark's conf/data file sets for the protocol, and the official verdict (worked out by hand from the
official code) is written next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from pore.metrics import METRICS
from pore.metrics.answer_rules import llava_pope_answer, mmbench_letter, mme_calculation_answer
from pore.metrics.choice import extract_choice

CONF = Path(__file__).resolve().parents[1] / "conf"
PROTOCOLS = ("default", "llava", "lmms_eval")


def rule_of(benchmark: str, protocol: str) -> dict[str, Any]:
    """The metric options conf/data/<benchmark>.yaml gives under `protocol` (no rule: the metric default)."""
    settings = OmegaConf.load(CONF / "data" / f"{benchmark}.yaml").protocols[protocol] or {}
    return {"rule": settings["answer_rule"]} if "answer_rule" in settings else {}


def score(metric_name: str, benchmark: str, protocol: str, prediction: str, answers: list[str]) -> float:
    """The metric's headline for one prediction under the benchmark's rule for `protocol`."""
    metric = METRICS[metric_name](**rule_of(benchmark, protocol))
    metric.update([prediction], [answers])
    return float(metric.compute()["acc"])


# ------------------------------------------------------------------------------------------------ GQA

GQA_CASES = [
    # prediction, reference, official (GQA eval.py after rstrip(".").lower()), lmms-eval exact_match
    ("dark  blue", "dark blue", 0.0, 0.0),  # inner whitespace is kept by both
    ("dark\nblue", "dark blue", 0.0, 0.0),
    ("yes .", "yes", 0.0, 0.0),  # official: "yes " (rstrip stops at the space); lmms-eval: "yes "
    (". yes", "yes", 0.0, 0.0),  # official: ". yes"; lmms-eval: " yes"
    ("Yes.", "yes", 1.0, 1.0),
    ("Table..", "table", 1.0, 1.0),  # rstrip removes every trailing period
    ("Yes!", "yes", 0.0, 1.0),  # lmms-eval deletes all punctuation; the official conversion only "."
    ("dark-blue", "dark blue", 0.0, 0.0),  # lmms-eval: "darkblue"
]


@pytest.mark.parametrize(("prediction", "reference", "official", "lmms_eval"), GQA_CASES)
def test_gqa_scoring(prediction: str, reference: str, official: float, lmms_eval: float) -> None:
    assert score("exact_match", "gqa", "default", prediction, [reference]) == official
    assert score("exact_match", "gqa", "llava", prediction, [reference]) == official
    assert score("exact_match", "gqa", "lmms_eval", prediction, [reference]) == lmms_eval


def test_gqa_lenient_rule_stays_an_option() -> None:
    """`exact` (answer_rule=exact, the metric's default) still collapses whitespace and punctuation."""
    metric = METRICS["exact_match"](rule="exact")
    metric.update(["dark  blue", ". yes"], [["dark blue"], ["yes"]])
    assert float(metric.compute()["acc"]) == 1.0


# ---------------------------------------------------------------------------------------------- VQAv2

VQAV2_CASES = [
    # prediction, the ten identical references, vqaEval (default) and lmms-eval 0.7, LLaVA's submission
    ("Dakota,Digital", "dakota digital", 1.0, 0.0),  # the EvalAI processor drops the comma: "dakotadigital"
    ("that's", "thats", 1.0, 0.0),  # reference -> "that's"; LLaVA uploads "that 's"
    ("red,white", "red white", 1.0, 0.0),  # LLaVA: "redwhite"
    ("whats", "what's", 1.0, 1.0),  # contraction table on both sides
    ("man's", "man's", 1.0, 0.0),  # LLaVA: "man 's"
    ("Two", "2", 1.0, 1.0),
]


@pytest.mark.parametrize(("prediction", "reference", "official", "llava"), VQAV2_CASES)
def test_vqav2_scoring(prediction: str, reference: str, official: float, llava: float) -> None:
    answers = [reference] * 10
    assert score("vqa_accuracy", "vqav2", "default", prediction, answers) == official
    assert score("vqa_accuracy", "vqav2", "lmms_eval", prediction, answers) == official
    assert score("vqa_accuracy", "vqav2", "llava", prediction, answers) == llava


@pytest.mark.parametrize("benchmark", ["vqav2", "textvqa"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_period_regex_stops_after_32_substitutions(benchmark: str, protocol: str) -> None:
    """vqaEval / the EvalAI processor pass re.UNICODE (32) as `count`: 40 periods then "yes" keeps 8 periods
    and scores 0 officially; 32 periods are all removed and score 1. LLaVA's VQAv2 answers go through the
    processor before upload and the server's vqaEval after it: two passes, 64 periods at most."""
    answers = ["yes"] * 10
    passes = 2 if (benchmark, protocol) == ("vqav2", "llava") else 1
    assert score("vqa_accuracy", benchmark, protocol, "." * (32 * passes + 8) + "yes", answers) == 0.0
    assert score("vqa_accuracy", benchmark, protocol, "." * (32 * passes) + "yes", answers) == 1.0


# ------------------------------------------------------------------------------------------------ MME

MME_CASES = [
    # prediction, truth, calculation.py (default, llava), lmms-eval parse_pred_ans
    ("Y", "yes", False, True),  # calculation.py: "y" is "other"
    ("N", "no", False, True),
    ("y.", "yes", False, True),
    ("n.", "no", False, True),
    ("Yes", "yes", True, True),
    ("No.", "no", True, True),  # "no." -> "no" within the first four characters
    ("None of them", "no", True, True),  # "none" holds "no"
    ("It is", "yes", False, False),
]


@pytest.mark.parametrize(("prediction", "truth", "official", "lmms_eval"), MME_CASES)
def test_mme_scoring(prediction: str, truth: str, official: bool, lmms_eval: bool) -> None:
    for protocol, expected in (("default", official), ("llava", official), ("lmms_eval", lmms_eval)):
        metric = METRICS["mme"](**rule_of("mme", protocol))
        metric.update([prediction], [[truth.capitalize()]], categories=["existence"], image_ids=["a.jpg"])
        assert float(metric.compute()["existence/acc"]) == 100.0 * expected, protocol
    assert mme_calculation_answer("Y") is None and mme_calculation_answer("yes, there is") == "yes"


# ------------------------------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize(
    ("prediction", "default", "llava", "lmms_eval"),
    [
        ("b", True, False, True),  # eval_science_qa.py is case-sensitive; lmms-eval lower()s both sides
        ("B", True, True, True),
        ("B. hawk", True, True, True),
        ("The answer is B.", True, True, False),  # lmms-eval: neither the letter nor "<capital>."
    ],
)
def test_scienceqa_scoring(prediction: str, default: bool, llava: bool, lmms_eval: bool) -> None:
    for protocol, expected in (("default", default), ("llava", llava), ("lmms_eval", lmms_eval)):
        metric = METRICS["multiple_choice"](**rule_of("scienceqa_img", protocol))
        metric.update([prediction], [["B"]], options=[["rabbit", "hawk", "fox"]])
        assert float(metric.compute()["acc"]) == float(expected), protocol


# ----------------------------------------------------------------------------------------------- POPE


def test_pope_yes_ratio_is_the_share_of_yes_predictions() -> None:
    """POPE's and LLaVA's scripts: yes_ratio = predictions read as yes / all (3 / 4 here); lmms-eval's
    pope_aggregate_yes_ratio would report the share of ground-truth "yes" (1 / 4): ours is kept."""
    for protocol in PROTOCOLS:
        metric = METRICS["pope"](**rule_of("pope", protocol))
        metric.update(["yes", "yes", "yes", "no"], [["yes"], ["no"], ["no"], ["no"]])
        assert float(metric.compute()["yes_ratio"]) == 0.75, protocol


def test_llava_pope_reading_is_case_sensitive_and_splits_on_spaces() -> None:
    """eval_pope.py: first sentence, commas removed, split(" "), "No" / "no" / "not" -> no, else yes."""
    official = {
        "NO": "yes",  # "NO" is none of the three words
        "No!": "yes",  # "No!" is not "No"
        "Not really": "yes",  # "Not" is not "not"
        "No, there is not.": "no",
        "There is no dog.": "no",
        "no.": "no",
        "Yes. No.": "yes",  # first sentence only
    }
    assert {text: llava_pope_answer(text) for text in official} == official
    lenient = METRICS["pope"]()  # the default protocol's lenient reading: "NO", "No!", "Not" are no
    lenient.update(["NO", "No!", "Not really"], [["no"]] * 3)
    assert float(lenient.compute()["acc"]) == 1.0
    llava = METRICS["pope"](**rule_of("pope", "llava"))
    llava.update(["NO", "No!", "Not really"], [["no"]] * 3)
    assert float(llava.compute()["acc"]) == 0.0


def test_pope_reports_each_category_and_the_pooled_scores() -> None:
    """eval_pope.py prints each category on its own; the pooled keys stay (data=pope)."""
    metric = METRICS["pope"](rule="llava_pope")
    metric.update(
        ["yes", "no", "yes", "yes"],
        [["yes"], ["yes"], ["no"], ["yes"]],
        categories=["random", "random", "popular", "popular"],
    )
    got = {key: float(value) for key, value in metric.compute().items()}
    # random: tp 1, fn 1 -> acc 1/2, precision 1, recall 1/2, yes_ratio 1/2; popular: fp 1, tp 1.
    assert got["random/acc"] == 0.5 and got["random/precision"] == 1.0 and got["random/recall"] == 0.5
    assert got["random/yes_ratio"] == 0.5
    assert got["popular/acc"] == 0.5 and got["popular/precision"] == 0.5 and got["popular/yes_ratio"] == 1.0
    assert got["acc"] == 0.5 and got["yes_ratio"] == 0.75
    assert not any(key.startswith("adversarial/") for key in got)


# -------------------------------------------------------------------------------------------- MMBench


def test_mmbench_two_letters_in_one_rotation() -> None:
    """'B and C': the MMBench tool's can_infer (what `llava` and `lmms_eval` use) finds two letters and no
    single option text: no answer, so the copy is wrong (the tool's next step would ask GPT; offline it
    cannot). lmms-eval's separate static task (mcq_extract) reads B; the `default` protocol's lenient
    reading takes the leading letter, B, too."""
    options = ["stop", "go", "wait"]
    assert mmbench_letter("B and C", options) is None
    assert extract_choice("B and C", "ABC", options) == "B"
    for protocol, expected in (("default", 1.0), ("llava", 0.0), ("lmms_eval", 0.0)):
        metric = METRICS["multiple_choice"](**rule_of("mmbench", protocol))
        metric.update(["B and C"], [["B"]], options=[options], groups=[7])
        assert float(metric.compute()["acc"]) == expected, protocol
