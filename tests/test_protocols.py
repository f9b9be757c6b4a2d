"""Evaluation protocols (`protocol=default|llava|lmms_eval`): prompts, preprocessing, answer rules, wiring.

Every expected prompt below is written out by hand from the official code (haotian-liu/LLaVA
`llava/eval/model_vqa_*.py`, `llava/conversation.py`; lmms-eval `lmms_eval/tasks/*/utils.py` and yaml), for
rows in the benchmarks' real column schemas read back from local parquet files. The benchmarks are built
from the composed Hydra config, so the protocol files in `conf/protocol/` and each benchmark's variants in
`conf/data/<name>.yaml` (`protocols:`) are what is tested.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from benchmark_tables import image_cell, vqav2_row, write_table
from conftest import build_tiny_llava
from pipeline_fixtures import run_program
from pore import build_strategy
from pore.adapters import ADAPTERS
from pore.app.config import build_benchmark, build_benchmark_protocol, build_protocol
from pore.app.evaluation import predictions
from pore.app.identity import register_resolvers
from pore.assets import asset_path
from pore.data import Benchmark, PromptCollator, Sample
from pore.data.loading import open_stream
from pore.data.protocol import BenchmarkProtocol, Protocol, expand2square, mean_colour, vicuna_v1_prompt
from pore.engine import Pruner
from pore.metrics import METRICS
from pore.metrics.answer_rules import (
    evalai_normalize,
    llava_fork_scienceqa_letter,
    llava_gqa_answer,
    llava_scienceqa_letter,
    lmms_eval_mme_answer,
    lmms_eval_pope_answer,
    lmms_eval_scienceqa_letter,
    mmbench_letter,
)
from pore.metrics.normalize import normalize_vqa
from pore.presets import compose_preset

CONF = Path(__file__).resolve().parent.parent / "conf"
PROTOCOLS = ("default", "llava", "lmms_eval")
SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Compose = Callable[..., DictConfig]


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield functools.cache(lambda *overrides: hydra.compose("config", overrides=list(overrides)))


def benchmark_for(compose: Compose, protocol: str, data: str, path: Path) -> Benchmark:
    """The benchmark of `protocol=<protocol> data=<data>` (the data path only reaches the stream source, so
    the composition is shared by every test that reads the same benchmark under the same protocol)."""
    return build_benchmark(compose(f"protocol={protocol}", f"data={data}"))[0]


def variant(compose: Compose, protocol: str, data: str) -> BenchmarkProtocol:
    """The benchmark's settings under `protocol=<protocol> data=<data>`."""
    return build_benchmark_protocol(compose(f"protocol={protocol}", f"data={data}"))


def texts(compose: Compose, data: str, path: Path, config: str | None, split: str) -> dict[str, list[str]]:
    """{protocol: the prompt text of every row}."""
    rows = list(open_stream(str(path), config, split))
    return {
        protocol: [benchmark_for(compose, protocol, data, path).to_sample(row).text for row in rows]
        for protocol in PROTOCOLS
    }


# ----------------------------------------------------------------------------------------------- configs


def test_every_protocol_file_composes_and_builds(compose: Compose) -> None:
    files = sorted(path.stem for path in (CONF / "protocol").glob("*.yaml"))
    assert files == sorted(PROTOCOLS)
    for name in files:
        protocol = build_protocol(compose(f"protocol={name}"))
        assert protocol.name == name
    assert build_protocol(compose()).name == "default"  # the default list picks today's behaviour


def test_protocol_settings_per_benchmark(compose: Compose) -> None:
    llava = build_protocol(compose("protocol=llava"))
    lmms = build_protocol(compose("protocol=lmms_eval"))
    default = build_protocol(compose())

    def tokens(protocol: str, *benchmarks: str) -> list[int]:
        return [variant(compose, protocol, benchmark).max_new_tokens for benchmark in benchmarks]

    # model_vqa_loader.py's 128; model_vqa_science / model_vqa_mmbench 1024.
    assert tokens("llava", "gqa", "pope", "scienceqa_img", "mmbench") == [128, 128, 1024, 1024]
    # Each lmms-eval task yaml's generation_kwargs.max_new_tokens.
    assert tokens("lmms_eval", "gqa", "vqav2", "mme", "scienceqa_img", "pope", "mmbench") == [
        16,
        16,
        16,
        16,
        128,
        1024,
    ]
    assert tokens("default", "gqa", "mmbench") == [16, 16]
    # expand2square for LLaVA-1.5 only (the adapter's pads_to_square); lmms-eval's llava class keeps MMBench /
    # ScienceQA "original".
    llava_15, llava_next = ADAPTERS.get("llava").pads_to_square, ADAPTERS.get("llava_next").pads_to_square
    mmbench = variant(compose, "llava", "mmbench")
    assert mmbench.pads(llava_15) and not mmbench.pads(llava_next)
    assert variant(compose, "lmms_eval", "gqa").pads(llava_15)
    assert not variant(compose, "lmms_eval", "mmbench").pads(llava_15)
    assert not variant(compose, "lmms_eval", "scienceqa_img").pads(llava_15)
    assert not variant(compose, "default", "gqa").pads(llava_15)
    assert llava.conversation_for("llava") == "vicuna_v1" and llava.conversation_for("qwen2_vl") is None
    assert default.conversation_for("llava") is None
    assert lmms.processor_options("qwen2_vl") == {"min_pixels": 3136, "max_pixels": 602112}
    assert lmms.processor_options("qwen2_5_vl") == {"min_pixels": 200704, "max_pixels": 1605632}
    assert lmms.processor_options("llava") == {} and llava.processor_options("qwen2_vl") == {}


