"""The `pore_authors_*` presets select exactly what the PoRe authors' weight files select.

The authors' 41 weight files (intcomp/attention-bias at e75ebe7, `playground/data/weight/`) are data the
project does not commit; the tests read them from `../shared/pore_authors/` next to the repository and are
skipped, saying so, where that folder is absent. For every benchmark the authors calibrated that this project
has, the preset resolved for that data set (as the run resolves it: `Strategy.resolve(data=data.name)`) must
weigh the 576 tokens of LLaVA-1.5's grid so that the top-k of random scores is the same set as with the
authors' file (kept-set agreement 1.0); FastV's curve is carried in closed form and checked against its file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import pore
from pipeline_fixtures import REPO, run_program
from pore.presets import names
from pore.priors import PRIORS, PriorConfig
from pore.priors.fastv_curve import FASTV_INVERSE_CUBIC

AUTHORS = REPO.parent / "shared" / "pore_authors"
needs_files = pytest.mark.skipif(
    not (AUTHORS / "README.md").is_file(),
    reason=f"the PoRe authors' weight files are not at {AUTHORS} (data, not committed: copy "
    "intcomp/attention-bias playground/data/weight/ there to run these checks)",
)

SIDE, TOKENS = 24, 576  # LLaVA-1.5's grid, the authors' files' length
# Our data.name -> the authors' file name, per method folder (their names differ between folders).
FILES = {
    "pore_authors_pdrop": ("PyramidDrop", {"gqa": "gqa", "mme": "MME", "mmbench": "mmbench"}),
    "pore_authors_sparsevlm": ("SparseVLMs", {"gqa": "gqa", "mme": "mme", "mmbench": "mmbench"}),
}
for _, _names in FILES.values():
    _names.update({"scienceqa_img": "scienceqa", "textvqa": "textvqa", "vqav2": "vqav2", "pope": "pope"})
    _names.update({f"pope_{subset}": "pope" for subset in ("adversarial", "popular", "random")})
CALIBRATED = [(preset, data) for preset, (_, table) in FILES.items() for data in sorted(table)]
UNCALIBRATED = "spatial"  # the embedded benchmark: the authors never ran it
BUDGETS = (16, 64, 128, 192, 288, 400)  # top-k sizes compared


def raster() -> tuple[torch.Tensor, ...]:
    """(row, col, grid_h, grid_w) of the 576 tokens of a 24 x 24 grid in raster order, each (576,)."""
    index = torch.arange(TOKENS)
    return index // SIDE, index % SIDE, torch.full_like(index, SIDE), torch.full_like(index, SIDE)


def authors_file(folder: str, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(AUTHORS / folder / f"{name}.npy", allow_pickle=False))


def kept_sets(weights: torch.Tensor, scores: torch.Tensor, keep: int) -> list[set[int]]:
    """The top-`keep` token ids of each row of `scores` (S, 576) times `weights` (576,)."""
    return [set(row.tolist()) for row in (scores * weights).topk(keep, dim=1).indices]


def agreement(ours: torch.Tensor, theirs: torch.Tensor, seed: int) -> float:
    """Mean share of the authors' kept set that ours keeps too, over 200 random score vectors and BUDGETS."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(200, TOKENS, generator=generator, dtype=torch.float64)  # (S, N)
    shares = [
        len(a & b) / keep
        for keep in BUDGETS
        for a, b in zip(kept_sets(ours, scores, keep), kept_sets(theirs, scores, keep), strict=True)
    ]
    return sum(shares) / len(shares)


def test_every_benchmark_we_have_is_calibrated_but_the_embedded_one() -> None:
    """The tables name every data config of conf/data/ (POPE's subsets share POPE's file)."""
    ours = set(names("data")) - {UNCALIBRATED}
    for preset, (_, table) in FILES.items():
        assert set(table) == ours, preset
        assert set(pore.build_strategy(preset).prior.params["sigma_by_data"]) == ours, preset


