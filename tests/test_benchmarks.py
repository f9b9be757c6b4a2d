"""Each registered benchmark, read from a tiny local parquet copy in its real schema, gives the exact prompt.

Every expected value below is written out by hand from the rows the test writes: the prompt text with its
answer instruction (and option lines), the reference answers, the question id, the metric's meta data and
the decoded image's size.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import hashlib
from pathlib import Path
from typing import Any

import datasets
import huggingface_hub.constants
import pytest
from omegaconf import OmegaConf

from benchmark_tables import CORRUPT_IMAGE, image_cell, vqav2_row, write_table
from pore.data import BENCHMARKS, Benchmark, DataError, SampleError
from pore.data.loading import column_names, open_stream

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def read(folder: Path, config: str | None = None, split: str = "test") -> list[dict[str, Any]]:
    """Every row of a local table, as a run streams it (images undecoded)."""
    return list(open_stream(str(folder), config, split))


def build(name: str, **options: Any) -> Benchmark:
    return BENCHMARKS.get(name)(**options)


CONF_DATA = Path(__file__).resolve().parent.parent / "conf" / "data"


def test_the_public_benchmarks_are_registered() -> None:
    """The registry holds every benchmark that a data config names (`benchmark:`; a subset such as
    pope_random inherits its benchmark's file), the public ones (on the hub under `hub_org`) included."""
    configs = [OmegaConf.load(path) for path in sorted(CONF_DATA.glob("*.yaml"))]
    named = {str(config.benchmark) for config in configs if "benchmark" in config}
    public = {str(config.benchmark) for config in configs if "hub_org" in config}
    assert public and public < named  # the embedded spatial benchmark is not on the hub
    assert named <= set(BENCHMARKS.names())


def test_vqav2_prompt_answers_and_image(tmp_path: Path) -> None:
    """VQAv2: ten answer records become ten answer strings; the id is the question_id column."""
    answers = ["red"] * 7 + ["dark red", "maroon", "red"]
    write_table(
        tmp_path, "vqav2", [vqav2_row(262148000, "What color is the bus?", answers, image_cell(5, 3))]
    )
    bench = build("vqav2")
    rows = read(tmp_path)
    bench.check_columns(list(rows[0]))
    sample = bench.to_sample(rows[0])
    assert sample.text == "What color is the bus?\nAnswer the question using a single word or phrase."
    assert sample.answers == ["red", "red", "red", "red", "red", "red", "red", "dark red", "maroon", "red"]
    assert sample.question_id == "262148000"
    assert sample.meta == {}
    assert sample.image.size == (5, 3)
    assert sample.image.mode == "RGB"
    assert sample.image.getpixel((0, 0)) == (200, 30, 30)


def test_textvqa_prompt_answers_and_image(tmp_path: Path) -> None:
    """TextVQA: the answers column is a list of ten strings, kept as is."""
    row = {
        "image_id": "003a8ae2ef43b901",
        "question_id": 34602,
        "question": "what is the brand of this camera?",
        "image": image_cell(6, 4),
        "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota"] * 2,
        "set_name": "val",
    }
    write_table(tmp_path, "textvqa", [row], split="validation")
    sample = build("textvqa").to_sample(read(tmp_path, split="validation")[0])
    assert sample.text == "what is the brand of this camera?" + SHORT
    assert sample.answers == ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota"] * 2
    assert sample.question_id == "34602"
    assert sample.meta == {}
    assert sample.image.size == (6, 4)


def write_gqa(folder: Path) -> Path:
    """GQA's two tables in the lmms-lab layout: one sub-folder per config, `testdev-*` shard files."""

    def question(qid: str, image_id: str, text: str, answer: str) -> dict[str, Any]:
        return {
            "id": qid,
            "imageId": image_id,
            "question": text,
            "answer": answer,
            "fullAnswer": f"The answer is {answer}.",
            "isBalanced": True,
        }

    write_table(
        folder / "testdev_balanced_instructions",
        "gqa_instructions",
        [
            question("201307251", "n161313", "Is it overcast?", "no"),
            question("20515826", "n235859", "Who is wearing the dress?", "woman"),
            question("999", "n404", "What is missing?", "nothing"),
        ],
        split="testdev",
    )
    write_table(
        folder / "testdev_balanced_images",
        "gqa_images",
        [{"id": "n235859", "image": image_cell(8, 2)}, {"id": "n161313", "image": image_cell(4, 7)}],
        split="testdev",
    )
    return folder