# The protocol files before each benchmark's data config held its variants (issue 17), verbatim: every
# benchmark keeps its token limit, answer rule, padding and prompt options under every protocol, and a run
# folder's config.yaml from then is still read the same (build_protocol's legacy maps).
PROTOCOL_FILES_BEFORE_ISSUE_17 = {
    "default": """
name: default
conversation: {}
pad_to_square: {}
max_new_tokens: {default: 16}
answer_rule: {}
prompt: {}
processor: {}
""",
    "llava": """
name: llava
conversation: {llava: vicuna_v1}
pad_to_square: {default: true}
max_new_tokens: {default: 128, scienceqa_img: 1024, mmbench: 1024}
answer_rule:
  scienceqa_img: llava_scienceqa
  mmbench: mmbench
  pope: pope
  mme: mme_prefix
  gqa: llava_gqa
  textvqa: evalai
prompt:
  textvqa: {ocr: true}
processor: {}
""",
    "lmms_eval": """
name: lmms_eval
conversation: {llava: vicuna_v1}
pad_to_square: {default: true, mmbench: false, scienceqa_img: false}
max_new_tokens:
  default: 16
  gqa: 16
  vqav2: 16
  mme: 16
  scienceqa_img: 16
  pope: 128
  textvqa: 1024
  mmbench: 1024
answer_rule:
  scienceqa_img: lmms_eval_scienceqa
  mmbench: mmbench
  pope: lmms_eval_pope
  mme: mme_prefix
  textvqa: evalai
  vqav2: evalai
prompt:
  textvqa: {ocr: false}
processor:
  qwen2_vl: {min_pixels: 3136, max_pixels: 602112}
  qwen2_5_vl: {min_pixels: 200704, max_pixels: 1605632}
""",
}


# Issue 20 made `default` / `llava` follow the official scorers and `lmms_eval` lmms-eval 0.7: these answer
# rules are the only settings that changed since the protocol files above.
ANSWER_RULES_CHANGED_BY_ISSUE_20: dict[tuple[str, str], str] = {
    ("default", "gqa"): "llava_gqa",  # GQA's convert_gqa_for_eval.py + eval.py
    ("default", "mme"): "mme_calculation",  # MME's calculation.py
    ("llava", "mme"): "mme_calculation",
    ("llava", "pope"): "llava_pope",  # eval_pope.py, case-sensitive
    ("llava", "vqav2"): "llava_vqav2",  # convert_vqav2_for_submission.py's EvalAI processor
    ("lmms_eval", "gqa"): "lmms_eval_exact",  # lmms-eval's exact_match keeps whitespace
    ("lmms_eval", "vqav2"): "vqa",  # vqav2_process_results no longer word-tokenizes
}


def data_file(name: str) -> dict[str, Any]:
    """conf/data/<name>.yaml as Hydra composes it: the file itself (test_configs checks that composing one
    without a `defaults:` list gives exactly its content), or composed with what it inherits (a subset)."""
    own = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"))
    return compose_preset("data", name) if "defaults" in own else own


