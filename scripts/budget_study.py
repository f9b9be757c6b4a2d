"""Accuracy against budget for every strategy, through the real pipeline, as a markdown table.

    python scripts/budget_study.py                       # embedded model, spatial benchmark, CPU
    python scripts/budget_study.py model=llava15_7b data=gqa data.limit=1000 --budgets 576 192 128 64

Each cell is one `pore.evaluate` run (the code path of `python src/run.py`) with `logger=none` in its own
output folder under `outputs/budget_study/`, so reruns resume and finished cells cost nothing. Extra
arguments are Hydra overrides applied to every run. Budgets are image tokens kept per image; "all" means
every token (the unpruned model is run once, with strategy=none).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from pore.config import register_resolvers
from pore.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("random", "fastv", "pore_linear", "pore_exponential")


def run(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return evaluate(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[32, 16, 8], help="tokens kept per image")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "budget_study")
    parser.add_argument("--json", type=Path, help="also write every cell's metrics here")
    args, overrides = parser.parse_known_args()
    register_resolvers()

    base = ["logger=none", *overrides]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    cells[("none", "all")] = run([*base, "strategy=none", f"output_dir={args.out}/none"])
    for strategy in args.strategies:
        for budget in args.budgets:
            folder = f"{args.out}/{strategy}-keep{budget}"
            cells[(strategy, str(budget))] = run(
                [*base, f"strategy={strategy}", f"strategy.keep={budget}", f"output_dir={folder}"]
            )

    metrics = next(iter(cells.values()))
    prefix = next(key.split("/")[0] for key in metrics if key.endswith("/acc"))
    region_keys = [k for k in (f"{prefix}/acc_top", f"{prefix}/acc_bottom") if k in metrics]
    before = int(metrics["eff/visual_tokens_before"])
    header = (
        ["strategy", "kept / image", f"{prefix} acc"]
        + [k.split("/")[1] for k in region_keys]
        + ["prefill TFLOPs"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (strategy, budget), values in cells.items():
        kept = f"{before} (all)" if budget == "all" else f"{budget} ({100 * int(budget) / before:.1f} %)"
        row = [strategy, kept, f"{100 * values[f'{prefix}/acc']:.1f}"]
        row += [f"{100 * values[key]:.1f}" for key in region_keys]
        row.append(f"{values['eff/prefill_tflops']:.2e}")
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({f"{s}/{b}": v for (s, b), v in cells.items()}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