def test_gqa_joins_questions_to_the_image_table(tmp_path: Path) -> None:
    """GQA: prepare() reads the image sub-folder; each question gets the image of its imageId."""
    folder = write_gqa(tmp_path)
    bench = build("gqa", image_config="testdev_balanced_images", image_split="testdev")
    bench.prepare(lambda config, split: open_stream(str(folder), config, split))
    assert sorted(bench.images) == ["n161313", "n235859"]
    rows = read(folder, "testdev_balanced_instructions", "testdev")
    bench.check_columns(list(rows[0]))
    assert [row["id"] for row in rows] == ["201307251", "20515826", "999"]

    first, second = bench.to_sample(rows[0]), bench.to_sample(rows[1])
    assert first.text == "Is it overcast?" + SHORT
    assert first.answers == ["no"]
    assert first.question_id == "201307251"
    assert first.meta == {"image_id": "n161313"}
    assert first.image.size == (4, 7)
    assert second.text == "Who is wearing the dress?" + SHORT
    assert second.answers == ["woman"]
    assert second.question_id == "20515826"
    assert second.meta == {"image_id": "n235859"}
    assert second.image.size == (8, 2)

    with pytest.raises(SampleError) as caught:
        bench.to_sample(rows[2])
    assert str(caught.value) == "image 'n404' is not in the image table 'testdev_balanced_images'"
    assert bench.question_id(rows[2]) == "999"  # so the failed row is still recorded under its id


def test_gqa_image_table_without_the_image_column_is_a_data_error(tmp_path: Path) -> None:
    """A GQA image table that lacks the configured image column says which columns it has."""
    folder = write_gqa(tmp_path)
    bench = build("gqa", image_column="picture")
    with pytest.raises(DataError) as caught:
        bench.prepare(lambda config, split: open_stream(str(folder), config, split))
    assert str(caught.value) == (
        "gqa: the image table 'testdev_balanced_images' needs columns 'id' and 'picture'; "
        "it has ['id', 'image']"
    )


def pope_row(category: str, qid: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": f"{category}-{qid}",
        "question_id": qid,
        "question": question,
        "answer": answer,
        "image_source": "COCO_val2014_000000310196",
        "image": image_cell(3, 3),
        "category": category,
    }


@pytest.fixture
def pope_folder(tmp_path: Path) -> Path:
    rows = [
        pope_row("adversarial", "1", "Is there a snowboard in the image?", "yes"),
        pope_row("popular", "1", "Is there a dining table in the image?", "no"),
        pope_row("random", "1", "Is there a car in the image?", "no"),
        pope_row("adversarial", "2", "Is there a person in the image?", "no"),
    ]
    return write_table(tmp_path, "pope", rows)


def test_pope_subset_keeps_only_its_category(pope_folder: Path) -> None:
    """POPE: `subset` keeps one category (keep_row); ids carry the category since ids repeat across them."""
    rows = read(pope_folder)
    adversarial = build("pope", subset="adversarial")
    kept = [row for row in rows if adversarial.keep_row(row)]
    samples = [adversarial.to_sample(row) for row in kept]
    assert [s.question_id for s in samples] == ["adversarial/1", "adversarial/2"]
    assert [s.text for s in samples] == [
        "Is there a snowboard in the image?" + SHORT,
        "Is there a person in the image?" + SHORT,
    ]
    assert [s.answers for s in samples] == [["yes"], ["no"]]
    assert [s.meta for s in samples] == [{"category": "adversarial"}] * 2
    assert samples[0].image.size == (3, 3)

    popular = build("pope", subset="popular")
    assert [popular.question_id(row) for row in rows if popular.keep_row(row)] == ["popular/1"]
    everything = build("pope", subset=None)
    assert [everything.question_id(row) for row in rows if everything.keep_row(row)] == [
        "adversarial/1",
        "popular/1",
        "random/1",
        "adversarial/2",
    ]


def test_pope_unknown_subset_lists_the_valid_ones() -> None:
    """A misspelt POPE subset fails at once and names the three valid subsets."""
    with pytest.raises(DataError) as caught:
        build("pope", subset="adverserial")
    assert str(caught.value) == (
        "pope: unknown subset 'adverserial'; choose one of: adversarial, popular, random (or null for all)"
    )


