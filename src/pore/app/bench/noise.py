"""Is a reported ratio larger than the noise of the timings it divides? Said when it is not.

Each speed-up of the report (speed-up = unpruned / pruned prefill, ideal speed-up = unpruned / ideal)
compares two medians. When the timings of either side spread (p10 to
p90, relative to their median) by more than the ratio differs from 1, the ratio says nothing: on a busy
machine, with many threads or a tiny model an "ideal" can come out at 0.5x. The benchmark then warns, with
the settings that give a stable figure.
"""

from __future__ import annotations

from typing import Any

# (ratio key of a comparison row, its name in the table, the numerator's approach, the denominator's). The
# effects the report claims: what pruning saves. (achieved / ideal near 1 is the claim "no overhead", which
# a spread does not contradict.)
RATIOS = (
    ("speedup", "speed-up", "unpruned", "pruned"),
    ("ideal_speedup", "ideal speed-up", "unpruned", "ideal"),
)
STABLE = (
    "for a stable figure: one thread on an idle machine (OMP_NUM_THREADS=1 or bench.threads=1), more "
    "repeats (bench.warmup=3 bench.repeats=30), or a larger architecture (bench.architecture=llava15_small "
    "on a CPU, the 7B model on a GPU)"
)


def relative_spread(record: dict[str, Any] | None) -> float | None:
    """(p90 - p10) / median of a record's prefill timings; None without them."""
    prefill = (record or {}).get("prefill_ms") or {}
    median, low, high = prefill.get("median"), prefill.get("p10"), prefill.get("p90")
    if not median or low is None or high is None:
        return None
    return (high - low) / median


def _record(results: list[dict[str, Any]], row: dict[str, Any], approach: str) -> dict[str, Any] | None:
    """The measured record of `approach` that `row`'s ratios were computed from (same batch and backend;
    the pruned one of its strategy, the ideal of its budget)."""
    for record in results:
        if record["status"] != "ok" or record["approach"] != approach:
            continue
        if (record["batch"], record["implementation"]) != (row["batch"], row["implementation"]):
            continue
        if approach == "pruned" and (record["budget"], record["strategy"]) != (
            row["budget"],
            row["strategy"],
        ):
            continue
        if approach == "ideal" and record["budget"] != row["budget"]:
            continue
        return record
    return None


def noisy_ratios(results: list[dict[str, Any]], row: dict[str, Any]) -> list[str]:
    """`speed-up 0.76x within a 600 % spread` for each ratio of `row` that its timings' spread exceeds."""
    noisy = []
    for key, name, numerator, denominator in RATIOS:
        ratio = row.get(key)
        spreads = [relative_spread(_record(results, row, side)) for side in (numerator, denominator)]
        if ratio is None or None in spreads:
            continue
        spread = max(spreads)
        if spread > abs(ratio - 1.0):
            noisy.append(f"{name} {ratio:.2f}x within a {100 * spread:.0f} % spread")
    return noisy


def spread_warning(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str | None:
    """One line when some reported ratios are smaller than the spread of their timings; None otherwise."""
    measured = [row for row in rows if row.get("status") == "ok"]
    noisy = [(row, found) for row in measured if (found := noisy_ratios(results, row))]
    if not noisy:
        return None
    row, found = noisy[0]
    example = (
        f"batch {row['batch']} {row['implementation']} {row['strategy']} keep {row['budget']}: "
        f"{', '.join(found)}"
    )
    return (
        f"in {len(noisy)} of {len(measured)} settings the timings spread (p10-p90) more than the effect "
        f"they report (e.g. {example}): those ratios are noise on this machine; {STABLE}"
    )
