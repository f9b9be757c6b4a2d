"""Two runs on the same questions: every metric's paired difference, answer agreement, kept-set overlap.

The differences are second - first with a paired-bootstrap interval (the same units drawn for both runs)
and, for accuracy-type values, McNemar's exact test (`pore.metrics.uncertainty`). A difference is marked
distinguishable when the data tell it from zero (McNemar's p below 1 - level for accuracy-type values, the
interval excluding 0 otherwise). Answer agreement is the share of questions whose two answers are the same
answer; the kept-set overlap is the mean Jaccard index of the image tokens the two runs kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pore.app.comparison.runs import RunResult, check_comparable
from pore.app.evaluation.uncertainty import answers_agree
from pore.metrics.uncertainty import PairedDifference, paired_differences
from pore.stats.bootstrap import BootstrapSettings, Interval, bootstrap_mean
from pore.stats.paired import jaccard


@dataclass
class PairComparison:
    first: RunResult
    second: RunResult
    differences: dict[str, PairedDifference]  # by metric key (without the benchmark prefix)
    agreement: Interval  # share of questions with the same answer
    overlap: Interval | None  # mean Jaccard of the kept image tokens (None: neither run pruned)
    questions: int


def kept_tokens(row: dict[str, Any]) -> set[tuple[int, int]] | None:
    """The (image, raster index) pairs a row kept; None when nothing was pruned (every token kept)."""
    kept = row.get("kept_visual_indices")
    if kept is None:
        return None
    images = kept if kept and isinstance(kept[0], list) else [kept]
    return {(image, int(index)) for image, indices in enumerate(images) for index in indices}


def kept_overlap(first: dict[str, Any], second: dict[str, Any]) -> float:
    """Jaccard index of two rows' kept tokens; an unpruned row kept all `n_visual_tokens_before`."""
    a, b = kept_tokens(first), kept_tokens(second)
    if a is None and b is None:
        return 1.0
    if a is None or b is None:  # one kept everything: |kept| / |all|
        kept, row = (b, first) if a is None else (a, second)
        return len(kept) / max(int(row.get("n_visual_tokens_before") or len(kept)), 1)
    return jaccard(a, b)


def compare_pair(first: RunResult, second: RunResult, settings: BootstrapSettings) -> PairComparison:
    """The paired comparison of two comparable runs (a `UserError` otherwise)."""
    check_comparable(first, second)
    differences = paired_differences(first.parts(), second.parts(), settings)
    pairs = list(zip(first.rows, second.rows, strict=True))  # both sorted by question id, the same ids
    agree = [float(answers_agree(a["prediction"], b["prediction"])) for a, b in pairs]
    overlap = None
    if first.prunes or second.prunes:
        overlap = bootstrap_mean([kept_overlap(a, b) for a, b in pairs], settings)
    return PairComparison(first, second, differences, bootstrap_mean(agree, settings), overlap, len(pairs))


def verdict(difference: PairedDifference, level: float, names: tuple[str, str] = ("A", "B")) -> str:
    """`B > A *` / `B < A *` when the data tell the runs apart, else `no difference detected`."""
    if not difference.distinguishable(level):
        return "no difference detected"
    return f"{names[1]} {'>' if difference.difference.estimate > 0 else '<'} {names[0]} *"
