"""The pruning engine inside a real (tiny, random) transformers LLaVA, against independent references."""

from __future__ import annotations

import pytest
import torch

from conftest import (
    GRID,
    TOKENS_PER_IMAGE,
    build_tiny_llava,
    left_pad,
    make_prompt,
    pixels,
    positions_from_mask,
)
from pore import Pruner, build_strategy
from reference import (
    kept_positions_from_raster,
    linear_row_weights,
    reference_compact_logits,
    reference_kept_raster,
    reference_pruned_logits,
)

PROMPTS = [
    make_prompt([1, 5, 6], 1, [7, 8, 9, 10]),
    make_prompt([1, 11], 1, [12, 13, 14, 15, 16, 17]),
    make_prompt([1], 1, [18, 19]),
]


def single(prompt: list[int]) -> torch.Tensor:
    return torch.tensor([prompt])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", ["fastv", "pore_linear", "random"])
def test_keeping_everything_equals_the_untouched_model(attn: str, strategy: str) -> None:
    model = build_tiny_llava(attn)
    input_ids, mask = left_pad(PROMPTS)
    inputs = dict(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions_from_mask(mask),
        pixel_values=pixels(3),
    )
    with torch.no_grad():
        untouched = model(**inputs).logits
        with Pruner(model, build_strategy(strategy, keep=TOKENS_PER_IMAGE)) as pruner:
            pruned = model(**inputs).logits
    real = mask.bool()
    assert pruned.shape == untouched.shape
    torch.testing.assert_close(pruned[real], untouched[real], atol=1e-5, rtol=0)
    assert pruner.last_record.kept_raster == [[list(range(TOKENS_PER_IMAGE))]] * 3
    # Detaching restores the model exactly.
    assert model.config.text_config._attn_implementation == attn
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, untouched, atol=0, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("strategy", "alpha"), [("fastv", 0.0), ("pore_linear", 0.6), ("pore_linear", 0.95)])
@pytest.mark.parametrize("layer", [1, 2])
def test_kept_tokens_equal_the_eager_attention_reference(
    attn: str, strategy: str, alpha: float, layer: int
) -> None:
    model = build_tiny_llava(attn)
    eager = build_tiny_llava("eager")
    keep = 9
    for b, prompt in enumerate(PROMPTS):
        input_ids, pixel_values = single(prompt), pixels(1, seed=b)
        expected = reference_kept_raster(
            eager, input_ids, pixel_values, layer, keep, linear_row_weights(alpha)
        )
        settings = {"keep": keep, "layer": layer}
        if strategy == "pore_linear":
            settings["prior"] = {"alpha": alpha}
        with torch.no_grad(), Pruner(model, build_strategy(strategy, **settings)) as pruner:
            model(input_ids=input_ids, pixel_values=pixel_values)
        assert pruner.last_record.kept_raster == [expected]


def test_prior_moves_the_choice_towards_the_top_rows() -> None:
    model = build_tiny_llava()
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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", ["fastv", "pore_exponential", "random"])
def test_pruned_forward_equals_removing_tokens_by_hand(attn: str, strategy: str) -> None:
    model = build_tiny_llava(attn)
    for b, prompt in enumerate(PROMPTS):
        input_ids, pixel_values = single(prompt), pixels(1, seed=b)
        with torch.no_grad(), Pruner(model, build_strategy(strategy, keep=5, layer=2)) as pruner:
            pruned = model(input_ids=input_ids, pixel_values=pixel_values).logits
        kept = kept_positions_from_raster(input_ids, pruner.last_record.kept_raster[0])
        assert pruned.shape[1] == len(prompt) - TOKENS_PER_IMAGE + 5 == len(kept)
        expected = reference_pruned_logits(model, input_ids, pixel_values, 2, kept)
        torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


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
@pytest.mark.parametrize(
    ("strategy", "positions"), [("pore_linear", "official"), ("random", "official"), ("fastv", "compact")]
)
def test_padded_batch_equals_single_samples(attn: str, strategy: str, positions: str) -> None:
    model = build_tiny_llava(attn)
    input_ids, mask = left_pad(PROMPTS)
    pixel_values = torch.cat([pixels(1, seed=b) for b in range(len(PROMPTS))])
    settings = build_strategy(strategy, keep=7, positions=positions)
    with torch.no_grad(), Pruner(model, settings) as pruner:
        batch_out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            pixel_values=pixel_values,
            max_new_tokens=6,
            do_sample=False,
        )[:, input_ids.shape[1] :]
        batch_kept = pruner.last_record.kept_raster
        for b, prompt in enumerate(PROMPTS):
            alone = model.generate(
                input_ids=single(prompt), pixel_values=pixels(1, seed=b), max_new_tokens=6, do_sample=False
            )[:, len(prompt) :]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            assert alone[0].tolist() == batch_out[b].tolist()


