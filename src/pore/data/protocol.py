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

The benchmark classes build the prompt text for a protocol (`Benchmark.protocol`); this module holds what is
shared: the conversation templates, `expand2square` and the per-benchmark settings of a protocol.
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


@dataclass(frozen=True)
class Protocol:
    """The per-benchmark settings of a protocol, as `conf/protocol/<name>.yaml` writes them.

    Every mapping is keyed by benchmark name (`data.benchmark`: gqa, pope, scienceqa_img, ...) with an
    optional `default` entry; `conversation` by model family (adapter name) and `processor` by the
    checkpoint's `model_type`.
    """

    name: str = "default"
    conversation: Mapping[str, str] = field(default_factory=dict)  # family -> template; else model's own
    pad_to_square: Mapping[str, bool] = field(default_factory=dict)  # expand2square (LLaVA-1.5 only)
    max_new_tokens: Mapping[str, int] = field(default_factory=lambda: {"default": 16})
    answer_rule: Mapping[str, str] = field(default_factory=dict)  # the metric's reading of an answer
    prompt: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # benchmark prompt options
    processor: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # model_type -> settings

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> Protocol:
        known = {
            "name",
            "conversation",
            "pad_to_square",
            "max_new_tokens",
            "answer_rule",
            "prompt",
            "processor",
        }
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
        values = {key: dict(settings[key] or {}) for key in known - {"name"} if key in settings}
        return cls(name=name, **values)

    @staticmethod
    def _for(mapping: Mapping[str, Any], benchmark: str, fallback: Any = None) -> Any:
        return mapping.get(benchmark, mapping.get("default", fallback))

    def tokens(self, benchmark: str) -> int:
        """The most new tokens to generate for `benchmark`."""
        return int(self._for(self.max_new_tokens, benchmark, 16))

    def rule(self, benchmark: str) -> str | None:
        """How the metric reads an answer for `benchmark` (None = the metric's default rule)."""
        return self._for(self.answer_rule, benchmark)

    def prompt_options(self, benchmark: str) -> dict[str, Any]:
        return dict(self.prompt.get(benchmark, {}))

    def pads(self, benchmark: str, family: str) -> bool:
        """Whether images are padded to a square before the processor: LLaVA-1.5 (`llava` adapter) only, as
        LLaVA-NeXT has its own anyres preprocessing and Qwen resizes."""
        return family == "llava" and bool(self._for(self.pad_to_square, benchmark, False))

    def conversation_for(self, family: str) -> str | None:
        """The conversation template for a model family, or None for the model's own chat template."""
        return self.conversation.get(family)

    def processor_options(self, model_type: str) -> dict[str, Any]:
        """Processor settings for a checkpoint's `model_type` (lmms-eval's Qwen min / max pixels)."""
        return {
            key: value for key, value in (self.processor.get(model_type) or {}).items() if value is not None
        }
