"""The pruning methods beyond FastV, each against a hand-checkable case or an independent reference.

PyramidDrop (several stages), SparseVLM-style raters (and token recycling), FasterVLM ([CLS] attention) and
spatial pooling, in the real tiny LLaVA; references use eager attention weights and plain indexing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from transformers.masking_utils import create_causal_mask

from conftest import GRID, IMAGE_TOKEN, TOKENS_PER_IMAGE, build_tiny_llava, left_pad, make_prompt, pixels
from families import llava_model
from pore import Pruner, build_strategy
from pore.adapters import ModelFacts, VisualLayout
from pore.methods import METHODS, ScoringInputs
from pore.methods.pool import window_grid, window_of_cells
from pore.methods.sparsevlm import density_peak_clusters
from reference import merged_embeddings, reference_kept_raster

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

PROMPTS = [
    make_prompt([1, 5, 6], 1, [7, 8, 9, 10]),
    make_prompt([1, 11], 1, [12, 13, 14, 15, 16, 17]),
]

Transform = Callable[[torch.Tensor], torch.Tensor]


def single(prompt: list[int]) -> torch.Tensor:
    return torch.tensor([prompt])


def image_positions(input_ids: torch.Tensor) -> list[int]:
    return (input_ids[0] == IMAGE_TOKEN).nonzero().flatten().tolist()


def kept_positions(input_ids: torch.Tensor, raster: list[int]) -> list[int]:
    """Prompt positions that survive when one image keeps the grid tokens `raster`."""
    images = image_positions(input_ids)
    dropped = set(images) - {images[r] for r in raster}
    return [i for i in range(input_ids.shape[1]) if i not in dropped]


def staged_reference_logits(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    stages: list[tuple[int, list[int], Transform | None]],
    compact: bool = False,
) -> torch.Tensor:
    """Logits of one unpadded sample run layer by layer; before each stage's layer only the prompt
    positions it lists stay, after an optional transform of the hidden states. They keep their RoPE
    positions, or with `compact` are renumbered 0..L'-1 (cos / sin recomputed for the new positions)."""
    language_model = model.model.language_model
    with torch.no_grad():
        hidden = merged_embeddings(model, input_ids, pixel_values)
        positions = torch.arange(input_ids.shape[1])
        cos, sin = language_model.rotary_emb(hidden, positions[None])
        mask = create_causal_mask(language_model.config, hidden, None, None, positions[None])
        by_layer = {layer: (kept, transform) for layer, kept, transform in stages}
        for index, decoder_layer in enumerate(language_model.layers):
            if index in by_layer:
                kept, transform = by_layer[index]
                if transform is not None:
                    hidden = transform(hidden)
                select = torch.tensor([i for i, p in enumerate(positions.tolist()) if p in set(kept)])
                hidden, cos, sin, positions = (
                    hidden[:, select],
                    cos[:, select],
                    sin[:, select],
                    positions[select],
                )
                if compact:
                    cos, sin = language_model.rotary_emb(hidden, torch.arange(len(select))[None])
                mask = create_causal_mask(language_model.config, hidden, None, None, None)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None]
            )
        return model.lm_head(language_model.norm(hidden))


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ties to the earlier index, sorted."""
    ranking = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(ranking[:k])


# ---------------------------------------------------------------------------------------- PyramidDrop


def test_pdrop_stages_follow_the_attention_of_the_shortened_sequence() -> None:
    """Stage 1 = FastV at layer 1; stage 2 ranks the survivors by layer 2's attention over the shortened
    sequence, read from an eager forward of the model pruned by stage 1 alone."""
    model = llava_model("eager")
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    strategy = build_strategy(
        "pdrop",
        layer=[1, 3],
        ratio=[0.5, 0.25],
        positions="original",
        options={"score_from": "previous_layer"},
    )
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    record = pruner.last_record
    stage_raster = [
        sorted(((kept & record.layout.valid)[0].nonzero().flatten()).tolist()) for kept in record.stage_kept
    ]
    first = reference_kept_raster(model, input_ids, pixel_values, 1, 18, torch.ones(TOKENS_PER_IMAGE))[0]
    assert stage_raster[0] == first and len(stage_raster[1]) == 9

    with torch.no_grad(), Pruner(model, build_strategy("fastv", layer=1, keep=18)):
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    last_row = out.attentions[2][0, :, -1, :].mean(dim=0).double()  # over the stage-1 sequence
    survivors = kept_positions(input_ids, first)
    images = image_positions(input_ids)
    slot_of_raster = {r: survivors.index(images[r]) for r in first}
    chosen = top_k(torch.stack([last_row[slot_of_raster[r]] for r in first]), 9)
    assert stage_raster[1] == [first[i] for i in chosen]
    assert record.kept_raster == [[stage_raster[1]]]
    assert record.stage_layers == [1, 3]
    assert record.visual_tokens[:, 0].tolist() == [36, 18, 18, 9]

    reference = staged_reference_logits(
        model,
        input_ids,
        pixel_values,
        [(1, kept_positions(input_ids, first), None), (3, kept_positions(input_ids, stage_raster[1]), None)],
    )
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def own_layer_last_token_attention(model, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """(L,) the official PyramidDrop score, by hand: layer `layer`'s input norm and q / k projections on its
    input `hidden` (1, L, D), RoPE at positions 0..L-1 (rotate-half written out), the last query's softmax
    attention over all keys (it sees them all under the causal mask), mean over heads."""
    language_model = model.model.language_model
    decoder_layer = language_model.layers[layer]
    attention = decoder_layer.self_attn
    config = language_model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    length = hidden.shape[1]
    normed = decoder_layer.input_layernorm(hidden)
    query = attention.q_proj(normed).view(length, heads, head_dim).transpose(0, 1)  # (H, L, d)
    key = attention.k_proj(normed).view(length, kv_heads, head_dim).transpose(0, 1)  # (H_kv, L, d)
    key = key.repeat_interleave(heads // kv_heads, dim=0)  # (H, L, d)
    cos, sin = language_model.rotary_emb(hidden, torch.arange(length)[None])
    cos, sin = cos[0], sin[0]  # (L, d)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    query, key = rotate(query), rotate(key)
    logits = (query[:, -1:] @ key.transpose(1, 2)).double() / head_dim**0.5  # (H, 1, L)
    return logits.softmax(dim=-1)[:, 0].mean(dim=0)  # (L,)


def test_pdrop_scores_each_stage_with_its_own_layer_norm_and_projections() -> None:
    """Official PyramidDrop: stage 1 (before layer 1) ranks the image by layer 1's own q / k of layer 1's
    input; stage 2 (before layer 3) by layer 3's q / k of its input, the sequence stage 1 left, renumbered
    0..L'-1. The pruned forward then equals the by-hand run with compact positions."""
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    with torch.no_grad(), Pruner(model, build_strategy("pdrop", layer=[1, 3], ratio=[0.5, 0.25])) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    record = pruner.last_record
    stage_raster = [sorted(kept[0].nonzero().flatten().tolist()) for kept in record.stage_kept]
    images = image_positions(input_ids)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
        first_scores = own_layer_last_token_attention(model, hidden.hidden_states[1], 1)[images]
    first = top_k(first_scores, 18)
    assert stage_raster[0] == first
    # The stage-2 input: the model pruned by stage 1 alone, whose layers 1.. run on the compacted sequence.
    with torch.no_grad(), Pruner(model, build_strategy("pdrop", layer=1, keep=18, ratio=None)) as alone:
        hidden = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    assert alone.last_record.kept_raster == [[first]]
    survivors = kept_positions(input_ids, first)
    slots = [survivors.index(images[r]) for r in first]
    with torch.no_grad():
        second_scores = own_layer_last_token_attention(model, hidden.hidden_states[3], 3)[slots]
    assert stage_raster[1] == [first[i] for i in top_k(second_scores, 9)]
    # The layer-K-1 attention (options.score_from=previous_layer) ranks differently on this model.
    previous = build_strategy(
        "pdrop", layer=[1, 3], ratio=[0.5, 0.25], options={"score_from": "previous_layer"}
    )
    with torch.no_grad(), Pruner(model, previous) as other:
        model(input_ids=input_ids, pixel_values=pixel_values)
    assert [sorted(k[0].nonzero().flatten().tolist()) for k in other.last_record.stage_kept] != stage_raster
    reference = staged_reference_logits(
        model,
        input_ids,
        pixel_values,
        [(1, kept_positions(input_ids, first), None), (3, kept_positions(input_ids, stage_raster[1]), None)],
        compact=True,
    )
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pdrop_keeping_everything_equals_the_untouched_model(attn: str) -> None:
    model = llava_model(attn)
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        untouched = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2)).logits
        with Pruner(model, build_strategy("pore_pdrop_linear", layer=[1, 2, 3], ratio=1.0)):
            pruned = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(2)).logits
    torch.testing.assert_close(pruned, untouched, atol=1e-5, rtol=0)


