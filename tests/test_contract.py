"""The engine's contract, written once and run over every model family of tests/families.py.

For each family's tiny random model (real transformers classes), against its independent references:

- keeping every token gives the untouched model's logits, and detaching restores it exactly;
- the kept set equals the top-k of layer K-1's eager attention (last prompt token, mean over heads) times
  the prior, written out by hand;
- a pruned forward equals the by-hand forward with the dropped tokens removed from layer K on;
- a left-padded batch (different prompt lengths, numbers of images, image sizes) keeps the same tokens,
  generates the same answer and gives the same logits as each sample alone;
- cached generation is deterministic and equals a greedy loop that recomputes the pruned sequence by hand;
- every method, with every prior, keeps everything as the untouched model and prunes a padded batch as each
  sample alone.

Family-specific layouts (tiles, M-RoPE grids, newlines) are tested in the adapter test files.
"""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, PRIOR_CASES, Family, positions_from_mask
from pore import ADAPTERS, Pruner, Strategy, build_strategy

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

ATTENTION = ["sdpa", "eager"]
NEW_TOKENS = 6


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def forward_inputs(family: Family, inputs: dict) -> dict:
    """A padded batch for a plain forward: with the positions generate() would compute, where needed."""
    if family.forward_positions and "attention_mask" in inputs:
        return {**inputs, "position_ids": positions_from_mask(inputs["attention_mask"])}
    return inputs


def set_sizes(family: Family, pruner: Pruner, b: int | None, vision: bool = False) -> None:
    """Hand the image sizes to the pruner where generate() would not (the pipeline does it every batch)."""
    sizes = family.sizes if vision else family.generate_sizes
    if sizes is not None:
        pruner.set_image_sizes(sizes(b))


def test_every_registered_family_is_in_the_table() -> None:
    covered = {family.adapter or family.name for family in FAMILIES.values()}
    assert set(ADAPTERS.names()) <= covered


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("prior", sorted(PRIOR_CASES))
@pytest.mark.parametrize("layer", [1, 2])
def test_kept_tokens_equal_the_eager_attention_reference(
    family: Family, attn: str, prior: str, layer: int
) -> None:
    model, eager = family.model(attn), family.model("eager")
    case = PRIOR_CASES[prior]
    strategy = build_strategy(case.strategy, keep=family.keep, layer=layer, prior=case.settings)
    for b in range(len(family.images)):
        expected = family.reference_kept(eager, b, layer, family.keep, case.weight)
        with torch.no_grad(), Pruner(model, strategy, family.adapter) as pruner:
            model(**family.sample(b))
        assert pruner.last_record.kept_raster == [expected]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("strategy", ["fastv", "pore_exponential", "random"])
def test_pruned_forward_equals_removing_tokens_by_hand(family: Family, attn: str, strategy: str) -> None:
    model, keep = family.model(attn), family.keep
    for b in range(len(family.images)):
        inputs = family.sample(b)
        with (
            torch.no_grad(),
            Pruner(model, build_strategy(strategy, keep=keep, layer=2), family.adapter) as p,
        ):
            pruned = model(**inputs).logits
        record = p.last_record
        fixed = record.layout.valid[0] & ~record.layout.prunable[0]
        assert bool(record.kept[0][fixed].all())  # never-prunable tokens (newlines) are never dropped
        images = family.images[b]
        assert record.visual_tokens_after.tolist() == [keep * images + family.fixed(b)]
        kept = family.kept_positions(b, inputs, record.kept_raster[0])
        length = inputs["input_ids"].shape[1]
        assert pruned.shape[1] == len(kept) == length - sum(family.prunable(b)) + keep * images
        expected = family.reference_logits(model, inputs, 2, kept)
        torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


# (strategy, positions, attention implementation)
PADDED = [("pore_linear", "official", attn) for attn in ATTENTION]
PADDED += [("pore_exponential", "official", "sdpa"), ("random", "official", "sdpa")]
PADDED += [("fastv", "compact", attn) for attn in ATTENTION]


