"""An evaluation protocol: how a published evaluation turns a benchmark row into model input and back.

Three protocols (`conf/protocol/<name>.yaml`, docs/protocols.md):

- `default`: the project's own: every benchmark's prompt in one style (question + LLaVA-1.5's answer
  suffix), the model's own chat template and processor, 16 new tokens, lenient answer reading.
- `llava`: LLaVA-1.5's own scripts (haotian-liu/LLaVA `llava/eval/model_vqa_loader.py`,
  `model_vqa_science.py`, `model_vqa_mmbench.py`, `scripts/v1_5/eval/*.sh`): the `vicuna_v1` conversation
  with its system line, images padded to a square with the processor's mean colour (`expand2square`), the
  scripts' token limits and answer rules.
- `lmms_eval`: EvolvingLMMs-Lab/lmms-eval's task prompts, generation limits and answer rules, its Qwen
  pixel limits, and LLaVA-1.5 run as its `llava` model class runs it.

A protocol's file holds what is the same for every benchmark (`Protocol`: the conversation template per model
family, processor settings per checkpoint type, what a benchmark without its own entry gets). What differs
by benchmark is the benchmark's own: the settings in its data config under `protocols.<name>`
(`BenchmarkProtocol`, from `Protocol.for_benchmark`), the prompt text in its class (`<step>_<protocol>`
methods, pore.data.benchmark). Nothing here names a model family in code: padding asks the caller for its
adapter's `pads_to_square`, and `conversation` is keyed by family name as data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

PROTOCOLS = ("default", "llava", "lmms_eval")

# llava/conversation.py `conv_vicuna_v1` (what `--conv-mode vicuna_v1` of the v1.5 scripts selects). Note
# "user", not "human": the "curious human" line belongs to `conv_llava_v1`, which the v1.5 scripts do not use.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1_prompt(text: str) -> str:
    """The single-turn `vicuna_v1` prompt (SeparatorStyle.TWO, sep " "): system, user turn, open reply.

    The image placeholder opens the user turn, followed by a newline, as the eval scripts write it.
    """
    return f"{VICUNA_V1_SYSTEM} USER: <image>\n{text} ASSISTANT:"


CONVERSATIONS = {"vicuna_v1": vicuna_v1_prompt}


def expand2square(image: Image.Image, background: tuple[int, ...]) -> Image.Image:
    """Pad `image` to a square of its longer side with `background`, the content centred (llava/mm_utils.py).

    The offset of the content is (longer - shorter) // 2 on the short axis, so an odd difference leaves the
    extra row or column of padding at the bottom or right, as in the official function.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(image_processor: Any) -> tuple[int, int, int]:
    """The processor's mean as an 8-bit RGB colour, truncated as `int(x * 255)` in the official code."""
    return tuple(int(x * 255) for x in image_processor.image_mean)


def processor_pads(image_processor: Any) -> bool:
    """Whether the processor itself pads images to a square (LlavaImageProcessor with `do_pad`)."""
    return bool(getattr(image_processor, "do_pad", False))


# What a benchmark may set for each protocol (`protocols.<protocol>` of conf/data/<name>.yaml).
PROTOCOL_DTYPES = ("float16", "bfloat16", "float32")
BENCHMARK_SETTINGS = ("max_new_tokens", "answer_rule", "pad_to_square", "prompt")