PADDED_CASES = {
    "pore_pdrop_linear": {"layer": [1, 3], "ratio": [0.5, 0.25]},
    "pdrop_previous_layer": {
        "layer": [1, 3],
        "ratio": [0.5, 0.25],
        "options": {"score_from": "previous_layer"},
    },
    "sparsevlm": {"keep": [12, 6], "layer": [1, 3]},
    "sparsevlm_attention": {"keep": 9, "layer": 2, "options": {"raters": "attention"}},
    "sparsevlm_cluster": {"keep": [12, 6], "layer": [1, 3], "options": {"recycle": "cluster"}},
    "fastervlm": {"keep": 9, "layer": 2},
    "pool_average": {"keep": 9, "layer": 2},
}


@pytest.mark.parametrize("case", sorted(PADDED_CASES))
def test_padded_batch_equals_single_samples(case: str) -> None:
    model = llava_model()
    method = case.split("_")[0] if case.startswith(("pdrop", "sparsevlm")) else case
    strategy = build_strategy(method, **PADDED_CASES[case])
    ids, mask = left_pad(PROMPTS)
    images = pixels(2)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        batch = model.generate(
            input_ids=ids, attention_mask=mask, pixel_values=images, max_new_tokens=5, do_sample=False
        )[:, ids.shape[1] :]
        batch_kept = pruner.last_record.kept_raster
        for b, prompt in enumerate(PROMPTS):
            alone = model.generate(
                input_ids=single(prompt), pixel_values=images[b : b + 1], max_new_tokens=5, do_sample=False
            )[:, len(prompt) :]
            assert pruner.last_record.kept_raster == [batch_kept[b]]
            assert alone[0].tolist() == batch[b].tolist()


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pdrop_cached_generation_equals_recomputing_without_cache(positions: str) -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[1]), pixels(1, seed=3)
    new_tokens = 6
    strategy = build_strategy("pore_pdrop_exponential", layer=[1, 3], ratio=[0.5, 0.25], positions=positions)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, input_ids.shape[1] :].tolist()
    record = pruner.last_record
    stage_raster = [
        sorted((kept & record.layout.valid)[0].nonzero().flatten().tolist()) for kept in record.stage_kept
    ]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        new = list(range(input_ids.shape[1], sequence.shape[1]))
        stages = [
            (layer, kept_positions(input_ids, raster) + new, None)
            for layer, raster in zip([1, 3], stage_raster, strict=True)
        ]
        logits = staged_reference_logits(model, sequence, pixel_values, stages, positions == "compact")
        token = int(logits[0, -1].argmax())
        recomputed.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert cached == recomputed


