"""What a method can see (`pore.methods.requests`): each observation against an eager reference of the real
tiny models, computed without the engine (the vision tower's own outputs, `get_image_features`, the untouched
model's hidden states and attention weights, k_proj + RoPE written out by hand).

A recording method, written in the test as a new method would be, asks for everything and keeps what it saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from conftest import IMAGE_TOKEN, TOKENS_PER_IMAGE, build_tiny_llava
from families import NEXT_SIZES, llava_batch, llava_model, llava_sample, next_batch, next_model
from next_reference import build_model as build_next
from next_reference import expected_tokens
from pore import METHODS, Pruner, PruningMethod, ScoringInputs, Strategy, build_strategy
from pore.methods.requests import (
    DecoderHiddenStates,
    DecoderKeys,
    ImageEmbeddings,
    LastTokenAttention,
    PromptEmbeddings,
    Request,
    TextAttention,
    TextEmbeddings,
    VisionAttention,
    VisionHiddenStates,
    VisionKeys,
)
from qwen_reference import sample_inputs as qwen_sample
from qwen_reference import tiny_model as qwen_model
from reference import merged_embeddings

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

ATOL = 1e-5


@contextmanager
def recording(requests: Sequence[Request]) -> Iterator[list[ScoringInputs]]:
    """A method registered as `recorder` that asks for `requests` and records what each stage showed it;
    it keeps the tokens the last prompt token attends to most when it asked for that, else the first ones."""
    seen: list[ScoringInputs] = []

    class Recorder(PruningMethod):
        def score(self, inputs: ScoringInputs) -> torch.Tensor:
            seen.append(inputs)
            if inputs.last_token_attention is not None:
                return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()
            return torch.ones(inputs.layout.seq_index.shape, dtype=torch.float64)

    Recorder.requests = tuple(requests)
    with METHODS.registered("recorder", Recorder):
        yield seen


def observe(
    model: nn.Module,
    requests: Sequence[Request],
    inputs: dict,
    layer: int | list[int] = 2,
    keep: int | list[int] = 4,
    sizes: list | None = None,
) -> list[ScoringInputs]:
    """What the recorder saw at each stage of one forward of `inputs`."""
    with recording(requests) as seen:
        strategy = Strategy(name="recorder", method="recorder", layer=layer, keep=keep, ratio=None)
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            pruner.set_image_sizes(sizes)
            model(**inputs)
    return seen


def image_positions(input_ids: torch.Tensor, token: int = IMAGE_TOKEN) -> list[list[int]]:
    """Per sample: the sequence positions of its image tokens."""
    return [(row == token).nonzero().flatten().tolist() for row in input_ids]


def eager_vision_copy(build) -> nn.Module:
    """The same weights with an eager vision tower (for its attention weights); the shared one stays."""
    model = build()
    model.set_attn_implementation({"vision_config": "eager"})
    return model


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE written out: x * cos + rotate_half(x) * sin, x (B, L, H, d), cos / sin (B, L, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def decoder_keys(model: nn.Module, hidden: torch.Tensor, layer: int, positions: torch.Tensor) -> torch.Tensor:
    """(B, L, H_kv, d) the keys of decoder layer `layer` for its input `hidden` (B, L, D) at `positions`."""
    language_model = model.model.language_model
    decoder_layer = language_model.layers[layer]
    config = language_model.config
    head_dim = config.hidden_size // config.num_attention_heads
    keys = decoder_layer.self_attn.k_proj(decoder_layer.input_layernorm(hidden))
    keys = keys.view(*hidden.shape[:2], config.num_key_value_heads, head_dim)
    cos, sin = language_model.rotary_emb(hidden, positions)
    return rotate(keys, cos, sin)


def vision_keys(tower: nn.Module, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """(views, L_v, H, d) the keys of encoder layer `layer` for its input `hidden` (views, L_v, D_v)."""
    encoder_layer = tower.encoder.layers[layer]
    keys = encoder_layer.self_attn.k_proj(encoder_layer.layer_norm1(hidden))
    return keys.view(*hidden.shape[:2], tower.config.num_attention_heads, -1)


# ---------------------------------------------------------------------------------------------- LLaVA-1.5


def test_vision_observations_equal_the_vision_towers_own_outputs() -> None:
    """hidden_states[j] / attentions[j] of the tower (eager), and layer j's keys (k_proj of its normed input),
    at each visual token's patch: 1 + its raster index in the view of its image; a padded batch of samples
    with 1, 2 and 1 images."""
    model = build_tiny_llava()
    inputs = llava_batch()
    requests = [VisionHiddenStates(0), VisionHiddenStates(), VisionHiddenStates(-1)]
    requests += [VisionAttention(), VisionAttention(1), VisionKeys(0), VisionKeys(-1)]
    (seen,) = observe(model, requests, inputs)
    eager = eager_vision_copy(build_tiny_llava)
    tower = eager.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
        keys = [vision_keys(tower, out.hidden_states[j], j) for j in range(len(tower.encoder.layers))]
    # vision_feature_layer -2 of 2 layers: the features are hidden_states[1], out of layer 0.
    expected = {
        VisionHiddenStates(0): out.hidden_states[0],
        VisionHiddenStates(): out.hidden_states[1],
        VisionHiddenStates(-1): out.hidden_states[2],
        VisionAttention(): out.attentions[0][:, :, 0].mean(dim=1),
        VisionAttention(1): out.attentions[1][:, :, 0].mean(dim=1),
        VisionKeys(0): keys[0],
        VisionKeys(-1): keys[1],
    }
    images = [1, 2, 1]
    for request, per_view in expected.items():
        observed = seen[request]
        assert observed.shape[:2] == (3, 2 * TOKENS_PER_IMAGE)
        view = 0
        for b, count in enumerate(images):
            for i in range(count):
                tokens = slice(i * TOKENS_PER_IMAGE, (i + 1) * TOKENS_PER_IMAGE)
                torch.testing.assert_close(observed[b, tokens], per_view[view, 1:], atol=ATOL, rtol=0)
                view += 1
            assert not bool(observed[b, count * TOKENS_PER_IMAGE :].any())  # batch padding slots
    assert seen.vision_views is None  # one view per image
    torch.testing.assert_close(seen.vision_attention, seen[VisionAttention()].double())


def test_embedding_observations_equal_the_language_models_inputs() -> None:
    """ImageEmbeddings == get_image_features; TextEmbeddings == the token embeddings of the real text tokens,
    at their prompt positions; PromptEmbeddings == the merged input embeddings."""
    model = llava_model()
    inputs = llava_batch()
    (seen,) = observe(model, [ImageEmbeddings(), TextEmbeddings(), PromptEmbeddings()], inputs)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        tokens = model.model.language_model.embed_tokens(inputs["input_ids"])
        merged = merged_embeddings(model, inputs["input_ids"], inputs["pixel_values"])
    image_embeddings, first = seen[ImageEmbeddings()], 0
    for b, count in enumerate([1, 2, 1]):
        torch.testing.assert_close(
            image_embeddings[b, : count * TOKENS_PER_IMAGE], torch.cat(list(features[first : first + count]))
        )
        first += count
    text = seen[TextEmbeddings()]
    for b in range(3):
        real = inputs["attention_mask"][b].bool() & (inputs["input_ids"][b] != IMAGE_TOKEN)
        positions = real.nonzero().flatten()
        assert text.positions[b][text.valid[b]].tolist() == positions.tolist()
        torch.testing.assert_close(text.embeddings[b][text.valid[b]], tokens[b, positions])
    torch.testing.assert_close(seen[PromptEmbeddings()], merged)
    assert seen.input_embeddings is seen[PromptEmbeddings()]


def test_decoder_observations_equal_the_untouched_models_hidden_states_and_keys() -> None:
    """Before pruning at K = 2 (a padded batch, eager attention): layer K's and K-1's inputs ==
    output_hidden_states[2] / [1] at the image tokens, layer 0's the whole sequence; layer K-1's and layer 0's
    keys == k_proj of the normed input, rotated at the token's position; the attention rows == the eager
    attention weights of layer K-1."""
    model = llava_model("eager")
    inputs = llava_batch()
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    inputs["position_ids"] = positions
    requests = [DecoderHiddenStates(0), DecoderHiddenStates(-1), DecoderHiddenStates(-2, sequence=True)]
    requests += [DecoderKeys(-1), DecoderKeys(-2, sequence=True), LastTokenAttention(), TextAttention()]
    (seen,) = observe(model, requests, inputs)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        keys = {layer: decoder_keys(model, out.hidden_states[layer], layer, positions) for layer in (0, 1)}
    expected = {
        DecoderHiddenStates(0): out.hidden_states[2],
        DecoderHiddenStates(-1): out.hidden_states[1],
        DecoderKeys(-1): keys[1],
    }
    for b, slots in enumerate(image_positions(inputs["input_ids"])):
        for request, sequence in expected.items():
            observed = seen[request]
            torch.testing.assert_close(observed[b, : len(slots)], sequence[b, slots], atol=ATOL, rtol=0)
            assert not bool(observed[b, len(slots) :].any())
    torch.testing.assert_close(seen[DecoderHiddenStates(-2, sequence=True)], out.hidden_states[0])
    torch.testing.assert_close(seen[DecoderKeys(-2, sequence=True)], keys[0], atol=ATOL, rtol=0)
    attention = out.attentions[1].mean(dim=1)  # (B, L, L) layer K-1, mean over heads
    torch.testing.assert_close(seen[LastTokenAttention()], attention[:, -1], atol=ATOL, rtol=0)
    rows = seen[TextAttention()]
    for b in range(3):
        real = inputs["attention_mask"][b].bool() & (inputs["input_ids"][b] != IMAGE_TOKEN)
        queries = real.nonzero().flatten()
        assert rows.positions[b][rows.valid[b]].tolist() == queries.tolist()
        torch.testing.assert_close(rows.attention[b][rows.valid[b]], attention[b, queries], atol=ATOL, rtol=0)
    assert seen.last_token_attention is seen[LastTokenAttention()]


def test_a_later_stage_sees_the_shortened_sequence() -> None:
    """Stages before layers 2 and 3: the second stage's layer K-1 (= 2) input is what the first stage handed
    layer 2 (its kept tokens; zeros for the dropped), and its keys are layer 2's k_proj + RoPE of it at the
    kept tokens' original positions."""
    model = llava_model()
    inputs = llava_sample(0)
    requests = [DecoderHiddenStates(0), DecoderHiddenStates(-1), DecoderKeys(-1), LastTokenAttention()]
    first, second = observe(model, requests, inputs, layer=[2, 3], keep=[8, 4])
    kept = second.alive[0]  # (N,) the first stage's choice
    assert int(kept.sum()) == 8
    before = first[DecoderHiddenStates(0)][0]  # (N, D) what layer 2 received before the first stage cut
    torch.testing.assert_close(second[DecoderHiddenStates(-1)][0][kept], before[kept])
    assert not bool(second[DecoderHiddenStates(-1)][0][~kept].any())
    positions = torch.tensor(image_positions(inputs["input_ids"])[0])[kept]  # original positions
    with torch.no_grad():
        keys = decoder_keys(model, before[kept][None], 2, positions[None])[0]
    torch.testing.assert_close(second[DecoderKeys(-1)][0][kept], keys, atol=ATOL, rtol=0)
    assert second[LastTokenAttention()].shape[1] == inputs["input_ids"].shape[1] - TOKENS_PER_IMAGE + 8