def test_mme_two_questions_of_an_image_get_distinct_ids(tmp_path: Path) -> None:
    """MME: question_id names the image; the sample id adds a digest of the question, so both stay apart."""
    image_id = "code_reasoning/0020.png"
    questions = [
        "The image shows a python code. Is the output of the code 'Hello'? Please answer yes or no.",
        "The image shows a python code. Is the output of the code 'World'? Please answer yes or no.",
    ]
    rows = [
        {"question_id": image_id, "image": image_cell(9, 5), "question": q, "answer": a, "category": c}
        for q, a, c in zip(questions, ["Yes", "No"], ["code_reasoning"] * 2, strict=True)
    ]
    write_table(tmp_path, "mme", rows)
    bench = build("mme")
    samples = [bench.to_sample(row) for row in read(tmp_path)]

    def digest(question: str) -> str:  # content_id's recipe: repr of each part, NUL-terminated, blake2b-64
        return hashlib.blake2b((repr(question) + "\x00").encode(), digest_size=8).hexdigest()

    assert [s.question_id for s in samples] == [f"{image_id}#{digest(q)}" for q in questions]
    assert samples[0].question_id != samples[1].question_id
    assert [s.text for s in samples] == [
        "The image shows a python code. Is the output of the code 'Hello'?" + SHORT,
        "The image shows a python code. Is the output of the code 'World'?" + SHORT,
    ]
    assert [s.answers for s in samples] == [["Yes"], ["No"]]
    assert [s.meta for s in samples] == [{"category": "code_reasoning", "image_id": image_id}] * 2
    assert samples[1].image.size == (9, 5)
    assert bench.metric_extras([s.meta for s in samples]) == {
        "categories": ["code_reasoning", "code_reasoning"],
        "image_ids": [image_id, image_id],
    }


def test_scienceqa_with_and_without_hint(tmp_path: Path) -> None:
    """ScienceQA-IMG: a hint becomes a Context line, an empty one none; the answer index becomes a letter."""
    rows = [
        {
            "image": image_cell(7, 2),
            "question": "Which animal eats grass?",
            "choices": ["rabbit", "hawk", "snake"],
            "answer": 0,
            "hint": "The diagram shows a food web.",
            "task": "closed choice",
            "subject": "natural science",
        },
        {
            "image": image_cell(2, 7, (0, 0, 255)),
            "question": "Which pole of the magnet is marked?",
            "choices": ["north", "south"],
            "answer": 1,
            "hint": "",
            "task": "closed choice",
            "subject": "natural science",
        },
    ]
    write_table(tmp_path, "scienceqa_img", rows)
    bench = build("scienceqa_img")
    samples = [bench.to_sample(row) for row in read(tmp_path)]
    assert samples[0].text == (
        "Context: The diagram shows a food web.\nWhich animal eats grass?\nA. rabbit\nB. hawk\nC. snake"
        + LETTER
    )
    assert samples[1].text == "Which pole of the magnet is marked?\nA. north\nB. south" + LETTER
    assert [s.answers for s in samples] == [["A"], ["B"]]
    assert [s.meta for s in samples] == [
        {"options": ["rabbit", "hawk", "snake"]},
        {"options": ["north", "south"]},
    ]
    assert [s.image.size for s in samples] == [(7, 2), (2, 7)]
    # No id column: a content digest, 16 hex digits, different for different rows.
    ids = [s.question_id for s in samples]
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]
    assert bench.metric_extras([s.meta for s in samples]) == {
        "options": [["rabbit", "hawk", "snake"], ["north", "south"]]
    }


def mmbench_row(index: int, hint: str | None, options: list[str | None], answer: str) -> dict[str, Any]:
    a, b, c, d = options
    return {
        "index": index,
        "question": "What does the sign say?",
        "hint": hint,
        "A": a,
        "B": b,
        "C": c,
        "D": d,
        "answer": answer,
        "category": "ocr",
        "image": image_cell(4, 4),
        "source": "MMBench",
        "split": "dev",
    }


def test_mmbench_missing_options_hints_and_circular_groups(tmp_path: Path) -> None:
    """MMBench: an absent D (None or the text "nan") is not listed; rotated copies share group index % 1e6."""
    rows = [
        mmbench_row(12, "Look at the sign.", ["stop", "go", "wait", None], "A"),
        mmbench_row(1_000_012, None, ["go", "wait", "stop", "nan"], "C"),
        mmbench_row(5, "nan", ["one", "two", "three", "four"], " D "),
    ]
    write_table(tmp_path / "en", "mmbench", rows, split="dev")  # lmms-lab layout: en/dev-00000-of-00001
    bench = build("mmbench")
    samples = [bench.to_sample(row) for row in read(tmp_path, "en", "dev")]
    assert samples[0].text == "Look at the sign.\nWhat does the sign say?\nA. stop\nB. go\nC. wait" + LETTER
    assert samples[1].text == "What does the sign say?\nA. go\nB. wait\nC. stop" + LETTER
    assert samples[2].text == "What does the sign say?\nA. one\nB. two\nC. three\nD. four" + LETTER
    assert [s.answers for s in samples] == [["A"], ["C"], ["D"]]
    assert [s.question_id for s in samples] == ["12", "1000012", "5"]
    assert [s.meta for s in samples] == [
        {"options": ["stop", "go", "wait"], "group": 12},
        {"options": ["go", "wait", "stop"], "group": 12},
        {"options": ["one", "two", "three", "four"], "group": 5},
    ]
    assert samples[0].image.size == (4, 4)
    assert bench.metric_extras([s.meta for s in samples]) == {
        "options": [["stop", "go", "wait"], ["go", "wait", "stop"], ["one", "two", "three", "four"]],
        "groups": [12, 12, 5],
    }