def test_growing_stage_budgets_are_refused() -> None:
    """Fixed budgets that grow are refused when the pruner is built; a share that leaves fewer tokens than a
    later fixed budget asks for, at the prefill that finds out."""
    model = llava_model()
    with pytest.raises(ValueError, match="grows from stage to stage"):
        Pruner(model, build_strategy("pdrop", layer=[1, 2], keep=[4, 8], ratio=None))
    share_then_more = build_strategy("pdrop", layer=[1, 2], keep=[None, 8], ratio=[0.1, 1.0])
    with (
        Pruner(model, share_then_more),
        pytest.raises(ValueError, match="budgets must not grow from stage to stage"),
    ):
        model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))


# ---------------------------------------------------------------------------------------- SparseVLM


@pytest.mark.parametrize("raters", ["attention", "attention_all_text"])
def test_sparsevlm_attention_raters_score_the_image_tokens(raters: str) -> None:
    """raters=attention: raters = the text tokens after the image whose mean attention to it is at least
    the mean over those tokens; an image token's score = the raters' mean attention to it (eager attention
    weights of layer K-1). attention_all_text: the old rule, over every text token (those before the image
    see nothing of it and lower the threshold)."""
    model = llava_model("eager")
    input_ids, pixel_values = single(PROMPTS[1]), pixels(1, seed=1)
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    attention = out.attentions[1][0].mean(dim=0).double()  # (L, L), layer K-1 = 1, mean over heads
    images = image_positions(input_ids)
    after = [i for i in range(images[-1] + 1, input_ids.shape[1])]
    before = [i for i in range(images[0])]
    text = after if raters == "attention" else before + after
    to_image = attention[text][:, images]  # (Q, 36)
    relevance = to_image.mean(dim=1)
    chosen = relevance >= relevance.mean()
    expected = top_k(to_image[chosen].mean(dim=0), 9)
    strategy = build_strategy("sparsevlm", layer=2, keep=9, options={"raters": raters})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        model(input_ids=input_ids, pixel_values=pixel_values)
    assert pruner.last_record.kept_raster == [[expected]]
    # The prefix lowers the threshold: more raters pass with it than without it.
    after_only = attention[after][:, images].mean(dim=1)
    assert int((after_only >= relevance.mean()).sum()) > int((after_only >= after_only.mean()).sum()) or (
        raters == "attention"
    )