# ---------------------------------------------------------------------------------------------- LLaVA-NeXT


def test_vision_observations_of_tiles_equal_the_vision_tower_run_per_image() -> None:
    """Each token reads the view it was encoded in (base image or tile) at its in-view patch; newlines have
    none (zeros, view -1); the image embeddings are the packed features, newlines included."""
    model = next_model()
    inputs = dict(next_batch())
    requests = [VisionHiddenStates(), VisionAttention(), VisionKeys(-1), ImageEmbeddings()]
    (seen,) = observe(model, requests, inputs)
    eager = eager_vision_copy(build_next)
    tower = eager.model.vision_tower
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output
    image = 0
    for b, sizes in enumerate(NEXT_SIZES):
        slot = 0
        for size in sizes:
            tokens = expected_tokens(size)
            views = max(t.view for t in tokens) + 1
            with torch.no_grad():
                out = tower(
                    inputs["pixel_values"][image, :views], output_hidden_states=True, output_attentions=True
                )
                keys = vision_keys(tower, out.hidden_states[-2], -1)
            per_view = {
                VisionHiddenStates(): out.hidden_states[-2],  # vision_feature_layer -2
                VisionAttention(): out.attentions[-2][:, :, 0].mean(dim=1),  # the layer that made it
                VisionKeys(-1): keys,
            }
            for n, token in enumerate(tokens):
                for request, values in per_view.items():
                    expected = (
                        values[token.view, 1 + token.in_view] if token.part != "newline" else 0 * values[0, 0]
                    )
                    torch.testing.assert_close(seen[request][b, slot + n], expected, atol=ATOL, rtol=0)
                assert int(seen.vision_views[b, slot + n]) == (token.view if token.part != "newline" else -1)
            torch.testing.assert_close(seen[ImageEmbeddings()][b, slot : slot + len(tokens)], features[image])
            slot += len(tokens)
            image += 1