def test_every_benchmark_keeps_its_settings_under_every_protocol() -> None:
    """For every conf/data file (subsets included) and protocol: the same settings as the per-benchmark maps
    of the protocol files before issue 17 gave, and a saved config in that old form is read the same."""
    names = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))
    assert len(names) >= 11
    for protocol, text in PROTOCOL_FILES_BEFORE_ISSUE_17.items():
        old_protocol = OmegaConf.to_container(OmegaConf.create(text))
        new_protocol = OmegaConf.load(CONF / "protocol" / f"{protocol}.yaml")  # no `defaults:` list
        old = build_protocol(OmegaConf.create({"protocol": old_protocol}))
        new = build_protocol(OmegaConf.create({"protocol": new_protocol}))
        assert (old.name, old.conversation, old.processor) == (new.name, new.conversation, new.processor)
        for name in names:
            data = data_file(name)
            now = OmegaConf.create({"protocol": new_protocol, "data": data})
            saved = OmegaConf.create({"protocol": old_protocol, "data": {"benchmark": data["benchmark"]}})
            expected = build_benchmark_protocol(saved)
            changed = ANSWER_RULES_CHANGED_BY_ISSUE_20.get((protocol, data["benchmark"]))
            if changed is not None:
                expected = dataclasses.replace(expected, answer_rule=changed)
            assert build_benchmark_protocol(now) == expected, (protocol, name)


def test_bad_protocol_settings_say_what_is_valid() -> None:
    with pytest.raises(
        ValueError, match="unknown protocol 'llava2'; choose one of: default, llava, lmms_eval"
    ):
        Protocol.from_mapping({"name": "llava2"})
    with pytest.raises(ValueError, match="unknown template 'chatml'; choose one of: vicuna_v1"):
        Protocol.from_mapping({"name": "llava", "conversation": {"llava": "chatml"}})
    with pytest.raises(ValueError, match=r"unknown protocol settings \['prompts'\]"):
        Protocol.from_mapping({"name": "llava", "prompts": {}})
    with pytest.raises(ValueError, match="unknown multiple-choice answer rule 'strict'"):
        METRICS["multiple_choice"](rule="strict")
    llava = Protocol.from_mapping({"name": "llava", "benchmark_defaults": {"max_new_tokens": 128}})
    with pytest.raises(ValueError) as caught:
        llava.for_benchmark({"llava": {"max_new_token": 64}})
    assert str(caught.value) == (
        "data.protocols.llava: unknown settings ['max_new_token']; a benchmark's protocol entry has "
        "['answer_rule', 'max_new_tokens', 'pad_to_square', 'prompt']"
    )
    with pytest.raises(ValueError) as caught:
        llava.for_benchmark({"lava": {}})
    assert str(caught.value) == (
        "data.protocols: unknown protocols ['lava']; choose among: default, llava, lmms_eval"
    )
    with pytest.raises(ValueError, match=r"data\.protocols\.llava\.max_new_tokens must be an integer >= 1"):
        llava.for_benchmark({"llava": {"max_new_tokens": 0}})
    with pytest.raises(ValueError, match=r"protocol\.benchmark_defaults: unknown settings \['tokens'\]"):
        Protocol.from_mapping({"name": "default", "benchmark_defaults": {"tokens": 8}})
    # A benchmark's own entry wins setting by setting; what it leaves out comes from the protocol.
    assert llava.for_benchmark({"llava": {"answer_rule": "pope"}, "default": {"max_new_tokens": 4}}) == (
        BenchmarkProtocol("llava", max_new_tokens=128, answer_rule="pope")
    )


# ----------------------------------------------------------------------------------------------- prompts


def test_short_answer_prompts_under_every_protocol(compose: Compose, tmp_path: Path) -> None:
    """VQAv2 and GQA: the question and the short-answer suffix under all three protocols."""
    write_table(
        tmp_path / "vqav2", "vqav2", [vqav2_row(7, "What color is the bus?", ["red"] * 10, image_cell(3, 2))]
    )
    assert texts(compose, "vqav2", tmp_path / "vqav2", None, "test") == {
        p: ["What color is the bus?\nAnswer the question using a single word or phrase."] for p in PROTOCOLS
    }
    row = {"id": "q1", "imageId": "n1", "question": "Is the cup on the left?", "answer": "yes"}
    for protocol in PROTOCOLS:
        gqa = benchmark_for(compose, protocol, "gqa", tmp_path)
        gqa.prepare(lambda config, split: [{"id": "n1", "image": image_cell(2, 2)}])
        assert (
            gqa.to_sample(row).text
            == "Is the cup on the left?\nAnswer the question using a single word or phrase."
        )


TEXTVQA_FEATURES = datasets.Features(
    {
        "image_id": datasets.Value("string"),
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "image": datasets.Image(),
        "answers": datasets.Sequence(datasets.Value("string")),
        "ocr_tokens": datasets.Sequence(datasets.Value("string")),
        "set_name": datasets.Value("string"),
    }
)