@pytest.mark.parametrize(("strategy", "positions", "attn"), PADDED)
def test_padded_batch_equals_single_samples(family: Family, strategy: str, positions: str, attn: str) -> None:
    if positions == "compact" and not family.compact:
        pytest.skip(
            "3-D M-RoPE positions are not compacted (tests/test_adapter_qwen2_vl.py checks the refusal)"
        )
    model = family.model(attn)
    inputs = family.batch()
    length = inputs["input_ids"].shape[1]
    ratio = 0.2
    settings = build_strategy(strategy, keep=None, ratio=ratio, positions=positions)
    with torch.no_grad(), Pruner(model, settings, family.adapter) as pruner:
        set_sizes(family, pruner, None)
        batch_out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, length:]
        batch_kept = pruner.last_record.kept_raster
        batch_logits = model(**forward_inputs(family, inputs)).logits
        assert pruner.last_record.kept_raster == batch_kept
        # Each image keeps `ratio` of its own prunable tokens.
        assert [[len(kept) for kept in images] for images in batch_kept] == [
            [max(1, round(ratio * n)) for n in family.prunable(b)] for b in range(len(family.images))
        ]
        for b in range(len(family.images)):
            alone_inputs = family.sample(b)
            alone_length = alone_inputs["input_ids"].shape[1]
            set_sizes(family, pruner, b)
            alone = model.generate(**alone_inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[
                0, alone_length:
            ]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            assert family.answer(alone) == family.answer(batch_out[b])
            alone_logits = model(**alone_inputs).logits
            # The pruned batch is left-filled per sample: compare each sample's last positions.
            torch.testing.assert_close(
                batch_logits[b, -alone_logits.shape[1] :], alone_logits[0], atol=family.batch_atol, rtol=0
            )


@pytest.mark.parametrize(("strategy", "attn"), [("pore_linear", "sdpa"), ("pore_exponential", "eager")])
def test_cached_generation_equals_recomputing_without_cache(family: Family, strategy: str, attn: str) -> None:
    """generate() with the KV cache == a greedy loop that recomputes the pruned sequence from scratch at
    every step, by hand."""
    model = family.model(attn)
    for b in (0, 1):
        inputs = family.sample(b)
        length = inputs["input_ids"].shape[1]
        with (
            torch.no_grad(),
            Pruner(model, build_strategy(strategy, keep=family.keep, layer=2), family.adapter) as p,
        ):
            set_sizes(family, p, b)
            cached = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, length:].tolist()
            set_sizes(family, p, b)
            again = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, length:].tolist()
        assert cached == again  # deterministic
        prompt_kept = family.kept_positions(b, inputs, p.last_record.kept_raster[0])
        sequence, recomputed = inputs, []
        for _ in range(NEW_TOKENS):
            total = sequence["input_ids"].shape[1]
            kept = torch.cat([prompt_kept, torch.arange(length, total)])
            token = int(family.reference_logits(model, sequence, 2, kept)[0, -1].argmax())
            recomputed.append(token)
            sequence = family.grow(sequence, token)
        assert cached == family.answer(recomputed)


# ------------------------------------------------------------------------------- every method x every prior

PRIORS = {
    "none": None,  # the preset's own
    "linear": {"name": "linear", "alpha": 0.9},
    "exponential": {"name": "exponential", "sigma": 2.0},
    "exponential_index": {"name": "exponential", "sigma": 1.5, "position": "index"},
}
# name -> (preset, layer(s), options, whether each image keeps exactly its budget, the prior it keeps
# everything with); two stages keep 4 / 2 of each image, one stage keeps 3.
METHOD_CASES: dict[str, tuple[str, int | list[int], dict, bool, str]] = {
    "fastv": ("fastv", 2, {}, True, "none"),
    "pore_linear": ("pore_linear", 2, {}, True, "none"),
    "pore_exponential": ("pore_exponential", 2, {}, True, "none"),
    "pdrop": ("pdrop", [1, 3], {}, True, "linear"),
    "sparsevlm": ("sparsevlm", 2, {}, True, "exponential"),
    "sparsevlm_merge": ("sparsevlm", 2, {"merge": True}, True, "exponential_index"),
    "sparsevlm_cluster": ("sparsevlm", [1, 3], {"recycle": "cluster"}, False, "linear"),  # centres on top
    "pool": ("pool", 2, {}, True, "exponential"),
    "pool_average": ("pool", 2, {"mode": "average"}, True, "none"),
    "fastervlm": ("fastervlm", 2, {}, True, "linear"),
    "random": ("random", 2, {}, True, "exponential_index"),
    # [CLS]-attention methods take no position weights (prior_use = "suppression"): the preset's own prior
    "visionzip": ("visionzip", 0, {"contextual": 1}, True, "none"),
    "vispruner": ("vispruner", 0, {}, True, "none"),
    "prumerge": ("prumerge_plus", 0, {}, False, "none"),  # the adaptive (data-dependent) count
    "prumerge_fixed": ("prumerge_plus", 0, {"adaptive": False, "merge": False}, True, "none"),
    "himap": ("himap", [1, 3], {}, True, "linear"),
    "tokencarve": ("tokencarve", 2, {}, True, "exponential"),
    "divprune": ("divprune", 0, {}, True, "none"),  # takes no prior (similarity / diversity)
    "dart": ("dart", 2, {"budget": "exact", "image_pivots": 1, "text_pivots": 1}, True, "none"),
}
# Presets that read the vision tower (LLaVA-NeXT's pruner needs the image sizes; no [CLS]: skipped).
VISION_PRESETS = ("fastervlm", "visionzip", "vispruner", "prumerge_plus")
# Keeping everything: every method with SDPA, those that read attention (and random) with eager attention too
# (with every token kept, a prior changes nothing: pore_linear / pore_exponential run as FastV does).
# (PruMerge's adaptive count never keeps everything: its fixed-budget case without the merge does.)
KEEP_ALL = [(method, "sdpa") for method in METHOD_CASES if method != "prumerge"]
KEEP_ALL += [(method, "eager") for method in ("fastv", "pdrop", "sparsevlm", "random", "himap", "tokencarve")]
# Pruning: the other attention-scored methods meet every prior (FastV does in the tests above); the others
# (their own scores, or a prior that cannot change the choice) one.
METHOD_PRIORS = [
    (method, prior) for method in ("pdrop", "sparsevlm", "himap", "tokencarve") for prior in list(PRIORS)[1:]
]
METHOD_PRIORS += [
    (method, "linear")
    for method in ("sparsevlm_merge", "sparsevlm_cluster", "pool", "pool_average", "fastervlm", "random")
]
METHOD_PRIORS += [(method, "none") for method in ("visionzip", "vispruner", "prumerge", "prumerge_fixed")]
METHOD_PRIORS += [(method, "none") for method in ("divprune", "dart")]  # no prior: the method's own choice


