"""Turn a list of samples into model inputs with the model's own processor and chat template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from pore.data.benchmark import Sample
from pore.data.protocol import CONVERSATIONS, expand2square, mean_colour
from pore.data.stream import FailedSample

# LLaVA-1.5's conversation format, used when a processor ships no chat template.
FALLBACK_TEMPLATE = "USER: <image>\n{text} ASSISTANT:"


@dataclass
class PromptBatch:
    """Model inputs for the usable samples of a batch, and the rows that failed."""

    inputs: dict[str, torch.Tensor] | None  # processor output (input_ids, attention_mask, pixel_values, ...)
    samples: list[Sample]  # without their images (kept light for the writer)
    prompts: list[str]  # the exact text given to the processor
    image_sizes: list[list[tuple[int, int]]]  # original (height, width) per image, per sample
    failed: list[FailedSample] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples) + len(self.failed)


def chat_prompt(
    processor: Any, text: str, conversation_template: str | None = None, media: tuple[str, ...] = ("image",)
) -> str:
    """The prompt for one user turn: the protocol's conversation template when it sets one for this model
    family (pore.data.protocol.CONVERSATIONS; images only), else the processor's own chat template with one
    content part per entry of `media` ("image", "video")."""
    if conversation_template is not None and media == ("image",):
        return CONVERSATIONS[conversation_template](text)
    content = [{"type": kind} for kind in media] + [{"type": "text", "text": text}]
    conversation = [{"role": "user", "content": content}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return FALLBACK_TEMPLATE.format(text=text)


class PromptCollator:
    """Samples -> processor inputs. `conversation` (a protocol's template name) replaces the chat template;
    `pad_to_square` pads each image to a square with the image processor's mean colour first (LLaVA-1.5's
    `expand2square`). Image sizes are always the original ones (what padding suppression needs)."""

    def __init__(self, processor: Any, conversation: str | None = None, pad_to_square: bool = False) -> None:
        if conversation is not None and conversation not in CONVERSATIONS:
            raise ValueError(
                f"unknown conversation {conversation!r}; choose one of: {', '.join(CONVERSATIONS)}"
            )
        self.processor = processor
        self.conversation = conversation
        self.pad_to_square = pad_to_square
        self.background = mean_colour(processor.image_processor) if pad_to_square else None

    def image(self, sample: Sample) -> Any:
        """The image as the processor receives it."""
        if self.pad_to_square:
            return expand2square(sample.image, self.background)
        return sample.image

    def __call__(self, items: list[Sample | FailedSample]) -> PromptBatch:
        failed = [item for item in items if isinstance(item, FailedSample)]
        samples = [item for item in items if isinstance(item, Sample)]
        usable = []
        for sample in samples:
            if sample.image is None and sample.video is None:
                failed.append(FailedSample(sample.question_id, "the row has no image"))
            else:
                usable.append(sample)
        prompts = [
            chat_prompt(self.processor, sample.text, self.conversation, media(sample)) for sample in usable
        ]
        inputs = None
        if usable:
            inputs = dict(
                self.processor(**self._media(usable), text=prompts, padding=True, return_tensors="pt")
            )
        image_sizes = [
            [(sample.image.height, sample.image.width)] if sample.image is not None else []
            for sample in usable
        ]
        light = [Sample(s.question_id, s.text, s.answers, None, s.meta) for s in usable]
        return PromptBatch(inputs, light, prompts, image_sizes, failed)

    def _media(self, usable: list[Sample]) -> dict[str, Any]:
        """The processor's `images=` / `videos=` for the samples that have them (a list of frames each)."""
        # One list per prompt: Gemma 3's processor counts images per sample (the others flatten the lists).
        images = [[self.image(sample)] for sample in usable if sample.image is not None]
        videos = [sample.video for sample in usable if sample.video is not None]
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"the data has a video column, but the model's processor ({type(self.processor).__name__}) "
                "reads no videos: it needs its video processor (transformers builds it with torchvision: "
                "pip install torchvision), or choose an image benchmark"
            )
        if not videos:
            return {"images": images}
        return video_arguments(usable) | ({"images": images} if images else {})


def video_arguments(samples: list[Sample]) -> dict[str, Any]:
    """The processor's video arguments for the samples that have a video: the frames, no resampling (they
    are the benchmark's sample of the clip; Qwen3-VL's processor would otherwise sample again, at 2 frames
    per second of a clip it takes for 24 fps), and per video its metadata (frame count, the frames' rate,
    their indices), from which Qwen3-VL's processor writes each frame's timestamp."""
    videos = [sample.video for sample in samples if sample.video is not None]
    metadata = [
        {"total_num_frames": len(frames), "fps": sample.video_fps, "frames_indices": list(range(len(frames)))}
        for sample, frames in ((s, s.video) for s in samples if s.video is not None)
    ]
    return {"videos": videos, "do_sample_frames": False, "video_metadata": metadata}


def media(sample: Sample) -> tuple[str, ...]:
    """The sample's media parts in prompt order: its image, then its video."""
    return ("image",) * (sample.image is not None) + ("video",) * (sample.video is not None)
