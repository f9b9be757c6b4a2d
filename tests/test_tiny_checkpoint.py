"""The tiny LLaVA checkpoint builder: a folder that loads like a real llava-1.5 checkpoint, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from pore import Pruner, build_strategy
from pore.testing.tiny_llava import (
    DEFAULT_WORDS,
    IMAGE_TOKEN,
    build_processor,
    build_tiny_checkpoint,
    build_tokenizer,
    main,
)

pytestmark = pytest.mark.transformers  # reads transformers' internals: CI runs it on both ends

GRID = 8
TOKENS_PER_IMAGE = GRID * GRID


def user_turn(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def images() -> list[Image.Image]:
    """Two images of different sizes and aspect ratios: the processor must resize and crop both."""
    return [Image.new("RGB", (80, 60), (255, 0, 0)), Image.new("RGB", (50, 90), (0, 0, 255))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava", grid=GRID, patch_size=8)


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    # local_files_only: loading must never need the hub.
    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, local_files_only=True)
    return model, processor


def batch(processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    prompts = [
        processor.apply_chat_template(user_turn("What colour is it?"), add_generation_prompt=True),
        processor.apply_chat_template(
            user_turn("How many circles are there? Answer the question using a single word or phrase."),
            add_generation_prompt=True,
        ),
    ]
    return processor(images=images(), text=prompts, padding=True, return_tensors="pt")


def test_saved_folder_is_small_safetensors(checkpoint: Path) -> None:
    assert (checkpoint / "model.safetensors").is_file()
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    assert size < 2_000_000


def test_loads_offline_with_consistent_config(loaded) -> None:
    model, processor = loaded
    tokenizer = processor.tokenizer
    assert isinstance(processor, LlavaProcessor)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_seq_length == TOKENS_PER_IMAGE
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert tokenizer.pad_token_id == 0 == model.generation_config.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert model.generation_config.do_sample is False
    assert model.generation_config.max_new_tokens == 16


def test_chat_template_renders_llava_format(loaded) -> None:
    _, processor = loaded
    prompt = processor.apply_chat_template(user_turn("What colour is it?"), add_generation_prompt=True)
    assert prompt == "USER: <image>\nWhat colour is it? ASSISTANT:"
    without = processor.apply_chat_template(user_turn("What colour is it?"), add_generation_prompt=False)
    assert without == "USER: <image>\nWhat colour is it? "


def test_chat_template_renders_conversations_for_training(loaded) -> None:
    _, processor = loaded
    messages = [
        {"role": "system", "content": "Be brief."},
        *user_turn("What colour is it?"),
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "And the shape?"},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        rendered
        == "Be brief. USER: <image>\nWhat colour is it? ASSISTANT: red</s>USER: And the shape? ASSISTANT:"
    )

    # The answer and its </s> are the assistant tokens a training loss would use.
    encoded = processor.tokenizer.apply_chat_template(
        messages[1:3], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokens = processor.tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assistant = [token for token, flag in zip(tokens, encoded["assistant_masks"], strict=True) if flag]
    assert assistant == ["red", "</s>"]


def test_processor_expands_each_image_to_the_grid(loaded) -> None:
    model, processor = loaded
    prompt = processor.apply_chat_template(user_turn("What colour is it?"), add_generation_prompt=True)
    inputs = processor(images=images()[:1], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == TOKENS_PER_IMAGE
    assert tuple(inputs["pixel_values"].shape) == (1, 3, GRID * 8, GRID * 8)
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_batch_is_left_padded_and_generates(loaded) -> None:
    model, processor = loaded
    inputs = batch(processor)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (ids == model.config.image_token_id).sum(dim=1).tolist() == [TOKENS_PER_IMAGE] * 2
    lengths = mask.sum(dim=1)
    assert lengths[0] < lengths[1]  # different lengths, so the first prompt is padded
    assert mask[:, -1].tolist() == [1, 1]  # left padding: every prompt ends at the last column
    assert mask[0, 0] == 0 and ids[0, 0] == processor.tokenizer.pad_token_id

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4)
    assert output.shape[0] == 2 and output.shape[1] <= ids.shape[1] + 4
    answers = processor.batch_decode(output[:, ids.shape[1] :], skip_special_tokens=True)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)


def test_pruning_engine_runs_on_the_checkpoint(loaded) -> None:
    model, processor = loaded
    inputs = batch(processor)
    with Pruner(model, build_strategy("pore_linear", keep=16)) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=4)
        kept = pruner.last_record.kept_raster
    assert len(kept) == 2
    for sample in kept:
        assert len(sample) == 1  # one image per prompt
        assert len(sample[0]) == 16 == len(set(sample[0]))
        assert all(0 <= index < TOKENS_PER_IMAGE for index in sample[0])


def test_tokenizer_round_trips_words_and_maps_unknown_words_to_unk() -> None:
    tokenizer = build_tokenizer(DEFAULT_WORDS)
    text = "what colour is the circle ?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Lower-casing and punctuation splitting: the same words, written as a question would be.
    assert tokenizer("What colour is the circle?", add_special_tokens=False)["input_ids"] == ids

    ids = tokenizer("what is the zorblax ?", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["what", "is", "the", "<unk>", "?"]

    assert tokenizer("red", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.padding_side == "left"
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_default_vocabulary_covers_the_vqa_suffixes_and_chat_roles() -> None:
    tokenizer = build_tokenizer(DEFAULT_WORDS)
    texts = [
        "USER: ASSISTANT:",
        "Answer the question using a single word or phrase.",
        "Answer with the option's letter from the given choices directly.",
        "A B C D E yes no 0 7 20 twenty top bottom left right middle center upper lower corner half",
    ]
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"], text


def test_image_token_is_special_and_never_split() -> None:
    tokenizer = build_tokenizer(["red"])
    ids = tokenizer(IMAGE_TOKEN * 3 + "\nred", add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert ids == [image_id, image_id, image_id, tokenizer.convert_tokens_to_ids("red")]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "red"


def test_processor_image_size_must_be_a_multiple_of_the_patch() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_processor(image_size=30, patch_size=8)


def test_builder_is_deterministic(tmp_path: Path) -> None:
    small = {"grid": 4, "text_layers": 2}
    first = load_file(build_tiny_checkpoint(tmp_path / "a", seed=3, **small) / "model.safetensors")
    second = load_file(build_tiny_checkpoint(tmp_path / "b", seed=3, **small) / "model.safetensors")
    other = load_file(build_tiny_checkpoint(tmp_path / "c", seed=4, **small) / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_builder_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_checkpoint(tmp_path / "ckpt", grid=4, text_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_command_line_writes_a_checkpoint(tmp_path: Path) -> None:
    main([str(tmp_path / "cli"), "--grid", "4", "--text-layers", "2"])
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "cli", local_files_only=True)
    assert model.config.image_seq_length == 16
    assert model.config.text_config.num_hidden_layers == 2
