"""How published evaluation code reads a model's answer, one small function per rule (pore.data.protocol).

Each function reproduces one official script's reading, quirks included, so that a protocol's numbers can be
compared with the published ones:

- `llava_scienceqa_letter`: haotian-liu/LLaVA `llava/eval/eval_science_qa.py` (upstream main);
  `llava_fork_scienceqa_letter`: the same file as a fork's commit 5200b75 rewrote it;
- `lmms_eval_scienceqa_letter`: lmms-eval `tasks/scienceqa/utils.py` `sqa_process_results`;
- `mmbench_letter`: the MMBench tool's `can_infer` (lmms-eval `tasks/mmbench/mmbench_evals.py`), without the
  GPT step that follows it when no letter is found (offline, such an answer is wrong);
- `lmms_eval_pope_answer`, `lmms_eval_mme_answer`: lmms-eval's POPE and MME readings;
- `llava_pope_answer`: LLaVA's `llava/eval/eval_pope.py` (POPE's own rule, case-sensitive);
- `mme_calculation_answer`: MME's `eval_tool/calculation.py`;
- `lmms_eval_exact_answer`: lmms-eval's `exact_match` with ignore_case / ignore_punctuation (GQA);
- `llava_gqa_answer`: LLaVA's `scripts/convert_gqa_for_eval.py` before GQA's exact string match;
- `evalai_normalize`: the EvalAI answer processor (LLaVA's `m4c_evaluator.py`, lmms-eval's
  `vqa_eval_metric.py`): its `word_tokenize` step, then the VQA normalisation; `llava_vqav2_answer`: that
  processor's output normalised again, as LLaVA uploads VQAv2 answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from pore.metrics.normalize import normalize_vqa

_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
SCIENCEQA_LETTERS = "ABCDE"  # eval_science_qa.py's --options default
_ANSWER_IS_ANY = re.compile(r"The answer is ([A-Z]).")  # upstream: "." is any character, as written there
_ANSWER_IS_DOT = re.compile(r"The answer is ([A-E])\.")
_ANSWER_IS = re.compile(r"The answer is ([A-E])")


def llava_scienceqa_letter(prediction: str, n_options: int) -> str | None:
    """Upstream eval_science_qa.py (haotian-liu/LLaVA main c121f04): the answer is exactly a letter of A-E,
    or starts with "<letter>. ", or holds exactly one "The answer is <capital><any character>" (so "The
    answer is A" with nothing after it, or two such sentences, fail); the letter must be one of the first
    `n_options` (get_pred_idx). None = "FAILED"."""
    if prediction in tuple(SCIENCEQA_LETTERS):  # args.options is a list: the whole answer is one letter
        answer = prediction
    elif len(prediction) >= 3 and prediction[0] in SCIENCEQA_LETTERS and prediction[1:3] == ". ":
        answer = prediction[0]
    else:
        found = _ANSWER_IS_ANY.findall(prediction)
        answer = found[0] if len(found) == 1 else None
    if answer is None or answer not in SCIENCEQA_LETTERS[:n_options]:
        return None
    return answer


def llava_fork_scienceqa_letter(prediction: str, n_options: int) -> str | None:
    """eval_science_qa.py as rewritten in commit 5200b75 (a fork's, not upstream's): newlines become ". ";
    then the whole answer is a letter, or it starts with "<letter>. ", or it says "The answer is <letter>"
    (with a period preferred, the first match taken); the letter must be one of the first `n_options`.
    None = "FAILED"."""
    text = prediction.replace("\n", ". ")
    answer = None
    if text.strip() in SCIENCEQA_LETTERS:
        answer = text.strip()
    elif len(text) >= 3 and text[0] in SCIENCEQA_LETTERS and text[1:3] == ". ":
        answer = text[0]
    elif "The answer is " in text:
        match = _ANSWER_IS_DOT.search(text) or _ANSWER_IS.search(text)
        answer = match.group(1) if match else None
    if not answer or answer not in SCIENCEQA_LETTERS[:n_options]:
        return None
    return answer


def lmms_eval_scienceqa_letter(prediction: str) -> str | None:
    """sqa_process_results (lmms-eval 0.7.x): the stripped answer equals the letter in any case ("b" is
    right for B), or starts with a capital and a period ("B. dog"); nothing else."""
    said = prediction.strip()
    if len(said) == 1:
        return said.upper()
    if len(said) >= 2 and said[0].isupper() and said[1] == ".":
        return said[0]
    return None


# can_infer_option's delimiters around a letter: "A.", "A,", "A:", "A)", "A).", "(A)", "(A).", ":A", ...
_MMBENCH_AFFIXES = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
    (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def mmbench_letter(prediction: str, options: Sequence[str]) -> str | None:
    """MMBench's `can_infer`: first a letter of A-E standing alone as a word (not when "A" may be an
    article: an answer of more than three words containing "A"), then one in exactly one delimiter style
    ("B.", "(C)", ...), then exactly one option text contained in the lowercased answer. None = no answer.

    The letter search looks at A-E whatever the number of options (the tool's `num_choice=5`), so a stray
    "E" is read as E, which is then wrong.
    """
    letters = "ABCDE"
    words = [word.strip() for word in prediction.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(prefix + letter + suffix in words for letter in letters)

    if count() == 1:
        for letter in letters:
            if "A" in words and len(words) > 3:
                break
            if letter in words:
                return letter
    for prefix, suffix in _MMBENCH_AFFIXES:
        if count(prefix, suffix) == 1:
            for letter in letters:
                if prefix + letter + suffix in words:
                    return letter
    said = prediction.lower()
    named = [letter for letter, option in zip(letters, options, strict=False) if str(option).lower() in said]
    return named[0] if len(named) == 1 else None


def lmms_eval_pope_answer(prediction: str) -> str | None:
    """pope_process_results: lower().strip() must be exactly "yes" or "no" ("Yes." is neither)."""
    said = prediction.lower().strip()
    return said if said in ("yes", "no") else None


def lmms_eval_mme_answer(prediction: str) -> str | None:
    """mme parse_pred_ans (from Otter): periods dropped; "yes" / "no"; "y" / "n"; else "yes" or "no" inside
    the first four characters ("none" reads as no); else None ("other")."""
    said = prediction.lower().strip().replace(".", "")
    if said in ("yes", "no"):
        return said
    if len(said) == 1:
        return {"y": "yes", "n": "no"}.get(said)
    prefix = said[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return None


def llava_pope_answer(prediction: str) -> str:
    """LLaVA's eval_pope.py (= POPE's own evaluate.py): the text before the first ".", commas removed, split
    on single spaces; "no" if a word is exactly "No", "no" or "not" (case-sensitive: "NO", "No!", "Not
    really" read as yes), else "yes"."""
    words = prediction.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_calculation_answer(prediction: str) -> str | None:
    """MME's eval_tool/calculation.py `parse_pred_ans` on the lowercased answer: exactly "yes" / "no", else
    "yes" or "no" inside the first four characters, else None ("other"): "y", "N", "n." are "other"."""
    said = prediction.lower()
    if said in ("yes", "no"):
        return said
    if "yes" in said[:4]:
        return "yes"
    if "no" in said[:4]:
        return "no"
    return None


def lmms_eval_exact_answer(text: str) -> str:
    """lmms-eval's `exact_match` with ignore_case and ignore_punctuation (GQA): lowercase, every ASCII
    punctuation mark deleted; whitespace is kept as it is ("dark  blue" is not "dark blue")."""
    return text.lower().translate(_ASCII_PUNCTUATION)


def llava_gqa_answer(prediction: str) -> str:
    """convert_gqa_for_eval.py: trailing periods stripped, lowercased; GQA then compares strings exactly."""
    return prediction.rstrip(".").lower()


def evalai_word_tokenize(text: str) -> str:
    """EvalAIAnswerProcessor.word_tokenize: lowercase, drop "," and "?", split off "'s", strip."""
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def evalai_normalize(text: str) -> str:
    """EvalAIAnswerProcessor.__call__: `word_tokenize`, then the VQA toolkit's normalisation."""
    return normalize_vqa(evalai_word_tokenize(text))


def llava_vqav2_answer(prediction: str) -> str:
    """LLaVA's VQAv2 answer as scored: convert_vqav2_for_submission.py uploads `EvalAIAnswerProcessor`'s
    output ("man's" -> "man 's", "Dakota,Digital" -> "dakotadigital"), which the server then normalises
    again with the VQA toolkit."""
    return normalize_vqa(evalai_normalize(prediction))