def test_sparsevlm_official_raters_come_from_the_input_embeddings() -> None:
    """raters=official (default): m = softmax over the text after the image of (image embeddings x text
    embeddings^T), mean over the image tokens; raters = m > mean(m), chosen once; the image tokens are
    scored by the raters' mean attention in layer K-1 at every stage."""
    model = llava_model("eager")
    prompt = make_prompt([1, 5], 1, [12, 13, 14, 15, 16, 17, 18, 19, 20, 21])
    input_ids, pixel_values = single(prompt), pixels(1, seed=6)
    images = image_positions(input_ids)
    after = list(range(images[-1] + 1, input_ids.shape[1]))
    with torch.no_grad():
        embeds = merged_embeddings(model, input_ids, pixel_values)[0].float()
        out = model(input_ids=input_ids, pixel_values=pixel_values, output_attentions=True)
    share = (embeds[images] @ embeds[after].T).softmax(dim=1).mean(dim=0)  # (T,)
    raters = [after[i] for i in range(len(after)) if share[i] > share.mean()]
    assert 0 < len(raters) < len(after)  # a real choice, so the test can tell it from other rules
    attention = out.attentions[1][0].mean(dim=0).double()  # layer K-1 = 1
    expected = top_k(attention[raters][:, images].mean(dim=0), 9)
    with torch.no_grad(), Pruner(model, build_strategy("sparsevlm", layer=2, keep=9)) as pruner:
        model(input_ids=input_ids, pixel_values=pixel_values)
    assert pruner.last_record.kept_raster == [[expected]]
    with (
        torch.no_grad(),
        Pruner(model, build_strategy("sparsevlm", layer=2, keep=9, options={"raters": "attention"})) as other,
    ):
        model(input_ids=input_ids, pixel_values=pixel_values)
    assert other.last_record.kept_raster != [[expected]]


