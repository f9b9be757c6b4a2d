"""Gemma 3: the token layout against the real model, and the masks of pruned layers against hand references.

The contract (tests/test_contract.py, entry "gemma3" of tests/families.py) covers keep-all equality, the kept
set, the pruned forward, padded batches and cached generation on a tiny Gemma 3 whose sliding window (8) is
shorter than its prompts. Here: where the adapter puts each image token (against the model's own pooling of
the patch grid), the mask each kind of pruned layer receives (causal OR the bidirectional block of each
image's kept tokens, AND the window for sliding layers), and the refusals.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import gemma3_reference as ref
from pore import ADAPTERS, Pruner, build_strategy
from pore.adapters.gemma3 import Gemma3Adapter, image_runs
from pore.testing.tiny_gemma3 import IMAGE_TOKEN, build_tiny_gemma3

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


@pytest.fixture(scope="module")
def model():
    return ref.tiny_model("sdpa")


def test_layout_places_each_token_where_the_projector_pools_its_patches(model) -> None:
    """Token i of an image is the projector's pooled cell (i // 4, i % 4) of its 8 x 8 patch grid: a feature
    changed in one patch cell changes exactly the token the layout puts there."""
    inputs = ref.sample_inputs(1)  # two images
    layout = Gemma3Adapter(model).visual_layout(inputs["input_ids"], inputs)
    positions = (inputs["input_ids"][0] == IMAGE_TOKEN).nonzero().flatten()
    assert layout.seq_index[0].tolist() == positions.tolist()
    assert layout.image_index[0].tolist() == [0] * 16 + [1] * 16
    assert layout.row[0].tolist() == [i // 4 for i in range(16)] * 2
    assert layout.col[0].tolist() == [i % 4 for i in range(16)] * 2
    assert layout.grid_h.unique().tolist() == layout.grid_w.unique().tolist() == [4]
    projector = model.model.multi_modal_projector
    tower = torch.randn(1, 64, model.config.vision_config.hidden_size)  # (1, 8 x 8 patches, D_v)
    with torch.no_grad():
        base = projector(tower)
        for row, col in [(0, 0), (2, 1), (3, 3), (1, 2)]:
            moved = tower.clone()
            moved[0, (2 * row + 1) * 8 + 2 * col] += 10.0  # a patch inside pooled cell (row, col)
            changed = (projector(moved) - base).abs().sum(-1)[0] > 0  # (16,) tokens that changed
            assert changed.nonzero().flatten().tolist() == [row * 4 + col]


def test_layout_counts_equal_the_models_placeholders(model) -> None:
    inputs = ref.batch_inputs()
    layout = Gemma3Adapter(model).visual_layout(inputs["input_ids"], inputs)
    features = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (images, 16, D)
    assert int(layout.valid.sum()) == features.shape[0] * features.shape[1] == 4 * 16
    assert Gemma3Adapter.fixed_image_tokens(model.config) == 16
    assert layout.images_per_sample.tolist() == [1, 2, 1]


def test_bidirectional_blocks_follow_the_models_rule() -> None:
    is_image = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1, 0, 0]]).bool()
    assert image_runs(is_image).tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1], [0, 0, -1, -1, -1, 1, -1, -1]]


def test_blocks_only_when_the_model_is_called_with_token_types(model) -> None:
    inputs = ref.sample_inputs(0)
    adapter = Gemma3Adapter(model)
    assert adapter.bidirectional_blocks(inputs["input_ids"], {}) is None
    blocks = adapter.bidirectional_blocks(inputs["input_ids"], inputs)
    assert blocks[0].tolist() == [0 if t == IMAGE_TOKEN else -1 for t in inputs["input_ids"][0].tolist()]


@pytest.mark.parametrize("layer", [1, 2])  # layer 1 is global (full), layer 2 a sliding-window layer
def test_pruned_layers_get_the_hand_written_masks(model, layer: int) -> None:
    """Each pruned layer's mask equals the hand reference over the kept sequence: causal, OR the block of
    each image's kept tokens (both ways), AND a window of 8 kept positions in sliding layers."""
    inputs = ref.sample_inputs(1)  # two images: two blocks
    seen: dict[int, torch.Tensor] = {}
    language_model = model.model.language_model

    def capture(index: int):
        def hook(module, args, kwargs):
            seen[index] = kwargs["attention_mask"]

        return hook

    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=5, layer=layer)) as pruner:
        handles = [
            language_model.layers[i].register_forward_pre_hook(capture(i), with_kwargs=True)
            for i in range(layer, len(language_model.layers))
        ]  # after the pruner's hooks: they see what the pruner hands the layers
        try:
            model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    kept = ref.kept_positions(inputs, pruner.last_record.kept_raster[0])
    token_types = inputs["token_type_ids"][:, kept]
    config = language_model.config
    for index, mask in seen.items():
        window = config.sliding_window if config.layer_types[index] == "sliding_attention" else None
        expected = ref.hand_mask(token_types, window, torch.float32)[0, 0] == 0  # (L', L') True = attend
        assert mask.dtype == torch.bool and mask.shape[-2:] == expected.shape
        assert torch.equal(mask[0, 0], expected), f"layer {index}"
    # The hand reference itself: the first kept token of the first image sees the last one (both ways), and
    # no token of the second image; sliding layers cut the text far behind.
    first_image = (token_types[0] == 1).nonzero().flatten()[:5]
    second_image = (token_types[0] == 1).nonzero().flatten()[5:]
    full = ref.hand_mask(token_types, None, torch.float32)[0, 0] == 0
    assert bool(full[first_image[0], first_image[-1]]) and bool(full[first_image[-1], first_image[0]])
    assert not bool(full[first_image[0], second_image].any())
    sliding = ref.hand_mask(token_types, 8, torch.float32)[0, 0] == 0
    assert not bool(sliding[-1, : len(kept) - 8].any()) and bool(sliding[-1, -8:].all())