def test_textvqa_prompts(compose: Compose, tmp_path: Path) -> None:
    """LLaVA-1.5's question file and lmms-eval capitalise the question (str.capitalize); LLaVA-1.5's adds the
    OCR tokens."""
    row = {
        "image_id": "003a8ae2ef43b901",
        "question_id": 34602,
        "question": "what is the brand of this Camera?",
        "image": image_cell(6, 4),
        "answers": ["dakota"] * 10,
        "ocr_tokens": ["DAKOTA", "digital", "1"],
        "set_name": "val",
    }
    tmp_path.mkdir(exist_ok=True)
    datasets.Dataset.from_list([row], features=TEXTVQA_FEATURES).to_parquet(
        str(tmp_path / "validation-00000-of-00001.parquet")
    )
    assert texts(compose, "textvqa", tmp_path, None, "validation") == {
        "default": ["what is the brand of this Camera?\nAnswer the question using a single word or phrase."],
        "llava": [  # LLaVA's question file is str.capitalize()d as well (issue 20)
            "What is the brand of this camera?\nReference OCR token: DAKOTA, digital, 1\n"
            "Answer the question using a single word or phrase."
        ],
        "lmms_eval": [
            "What is the brand of this camera?\nAnswer the question using a single word or phrase."
        ],
    }


def test_pope_and_mme_prompts(compose: Compose, tmp_path: Path) -> None:
    """lmms-eval strips the POPE question; MME drops " Please answer yes or no." after stripping."""
    pope = {
        "id": "0",
        "question_id": "1",
        "question": "Is there a dog in the image? ",
        "answer": "yes",
        "image_source": "COCO_val2014_000000001",
        "image": image_cell(3, 3),
        "category": "adversarial",
    }
    write_table(tmp_path / "pope", "pope", [pope])
    assert texts(compose, "pope", tmp_path / "pope", None, "test") == {
        "default": ["Is there a dog in the image? \nAnswer the question using a single word or phrase."],
        "llava": ["Is there a dog in the image? \nAnswer the question using a single word or phrase."],
        "lmms_eval": ["Is there a dog in the image?\nAnswer the question using a single word or phrase."],
    }
    mme = {
        "question_id": "code_reasoning/0020.png",
        "image": image_cell(3, 3),
        "question": "Is this a python code?  Please answer yes or no.",
        "answer": "Yes",
        "category": "code_reasoning",
    }
    write_table(tmp_path / "mme", "mme", [mme])
    assert texts(compose, "mme", tmp_path / "mme", None, "test") == {
        "default": ["Is this a python code?\nAnswer the question using a single word or phrase."],
        "llava": ["Is this a python code?\nAnswer the question using a single word or phrase."],
        "lmms_eval": ["Is this a python code? \nAnswer the question using a single word or phrase."],
    }


def test_scienceqa_prompts(compose: Compose, tmp_path: Path) -> None:
    """A hint becomes "Context: ...", an empty one nothing; lmms-eval keeps the hint's own whitespace."""
    rows = [
        {
            "image": image_cell(7, 2),
            "question": "Which animal eats grass?",
            "choices": ["rabbit", "hawk", "snake"],
            "answer": 0,
            "hint": "The diagram shows a food web. ",
            "task": "closed choice",
            "subject": "natural science",
        },
        {
            "image": image_cell(2, 7),
            "question": "Which pole of the magnet is marked?",
            "choices": ["north", "south"],
            "answer": 1,
            "hint": "",
            "task": "closed choice",
            "subject": "natural science",
        },
    ]
    write_table(tmp_path / "ScienceQA-IMG", "scienceqa_img", rows)
    stripped = [
        "Context: The diagram shows a food web.\nWhich animal eats grass?\nA. rabbit\nB. hawk\nC. snake\n"
        "Answer with the option's letter from the given choices directly.",
        "Which pole of the magnet is marked?\nA. north\nB. south\n"
        "Answer with the option's letter from the given choices directly.",
    ]
    assert texts(compose, "scienceqa_img", tmp_path, "ScienceQA-IMG", "test") == {
        "default": stripped,
        "llava": stripped,
        "lmms_eval": [
            "Context: The diagram shows a food web. \nWhich animal eats grass?\nA. rabbit\nB. hawk\n"
            "C. snake\nAnswer with the option's letter from the given choices directly.",
            stripped[1],
        ],
    }