@pytest.mark.parametrize(
    ("name", "keep"),
    [
        ("sparsevlm", (300, 200, 110)),
        ("sparsevlm_128", (303, 110, 36)),
        ("sparsevlm_96", (238, 48, 26)),
        ("sparsevlm_64", (66, 30, 17)),
    ],
)
def test_sparsevlm_presets_are_the_official_budget_tables(name: str, keep: tuple[int, ...]) -> None:
    """Official v1 (LLaVA-1.5): scored in layers 2 / 6 / 15, pruned right after them (K = 3 / 7 / 16),
    keeping the table's tokens of the 576; raters from the embeddings, compact positions."""
    strategy = build_strategy(name).resolve(ModelFacts("llava", 32, pads_to_square=True))
    assert [(stage.layer, stage.budget(576)) for stage in strategy.stages()] == list(
        zip((3, 7, 16), keep, strict=True)
    )
    assert strategy.options["raters"] == "official" and strategy.positions == "compact"


def test_sparsevlm_stages_keep_their_budgets_and_cluster_recycling_adds_the_official_count() -> None:
    """Three stages scaled to the tiny model: 20 / 10 / 5 of 36 tokens. recycle=cluster keeps, on top,
    int(int(0.3 * dropped) + 1) / 10) + 1 centres per stage, each carrying its cluster's mean."""
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1, seed=7)
    counts = {}
    for recycle in ("none", "cluster"):
        strategy = build_strategy(
            "sparsevlm", layer=[1, 2, 3], keep=[20, 10, 5], options={"recycle": recycle}
        )
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            model(input_ids=input_ids, pixel_values=pixel_values)
        counts[recycle] = pruner.last_record.visual_tokens[:, 0].tolist()
    assert counts["none"] == [36, 20, 10, 5]

    def centres(dropped: int) -> int:
        return int((int(0.3 * dropped) + 1) / 10) + 1

    first = 20 + centres(16)
    second = 10 + centres(first - 10)
    assert counts["cluster"] == [36, first, second, 5 + centres(second - 5)]


def reference_density_peaks(points: torch.Tensor, clusters: int) -> tuple[list[int], list[int]]:
    """DPC-KNN with plain loops, as described by the official SparseVLM recycling."""
    m, dim = points.shape
    dist = [[float((points[i] - points[j]).norm()) / dim**0.5 for j in range(m)] for i in range(m)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in dist]
    largest = max(max(row) for row in dist)
    denser = [
        [density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(m)] for i in range(m)
    ]
    peak = [min([dist[i][j] for j in range(m) if denser[i][j]], default=largest) for i in range(m)]
    centre = sorted(range(m), key=lambda i: (-peak[i] * density[i], i))[:clusters]
    assignment = [min(range(clusters), key=lambda c: (dist[i][centre[c]], c)) for i in range(m)]
    for c, i in enumerate(centre):
        assignment[i] = c
    return centre, assignment