# ---------------------------------------------------------------------------------------------- Qwen2-VL


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_sees_embeddings_and_decoder_states_and_refuses_the_vision_tower(family: str) -> None:
    model = qwen_model(family)
    inputs = qwen_sample(family, 1)  # two images
    (seen,) = observe(model, [ImageEmbeddings(), DecoderHiddenStates(-1)], inputs, keep=3)
    with torch.no_grad():
        features = model.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]
        ).pooler_output
        out = model(**inputs, output_hidden_states=True)
    (slots,) = image_positions(inputs["input_ids"], model.config.image_token_id)
    torch.testing.assert_close(seen[ImageEmbeddings()][0], torch.cat(list(features)))
    torch.testing.assert_close(
        seen[DecoderHiddenStates(-1)][0], out.hidden_states[1][0, slots], atol=ATOL, rtol=0
    )
    # Refused when the strategy is resolved against the family (before any weights would load in a run).
    with pytest.raises(ValueError, match="recorder scores with the vision tower's"):
        observe(model, [VisionHiddenStates()], inputs)
    with pytest.raises(ValueError, match="which qwen2_vl models do not give"):
        observe(model, [VisionAttention()], inputs)


# ---------------------------------------------------------------------------------------------- the requests


def test_only_what_is_asked_is_captured() -> None:
    """FastV switches only the language model's attention and hooks nothing in the vision tower; a method that
    reads only the image embeddings switches no attention implementation at all."""
    model = llava_model()
    modules = [*model.model.vision_tower.encoder.layers, model.model.language_model.layers[0]]

    def hooks() -> list[int]:
        return [len(module._forward_pre_hooks) + len(module._forward_hooks) for module in modules]

    before = hooks()
    with Pruner(model, build_strategy("fastv", keep=4)):
        assert model.config.text_config._attn_implementation == "pore_sdpa"
        assert model.config.vision_config._attn_implementation == "sdpa"
        assert hooks() == before  # the encoder and the layers below K run as they are
    with Pruner(model, Strategy(name="v", method="fastervlm", layer=2, keep=4, ratio=None)):
        assert model.config.vision_config._attn_implementation == "pore_sdpa"
        assert hooks() == before  # its [CLS] row comes through the tap, no hook
    with recording([ImageEmbeddings()]):
        strategy = Strategy(name="recorder", method="recorder", layer=0, keep=4, ratio=None)
        with Pruner(model, strategy):
            assert model.config.text_config._attn_implementation == "sdpa"
    (seen,) = observe(model, [VisionHiddenStates()], llava_sample(0))
    with pytest.raises(KeyError, match="was not observed"):
        seen[VisionKeys()]