def test_scienceqa_llava_prompt_has_no_double_spaces(compose: Compose, tmp_path: Path) -> None:
    """LLaVA's question file applies .replace("  ", " ") once to the prompt's body: a raw hint's double space
    becomes one (three become two), the default keeps them; the instruction follows unchanged."""
    row = {
        "image": image_cell(7, 2),
        "question": "Which animal  eats grass?",
        "choices": ["rabbit", "hawk"],
        "answer": 0,
        "hint": "Read the text.  Then   answer.",
        "task": "closed choice",
        "subject": "natural science",
    }
    write_table(tmp_path / "ScienceQA-IMG", "scienceqa_img", [row])
    got = texts(compose, "scienceqa_img", tmp_path, "ScienceQA-IMG", "test")
    instruction = "Answer with the option's letter from the given choices directly."
    assert got["llava"] == [
        f"Context: Read the text. Then  answer.\nWhich animal eats grass?\nA. rabbit\nB. hawk\n{instruction}"
    ]
    assert got["default"] == [
        "Context: Read the text.  Then   answer.\nWhich animal  eats grass?\nA. rabbit\nB. hawk\n"
        + instruction
    ]


def test_mmbench_llava_reads_empty_cells_as_nan(compose: Compose, tmp_path: Path) -> None:
    """LLaVA reads MMBench's TSV with pandas: an empty hint or option is NaN, so no leading "\n" and the
    options stop before it (no empty "C. ")."""
    write_table(tmp_path / "en", "mmbench", [mmbench_row(14, "", ["stop", "go", "", None])], split="dev")
    got = texts(compose, "mmbench", tmp_path, "en", "dev")
    assert got["llava"] == [
        "What does the sign say?\nA. stop\nB. go\nAnswer with the option's letter from the given choices "
        "directly."
    ]


def mmbench_row(index: int, hint: str | None, options: list[str | None]) -> dict[str, Any]:
    a, b, c, d = options
    return {
        "index": index,
        "question": "What does the sign say?",
        "hint": hint,
        **{"A": a, "B": b, "C": c, "D": d},
        "answer": "A",
        "category": "ocr",
        "image": image_cell(4, 4),
        "source": "MMBench",
        "split": "dev",
    }


def test_mmbench_prompts(compose: Compose, tmp_path: Path) -> None:
    """LLaVA: "hint\\nquestion\\nA. ..." up to the first missing option; lmms-eval: "hint question There are
    several options:\\nA. ...", a blank line, then the instruction."""
    rows = [
        mmbench_row(12, "Look at the sign.", ["stop", "go", "wait", None]),
        mmbench_row(13, None, ["go", None, "stop", "nan"]),
    ]
    write_table(tmp_path / "en", "mmbench", rows, split="dev")
    assert texts(compose, "mmbench", tmp_path, "en", "dev") == {
        "default": [
            "Look at the sign.\nWhat does the sign say?\nA. stop\nB. go\nC. wait\n"
            "Answer with the option's letter from the given choices directly.",
            "What does the sign say?\nA. go\nC. stop\n"
            "Answer with the option's letter from the given choices directly.",
        ],
        "llava": [
            "Look at the sign.\nWhat does the sign say?\nA. stop\nB. go\nC. wait\n"
            "Answer with the option's letter from the given choices directly.",
            "What does the sign say?\nA. go\n"
            "Answer with the option's letter from the given choices directly.",
        ],
        "lmms_eval": [
            "Look at the sign. What does the sign say? There are several options:\nA. stop\nB. go\n"
            "C. wait\n\nAnswer with the option's letter from the given choices directly.",
            "What does the sign say? There are several options:\nA. go\nC. stop\n\n"
            "Answer with the option's letter from the given choices directly.",
        ],
    }
    llava = benchmark_for(compose, "llava", "mmbench", tmp_path)
    sample = llava.to_sample(list(open_stream(str(tmp_path), "en", "dev"))[1])
    assert sample.meta == {"options": ["go"], "group": 13}  # the letters the prompt listed


# ----------------------------------------------------------------------------------- conversation, images


@pytest.fixture(scope="module")
def processor() -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(asset_path("tiny-llava"))


def test_vicuna_v1_prompt_and_the_models_own_template(processor: Any) -> None:
    """conv_vicuna_v1.get_prompt() with "<image>\\n" + text: system, " USER: ", the turn, " ASSISTANT:"."""
    assert vicuna_v1_prompt("What is it?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is it? ASSISTANT:"
    )
    sample = Sample("q", "What is it?", ["cat"], Image.new("RGB", (4, 4)))
    assert PromptCollator(processor, conversation="vicuna_v1")([sample]).prompts == [
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    ]
    assert PromptCollator(processor)([sample]).prompts == ["USER: <image>\nWhat is it? ASSISTANT:"]


