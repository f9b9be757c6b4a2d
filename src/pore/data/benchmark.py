"""A benchmark: where its rows live, which columns they need, how a row becomes a prompt, how it is scored.

Each benchmark is one small registered class in `pore/data/benchmarks/` (every module there is imported,
so a new one is one file) plus one config, `conf/data/<name>.yaml`. The data module streams the rows with
Hugging Face `datasets`, asks the benchmark to turn each row into a `Sample`, and the evaluation scores the
answers with the benchmark's torchmetrics metric.

Protocols (`pore.data.protocol`: `default`, `llava`, `lmms_eval`) are the published evaluations a run can
follow. A benchmark carries its variants of them in two places, one per kind of difference:

- settings (token limit, answer rule, pad to square, prompt options) in its data config, under
  `protocols: {<protocol>: {...}}`; a protocol without an entry gets that protocol's `benchmark_defaults`;
- prompt text in its class, as methods named `<step>_<protocol>` next to `<step>_default`, for each step
  listed in `protocol_steps` (`prompt` for every benchmark). `Benchmark.variant(step)` picks the method for
  the benchmark's protocol, the `_default` one when the class defines none for it, so `prompt(row)` is
  `prompt_lmms_eval(row)` under `protocol=lmms_eval` when the class has it and `prompt_default(row)`
  otherwise. A method named after a step but no protocol (a misspelt `prompt_lmmseval`) is refused when the
  class is defined, instead of silently falling back to the default.

A new protocol variant of a benchmark is therefore one method plus one entry in its YAML file.
"""

from __future__ import annotations

import hashlib
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from pore.data.protocol import PROTOCOLS
from pore.registry import Registry

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


class DataError(ValueError):
    """A problem with the benchmark's data that the user can fix (a column, a path, a split)."""


class SampleError(ValueError):
    """A problem with one row (e.g. an unreadable image): the row is recorded as failed and skipped."""


@dataclass
class Sample:
    """One question, ready for the model's chat template."""

    question_id: str
    text: str  # the user's turn: question, options and answer instruction (no chat markup)
    answers: list[str]
    image: Image.Image | None
    # What the metric needs besides answers (category, image id, options, circular group), JSON-serialisable.
    meta: dict[str, Any] = field(default_factory=dict)
    # The frames of a video question, in order (`decode_video`); the collator hands them to the processor as
    # `videos=` (a sample may have an image, a video, or both).
    video: list[Image.Image] | None = None
    # Frames per second of `video` as given (the benchmark's sampling rate), for the processors that write
    # timestamps (Qwen3-VL: frame i at i / video_fps seconds); None = unknown (Qwen3-VL then assumes 24).
    video_fps: float | None = None


def decode_image(value: Any) -> Image.Image:
    """An RGB PIL image from what `datasets` gives with `Image(decode=False)`, a PIL image or raw bytes."""
    try:
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, Mapping):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path"):
                with Image.open(value["path"]) as image:
                    return image.convert("RGB")
            else:
                raise SampleError("the image cell is empty")
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as image:
                image.load()
                return image.convert("RGB")
    except SampleError:
        raise
    except Exception as error:  # PIL raises several types for broken files
        # Drop object addresses ("<_io.BytesIO object at 0x...>") so that the message is reproducible.
        message = re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(error))
        raise SampleError(f"unreadable image: {type(error).__name__}: {message}") from error
    raise SampleError(f"unsupported image value of type {type(value).__name__}")


def decode_video(value: Any) -> list[Image.Image]:
    """The frames of a video cell as RGB PIL images: a list of image cells (what `decode_image` reads: bytes,
    `{"bytes"|"path": ...}`, PIL images) or an array (T, H, W, 3) of uint8 (numpy, or anything `np.asarray`
    takes, e.g. a tensor)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise SampleError("the video cell has no frames")
        return [decode_image(frame) for frame in value]
    import numpy as np

    array = np.asarray(value)
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise SampleError(
            f"a video array must be (frames, height, width, 3), got shape {tuple(array.shape)}; or give a "
            "list of image cells"
        )
    if array.dtype != np.uint8:
        raise SampleError(f"a video array must hold uint8 pixels, got {array.dtype}")
    return [Image.fromarray(frame).convert("RGB") for frame in array]


def content_id(*parts: Any) -> str:
    """A stable id from a row's content, for benchmarks without a unique question id column."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


