"""Gemma 4: the token layout against the model's own vision pooler and processor, the KV-sharing limit, and
the prefill that runs the KV-shared layers on the last tokens only.

The contract (tests/test_contract.py, entry "gemma4" of tests/families.py) covers keep-all equality, the kept
set, the pruned forward (per-layer inputs of the kept tokens, shared keys / values, image blocks in the
sliding layers only), padded batches of images of different sizes and cached generation on a tiny Gemma 4.
Here: where the adapter puts each image token (against the model's pooler, for hand-made grids and for the
processor's aspect-preserving resize), what generate() does differently (pre-encoded images, logits_to_keep),
the refusals, and the pipeline's collator.

`python src/run.py` runs end to end on a tiny Gemma 4 checkpoint whose processor is the real class without its
video and audio parts (the video processor needs torchvision, not installable beside this CPU torch build),
registered with `AutoProcessor`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gemma4_reference as ref
from pore import ADAPTERS, Pruner, build_strategy
from pore.adapters.gemma4 import Gemma4Adapter, kv_storing_layers
from pore.data.benchmark import Sample
from pore.data.collate import PromptCollator
from pore.testing.tiny_gemma4 import IMAGE_TOKEN, VIDEO_TOKEN, build_gemma4_processor, build_tiny_gemma4

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends


@pytest.fixture(scope="module")
def model():
    return ref.tiny_model("sdpa")


def pooled_cells(model, positions: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per image, the (row, col) of the patch block each soft token averages, read off the model's own
    pooler: fed each patch's (x, y) as its features, it returns each token's mean patch position."""
    pooler = model.model.vision_tower.pooler
    kernel = model.config.vision_config.pooling_kernel_size
    features = positions.clamp(min=0).float()  # (I, P, 2): x, y
    padding = (positions == -1).all(dim=-1)
    length = positions.shape[1] // kernel**2
    with torch.no_grad():
        pooled, real = pooler(features, positions, padding, output_length=length)
    cells = []
    for image in range(positions.shape[0]):
        means = pooled[image][real[image]] / pooler.root_hidden_size  # (tokens, 2) mean x, mean y
        cells.append([(int(y // kernel), int(x // kernel)) for x, y in means.tolist()])
    return cells


def layout_cells(layout, b: int) -> list[list[tuple[int, int]]]:
    """Per image of sample b, the (row, col) the adapter gives its tokens, in sequence order."""
    images = int(layout.images_per_sample[b])
    return [
        [
            (int(r), int(c))
            for r, c, i, v in zip(
                layout.row[b], layout.col[b], layout.image_index[b], layout.valid[b], strict=True
            )
            if v and i == image
        ]
        for image in range(images)
    ]


def test_layout_places_each_token_where_the_vision_pooler_pools_its_patches(model) -> None:
    """A padded batch of images of different grids: each token's (row, col) and its image's grid are those of
    the patch block the model's pooler averages into it, and each image has as many tokens as its features."""
    inputs = ref.batch_inputs()
    layout = Gemma4Adapter(model).visual_layout(inputs["input_ids"], inputs)
    cells = pooled_cells(model, inputs["image_position_ids"])
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    assert [len(f) for f in features.pooler_output] == [len(c) for c in cells]
    first = 0
    for b, (_, grids, _) in enumerate(ref.PROMPTS):
        assert layout_cells(layout, b) == cells[first : first + len(grids)]
        for image, (rows, cols) in enumerate(grids):
            of_image = layout.valid[b] & (layout.image_index[b] == image)
            assert set(layout.grid_h[b][of_image].tolist()) == {rows}
            assert set(layout.grid_w[b][of_image].tolist()) == {cols}
        first += len(grids)
    # Tokens in sequence order, at the image token positions.
    for b in range(len(ref.PROMPTS)):
        expected = (inputs["input_ids"][b] == IMAGE_TOKEN).nonzero().flatten().tolist()
        assert layout.seq_index[b][layout.valid[b]].tolist() == expected


def image(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def processor():
    try:
        return build_gemma4_processor()
    except ModuleNotFoundError as error:  # transformers 5.17's Gemma 4 processor module imports torchvision
        pytest.skip(f"Gemma 4's processor cannot be built here: {error}")


@pytest.fixture(scope="module")
def checkpoint_model(processor):
    return build_tiny_gemma4(vocab_size=len(processor.tokenizer))


def test_layout_of_the_processors_resized_images(processor, checkpoint_model) -> None:
    """The processor resizes a wide and a tall image (aspect ratio kept) to at most 70 tokens: the layout's
    grids are the pooler's, and the token counts the processor's own."""
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(
        text=[text, text],
        images=[[image((40, 60), 1)], [image((50, 30), 2)]],
        return_tensors="pt",
        padding=True,
    )
    layout = Gemma4Adapter(checkpoint_model).visual_layout(inputs["input_ids"], inputs)
    cells = pooled_cells(checkpoint_model, inputs["image_position_ids"])
    assert [layout_cells(layout, b) for b in range(2)] == [[cells[0]], [cells[1]]]
    counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist()
    assert counts == [len(cells[0]), len(cells[1])] and max(counts) <= 70
    grids = [(int(layout.grid_h[b][0]), int(layout.grid_w[b][0])) for b in range(2)]
    assert grids[0][0] < grids[0][1] and grids[1][0] > grids[1][1]  # wide, then tall


def test_generate_places_tokens_from_the_vision_towers_own_call(model) -> None:
    """generate() may encode the images before the prefill and not hand the forward image_position_ids
    (transformers >= 5.23): the layout then comes from the vision tower's call, as in a plain forward."""
    inputs = ref.batch_inputs()
    expected = Gemma4Adapter(model).visual_layout(inputs["input_ids"], inputs)
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)) as pruner:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    layout = pruner.last_record.layout
    for name in ("row", "col", "grid_h", "grid_w", "image_index", "seq_index", "valid"):
        assert torch.equal(getattr(layout, name), getattr(expected, name)), name


@pytest.mark.parametrize(("attn", "keep"), [("sdpa", 1), ("eager", 1), ("eager", 3)])
def test_logits_to_keep_runs_the_shared_layers_on_the_last_tokens_as_the_full_forward(attn, keep) -> None:
    """With an integer logits_to_keep the model runs its KV-shared layers on the last tokens only; the
    pruned layers' masks and RoPE are cut to them: the logits are the last rows of the full pruned forward."""
    model = ref.tiny_model(attn)
    inputs = ref.sample_inputs(1)
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=3, layer=2)):
        full = model(**inputs).logits
        last = model(**inputs, logits_to_keep=keep).logits
    assert last.shape[1] == keep
    torch.testing.assert_close(last, full[:, -keep:], atol=1e-5, rtol=0)


def test_without_token_types_no_image_block_is_built(model) -> None:
    """Called without mm_token_type_ids the model masks image tokens causally: so do the pruned layers."""
    inputs = {k: v for k, v in ref.sample_inputs(0).items() if k != "mm_token_type_ids"}
    assert Gemma4Adapter(model).bidirectional_blocks(inputs["input_ids"], inputs) is None
    with torch.no_grad(), Pruner(model, build_strategy("fastv", keep=3, layer=2)) as pruner:
        pruned = model(**inputs).logits
    kept = ref.kept_positions(0, inputs, pruner.last_record.kept_raster[0])
    causal = {
        **inputs,
        "mm_token_type_ids": torch.zeros_like(inputs["input_ids"]),
    }  # no block in the reference
    torch.testing.assert_close(pruned, ref.reference_pruned_logits(model, causal, 2, kept), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ refusals


def test_the_adapter_is_found_by_class_and_model_type(model) -> None:
    assert ADAPTERS.get("gemma4") is Gemma4Adapter
    assert Gemma4Adapter.matches(model) and Gemma4Adapter.matches_config(model.config)
    assert Gemma4Adapter.facts(model.config).image_tokens is None  # variable resolution


def test_stages_past_the_first_kv_storing_layer_are_refused_before_the_weights(model) -> None:
    """The last 2 of 8 layers reuse the keys / values layers 4 (sliding) and 5 (full) store: a cut at layer 5
    would leave layer 4's stored keys unpruned. Refused from the config alone, in one line."""
    config = model.config
    assert kv_storing_layers(config.get_text_config()) == [4, 5]
    facts = Gemma4Adapter.facts(config)
    assert facts.last_prunable_layer == 4
    with pytest.raises(
        ValueError, match=r"strategy.layer=\[2, 5\] cuts at layer 5, but gemma4 models can only"
    ):
        build_strategy("pdrop", layer=[2, 5], keep=[3, 2], ratio=[0.5, 0.5]).resolve(facts)
    with pytest.raises(ValueError, match=r"layers <= 4: its last 2 layers reuse the keys and values"):
        Pruner(model, build_strategy("fastv", keep=3, layer=5))
    build_strategy("fastv", keep=3, layer=4).resolve(facts)  # the deepest allowed cut


@pytest.mark.parametrize("layer", [4, 6])
def test_without_kv_sharing_every_layer_can_be_cut(layer: int) -> None:
    """No KV-shared layers: no limit; keeping everything at layer 6 gives the untouched logits. With them,
    a cut at the deepest allowed layer (4) keeps everything as the untouched model too."""
    model = build_tiny_gemma4(kv_shared_layers=0 if layer == 6 else 2)
    assert Gemma4Adapter.facts(model.config).last_prunable_layer == (None if layer == 6 else 4)
    inputs = ref.sample_inputs(1)
    with torch.no_grad():
        untouched = model(**inputs).logits
        with Pruner(model, build_strategy("fastv", keep=None, ratio=1.0, layer=layer)):
            kept = model(**inputs).logits
    torch.testing.assert_close(kept, untouched, atol=1e-5, rtol=0)


def test_vision_tower_requests_are_refused(model) -> None:
    with pytest.raises(
        ValueError, match=r"fastervlm scores with the vision tower's .* gemma4 models do not give"
    ):
        Pruner(model, build_strategy("fastervlm", keep=3, layer=2))


def test_video_tokens_are_refused(model) -> None:
    inputs = ref.sample_inputs(0)
    ids = inputs["input_ids"].clone()
    ids[0, 1] = VIDEO_TOKEN
    with pytest.raises(NotImplementedError, match="video tokens is not supported"):
        Gemma4Adapter(model).visual_layout(ids, inputs)


# ---------------------------------------------------------------------------------------------- pipeline


def test_the_pipeline_collator_gives_inputs_the_pruner_runs_on(processor, checkpoint_model) -> None:
    """PromptCollator (chat template + processor, as `python src/run.py` uses it, here the real processor
    class without its video and audio parts): images of different shapes in one padded batch, each sample
    keeping the same tokens and answering the same alone."""
    collate = PromptCollator(processor)
    questions = ["what colour is the circle?", "what shape is in the bottom right of the image?"]
    images = [image((40, 60), seed=1), image((50, 30), seed=2)]
    samples = [
        Sample(str(i), q, ["red"], im) for i, (q, im) in enumerate(zip(questions, images, strict=True))
    ]
    inputs = collate(samples).inputs
    assert {"input_ids", "attention_mask", "pixel_values", "image_position_ids", "mm_token_type_ids"} <= set(
        inputs
    )
    model = checkpoint_model
    with torch.no_grad(), Pruner(model, build_strategy("pore_linear", keep=None, ratio=0.3)) as pruner:
        length = inputs["input_ids"].shape[1]
        answers = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, length:]
        kept = pruner.last_record.kept_raster
        counts = (inputs["input_ids"] == IMAGE_TOKEN).sum(dim=1).tolist()
        assert [len(k[0]) for k in kept] == [round(0.3 * n) for n in counts]
        for b in range(2):
            alone = collate([samples[b]]).inputs
            alone_answer = model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert alone_answer[0, alone["input_ids"].shape[1] :].tolist() == answers[b].tolist()
            assert pruner.last_record.kept_raster == [kept[b]]


# What `python src/run.py model=gemma4_e2b model.path=<tiny> strategy=<s>` does with each method the family
# supports; stages stay at or before layer 4, the tiny model's KV-sharing limit (the refusal: below).
RUNS = {
    "none": [],
    "fastv": [],
    "pore_linear": [],
    "pore_exponential": [],
    "random": [],
    "pool": [],
    "pdrop": ["strategy.layer=[1,2,3]", "strategy.keep=[30,20,10]"],
    "sparsevlm": ["strategy.layer=[1,2,3]", "strategy.keep=[24,16,8]"],
    "dart": [],
    "divprune": [],
    "himap": [],
    "tokencarve": [],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, processor):
    """A tiny Gemma 4 checkpoint whose processor (image-only subclass of the real class) `AutoProcessor`
    finds by the class name the folder records."""
    from transformers import AutoProcessor, Gemma4Config

    from pore.testing.tiny_gemma4 import build_tiny_gemma4_checkpoint, image_only_processor_class

    AutoProcessor.register(Gemma4Config, image_only_processor_class(), exist_ok=True)
    path = build_tiny_gemma4_checkpoint(tmp_path_factory.mktemp("model") / "tiny-gemma4")
    if not isinstance(AutoProcessor.from_pretrained(path), image_only_processor_class()):
        pytest.skip("AutoProcessor here does not load a processor class registered at run time")
    return path


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory):
    from pipeline_fixtures import write_vqa_parquet

    return write_vqa_parquet(tmp_path_factory.mktemp("data") / "vqa", samples=3)