def test_the_cache_holds_fewer_tokens_in_pruned_layers_and_a_window_in_sliding_ones(model) -> None:
    """After a pruned prefill (K = 2): layers 0-1 cached the whole prompt, layers 2-3 the kept sequence; a
    sliding layer stores only its last window - 1 keys of what it saw (transformers' sliding cache layer)."""
    from transformers import DynamicCache

    inputs = ref.sample_inputs(1)  # 2 images of 16 tokens, keep 3 each
    length = inputs["input_ids"].shape[1]
    pruned = length - 2 * (16 - 3)
    config = model.model.language_model.config
    cache = DynamicCache(config=config)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)):
        # The cache's keyword of this transformers release (`cache` from 5.24, `past_key_values` before).
        keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(**inputs, **{keyword: cache}, use_cache=True)
    window = config.sliding_window
    for index, kind in enumerate(config.layer_types):
        seen = length if index < 2 else pruned
        stored = min(seen, window - 1) if kind == "sliding_attention" else seen
        assert cache.get_seq_length(index) == seen, index
        assert cache.layers[index].keys.shape[-2] == stored, index


def test_without_token_types_pruned_layers_stay_causal(model) -> None:
    """Called without token_type_ids the untouched model is causal everywhere; so are the pruned layers."""
    inputs = {key: value for key, value in ref.sample_inputs(0).items() if key != "token_type_ids"}
    with torch.no_grad():
        untouched = model(**inputs).logits
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=1)):
            pruned = model(**inputs).logits
    torch.testing.assert_close(pruned, untouched, atol=1e-5, rtol=0)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)) as pruner:
        pruned = model(**inputs).logits
    kept = ref.kept_positions(inputs, pruner.last_record.kept_raster[0])
    causal = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}  # no block in the reference
    torch.testing.assert_close(pruned, ref.reference_pruned_logits(model, causal, 2, kept), atol=1e-5, rtol=0)


def test_the_adapter_is_found_by_class_and_model_type(model) -> None:
    assert ADAPTERS.get("gemma3") is Gemma3Adapter
    assert Gemma3Adapter.matches(model) and Gemma3Adapter.matches_config(model.config)
    assert type(Gemma3Adapter.facts(model.config)).__name__ == "ModelFacts"
    assert Gemma3Adapter.facts(model.config).image_tokens == 16


def test_other_layer_kinds_are_refused_clearly() -> None:
    odd = build_tiny_gemma3(text_layers=2, layer_types=["sliding_attention", "full_attention"])
    odd.model.language_model.config.layer_types = ["chunked_attention", "full_attention"]
    with pytest.raises(NotImplementedError, match="chunked_attention"):
        Pruner(odd, build_strategy("fastv", keep=3, layer=1))


def test_vision_tower_requests_are_refused(model) -> None:
    refusal = r"fastervlm scores with the vision tower's .* gemma3 models do not give"
    with pytest.raises(ValueError, match=refusal):
        Pruner(model, build_strategy("fastervlm", keep=3, layer=2))


# ------------------------------------------------------------------------------- python src/run.py, offline

