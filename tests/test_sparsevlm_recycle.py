"""SparseVLM's recycling under a prior: the official code (with the PoRe authors' patch) ranks the dropped
tokens to recycle by the raters' score as it is, not by the reweighted score that picked the kept ones.

The by-hand reference divides the ranked (weighted) scores of the record by the prior's weights written out
here, exp(-sigma i / (N - 1)), to get the raters' scores back, picks the top int(0.3 * dropped) + 1 dropped
tokens by them, clusters them with the loop DPC-KNN reference and runs the pruned sequence layer by layer.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENS_PER_IMAGE, pixels
from families import llava_model
from pore import Pruner, build_strategy
from pore.methods import METHODS
from test_methods import (
    PROMPTS,
    image_positions,
    kept_positions,
    reference_density_peaks,
    single,
    staged_reference_logits,
)

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

SIGMA = 4.0  # a steep prior, so that the two rankings of the dropped tokens differ
KEEP = 20


def strategy(recycle_score: str | None):
    options = {"recycle": "cluster"} | ({"recycle_score": recycle_score} if recycle_score else {})
    prior = {"name": "exponential", "sigma": SIGMA, "position": "index"}
    return build_strategy("sparsevlm", layer=1, keep=KEEP, options=options, prior=prior)


def recycled_by_hand(scores: torch.Tensor, top: list[int]) -> list[int]:
    """The 5 dropped raster ids (16 dropped: int(0.3 * 16) + 1) of highest `scores` (N,), ties by id."""
    dropped = [r for r in range(TOKENS_PER_IMAGE) if r not in top]
    return sorted(dropped, key=lambda r: (-float(scores[r]), r))[:5]


@pytest.mark.parametrize("recycle_score", [None, "rater", "weighted"])
def test_cluster_recycling_ranks_the_dropped_tokens_by_the_chosen_score(recycle_score: str | None) -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[1]), pixels(1, seed=8)
    with torch.no_grad(), Pruner(model, strategy(recycle_score)) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    with (
        torch.no_grad(),
        Pruner(model, strategy(recycle_score).replace(options={"recycle": "none"})) as plain,
    ):
        model(input_ids=input_ids, pixel_values=pixel_values)
    top = plain.last_record.kept_raster[0][0]
    weighted = plain.last_record.stage_scores[0][0].double()  # (N,) rater score x prior
    index = torch.arange(TOKENS_PER_IMAGE, dtype=torch.float64)
    raters = weighted / torch.exp(-SIGMA * index / (TOKENS_PER_IMAGE - 1))  # (N,) the raters' own scores
    by_rater, by_weight = recycled_by_hand(raters, top), recycled_by_hand(weighted, top)
    assert by_rater != by_weight  # the case tells the two rules apart
    recycled = by_weight if recycle_score == "weighted" else by_rater  # default: the official rule
    images = image_positions(input_ids)
    with torch.no_grad():
        layer_input = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    states = layer_input.hidden_states[1][0, [images[r] for r in recycled]]
    centre = recycled[reference_density_peaks(states, 1)[0][0]]
    assert pruner.last_record.kept_raster == [[sorted([*top, centre])]]

    def carry_mean(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[0, images[centre]] = hidden[0, [images[r] for r in recycled]].mean(dim=0)
        return hidden

    kept = kept_positions(input_ids, sorted([*top, centre]))
    reference = staged_reference_logits(model, input_ids, pixel_values, [(1, kept, carry_mean)], compact=True)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_an_unknown_recycle_score_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"unknown options.recycle_score 'raw'; valid values: rater, weighted"
    ):
        METHODS.get("sparsevlm")(recycle_score="raw")