def staged(value: float | int, layer: int | list[int]) -> float | int | list:
    """One budget per pruning stage: 4 / 2 tokens for two stages, 3 for one (or the same ratio)."""
    if not isinstance(layer, list):
        return value
    return [value] * len(layer) if isinstance(value, float) else [value + 1, value - 1]


def method_strategy(family: Family, method: str, prior: str, everything: bool) -> tuple[Strategy, bool]:
    """A METHOD_CASES entry with `prior` that keeps everything or 3 per image (4 / 2 in two stages), and
    whether the pruner needs the image sizes (vision requests on LLaVA-NeXT)."""
    preset, layer, options, _, _ = METHOD_CASES[method]
    if method in family.skip:
        pytest.skip(family.skip[method])
    if preset in VISION_PRESETS and not family.vision_cls:
        pytest.skip("no vision [CLS] token (tests/test_adapter_qwen2_vl.py checks the refusal)")
    settings = {"layer": layer, "options": options}
    if PRIORS[prior] is not None:
        settings["prior"] = PRIORS[prior]
    if everything:
        settings.update(keep=None, ratio=staged(1.0, layer))
    else:
        settings.update(keep=staged(3, layer), ratio=staged(0.5, layer))
    return build_strategy(preset, **settings), preset in VISION_PRESETS


@pytest.mark.parametrize(("method", "attn"), KEEP_ALL)
def test_keeping_everything_equals_the_untouched_model(family: Family, method: str, attn: str) -> None:
    strategy, vision = method_strategy(family, method, METHOD_CASES[method][4], everything=True)
    model = family.model(attn)
    inputs = forward_inputs(family, family.batch())
    vision_attention = model.config.vision_config._attn_implementation
    with torch.no_grad():
        untouched = model(**inputs).logits
        with Pruner(model, strategy, family.adapter) as pruner:
            set_sizes(family, pruner, None, vision)
            pruned = model(**inputs).logits
    real = inputs["attention_mask"].bool()
    assert pruned.shape == untouched.shape
    torch.testing.assert_close(pruned[real], untouched[real], atol=1e-5, rtol=0)
    expected = [[list(range(n)) for n in family.prunable(b)] for b in range(len(family.images))]
    assert pruner.last_record.kept_raster == expected
    # Detaching restores the model exactly.
    assert model.config.text_config._attn_implementation == attn
    assert model.config.vision_config._attn_implementation == vision_attention
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, untouched, atol=0, rtol=0)


@pytest.mark.parametrize(("method", "prior"), METHOD_PRIORS)
def test_every_method_prunes_a_padded_batch_as_each_sample_alone(
    family: Family, method: str, prior: str
) -> None:
    """Kept tokens and cached greedy answers of each sample, in the padded batch and alone."""
    strategy, vision = method_strategy(family, method, prior, everything=False)
    layer, exact = METHOD_CASES[method][1], METHOD_CASES[method][3]
    model = family.model("sdpa")
    inputs = family.batch()
    length = inputs["input_ids"].shape[1]
    with torch.no_grad(), Pruner(model, strategy, family.adapter) as pruner:
        set_sizes(family, pruner, None, vision)
        batch_out = model.generate(**inputs, max_new_tokens=5, do_sample=False)[:, length:]
        batch_kept = pruner.last_record.kept_raster
        if exact:
            final = 2 if isinstance(layer, list) else 3
            assert [[len(kept) for kept in images] for images in batch_kept] == [
                [final] * images for images in family.images
            ]
        for b in range(len(family.images)):
            alone_inputs = family.sample(b)
            set_sizes(family, pruner, b, vision)
            alone = model.generate(**alone_inputs, max_new_tokens=5, do_sample=False)
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            answer = alone[0, alone_inputs["input_ids"].shape[1] :]
            assert family.answer(answer) == family.answer(batch_out[b])