def run(checkpoint, benchmark, out, strategy: str, *extra: str):
    from pipeline_fixtures import run_program

    return run_program(
        "model=gemma4_e2b",
        f"model.path={checkpoint}",
        "data=vqav2",
        f"data.path={benchmark}",
        "data.config=null",
        "data.split=test",
        "data.batch_size=2",
        "data.num_workers=0",
        "logger=none",
        f"output_dir={out}",
        f"strategy={strategy}",
        *extra,
    )


@pytest.mark.parametrize("strategy", sorted(RUNS))
def test_run_py_end_to_end_with_each_method(checkpoint, benchmark, tmp_path, strategy: str) -> None:
    """A padded batch of images of different sizes, generation with the pruned cache (the KV-shared layers
    on the last token only), per-layer FLOPs of a heterogeneous config; every sample predicted once."""
    result = run(checkpoint, benchmark, tmp_path / strategy, strategy, *RUNS[strategy])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / strategy / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all('"error": null' in row for row in rows)


def test_run_py_refuses_a_stage_in_the_kv_shared_layers(checkpoint, benchmark, tmp_path) -> None:
    """PyramidDrop's default stages, scaled to 8 layers, reach layer 6: one line, exit 2, before the
    weights."""
    result = run(checkpoint, benchmark, tmp_path / "pdrop", "pdrop")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "gemma4 models can only be pruned at layers <= 4" in last


@pytest.mark.parametrize("name", ["gemma4_e2b", "gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b"])
def test_real_checkpoints_compose_and_are_refused_clearly_offline(name: str, tmp_path) -> None:
    from pipeline_fixtures import run_program

    result = run_program(
        f"model={name}", "data.limit=2", "logger=none", "figures.enabled=false", f"output_dir={tmp_path}"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    hub = name.replace("gemma4_", "gemma-4-").replace("_", "-").upper().replace("GEMMA-4-", "gemma-4-")
    assert last.startswith("error: ") and f"google/{hub}-it" in last
    assert "hub id that is not in the local cache" in last and "Traceback" not in result.stderr


def test_a_text_only_prompt_runs_untouched(model) -> None:
    """No image tokens: nothing to prune, the untouched logits (the layout needs no patch positions)."""
    ids = torch.tensor([[2, 13, 14, 15, 16, 17]])
    with torch.no_grad():
        untouched = model(input_ids=ids).logits
        with Pruner(model, build_strategy("fastv", keep=3, layer=2)):
            pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, untouched, atol=1e-6, rtol=0)
