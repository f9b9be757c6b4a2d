"""A method and a prior of one's own, in a folder outside the project: one .py + one YAML each, nothing else.

The test writes them into a temporary folder, with a strategy that composes them, and runs
`python src/run.py plugins=<folder> strategy=<theirs>` on the embedded model: the tokens kept are exactly
the ones the new method and prior choose, worked out by hand.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline_fixtures import run_cli
from pore import plugins, presets
from pore.methods import METHODS
from pore.priors import PRIORS

METHOD = '''
"""Keep the leftmost columns: score = grid width - column (no attention needed: it prunes before the LLM)."""

import torch

from pore.methods import METHODS, PruningMethod, ScoringInputs


@METHODS.register("keep_left")
class KeepLeft(PruningMethod):
    def score(self, inputs: ScoringInputs) -> torch.Tensor:
        layout = inputs.layout
        return (layout.grid_w - layout.col).double()  # (B, N)
'''

METHOD_CONFIG = """
# Keep the leftmost columns, before the language model.
defaults: [none, _self_]
method: keep_left
layer: 0
"""

PRIOR = '''
"""Top half 1, bottom half `lower`."""

import torch

from pore.priors import PRIORS


@PRIORS.register("halves")
def halves_prior(row: torch.Tensor, grid_h: torch.Tensor, lower: float = 0.5) -> torch.Tensor:
    return torch.where(2 * row < grid_h, 1.0, lower).double()
'''

PRIOR_CONFIG = """
defaults: [none, _self_]
name: halves
lower: 0.1
"""

STRATEGY_CONFIG = """
# The new method reweighted by the new prior.
defaults:
  - none
  - override /method@_here_: keep_left
  - override /prior@prior: halves
  - _self_
name: left_top
"""


def write_plugins(folder: Path) -> Path:
    for path, text in {
        "keep_left.py": METHOD,
        "halves.py": PRIOR,
        "conf/method/keep_left.yaml": METHOD_CONFIG,
        "conf/prior/halves.yaml": PRIOR_CONFIG,
        "conf/strategy/left_top.yaml": STRATEGY_CONFIG,
    }.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(textwrap.dedent(text).lstrip())
    return folder


@pytest.mark.slow
def test_a_method_and_a_prior_in_a_folder_run_from_the_command_line(tmp_path: Path) -> None:
    folder = write_plugins(tmp_path / "mine")
    out = tmp_path / "run"
    result = run_cli(
        f"plugins={folder}",
        "strategy=left_top",
        "strategy.keep=16",
        "data.limit=8",
        "logger=none",
        "figures.enabled=false",
        f"output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    # Scores (8 - col) x (1 on rows 0-3, 0.1 on rows 4-7) of the 8 x 8 grid: the 16 best are rows 0-3, columns
    # 0-3 (8, 7, 6, 5 against at most 0.8 below); without the prior they would be columns 0-1 of every row.
    expected = [row * 8 + col for row in range(4) for col in range(4)]
    assert all(row["kept_visual_indices"] == expected for row in rows)
    ran = json.loads((out / "strategy.json").read_text())
    assert (ran["method"], ran["prior"]["name"], ran["layer"]) == ("keep_left", "halves", 0)


def test_a_plugin_folder_registers_and_its_presets_compose(tmp_path: Path) -> None:
    """In process: loading registers the method and the prior and makes the strategy a preset (the registries
    are shared by the process, so this test leaves them as it found them)."""
    folder = write_plugins(tmp_path / "mine")
    try:
        modules = plugins.load(folder)
        assert len(modules) == 2 and plugins.load(folder) == modules  # once per process
        assert "keep_left" in METHODS and "halves" in PRIORS and "left_top" in presets.names()
        strategy = presets.build_strategy("left_top")
        assert (strategy.method, strategy.layer, strategy.prior.name) == ("keep_left", 0, "halves")
        assert strategy.prior.hyperparameters() == {"lower": 0.1}
    finally:
        METHODS.unregister("keep_left")
        PRIORS.unregister("halves")
        plugins.forget(folder)
    assert "left_top" not in presets.names()


def test_a_missing_or_broken_plugin_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(plugins.PluginError, match="does not exist"):
        plugins.load(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "oops.py").write_text("import nothing_of_that_name\n")
    with pytest.raises(plugins.PluginError, match=r"oops\.py failed to import: ModuleNotFoundError"):
        plugins.load(broken)