@needs_files
@pytest.mark.parametrize(("preset", "data"), CALIBRATED)
def test_the_preset_keeps_what_the_authors_file_keeps(preset: str, data: str) -> None:
    folder, table = FILES[preset]
    theirs = authors_file(folder, table[data])
    prior = pore.build_strategy(preset).resolve(data=data).prior
    ours = prior.weights(*raster())
    assert (ours - theirs).abs().max().item() < 1e-9
    assert agreement(ours, theirs, seed=len(data)) == 1.0


@needs_files
def test_the_fastv_curve_is_the_authors_file_within_1e_3() -> None:
    """One curve for all benchmarks: within 1e-3 at every index (the closed form is within 1e-12)."""
    theirs = authors_file("FastV", "weight")
    for data in [*names("data"), None]:  # one curve for every benchmark, the embedded one too
        prior = pore.build_strategy("pore_authors_fastv").resolve(data=data).prior
        ours = prior.weights(*raster())
        error = (ours - theirs).abs().max().item()
        assert error <= 1e-3
        assert error < 1e-12
        assert agreement(ours, theirs, seed=7) == 1.0


@needs_files
def test_the_table_prior_still_reads_the_fastv_file_as_it_is() -> None:
    path = AUTHORS / "FastV" / "weight.npy"
    table = PriorConfig.from_mapping({"name": "table", "path": str(path), "position": "index"})
    assert torch.equal(table.weights(*raster()), authors_file("FastV", "weight"))


def test_the_fastv_curve_by_hand() -> None:
    """w = 1 / (1 + a p + b p^2 + c p^3): values at p = 0, 1/2, 1 computed by hand from the coefficients,
    and the row starts the authors' README lists (row 0: 1.0, row 23: 0.39409)."""
    one, a, b, c = FASTV_INVERSE_CUBIC

    curve = PriorConfig.from_mapping({"name": "pore_fastv_curve", "position": "index"})
    p = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    expected = [1.0, 1 / (one + a / 2 + b / 4 + c / 8), 1 / (one + a + b + c)]
    assert PRIORS.get("pore_fastv_curve")(p).tolist() == pytest.approx(expected, abs=1e-15)
    side = torch.full((3,), SIDE)
    row_starts = curve.weights(torch.tensor([0, 5, 23]), torch.zeros(3, dtype=torch.long), side, side)
    assert row_starts.tolist() == pytest.approx([1.0, 0.83611, 0.39409], abs=1e-5)


@pytest.mark.parametrize("preset", sorted(FILES))
def test_an_uncalibrated_benchmark_is_refused_with_the_calibrated_ones(preset: str) -> None:
    with pytest.raises(ValueError) as refused:
        pore.build_strategy(preset).resolve(data=UNCALIBRATED)
    message = str(refused.value)
    assert "\n" not in message
    assert f"no sigma for data.name='{UNCALIBRATED}'" in message
    assert "calibrated on: gqa, mmbench, mme, pope, pope_adversarial" in message
    assert "set strategy.prior.sigma=<value>" in message
    # A sigma given by the user holds for every benchmark: the embedded one runs.
    chosen = pore.build_strategy(preset, prior={"sigma": 1.5}).resolve(data=UNCALIBRATED)
    assert chosen.prior.hyperparameters() == {"sigma": 1.5}
    # A prior that takes no sigma has nothing calibrated to refuse.
    linear = pore.build_strategy(preset, prior={"name": "linear"}).resolve(data=UNCALIBRATED)
    assert linear.prior.hyperparameters() == {"alpha": 0.6}


def test_the_run_refuses_an_uncalibrated_benchmark_before_the_weights_load(tmp_path: Path) -> None:
    """`python src/run.py strategy=pore_authors_pdrop ...` on the embedded benchmark: one line, exit 2."""
    argv = ["protocol=llava", "strategy=pore_authors_pdrop", "strategy.layer=[1,2,3]", "data.limit=2"]
    result = run_program(*argv, "logger=none", f"output_dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no sigma for data.name='spatial'" in last
    assert "Traceback" not in result.stderr and "Loading weights" not in result.stdout + result.stderr