def test_requests_of_the_same_capture_agree() -> None:
    """The feature layer's [CLS] row asked as None and as 0, a layer's keys per token and as the sequence: one
    capture each, delivered both ways."""
    model, inputs = llava_model(), llava_batch()
    requests = [VisionAttention(), VisionAttention(0), DecoderKeys(-1), DecoderKeys(-1, sequence=True)]
    (seen,) = observe(model, requests, inputs)
    assert torch.equal(seen[VisionAttention()], seen[VisionAttention(0)])
    sequence = seen[DecoderKeys(-1, sequence=True)]  # (B, L, H_kv, d)
    for b, slots in enumerate(image_positions(inputs["input_ids"])):
        assert torch.equal(seen[DecoderKeys(-1)][b, : len(slots)], sequence[b, slots])


def test_requests_that_cannot_be_served_say_why() -> None:
    model = llava_model()
    with pytest.raises(ValueError, match="only layers before K have run their attention"):
        DecoderKeys(offset=0)
    with pytest.raises(ValueError, match="layers after K have not run yet"):
        DecoderHiddenStates(offset=1)
    with recording([DecoderHiddenStates(-2)]):
        # The second stage (before layer 3) would read layer 1, which saw the sequence before the first cut.
        strategy = Strategy(name="recorder", method="recorder", layer=(2, 3), keep=(8, 4), ratio=None)
        with pytest.raises(ValueError, match="reads decoder layer 1 for the stage before layer 3"):
            Pruner(model, strategy)
        with pytest.raises(ValueError, match=r"must be in \[2, 3\].*reads layer K-2"):
            Pruner(model, strategy.replace(layer=1, keep=4))
    with pytest.raises(ValueError, match="does not exist: the tower has 2 layers"):
        observe(model, [VisionKeys(2)], llava_sample(0))