def test_density_peak_clusters_equal_the_loop_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    for m, clusters in ((7, 1), (12, 2), (25, 3)):
        points = torch.randn(m, 5, generator=generator)
        centres, assignment = density_peak_clusters(points, clusters)
        assert (centres.tolist(), assignment.tolist()) == reference_density_peaks(points, clusters)
    # Two far-apart blobs and two clusters: one centre in each, each blob one cluster.
    blobs = torch.cat([torch.randn(6, 3, generator=generator), 50 + torch.randn(5, 3, generator=generator)])
    centres, assignment = density_peak_clusters(blobs, 2)
    assert sorted(int(c) // 6 for c in centres) == [0, 1]
    assert len(set(assignment[:6].tolist())) == 1 and len(set(assignment[6:].tolist())) == 1


@pytest.mark.parametrize("options", [{}, {"raters": "attention"}])
def test_sparsevlm_cached_generation_equals_recomputing_without_cache(options: dict) -> None:
    """Compact positions (official) across two stages: cached decoding == the by-hand run of the kept
    tokens renumbered 0..L'-1, new tokens after them."""
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[1]), pixels(1, seed=3)
    new_tokens = 6
    strategy = build_strategy("sparsevlm", layer=[1, 3], keep=[12, 6], options=options)
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        cached = model.generate(
            input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=new_tokens, do_sample=False
        )[0, input_ids.shape[1] :].tolist()
    stage_raster = [sorted(kept[0].nonzero().flatten().tolist()) for kept in pruner.last_record.stage_kept]
    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        new = list(range(input_ids.shape[1], sequence.shape[1]))
        stages = [
            (layer, kept_positions(input_ids, raster) + new, None)
            for layer, raster in zip([1, 3], stage_raster, strict=True)
        ]
        logits = staged_reference_logits(model, sequence, pixel_values, stages, compact=True)
        recomputed.append(int(logits[0, -1].argmax()))
        sequence = torch.cat([sequence, torch.tensor([[recomputed[-1]]])], dim=1)
    assert cached == recomputed


def test_sparsevlm_merge_averages_dropped_tokens_into_the_most_similar_kept_one() -> None:
    """Kept tokens 0, 2; dropped 1 (closest to 0), 3 (closest to 2): 0 <- mean(h0, h1), 2 <- mean(h2, h3)."""
    hidden = torch.tensor(
        [[[9.0, 9.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [5.0, 5.0]]]
    )  # (1, 6, 2): position 0 is text, 1..4 are visual, 5 is text
    n = 4
    layout = VisualLayout(
        seq_index=torch.tensor([[1, 2, 3, 4]]),
        image_index=torch.zeros(1, n, dtype=torch.long),
        row=torch.tensor([[0, 0, 1, 1]]),
        col=torch.tensor([[0, 1, 0, 1]]),
        grid_h=torch.full((1, n), 2),
        grid_w=torch.full((1, n), 2),
        valid=torch.ones(1, n, dtype=torch.bool),
        prunable=torch.ones(1, n, dtype=torch.bool),
    )
    inputs = ScoringInputs(
        layout, torch.ones(1, n, dtype=torch.bool), torch.zeros(1, 6), torch.ones(1, 6), budget=lambda _: 2
    )
    kept = torch.tensor([[True, False, True, False]])
    merged = METHODS.get("sparsevlm")(merge=True).merge(inputs, hidden, kept)
    expected = hidden.clone()
    expected[0, 1] = (hidden[0, 1] + hidden[0, 2]) / 2
    expected[0, 3] = (hidden[0, 3] + hidden[0, 4]) / 2
    torch.testing.assert_close(merged, expected)
    recycled, still_kept = METHODS.get("sparsevlm")(merge=False).recycle(inputs, hidden, kept, kept.double())
    assert recycled is hidden and still_kept is kept


def test_sparsevlm_merge_changes_the_kept_tokens_not_the_choice() -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    results = {}
    for merge in (False, True):
        with (
            torch.no_grad(),
            Pruner(model, build_strategy("sparsevlm", keep=6, layer=2, options={"merge": merge})) as p,
        ):
            results[merge] = (
                model(input_ids=input_ids, pixel_values=pixel_values).logits,
                p.last_record.kept_raster,
            )
    assert results[True][1] == results[False][1]
    assert not torch.allclose(results[True][0], results[False][0])


# ---------------------------------------------------------------------------------------- FasterVLM


def test_fastervlm_ranks_by_the_vision_cls_attention() -> None:
    model = build_tiny_llava()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1, seed=2)
    with torch.no_grad(), Pruner(model, build_strategy("fastervlm", keep=8)) as pruner:
        model(input_ids=input_ids, pixel_values=pixel_values)
    assert model.config.vision_config._attn_implementation == "sdpa"  # restored on detach
    model.set_attn_implementation({"vision_config": "eager"})
    with torch.no_grad():
        vision = model.model.vision_tower(pixel_values, output_attentions=True)
    # vision_feature_layer -2 of 2 encoder layers: the features come out of layer 0, scored by its attention.
    cls_row = vision.attentions[0][0, :, 0, 1:].mean(dim=0)  # (36,) [CLS] -> patches, mean over heads
    assert pruner.last_record.kept_raster == [[top_k(cls_row, 8)]]


