"""The pruning engine inside a real (tiny, random) transformers LLaVA, against independent references.

What every family must satisfy (keeping everything, the kept set, the pruned forward, padded batches, cached
generation, every method x prior) is tests/test_contract.py; here is what is LLaVA-1.5's own or the engine's
beyond it: compact positions, the cache per layer, the record, budgets, padding suppression.
"""

from __future__ import annotations

import pytest
import torch

from conftest import GRID, TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels
from families import llava_model
from pore import Pruner, build_strategy
from reference import kept_positions_from_raster, reference_compact_logits, reference_pruned_logits

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PROMPTS = [
    make_prompt([1, 5, 6], 1, [7, 8, 9, 10]),
    make_prompt([1, 11], 1, [12, 13, 14, 15, 16, 17]),
    make_prompt([1], 1, [18, 19]),
]


def single(prompt: list[int]) -> torch.Tensor:
    return torch.tensor([prompt])


def test_prior_moves_the_choice_towards_the_top_rows() -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    mean_rows = {}
    for alpha in (0.0, 0.95):
        with (
            torch.no_grad(),
            Pruner(model, build_strategy("pore_linear", keep=9, prior={"alpha": alpha})) as pruner,
        ):
            model(input_ids=input_ids, pixel_values=pixel_values)
        rows = [r // GRID for r in pruner.last_record.kept_raster[0][0]]
        mean_rows[alpha] = sum(rows) / len(rows)
    assert mean_rows[0.95] < mean_rows[0.0]


def test_record_reports_tokens_per_layer() -> None:
    model = build_tiny_llava(layers=5)
    input_ids, mask = left_pad(PROMPTS)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=4, layer=3)) as pruner:
        model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels(3))
    record = pruner.last_record
    assert record.visual_tokens.tolist() == [[36] * 3] * 3 + [[4] * 3] * 2
    lengths = [len(p) for p in PROMPTS]
    assert record.sequence_lengths.tolist() == [lengths] * 3 + [[n - 32 for n in lengths]] * 2
    assert record.visual_tokens_before.tolist() == [36] * 3 and record.visual_tokens_after.tolist() == [4] * 3
    assert all(len(images[0]) == 4 for images in record.kept_raster)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compact_positions_equal_a_model_run_on_the_kept_tokens_alone(attn: str) -> None:
    """positions=compact: the pruned forward == a by-hand run whose layers from K on see only the kept tokens
    at positions 0..L'-1, and cached decoding == recomputing that without cache, new tokens at L', L'+1..."""
    model = llava_model(attn)
    new_tokens = 6
    for b, prompt in enumerate(PROMPTS):
        input_ids, pixel_values = single(prompt), pixels(1, seed=b)
        strategy = build_strategy("fastv", keep=5, layer=2, positions="compact")
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
            cached = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
            )[0, len(prompt) :].tolist()
        prompt_kept = kept_positions_from_raster(input_ids, pruner.last_record.kept_raster[0])
        expected = reference_compact_logits(model, input_ids, pixel_values, 2, prompt_kept)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        # Original positions give other logits: the test can tell the two apart.
        original = reference_pruned_logits(model, input_ids, pixel_values, 2, prompt_kept)
        assert not torch.allclose(original, expected, atol=1e-4)
        sequence, recomputed = input_ids, []
        for _ in range(new_tokens):
            kept = torch.cat([prompt_kept, torch.arange(len(prompt), sequence.shape[1])])
            step = reference_compact_logits(model, sequence, pixel_values, 2, kept)
            recomputed.append(int(step[0, -1].argmax()))
            sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
        assert cached == recomputed


def test_cache_holds_full_layers_below_k_and_pruned_layers_from_k() -> None:
    model = llava_model()
    prompt = PROMPTS[0]
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)):
        out = model.generate(
            input_ids=single(prompt),
            pixel_values=pixels(1),
            max_new_tokens=4,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cache = out.past_key_values
    total = len(prompt) + 3  # the last generated token is never fed back
    pruned = total - (TOKENS_PER_IMAGE - 3)
    assert [cache.get_seq_length(i) for i in range(4)] == [total, total, pruned, pruned]


def test_random_keep_is_seeded() -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    kept = {}
    for seed in (0, 0, 1):
        with torch.no_grad(), Pruner(model, build_strategy("random", keep=9, seed=seed)) as pruner:
            model(input_ids=input_ids, pixel_values=pixel_values)
        kept.setdefault(seed, []).append(pruner.last_record.kept_raster)
    assert kept[0][0] == kept[0][1]
    assert kept[0][0] != kept[1][0]


def test_ratio_budget() -> None:
    model = llava_model()
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=None, ratio=0.25)) as pruner:
        model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
    assert len(pruner.last_record.kept_raster[0][0]) == 9


def test_padding_suppression_never_keeps_border_tokens() -> None:
    model = llava_model()
    strategy = build_strategy("fastv", keep=12, prior={"suppress_padding": True})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        # A 300 x 100 (w x h) image: padded to 300 x 300, only the middle two of six grid rows hold content.
        pruner.set_image_sizes([[(100, 300)]])
        model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
        kept = pruner.last_record.kept_raster[0][0]
        assert sorted(kept) == list(range(2 * GRID, 4 * GRID))
        with pytest.raises(ValueError, match="original \\(height, width\\)"):
            model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
