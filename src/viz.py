"""Pictures of one or two evaluation runs: where the kept tokens are, by row, by cell, and on sample images.

python src/viz.py RUN_DIR                         # one run: figures in RUN_DIR/figures
python src/viz.py RUN_A RUN_B --samples 4         # two strategies side by side (same model and data)
python src/viz.py RUN_A RUN_B --pick differ       # the samples where the runs' kept tokens differ most
python src/viz.py RUN_A --ids 17 42 --out figs/   # chosen questions (test-000017 or just its number 17)

Writes kept_by_row.png (share of kept tokens in each image row: the figure that shows the bias and its fix),
kept_map.png (how often each grid cell is kept) and samples.png (the image as the model saw it, dropped
tokens dimmed, one column per run). The images are read again from the run's data (its config.yaml).
A folder that is not a finished run, or an id no run answered, ends with one line `error: ...` (status 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pore.app.viz import draw_runs
from pore.app.viz.runs import load_run
from pore.errors import UserError, user_errors


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, help="evaluation output_dir(s): predictions.jsonl + config.yaml"
    )
    parser.add_argument("--samples", type=int, default=4, help="sample pictures (0 = none); default 4")
    parser.add_argument("--ids", nargs="+", default=None, help="question ids to draw (instead of --samples)")
    parser.add_argument(
        "--pick",
        choices=("first", "differ"),
        default="first",
        help="which samples: the first of the data, or where the first and last runs differ most",
    )
    parser.add_argument(
        "--labels", nargs="+", default=None, help="a label per run (default: strategy, budget)"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <first run>/figures)")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the pictures to a W&B run (WANDB_MODE)"
    )
    parser.add_argument("--project", default="pore", help="W&B project for --wandb")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The program; a mistake (a folder that is not a finished run, an unknown id) is one line, exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with user_errors():
        return draw(args)


def draw(args: argparse.Namespace) -> int:
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise UserError(f"--labels needs one label per run ({len(args.runs)}), got {len(args.labels)}")
    labels = args.labels or [None] * len(args.runs)
    runs = [load_run(path, label) for path, label in zip(args.runs, labels, strict=True)]
    out = args.out
    if out is None:
        out = args.runs[0] / "figures"
        if len(args.runs) > 1:
            out = out / ("vs-" + "-".join(path.resolve().name for path in args.runs[1:]))
    written = draw_runs(runs, out, samples=args.samples, ids=args.ids, pick=args.pick)
    for run in runs:
        print(f"{run.label}: {len(run.rows)} answers, grid {run.grid[0]}x{run.grid[1]}")
    for name, path in written.items():
        print(f"{name}: {path}")
    if args.wandb:
        import wandb

        run = wandb.init(
            project=args.project, job_type="viz", dir=str(out), config={"runs": [str(p) for p in args.runs]}
        )
        run.log({f"figures/{name}": wandb.Image(str(path)) for name, path in written.items()})
        run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