def test_expand2square_by_hand() -> None:
    """A 3 x 1 (w x h) image becomes 3 x 3 with the content on row (3 - 1) // 2 = 1; a 2 x 5 one 5 x 5 with
    the content in columns 1-2 ((5 - 2) // 2 = 1 on the left, two padding columns on the right)."""
    red, bg = (200, 0, 0), (10, 20, 30)
    wide = expand2square(Image.new("RGB", (3, 1), red), bg)
    assert wide.size == (3, 3)
    assert [[wide.getpixel((x, y)) for x in range(3)] for y in range(3)] == [[bg] * 3, [red] * 3, [bg] * 3]
    tall = expand2square(Image.new("RGB", (2, 5), red), bg)
    assert tall.size == (5, 5)
    assert [tall.getpixel((x, 2)) for x in range(5)] == [bg, red, red, bg, bg]
    square = Image.new("RGB", (2, 2), red)
    assert expand2square(square, bg) is square


def test_mean_colour_is_the_official_background(processor: Any) -> None:
    """int(x * 255) of the CLIP mean: (122, 116, 104), the colour llava/conversation.py pads with."""
    assert mean_colour(processor.image_processor) == (122, 116, 104)


def test_collator_pads_to_square_before_the_processor(processor: Any) -> None:
    """With pad_to_square a 64 x 32 image keeps its content in the middle rows and the mean colour above
    and below (normalised to about 0); without, the processor's centre crop leaves only content. The image
    size handed to the pruner stays the original one."""
    red = Sample("q", "What is it?", ["cat"], Image.new("RGB", (64, 32), (255, 0, 0)))
    padded = PromptCollator(processor, pad_to_square=True)([red])
    cropped = PromptCollator(processor)([red])
    pixels = padded.inputs["pixel_values"][0]  # (3, 64, 64)
    mean = torch.tensor(processor.image_processor.image_mean)
    std = torch.tensor(processor.image_processor.image_std)
    background = (torch.tensor([122, 116, 104]) / 255 - mean) / std
    content = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    assert torch.allclose(pixels[:, 2, 32], background, atol=0.01)  # top border
    assert torch.allclose(pixels[:, 61, 32], background, atol=0.01)  # bottom border
    assert torch.allclose(pixels[:, 32, 32], content, atol=0.01)
    assert torch.allclose(cropped.inputs["pixel_values"][0][:, 2, 32], content, atol=0.01)
    assert padded.image_sizes == cropped.image_sizes == [[(32, 64)]]


# ----------------------------------------------------------------------------------------- answer rules


def test_llava_scienceqa_rule() -> None:
    """Upstream eval_science_qa.py (c121f04): the letter exactly, "<letter>. ", or exactly one "The answer is
    <capital><any character>"; within the options. The official verdict is written next to each case."""
    assert llava_scienceqa_letter("B", 3) == "B"
    assert llava_scienceqa_letter("C. snake", 3) == "C"
    assert llava_scienceqa_letter("B\nbecause it eats grass", 3) is None  # upstream: FAILED (no ". ")
    assert llava_scienceqa_letter("I think the answer is A.", 3) is None  # lowercase "the": FAILED
    assert llava_scienceqa_letter("So The answer is A", 3) is None  # nothing after the letter: FAILED
    assert llava_scienceqa_letter("So The answer is A!", 3) == "A"  # "." in the regex is any character
    assert llava_scienceqa_letter("The answer is A. The answer is B.", 3) is None  # two matches: FAILED
    assert llava_scienceqa_letter("D", 3) is None  # not an option
    assert llava_scienceqa_letter(" B", 3) is None  # not stripped: FAILED
    assert llava_scienceqa_letter("C) snake", 3) is None
    assert llava_scienceqa_letter("rabbit", 3) is None
    assert llava_scienceqa_letter("", 3) is None


def test_llava_fork_scienceqa_rule_is_an_option() -> None:
    """The 5200b75 rewrite (the rule before issue 20): newline -> ". ", the first match, no trailing char."""
    assert llava_fork_scienceqa_letter("B\nbecause it eats grass", 3) == "B"  # newline -> ". "
    assert llava_fork_scienceqa_letter("So The answer is A", 3) == "A"
    assert llava_fork_scienceqa_letter("The answer is A. The answer is B.", 3) == "A"
    assert llava_fork_scienceqa_letter("I think the answer is A.", 3) is None
    assert llava_fork_scienceqa_letter("D", 3) is None
    metric = METRICS["multiple_choice"](rule="llava_scienceqa_5200b75")
    metric.update(["B\nbecause", "So The answer is A"], [["B"], ["A"]], options=[["x", "y", "z"]] * 2)
    assert float(metric.compute()["acc"]) == 1.0