def test_fastervlm_keeps_the_same_tokens_whatever_the_text() -> None:
    """No language-model attention is involved: the choice depends on the image alone."""
    model = llava_model()
    pixel_values = pixels(1, seed=4)
    chosen = []
    for prompt in PROMPTS:
        with torch.no_grad(), Pruner(model, build_strategy("fastervlm", keep=8)) as pruner:
            model(input_ids=single(prompt), pixel_values=pixel_values)
        chosen.append(pruner.last_record.kept_raster)
    assert chosen[0] == chosen[1]


# ---------------------------------------------------------------------------------------- pooling


def test_window_grids_by_hand() -> None:
    assert window_grid(24, 24, 64) == (8, 8)
    assert window_grid(24, 24, 144) == (12, 12)
    assert window_grid(6, 6, 9) == (3, 3)
    window, centres = window_of_cells(6, 6, 4)  # 3 x 3 windows: centres at rows/cols 1 and 4
    assert centres.tolist() == [1 * 6 + 1, 1 * 6 + 4, 4 * 6 + 1, 4 * 6 + 4]
    assert window.view(6, 6)[:3, :3].unique().tolist() == [0] and window.view(6, 6)[
        3:, 3:
    ].unique().tolist() == [3]


@pytest.mark.parametrize("strategy", ["pool", "pool_average"])
def test_pool_keeps_the_window_centres(strategy: str) -> None:
    model = llava_model()
    for keep, expected in ((9, [0, 2, 4, 12, 14, 16, 24, 26, 28]), (4, [7, 10, 25, 28])):
        # The prior does not change the choice: every window keeps its own centre.
        with (
            torch.no_grad(),
            Pruner(model, build_strategy(strategy, keep=keep, prior={"name": "linear"})) as p,
        ):
            model(input_ids=single(PROMPTS[0]), pixel_values=pixels(1))
        assert p.last_record.kept_raster == [[expected]]


