"""Accuracy against budget for every strategy, through the real pipeline, as a markdown table.

    python scripts/budget_study.py                       # embedded model, spatial benchmark, CPU
    python scripts/budget_study.py model=llava15_7b data=gqa data.limit=1000 --budgets 576 192 128 64

Each cell is one `pore.app.evaluate` run (the code path of `python src/run.py`) with `logger=none` in its own
output folder under `outputs/budget_study/`, so reruns resume and finished cells cost nothing. Extra
arguments are Hydra overrides applied to every run. Budgets are image tokens kept per image; "all" means
every token (the unpruned model is run once, with strategy=none).

A strategy may name a calibrated prior's form after a slash (`pore_calibrated/profile2d`) and its pruning
layer after an at sign (`fastervlm@2`: FasterVLM pruning before layer 2, like FastV, instead of before the
language model). Settings of one strategy go in brackets, separated by semicolons:
`pdrop[strategy.options.score_from=previous_layer;strategy.positions=original]` runs PyramidDrop as this
project did before it followed the official code, next to `pdrop`; `{b}` in a setting stands for the budget.

Multi-stage strategies (PyramidDrop's and SparseVLM's presets: their names contain `pdrop` or `sparsevlm`) get
three stages before layers 1, 2 and 3 (the embedded model has 4) keeping 4b, 2b and b tokens (capped at the
image's tokens), so their last stage meets the budget b; `--stage-layers` changes the layers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from pore.app.config import register_resolvers
from pore.app.evaluate import evaluate

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = (
    "random",
    "random@0",
    "pool",
    "pool@2",
    "pool_average",
    "fastervlm",
    "fastervlm@2",
    "fastv",
    "pore_linear",
    "pore_exponential",
    "sparsevlm",
    "pore_sparsevlm_linear",
    "pdrop",
    "pore_pdrop_linear",
    "pore_calibrated/linear",
    # K = 1: ranked by layer 0, where the embedded model's attention is most biased towards the bottom.
    "fastv@1",
    "pore_linear@1",
    "pore_exponential@1",
    "pore_calibrated/linear@1",
    "pore_calibrated/profile@1",
)


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
    parser.add_argument("--stage-layers", type=int, nargs="+", default=[1, 2, 3])
    args, overrides = parser.parse_known_args()
    register_resolvers()

    base = ["logger=none", *overrides]
    cells: dict[tuple[str, str], dict[str, float]] = {}
    cells[("none", "all")] = run([*base, "strategy=none", f"output_dir={args.out}/none"])
    metrics = cells[("none", "all")]
    before = int(metrics["eff/visual_tokens_before"])
    for strategy in args.strategies:
        name, _, extra = strategy.partition("[")
        extra_settings = [setting for setting in extra.rstrip("]").split(";") if setting]
        name, _, layer = name.partition("@")
        name, _, form = name.partition("/")
        for budget in args.budgets:
            settings = [f"strategy={name}", f"strategy.keep={budget}"]
            if form:
                settings.append(f"strategy.prior.form={form}")
            if layer:
                settings.append(f"strategy.layer={layer}")
            if "pdrop" in name or "sparsevlm" in name:
                stages = len(args.stage_layers)
                keeps = [min(before, budget * 2 ** (stages - 1 - i)) for i in range(stages)]
                layers = ",".join(map(str, args.stage_layers))
                settings = [f"strategy={name}", f"strategy.layer=[{layers}]", "strategy.ratio=null"]
                settings.append("++strategy.reference_depth=null")  # this model's layers: not to be scaled
                settings.append(f"strategy.keep=[{','.join(map(str, keeps))}]")
            settings += [setting.replace("{b}", str(budget)) for setting in extra_settings]
            slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in strategy.replace("@", "-K"))
            folder = f"{args.out}/{slug}-keep{budget}"
            cells[(strategy, str(budget))] = run([*base, *settings, f"output_dir={folder}"])

    prefix = next(key.split("/")[0] for key in metrics if key.endswith("/acc"))
    region_keys = [k for k in (f"{prefix}/acc_top", f"{prefix}/acc_bottom") if k in metrics]
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