def test_lmms_eval_scienceqa_rule() -> None:
    """sqa_process_results (0.7): the letter in any case, or a capital followed by a period; nothing else."""
    assert lmms_eval_scienceqa_letter("B") == "B"
    assert lmms_eval_scienceqa_letter("B. hawk") == "B"
    assert lmms_eval_scienceqa_letter("b") == "B"  # pred.lower() == target: right
    assert lmms_eval_scienceqa_letter(" b ") == "B"  # stripped first
    assert lmms_eval_scienceqa_letter("b. hawk") is None  # lowercase then ".": wrong
    assert lmms_eval_scienceqa_letter("B) hawk") is None
    assert lmms_eval_scienceqa_letter("The answer is B") is None
    metric = METRICS["multiple_choice"](rule="lmms_eval_scienceqa")
    options = [["rabbit", "hawk"]] * 4
    metric.update(["B", "b", "B. hawk", "(B)"], [["B"]] * 4, options=options)
    assert float(metric.compute()["acc"]) == 0.75
    lenient = METRICS["multiple_choice"]()
    lenient.update(["B", "b", "B. hawk", "(B)"], [["B"]] * 4, options=options)
    assert float(lenient.compute()["acc"]) == 1.0


def test_mmbench_can_infer_rule() -> None:
    """The MMBench tool's matching: a lone letter (not "A" in a longer sentence), one delimited letter, or
    exactly one option text inside the answer."""
    options = ["stop", "go", "wait"]
    assert mmbench_letter("B", options) == "B"
    assert mmbench_letter("B. go", options) == "B"
    assert mmbench_letter("The answer is (C).", options) == "C"
    assert mmbench_letter("I would say go", options) == "B"  # the option text
    assert mmbench_letter("go or stop", options) is None  # two option texts
    assert mmbench_letter("A sign that means wait", options) == "C"  # "A" may be an article: text match
    assert mmbench_letter("E", options) == "E"  # A-E whatever the options: then wrong
    assert mmbench_letter("B or C", options) is None


def test_yes_no_and_short_answer_rules() -> None:
    assert [lmms_eval_pope_answer(a) for a in ("Yes", " no ", "Yes.", "yes, there is")] == [
        "yes",
        "no",
        None,
        None,
    ]
    assert [lmms_eval_mme_answer(a) for a in ("Yes.", "N", "None of them", "It is")] == [
        "yes",
        "no",
        "no",
        None,
    ]
    assert llava_gqa_answer("Table.") == "table" and llava_gqa_answer("table ") == "table "
    pope = METRICS["pope"](rule="lmms_eval_pope")
    pope.update(["Yes.", "yes", "no", "No"], [["yes"], ["yes"], ["yes"], ["no"]])
    got = {key: float(value) for key, value in pope.compute().items()}
    # tp 1, fn 1, tn 1 and one unreadable answer: acc 2 / 4, recall 1 / 2.
    assert got["acc"] == 0.5 and got["recall"] == 0.5 and got["precision"] == 1.0
    gqa = METRICS["exact_match"](rule="llava_gqa")
    gqa.update(["Table.", "Red table", "the table"], [["table"], ["red table"], ["table"]])
    assert float(gqa.compute()["acc"]) == pytest.approx(2 / 3)


def test_evalai_word_tokenize_step() -> None:
    """The EvalAI processor drops commas and "?" before the VQA normalisation, which would turn them into
    spaces, and splits off "'s"."""
    assert evalai_normalize("Dakota,Digital") == "dakotadigital"
    assert normalize_vqa("Dakota,Digital") == "dakota digital"
    assert evalai_normalize("Dakota's?") == "dakota 's"
    evalai, vqa = METRICS["vqa_accuracy"](rule="evalai"), METRICS["vqa_accuracy"]()
    for metric in (evalai, vqa):
        metric.update(["Dakota,Digital"], [["dakotadigital"] * 10])
    assert float(evalai.compute()["acc"]) == 1.0 and float(vqa.compute()["acc"]) == 0.0


def test_protocol_rules_reach_the_benchmarks_metric(compose: Compose, tmp_path: Path) -> None:
    assert benchmark_for(compose, "lmms_eval", "scienceqa_img", tmp_path).metric_options() == {
        "rule": "lmms_eval_scienceqa"
    }
    assert benchmark_for(compose, "llava", "scienceqa_img", tmp_path).metric_options() == {
        "rule": "llava_scienceqa"
    }
    assert benchmark_for(compose, "llava", "mmbench", tmp_path).metric_options() == {"rule": "mmbench"}
    assert benchmark_for(compose, "default", "mmbench", tmp_path).metric_options() == {}


# ------------------------------------------------------------------------- MMBench headline, duplicates