def test_the_older_class_attributes_are_requests() -> None:
    """attention_queries / vision_attention / scores_in_own_layer / needs_input_embeddings map onto requests:
    a method written with them keeps what the same method written with requests keeps."""

    class Shorthand(PruningMethod):
        attention_queries = "last"
        vision_attention = True

        def score(self, inputs: ScoringInputs) -> torch.Tensor:
            rows = inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()
            return rows * inputs.vision_attention

    class WithRequests(Shorthand):
        attention_queries, vision_attention = None, False
        requests = (LastTokenAttention(), VisionAttention())

    method = Shorthand()
    method.scores_in_own_layer, method.needs_input_embeddings = True, True
    assert method.observations() == (
        LastTokenAttention(own_layer=True),
        VisionAttention(),
        PromptEmbeddings(),
    )
    assert Shorthand.lowest_layer() == 1 and WithRequests.lowest_layer() == 1
    model, inputs = llava_model(), llava_sample(1)
    kept = {}
    for name, method_class in (("shorthand", Shorthand), ("requests", WithRequests)):
        with METHODS.registered(name, method_class):
            strategy = Strategy(name=name, method=name, layer=2, keep=5, ratio=None)
            with torch.no_grad(), Pruner(model, strategy) as pruner:
                model(**inputs)
        kept[name] = pruner.last_record.kept_raster
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=5, layer=2)) as fastv:
        model(**inputs)
    assert kept["shorthand"] == kept["requests"] != fastv.last_record.kept_raster