# strategy -> its overrides on the 4-layer tiny model (SparseVLM's preset layers are a 7B's)
PIPELINE_METHODS = {
    "fastv": [],
    "pore_linear": [],
    "pore_exponential": [],
    "pdrop": [],
    "sparsevlm": ["strategy.layer=[1,2,3]"],
    "pool": [],
    "random": [],
    "dart": [],
    "divprune": [],
    "himap": [],
    "tokencarve": [],
}


@pytest.fixture(scope="session")
def gemma3_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    from pore.testing.tiny_gemma3 import build_tiny_gemma3_checkpoint

    return build_tiny_gemma3_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gemma3")


@pytest.fixture(scope="module")
def vqa_benchmark(tmp_path_factory: pytest.TempPathFactory):
    from pipeline_fixtures import write_vqa_parquet

    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=3)


@pytest.mark.parametrize("strategy", PIPELINE_METHODS)
def test_run_py_end_to_end_on_a_tiny_checkpoint(gemma3_checkpoint, vqa_benchmark, tmp_path, strategy) -> None:
    """`python src/run.py model.path=<tiny gemma3> strategy=<method>`: the real Gemma3Processor (PIL
    preprocessing), a padded batch, generation with the pruned cache; every sample predicted once."""
    import json

    from pipeline_fixtures import run_program

    out = tmp_path / strategy
    result = run_program(
        f"model.path={gemma3_checkpoint}",
        "model.name=tiny_gemma3",
        "data=vqav2",
        f"data.path={vqa_benchmark}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=2",
        "data.num_workers=0",
        "logger=none",
        "figures.enabled=false",
        f"output_dir={out}",
        f"strategy={strategy}",
        "strategy.keep=4",
        *PIPELINE_METHODS[strategy],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(row["question_id"] for row in rows) == sorted({row["question_id"] for row in rows})
    assert len(rows) == 3


def test_fastervlm_is_refused_with_the_reason(gemma3_checkpoint, vqa_benchmark, tmp_path) -> None:
    """SigLIP has no [CLS]: FasterVLM is refused in one line (exit 2) before the weights load, saying why."""
    from pipeline_fixtures import run_program

    result = run_program(
        f"model.path={gemma3_checkpoint}",
        "data=vqav2",
        f"data.path={vqa_benchmark}",
        "data.config=null",
        "data.split=test",
        "logger=none",
        "figures.enabled=false",
        f"output_dir={tmp_path / 'x'}",
        "strategy=fastervlm",
        "strategy.keep=4",
    )
    assert result.returncode == 2  # one line, before the weights load
    assert "fastervlm scores with the vision tower's [CLS] attention" in result.stderr
    assert "gemma3 models do not give" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x" / "predictions.jsonl").exists()


@pytest.mark.parametrize("name", ["gemma3_4b", "gemma3_12b", "gemma3_27b"])
def test_real_checkpoints_compose_and_are_refused_clearly_offline(name: str, tmp_path) -> None:
    from pipeline_fixtures import run_program

    result = run_program(
        f"model={name}", "data.limit=2", "logger=none", "figures.enabled=false", f"output_dir={tmp_path}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"google/{name.replace('gemma3_', 'gemma-3-')}-it" in last
    assert "hub id that is not in the local cache" in last and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- layer kinds in another family


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sliding_layers_with_one_shared_rope_keep_everything_as_the_untouched_model(attn: str) -> None:
    """The refusal of sliding-window layers is lifted for every family: a tiny Qwen2-VL whose text layers
    alternate sliding (window 6, shorter than the prompt) and full attention, with one RoPE for both kinds,
    gives the untouched logits when everything is kept (pruning from a full layer and from a sliding one)."""
    from transformers import Qwen2VLForConditionalGeneration

    import qwen_reference as q
    from pore.testing.tiny_qwen import tiny_qwen_config

    config = tiny_qwen_config("qwen2_vl", len(q.processor("qwen2_vl").tokenizer))
    text = config.text_config
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 6, 0
    text.layer_types = ["sliding_attention", "full_attention"] * 2
    config._attn_implementation = text._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        qwen = Qwen2VLForConditionalGeneration(config).eval()
    inputs = q.sample_inputs("qwen2_vl", 1)
    assert inputs["input_ids"].shape[1] > 6
    with torch.no_grad():
        untouched = qwen(**inputs).logits
        for layer in (1, 2):
            with Pruner(qwen, build_strategy("fastv", keep=None, ratio=1.0, layer=layer)):
                kept = qwen(**inputs).logits
            torch.testing.assert_close(kept, untouched, atol=1e-5, rtol=0)