class Benchmark(ABC):
    """How to read and score one benchmark. Subclasses set the class attributes, `question_id` and
    `to_sample` (which takes its text from `prompt(row)`), and the protocol variants of their prompt."""

    name: ClassVar[str]
    metric: ClassVar[str]  # a key of pore.metrics.METRICS
    # logical column -> column name in the default dataset; users remap with `data.columns`
    default_columns: ClassVar[dict[str, str]]
    # The steps whose methods vary by protocol: `<step>_default` plus `<step>_<protocol>` where it differs.
    protocol_steps: ClassVar[tuple[str, ...]] = ("prompt",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for step in cls.protocol_steps:
            if not callable(getattr(cls, f"{step}_default", None)):
                raise TypeError(f"{cls.__name__}: protocol step {step!r} needs a method {step}_default")
            for attribute in dir(cls):
                suffix = attribute.removeprefix(f"{step}_")
                if attribute.startswith(f"{step}_") and suffix not in PROTOCOLS:
                    raise TypeError(
                        f"{cls.__name__}.{attribute}: {suffix!r} is not a protocol; protocol variants of "
                        f"{step!r} are named {step}_<protocol> with a protocol of: {', '.join(PROTOCOLS)}"
                    )

    def __init__(
        self,
        columns: Mapping[str, str] | None = None,
        protocol: str = "default",
        answer_rule: str | None = None,
        **options: Any,
    ) -> None:
        if protocol not in PROTOCOLS:
            raise DataError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        # Which published evaluation the prompt follows (pore.data.protocol); how the metric reads answers.
        self.protocol = protocol
        self.answer_rule = answer_rule
        unknown = set(columns or {}) - set(self.default_columns)
        if unknown:
            raise DataError(
                f"{self.name}: unknown logical columns {sorted(unknown)} in data.columns; "
                f"this benchmark reads {sorted(self.default_columns)}"
            )
        self.columns = {**self.default_columns, **(columns or {})}
        self.options = options

    def column(self, row: Mapping[str, Any], logical: str) -> Any:
        return row[self.columns[logical]]

    def required_columns(self) -> list[str]:
        return list(self.columns.values())

    def check_columns(self, available: list[str]) -> None:
        missing = [logical for logical, actual in self.columns.items() if actual not in available]
        if missing:
            wanted = ", ".join(f"{logical} (column {self.columns[logical]!r})" for logical in missing)
            raise DataError(
                f"{self.name}: the data has no {wanted}; its columns are {sorted(available)}. "
                f"Point data.path at the right dataset, or map the names, e.g. "
                f"+data.columns.{missing[0]}=<column>"
            )

    def prepare(self, open_table: Callable[[str | None, str], Iterable[Mapping[str, Any]]]) -> None:
        """Load side tables before streaming (GQA's images); `open_table(config, split)` streams one."""

    def keep_row(self, row: Mapping[str, Any]) -> bool:
        """Whether a row belongs to the configured subset (e.g. one POPE category). Cheap: no image decode."""
        return True

    def variant(self, step: str) -> Callable[..., Any]:
        """The method of `step` for this benchmark's protocol: `<step>_<protocol>` when the class defines
        it, else `<step>_default` (the one dispatch of protocol variants, see the module's docstring)."""
        return getattr(self, f"{step}_{self.protocol}", None) or getattr(self, f"{step}_default")

    def prompt(self, row: Mapping[str, Any]) -> str:
        """The user's turn for `row` (question, options, answer instruction; no chat markup) under the
        benchmark's protocol."""
        return self.variant("prompt")(row)

    def prompt_default(self, row: Mapping[str, Any]) -> str:
        """The question and LLaVA-1.5's short-answer instruction: the prompt of the short-answer benchmarks
        under every protocol unless a class says otherwise."""
        return f"{self.column(row, 'question')}\n{SHORT_ANSWER}"

    def metric_options(self) -> dict[str, Any]:
        """Keyword arguments for the metric's constructor: the protocol's answer rule, when it sets one."""
        return {"rule": self.answer_rule} if self.answer_rule else {}

    def metric_extras(self, metas: list[dict[str, Any]]) -> dict[str, list[Any]]:
        """Keyword arguments for the metric's `update`, from the samples' `meta` (categories, groups, ...)."""
        return {}

    @abstractmethod
    def question_id(self, row: Mapping[str, Any]) -> str:
        """A unique, stable id for the row (used to resume and to merge ranks)."""

    @abstractmethod
    def to_sample(self, row: Mapping[str, Any]) -> Sample:
        """Turn a row into a Sample; raise SampleError for a row that cannot be used."""


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark")