def test_benchmarks_without_extras_give_none() -> None:
    """The metrics of VQAv2, TextVQA and GQA need nothing besides the answers; POPE's takes each sample's
    category, to report each probe set as eval_pope.py does (issue 20)."""
    for name in ("vqav2", "textvqa", "gqa"):
        assert build(name).metric_extras([{"category": "x", "image_id": "y"}]) == {}
    pope_extras = build("pope").metric_extras([{"category": "random", "image_id": "y"}])
    assert pope_extras == {"categories": ["random"]}


def test_a_corrupt_image_cell_is_a_sample_error_without_memory_addresses(tmp_path: Path) -> None:
    """Bytes that are not an image fail that one row, with a message that is the same in every run."""
    write_table(tmp_path, "vqav2", [vqav2_row(1, "Is it red?", ["yes"] * 10, CORRUPT_IMAGE)])
    with pytest.raises(SampleError) as caught:
        build("vqav2").to_sample(read(tmp_path)[0])
    assert str(caught.value) == "unreadable image: UnidentifiedImageError: cannot identify image file"
    assert "0x" not in str(caught.value)


def test_missing_column_names_it_the_available_ones_and_the_override(tmp_path: Path) -> None:
    """check_columns names the missing logical column, the data's columns and the `+data.columns` fix."""
    features = datasets.Features(
        {
            "question_id": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answer_list": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Image(),
        }
    )
    row = {
        "question_id": 3,
        "question": "what is written?",
        "answer_list": ["stop"] * 10,
        "image": image_cell(2, 2),
    }
    datasets.Dataset.from_list([row], features=features).to_parquet(str(tmp_path / "validation.parquet"))
    stream = open_stream(str(tmp_path), None, "validation")
    assert column_names(stream) == ["question_id", "question", "answer_list", "image"]

    with pytest.raises(DataError) as caught:
        build("textvqa").check_columns(column_names(stream))
    assert str(caught.value) == (
        "textvqa: the data has no answers (column 'answers'); its columns are "
        "['answer_list', 'image', 'question', 'question_id']. Point data.path at the right dataset, or map "
        "the names, e.g. +data.columns.answers=<column>"
    )
    # Following the hint fixes it.
    remapped = build("textvqa", columns={"answers": "answer_list"})
    remapped.check_columns(column_names(stream))
    assert remapped.to_sample(next(iter(stream))).answers == ["stop"] * 10


def test_unknown_logical_column_is_a_data_error() -> None:
    """data.columns may only remap the columns the benchmark reads; the message lists them."""
    with pytest.raises(DataError) as caught:
        build("vqav2", columns={"answer": "answers"})
    assert str(caught.value) == (
        "vqav2: unknown logical columns ['answer'] in data.columns; "
        "this benchmark reads ['answers', 'image', 'question', 'question_id']"
    )


def test_unknown_split_is_a_data_error_naming_data_split(tmp_path: Path) -> None:
    """A split that the folder does not have fails with a pointer to data.split, also inside a config."""
    write_table(tmp_path / "vqa", "vqav2", [vqav2_row(1, "Is it red?", ["yes"] * 10, image_cell(2, 2))])
    with pytest.raises(DataError, match=r"Bad split: validation\. Available splits: \['test'\].*data\.split"):
        open_stream(str(tmp_path / "vqa"), None, "validation")
    gqa = write_gqa(tmp_path / "gqa")
    with pytest.raises(DataError, match=r"data\.split"):
        open_stream(str(gqa), "testdev_balanced_instructions", "val")


def test_a_path_that_does_not_exist_is_a_data_error(tmp_path: Path) -> None:
    """A local path that is not there fails before anything is looked up."""
    missing = str(tmp_path / "no-such-folder")
    with pytest.raises(DataError) as caught:
        open_stream(missing, None, "test")
    assert str(caught.value) == f"data.path {missing!r} is neither a local folder nor a hub id (owner/name)"


def test_a_config_sub_folder_that_does_not_exist_is_a_data_error(tmp_path: Path) -> None:
    """An unknown config of a local folder names the config in the error."""
    gqa = write_gqa(tmp_path)
    with pytest.raises(DataError, match=r"config 'testdev_all_instructions'"):
        open_stream(str(gqa), "testdev_all_instructions", "testdev")


def test_an_unreachable_hub_id_is_a_data_error_that_suggests_a_local_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offline, a hub id fails with a DataError that says to point data.path at a local folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"cannot find 'nobody-here/NoSuchBenchmark'.*local folder"):
        open_stream("nobody-here/NoSuchBenchmark", None, "test")