def test_pool_average_carries_the_mean_of_each_window() -> None:
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1)
    layer, centres = 2, [7, 10, 25, 28]
    with torch.no_grad(), Pruner(model, build_strategy("pool_average", keep=4, layer=layer)):
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    images = image_positions(input_ids)
    rows, cols = torch.arange(TOKENS_PER_IMAGE) // GRID, torch.arange(TOKENS_PER_IMAGE) % GRID
    window = (rows // 3) * 2 + cols // 3  # 3 x 3 windows of the 6 x 6 grid

    def average(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        original = hidden.clone()
        for w, centre in enumerate(centres):
            members = [images[r] for r in range(TOKENS_PER_IMAGE) if int(window[r]) == w]
            hidden[0, images[centre]] = original[0, members].mean(dim=0)
        return hidden

    reference = staged_reference_logits(
        model, input_ids, pixel_values, [(layer, kept_positions(input_ids, centres), average)]
    )
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------- before the LLM


@pytest.mark.parametrize("strategy", ["pool_average", "fastervlm"])
def test_pruning_before_the_language_model_generates_like_the_shortened_prompt(strategy: str) -> None:
    """K = 0: no decoder layer sees the dropped tokens; cached generation == recomputing by hand, with the
    kept tokens at their original positions and new tokens after the full prompt (pooling), or the kept
    sequence renumbered 0..L'-1 and new tokens after it (FasterVLM, as its official code)."""
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[0]), pixels(1, seed=5)
    new_tokens = 5
    with torch.no_grad(), Pruner(model, build_strategy(strategy, keep=4)) as pruner:
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    cached = out.sequences[0, input_ids.shape[1] :].tolist()
    kept_raster = pruner.last_record.kept_raster[0][0]
    assert pruner.last_record.visual_tokens[:, 0].tolist() == [4] * 4
    length = input_ids.shape[1] + new_tokens - 1
    assert [out.past_key_values.get_seq_length(i) for i in range(4)] == [length - 32] * 4
    if strategy == "pool_average":
        assert kept_raster == [7, 10, 25, 28]
    images = image_positions(input_ids)
    window = (torch.arange(TOKENS_PER_IMAGE) // GRID // 3) * 2 + torch.arange(TOKENS_PER_IMAGE) % GRID // 3

    def average(hidden: torch.Tensor) -> torch.Tensor:
        if strategy != "pool_average":
            return hidden
        pooled = hidden.clone()
        for w, centre in enumerate(kept_raster):
            members = [images[r] for r in range(TOKENS_PER_IMAGE) if int(window[r]) == w]
            pooled[0, images[centre]] = hidden[0, members].mean(dim=0)
        return pooled

    sequence, recomputed = input_ids, []
    for _ in range(new_tokens):
        kept = kept_positions(input_ids, kept_raster) + list(range(input_ids.shape[1], sequence.shape[1]))
        # FasterVLM removes the tokens before the LLM (official: compact positions); pooling keeps them.
        compact = strategy == "fastervlm"
        logits = staged_reference_logits(model, sequence, pixel_values, [(0, kept, average)], compact)
        token = int(logits[0, -1].argmax())
        recomputed.append(token)
        sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    assert cached == recomputed


def test_only_methods_without_language_model_attention_prune_before_layer_1() -> None:
    build_strategy("pool", layer=0).resolve(ModelFacts("llava", 32, pads_to_square=True))
    with pytest.raises(ValueError, match=r"layer must be in \[1, 31\].*scored in layer K-1"):
        build_strategy("fastv", layer=0).resolve(ModelFacts("llava", 32, pads_to_square=True))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 31\]"):
        build_strategy("pool", layer=-1).resolve(ModelFacts("llava", 32, pads_to_square=True))


def test_sparsevlm_cluster_recycling_carries_the_cluster_mean_into_the_kept_centre() -> None:
    """One stage before layer 1 keeping 20 of 36: the 16 dropped tokens' top int(0.3 * 16) + 1 = 5 by score
    form int(5 / 10) + 1 = 1 cluster; its centre (DPC-KNN by hand) is kept on top, carrying the mean of the
    5 hidden states; the forward equals the by-hand run of that sequence with compact positions."""
    model = llava_model()
    input_ids, pixel_values = single(PROMPTS[1]), pixels(1, seed=8)
    strategy = build_strategy("sparsevlm", layer=1, keep=20, options={"recycle": "cluster"})
    with torch.no_grad(), Pruner(model, strategy) as pruner:
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
    record = pruner.last_record
    with torch.no_grad(), Pruner(model, strategy.replace(options={"recycle": "none"})) as plain:
        model(input_ids=input_ids, pixel_values=pixel_values)
    top = plain.last_record.kept_raster[0][0]
    scores = record.stage_scores[0][0]
    dropped = [r for r in range(TOKENS_PER_IMAGE) if r not in top]
    recycled = sorted(dropped, key=lambda r: (-float(scores[r]), r))[:5]
    images = image_positions(input_ids)
    with torch.no_grad():
        layer_input = model(input_ids=input_ids, pixel_values=pixel_values, output_hidden_states=True)
    states = layer_input.hidden_states[1][0, [images[r] for r in recycled]]
    centre = recycled[reference_density_peaks(states, 1)[0][0]]
    assert record.kept_raster == [[sorted([*top, centre])]]

    def carry_mean(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        hidden[0, images[centre]] = hidden[0, [images[r] for r in recycled]].mean(dim=0)
        return hidden

    kept = kept_positions(input_ids, sorted([*top, centre]))
    reference = staged_reference_logits(model, input_ids, pixel_values, [(1, kept, carry_mean)], compact=True)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