def test_samples_with_different_numbers_of_images_share_a_batch() -> None:
    model = build_tiny_llava()
    prompts = [make_prompt([1, 5], 2, [7, 8, 9]), make_prompt([1, 6, 6, 6], 1, [7, 8])]
    images = [pixels(2, seed=10), pixels(1, seed=11)]
    input_ids, mask = left_pad(prompts)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=6)) as pruner:
        batch_logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            pixel_values=torch.cat(images),
        ).logits
        batch_kept = pruner.last_record.kept_raster
        assert [len(k) for k in batch_kept] == [2, 1]
        for b, prompt in enumerate(prompts):
            alone = model(input_ids=single(prompt), pixel_values=images[b]).logits
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            # The sample with fewer images is left-filled: compare its last positions.
            torch.testing.assert_close(batch_logits[b, -alone.shape[1] :], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_generation_equals_recomputing_without_cache(attn: str) -> None:
    model = build_tiny_llava(attn)
    new_tokens = 8
    for b, prompt in enumerate(PROMPTS):
        input_ids, pixel_values = single(prompt), pixels(1, seed=b)
        with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=6, layer=2)) as pruner:
            cached = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
            )[0, len(prompt) :].tolist()
            again = model.generate(
                input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
            )[0, len(prompt) :].tolist()
        assert cached == again  # deterministic
        prompt_kept = kept_positions_from_raster(input_ids, pruner.last_record.kept_raster[0])
        # Greedy decoding by hand: every step recomputes the whole sequence, pruned by hand, without cache.
        sequence, recomputed = input_ids, []
        for _ in range(new_tokens):
            kept = torch.cat([prompt_kept, torch.arange(len(prompt), sequence.shape[1])])
            logits = reference_pruned_logits(model, sequence, pixel_values, 2, kept)
            token = int(logits[0, -1].argmax())
            recomputed.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        assert cached == recomputed


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_compact_positions_equal_a_model_run_on_the_kept_tokens_alone(attn: str) -> None:
    """positions=compact: the pruned forward == a by-hand run whose layers from K on see only the kept tokens
    at positions 0..L'-1, and cached decoding == recomputing that without cache, new tokens at L', L'+1..."""
    model = build_tiny_llava(attn)
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
    model = build_tiny_llava(layers=4)
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
    model = build_tiny_llava()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    kept = {}
    for seed in (0, 0, 1):
        with torch.no_grad(), Pruner(model, build_strategy("random", keep=9, seed=seed)) as pruner:
            model(input_ids=input_ids, pixel_values=pixel_values)
        kept.setdefault(seed, []).append(pruner.last_record.kept_raster)
    assert kept[0][0] == kept[0][1]
    assert kept[0][0] != kept[1][0]


def test_ratio_budget() -> None:
    model = build_tiny_llava()
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=None, ratio=0.25)) as pruner:
        model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
    assert len(pruner.last_record.kept_raster[0][0]) == 9


def test_padding_suppression_never_keeps_border_tokens() -> None:
    model = build_tiny_llava()
    strategy = build_strategy("fastv", keep=12, prior={"suppress_padding": True})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        # A 300 x 100 (w x h) image: padded to 300 x 300, only the middle two of six grid rows hold content.
        pruner.set_image_sizes([[(100, 300)]])
        model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
        kept = pruner.last_record.kept_raster[0][0]
        assert sorted(kept) == list(range(2 * GRID, 4 * GRID))
        with pytest.raises(ValueError, match="original \\(height, width\\)"):
            model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