def benchmark_settings(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`settings` checked and typed (only the keys given); `where` names them in an error message."""
    unknown = set(settings) - set(BENCHMARK_SETTINGS)
    if unknown:
        raise ValueError(
            f"{where}: unknown settings {sorted(unknown)}; a benchmark's protocol entry has "
            f"{sorted(BENCHMARK_SETTINGS)}"
        )
    typed = dict(settings)
    if "max_new_tokens" in typed:
        tokens = typed["max_new_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{where}.max_new_tokens must be an integer >= 1, got {tokens!r}")
    if "pad_to_square" in typed:
        typed["pad_to_square"] = bool(typed["pad_to_square"])
    if "prompt" in typed:
        typed["prompt"] = dict(typed["prompt"] or {})
    return typed


@dataclass(frozen=True)
class BenchmarkProtocol:
    """One benchmark's variant of a protocol: its entry `protocols.<protocol>` in conf/data/<name>.yaml over
    the protocol's `benchmark_defaults` (`Protocol.for_benchmark`)."""

    protocol: str = "default"
    max_new_tokens: int = 16  # most new tokens to generate; a top-level max_new_tokens wins
    answer_rule: str | None = None  # the metric's reading of an answer; None = the metric's default rule
    pad_to_square: bool = False  # expand2square before the processor, where the family encodes squares
    prompt: Mapping[str, Any] = field(default_factory=dict)  # the benchmark's prompt options (textvqa: ocr)

    def pads(self, model_pads_to_square: bool) -> bool:
        """Whether images are padded to a square before the processor: when this variant asks for it and the
        model family can encode padded squares (the caller passes its adapter's `pads_to_square`: LLaVA-1.5;
        LLaVA-NeXT has its own anyres preprocessing and Qwen resizes)."""
        return bool(model_pads_to_square) and self.pad_to_square


@dataclass(frozen=True)
class Protocol:
    """What a protocol sets for every benchmark, as `conf/protocol/<name>.yaml` writes it.

    `conversation` is keyed by model family (adapter name), `processor` by the checkpoint's `model_type`.
    What differs by benchmark lives in the benchmark's data config (`protocols.<name>`, `for_benchmark`);
    `benchmark_defaults` is what a benchmark without its own entry for this protocol gets.
    """

    name: str = "default"
    conversation: Mapping[str, str] = field(default_factory=dict)  # family -> template; else model's own
    processor: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # model_type -> settings
    benchmark_defaults: Mapping[str, Any] = field(default_factory=dict)  # checked `BENCHMARK_SETTINGS`
    # The precision the published evaluation ran in (LLaVA: float16), which `model.dtype=auto` follows on a
    # GPU; None = auto's own choice. On CPU, auto stays float32 (half precision is slow or missing there).
    dtype: str | None = None

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> Protocol:
        known = {"name", "conversation", "processor", "benchmark_defaults", "dtype"}
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"unknown protocol settings {sorted(unknown)}; a protocol has {sorted(known)}")
        name = str(settings.get("name", "default"))
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}")
        for family, template in (settings.get("conversation") or {}).items():
            if template not in CONVERSATIONS:
                raise ValueError(
                    f"protocol.conversation.{family}: unknown template {template!r}; "
                    f"choose one of: {', '.join(CONVERSATIONS)} (or drop the entry for the model's own)"
                )
        dtype = settings.get("dtype")
        if dtype is not None and dtype not in PROTOCOL_DTYPES:
            raise ValueError(
                f"protocol.dtype: unknown precision {dtype!r}; choose one of: {', '.join(PROTOCOL_DTYPES)} "
                "(or null for model.dtype=auto's own choice)"
            )
        return cls(
            name=name,
            dtype=None if dtype is None else str(dtype),
            conversation=dict(settings.get("conversation") or {}),
            processor=dict(settings.get("processor") or {}),
            benchmark_defaults=benchmark_settings(
                settings.get("benchmark_defaults") or {}, "protocol.benchmark_defaults"
            ),
        )

    def for_benchmark(self, protocols: Mapping[str, Mapping[str, Any] | None] | None) -> BenchmarkProtocol:
        """A benchmark's variant of this protocol, from its data config's `protocols` (protocol name ->
        settings): its entry for this protocol over `benchmark_defaults`, setting by setting."""
        protocols = protocols or {}
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown:
            raise ValueError(
                f"data.protocols: unknown protocols {sorted(unknown)}; choose among: {', '.join(PROTOCOLS)}"
            )
        own = benchmark_settings(protocols.get(self.name) or {}, f"data.protocols.{self.name}")
        return BenchmarkProtocol(self.name, **{**self.benchmark_defaults, **own})

    def conversation_for(self, family: str) -> str | None:
        """The conversation template for a model family, or None for the model's own chat template."""
        return self.conversation.get(family)

    def processor_options(self, model_type: str) -> dict[str, Any]:
        """Processor settings for a checkpoint's `model_type` (lmms-eval's Qwen min / max pixels)."""
        return {
            key: value for key, value in (self.processor.get(model_type) or {}).items() if value is not None
        }