def test_mmbench_headline_is_circular_accuracy() -> None:
    """Two rotations of question 12 (one wrong) and question 5 alone (right): circular 1 / 2, listed first."""
    metric = METRICS["multiple_choice"](rule="mmbench")
    metric.update(
        ["A", "B", "D"],
        [["A"], ["C"], ["D"]],
        options=[["stop", "go", "wait"], ["go", "wait", "stop"], ["one", "two", "three", "four"]],
        groups=[12, 12, 5],
    )
    results = metric.compute()
    assert list(results) == ["circular_acc", "acc"]
    assert float(results["circular_acc"]) == 0.5 and float(results["acc"]) == pytest.approx(2 / 3)


def test_merging_warns_about_dropped_duplicate_question_ids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    row = {"question_id": "7", "prediction": "A", "error": None}
    predictions.append_rows(predictions.rank_file(tmp_path, 0), [row, {**row, "prediction": "B"}])
    predictions.append_rows(predictions.rank_file(tmp_path, 1), [{**row, "question_id": "8"}])
    with caplog.at_level(logging.WARNING, logger="pore"):
        merged = predictions.merge(tmp_path)
    assert [(r["question_id"], r["prediction"]) for r in merged] == [("7", "A"), ("8", "A")]
    assert (
        "1 prediction rows were dropped because their question_id repeats an earlier row's ('7')"
        in caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pore"):
        predictions.merge(tmp_path)  # nothing repeats now: no warning
    assert caplog.text == ""


# --------------------------------------------------------------------------------- padding suppression


def test_padding_suppression_is_refused_for_centre_cropped_images() -> None:
    model = build_tiny_llava()
    strategy = build_strategy("fastv", keep=12, prior={"suppress_padding": True})
    with pytest.raises(ValueError, match=r"these images were not padded to a square .* protocol=llava"):
        Pruner(model, strategy, images_padded=False)
    assert Pruner(model, strategy, images_padded=True).strategy.prior.suppress_padding
    assert Pruner(model, build_strategy("fastv", keep=12), images_padded=False).strategy.method == "fastv"


def test_cli_runs_each_protocol_with_the_shipped_model(tmp_path: Path) -> None:
    """`python src/run.py protocol=... data.limit=4` on the embedded model and benchmark: protocol=llava pads
    (so padding suppression runs) and writes the vicuna_v1 prompt; protocol=lmms_eval runs; the default
    protocol (llava-hf centre crop) refuses padding suppression."""
    common = ["data.limit=4", "logger=none", "figures.enabled=false", "strategy=fastv", "strategy.keep=16"]
    llava = run_program(
        "protocol=llava", "strategy.prior.suppress_padding=true", f"output_dir={tmp_path / 'a'}", *common
    )
    assert llava.returncode == 0, llava.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(r["prompt"].startswith(f"{VICUNA_SYSTEM} USER: <image>\n") for r in rows)
    assert "protocol llava" in llava.stdout
    lmms = run_program("protocol=lmms_eval", f"output_dir={tmp_path / 'b'}", *common)
    assert lmms.returncode == 0, lmms.stderr[-3000:]
    assert len((tmp_path / "b" / "predictions.jsonl").read_text().splitlines()) == 4
    refused = run_program("strategy.prior.suppress_padding=true", f"output_dir={tmp_path / 'c'}", *common)
    assert refused.returncode != 0 and "these images were not padded to a square" in refused.stderr


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize(
    ("protocol", "accelerator", "dtype", "expected"),
    [
        ("llava", "gpu", "auto", torch.float16),  # LLaVA's scripts run float16
        ("llava", "cpu", "auto", torch.float32),  # auto on CPU stays float32
        ("llava", "gpu", "bfloat16", torch.bfloat16),  # an explicit model.dtype wins
        ("default", "gpu", "auto", torch.bfloat16),
        ("lmms_eval", "gpu", "auto", torch.bfloat16),
        ("default", "cpu", "float16", torch.float16),
    ],
)
def test_model_dtype_follows_the_protocol_on_a_gpu(
    protocol: str, accelerator: str, dtype: str, expected: torch.dtype
) -> None:
    from pore.app.config import model_dtype

    cfg = OmegaConf.create(
        {
            "protocol": OmegaConf.load(CONF / "protocol" / f"{protocol}.yaml"),
            "model": {"dtype": dtype},
            "trainer": {"accelerator": accelerator},
        }
    )
    assert model_dtype(cfg) == expected


def test_a_bad_protocol_dtype_says_what_is_valid() -> None:
    message = r"protocol\.dtype: unknown precision 'half'; choose one of: float16"
    with pytest.raises(ValueError, match=message):
        Protocol.from_mapping({"name": "llava", "dtype": "half"})
