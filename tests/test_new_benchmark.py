"""A new benchmark is one .py (a registered `Benchmark` subclass) plus one YAML (its data config, with its
protocol variants): written here in a temporary folder, outside the package, as docs/extending.md shows.

The module is imported with importlib (as a plug-in would be), the YAML found through Hydra's search path
(`hydra.searchpath=[file://<folder>]`), and the benchmark read from a local parquet file through `datasets`.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import importlib.util
import sys
from pathlib import Path
from typing import Any

import datasets
import hydra
import pytest

from benchmark_tables import image_cell
from pore.app.config import build_benchmark, build_benchmark_protocol
from pore.app.identity import register_resolvers
from pore.data import BENCHMARKS, Benchmark, BenchmarkStream, Sample

CONF = Path(__file__).resolve().parent.parent / "conf"

# src/pore/data/benchmarks/count_vqa.py in the package; here a file of its own.
BENCHMARK_MODULE = '''
"""CountVQA: how many objects; scored by exact match. lmms-eval asks for a number."""

from collections.abc import Mapping
from typing import Any

from pore.data.benchmark import BENCHMARKS, Benchmark, Sample, decode_image


@BENCHMARKS.register("count_vqa")
class CountVQA(Benchmark):
    name = "count_vqa"
    metric = "exact_match"
    default_columns = {"question_id": "qid", "question": "question", "answer": "answer", "image": "image"}

    def question_id(self, row: Mapping[str, Any]) -> str:
        return str(self.column(row, "question_id"))

    # prompt_default (the question and the short-answer instruction) is inherited; one variant differs.
    def prompt_lmms_eval(self, row: Mapping[str, Any]) -> str:
        return f"{self.column(row, 'question')}\\nAnswer with a number."

    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        return Sample(
            question_id=self.question_id(row),
            text=self.prompt(row),
            answers=[str(self.column(row, "answer"))],
            image=decode_image(self.column(row, "image")),
        )
'''

# conf/data/count_vqa.yaml in the package; here <folder>/data/count_vqa.yaml.
DATA_CONFIG = """
name: count_vqa
benchmark: count_vqa
path: null  # set on the command line: a local folder of parquet files
config: null
split: test
limit: null
batch_size: 2
num_workers: 0
columns: {}
options: {}
protocols:
  llava: {max_new_tokens: 8, answer_rule: llava_gqa}  # padding: the llava protocol's benchmark_defaults
  lmms_eval: {max_new_tokens: 4, pad_to_square: false}
  # no `default` entry: the default protocol's benchmark_defaults (16 new tokens)
"""


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder with count_vqa.py and data/count_vqa.yaml, the module imported (registering CountVQA).

    The registry and sys.modules are restored afterwards, so that no other test sees the extra benchmark."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "count_vqa.yaml").write_text(DATA_CONFIG)
    (tmp_path / "count_vqa.py").write_text(BENCHMARK_MODULE)
    monkeypatch.setattr(BENCHMARKS, "_entries", dict(BENCHMARKS._entries))
    spec = importlib.util.spec_from_file_location("count_vqa_plugin", tmp_path / "count_vqa.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "count_vqa_plugin", module)
    spec.loader.exec_module(module)
    return tmp_path


def write_rows(folder: Path) -> Path:
    features = datasets.Features(
        {
            "qid": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    rows = [
        {"qid": 1, "question": "How many dogs are there?", "answer": "2", "image": image_cell(4, 3)},
        {"qid": 2, "question": "How many cats are there?", "answer": "0", "image": image_cell(3, 3)},
    ]
    folder.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(
        str(folder / "test-00000-of-00001.parquet")
    )
    return folder


def test_a_benchmark_in_a_folder_of_its_own_registers_and_composes(plugin: Path) -> None:
    """The registry finds the class; `data=count_vqa protocol=...` composes with the folder on Hydra's search
    path; each protocol gets the YAML's entry over its benchmark_defaults, and the class's prompt variant."""
    assert "count_vqa" in BENCHMARKS.names()
    rows = write_rows(plugin / "rows")
    register_resolvers()
    built: dict[str, tuple[Benchmark, Any]] = {}
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for protocol in ("default", "llava", "lmms_eval"):
            cfg = hydra.compose(
                "config",
                overrides=[
                    f"hydra.searchpath=[file://{plugin}]",
                    "data=count_vqa",
                    f"data.path={rows}",
                    f"protocol={protocol}",
                ],
            )
            built[protocol] = build_benchmark(cfg), build_benchmark_protocol(cfg)
    cls = BENCHMARKS.get("count_vqa")
    assert cls.__module__ == "count_vqa_plugin" and issubclass(cls, Benchmark)
    settings = {name: (v.max_new_tokens, v.answer_rule, v.pad_to_square) for name, (_, v) in built.items()}
    assert settings == {
        "default": (16, None, False),
        "llava": (8, "llava_gqa", True),
        "lmms_eval": (4, None, False),
    }
    assert built["llava"][0][0].metric_options() == {"rule": "llava_gqa"}

    texts = {}
    for protocol, ((benchmark, source), _) in built.items():
        assert isinstance(benchmark, cls) and source.path == str(rows)
        samples = list(BenchmarkStream(benchmark, source))
        assert all(isinstance(sample, Sample) for sample in samples)
        assert [(s.question_id, s.answers, s.image.size) for s in samples] == [
            ("1", ["2"], (4, 3)),
            ("2", ["0"], (3, 3)),
        ]
        texts[protocol] = [sample.text for sample in samples]
    short = "\nAnswer the question using a single word or phrase."
    assert texts == {
        "default": ["How many dogs are there?" + short, "How many cats are there?" + short],
        "llava": ["How many dogs are there?" + short, "How many cats are there?" + short],
        "lmms_eval": [
            "How many dogs are there?\nAnswer with a number.",
            "How many cats are there?\nAnswer with a number.",
        ],
    }


def test_a_misspelt_protocol_variant_is_refused_when_the_class_is_defined() -> None:
    """`prompt_lmmseval` would otherwise silently fall back to the default prompt under protocol=lmms_eval."""
    with pytest.raises(TypeError) as caught:

        class Misspelt(Benchmark):
            name = "misspelt"
            metric = "exact_match"
            default_columns = {"question": "question"}

            def prompt_lmmseval(self, row: dict[str, Any]) -> str:
                return ""

    assert str(caught.value) == (
        "Misspelt.prompt_lmmseval: 'lmmseval' is not a protocol; protocol variants of 'prompt' are named "
        "prompt_<protocol> with a protocol of: default, llava, lmms_eval"
    )