# ---------------------------------------------------------------------------------------------- recycling


def by_hand_logits(model: nn.Module, inputs: dict, layer: int, kept: list[int], slot: int, merged: list[int]):
    """Logits of one sample run layer by layer: before `layer` only the positions `kept` stay, and position
    `slot` carries the mean of the hidden states at `merged` (original RoPE positions)."""
    from transformers.masking_utils import create_causal_mask

    language_model = model.model.language_model
    with torch.no_grad():
        hidden = merged_embeddings(model, inputs["input_ids"], inputs["pixel_values"])
        positions = torch.arange(hidden.shape[1])[None]
        cos, sin = language_model.rotary_emb(hidden, positions)
        mask = create_causal_mask(language_model.config, hidden, None, None, positions)
        for index, decoder_layer in enumerate(language_model.layers):
            if index == layer:
                hidden = hidden.clone()
                hidden[0, slot] = hidden[0, merged].mean(dim=0)
                hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
                positions = positions[:, kept]
                mask = create_causal_mask(language_model.config, hidden, None, None, None)
            hidden = decoder_layer(
                hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions
            )
        return model.lm_head(language_model.norm(hidden))


def test_recycle_can_put_a_merged_token_into_a_dropped_tokens_slot() -> None:
    """VisionZip-style: the tokens the top-k drops are averaged into one contextual token that takes the
    place of the first of them; the forward equals the by-hand run of exactly that."""

    class Contextual(PruningMethod):
        requests = (LastTokenAttention(),)

        def score(self, inputs: ScoringInputs) -> torch.Tensor:
            return inputs.last_token_attention.gather(1, inputs.layout.seq_index).double()

        def recycle(self, inputs, hidden, kept, scores):
            dropped = inputs.candidates() & ~kept  # (B, N)
            hidden, kept = hidden.clone(), kept.clone()
            for b in range(hidden.shape[0]):
                slots = inputs.layout.seq_index[b][dropped[b]]
                hidden[b, slots[0]] = hidden[b, slots].mean(dim=0)
                kept[b, dropped[b].nonzero()[0, 0]] = True
            return hidden, kept

    model, inputs = llava_model(), llava_sample(0)
    with METHODS.registered("contextual", Contextual):
        strategy = Strategy(name="contextual", method="contextual", layer=2, keep=4, ratio=None)
        with torch.no_grad(), Pruner(model, strategy) as pruner:
            logits = model(**inputs).logits
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=4, layer=2)) as fastv:
        model(**inputs)
    top = fastv.last_record.kept_raster[0][0]
    (images,) = image_positions(inputs["input_ids"])
    dropped = [r for r in range(TOKENS_PER_IMAGE) if r not in top]
    assert pruner.last_record.kept_raster == [[sorted([*top, dropped[0]])]]
    removed = {images[r] for r in dropped[1:]}
    kept = [i for i in range(inputs["input_ids"].shape[1]) if i not in removed]
    expected = by_hand_logits(model, inputs, 2, kept, images[dropped[0]], [images[r] for r in dropped])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_recycle_cannot_bring_back_a_token_an_earlier_stage_removed() -> None:
    class Resurrect(PruningMethod):
        def score(self, inputs: ScoringInputs) -> torch.Tensor:
            return torch.ones(inputs.layout.seq_index.shape, dtype=torch.float64)

        def recycle(self, inputs, hidden, kept, scores):
            if inputs.stage == 0:
                return hidden, kept
            return hidden, inputs.layout.valid.clone()  # every token, also those the first stage removed

    with METHODS.registered("resurrect", Resurrect):
        strategy = Strategy(name="resurrect", method="resurrect", layer=(1, 2), keep=(8, 4), ratio=None)
        with Pruner(llava_model(), strategy), pytest.raises(RuntimeError, match="no longer there"):
            llava_model()(**llava_sample(0))
