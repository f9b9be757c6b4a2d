"""A video column in the data pipeline: frames decoded to PIL images (`decode_video`), the collator's prompt
and processor arguments for video samples, and its clear refusal when the processor reads no videos.

Not tested here: a processor turning frames into `pixel_values_videos` (every video processor of transformers
5 needs torchvision, which does not install beside this CPU torch build); the model side of video tokens is
tested on inputs in the processor's layout (tests/test_adapter_qwen2_vl.py, tests/test_temporal_prior.py).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pore.data.benchmark import Sample, SampleError, decode_video
from pore.data.collate import PromptCollator, chat_prompt, media, video_arguments
from qwen_reference import image, processor


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def frames(count: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (count, 6, 8, 3), dtype=np.uint8)


def test_a_video_cell_of_image_cells_or_an_array_gives_its_frames_in_order() -> None:
    array = frames()
    from_cells = decode_video([{"bytes": png(frame), "path": None} for frame in array])
    from_array = decode_video(array)
    for decoded in (from_cells, from_array):
        assert [frame.mode for frame in decoded] == ["RGB"] * 3
        assert [np.asarray(frame).tolist() for frame in decoded] == array.tolist()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "no frames"),
        (
            np.zeros((6, 8, 3), dtype=np.uint8),
            "must be \\(frames, height, width, 3\\), got shape \\(6, 8, 3\\)",
        ),
        (np.zeros((2, 6, 8, 3), dtype=np.float32), "uint8 pixels, got float32"),
        ([b"not an image"], "unreadable image"),
    ],
)
def test_bad_video_cells_fail_the_row_with_a_reason(value, message: str) -> None:
    with pytest.raises(SampleError, match=message):
        decode_video(value)


def test_the_prompt_names_the_video_part_and_the_collator_refuses_a_processor_without_videos() -> None:
    """A video sample's prompt has a video part (the Qwen chat template writes its video placeholders); a
    processor built without its video processor (no torchvision) is refused with the fix, not a traceback
    from deep inside transformers."""
    proc = processor("qwen2_vl")
    video = Sample("v", "what colour is the circle?", ["red"], None, video=decode_video(frames(2)))
    assert media(video) == ("video",)
    prompt = chat_prompt(proc, video.text, None, media(video))
    assert "<|vision_start|><|video_pad|><|vision_end|>what colour" in prompt
    with pytest.raises(ValueError, match=r"reads no videos: it needs its video processor .* torchvision"):
        PromptCollator(proc)([video])


def test_video_arguments_keep_the_benchmarks_frames_and_give_their_rate() -> None:
    """The processor gets each video's frames as the benchmark sampled them (no resampling: Qwen3-VL's video
    processor samples by default) and their rate and indices (Qwen3-VL writes frame i's timestamp from them);
    samples without a video are skipped, the order is the samples' order."""
    clip = decode_video(frames(3))
    samples = [
        Sample("a", "q", ["x"], None, video=clip, video_fps=2.0),
        Sample("b", "q", ["x"], image((28, 28), seed=1)),
        Sample("c", "q", ["x"], None, video=clip[:2]),
    ]
    arguments = video_arguments(samples)
    assert arguments["videos"] == [clip, clip[:2]]
    assert arguments["do_sample_frames"] is False
    assert arguments["video_metadata"] == [
        {"total_num_frames": 3, "fps": 2.0, "frames_indices": [0, 1, 2]},
        {"total_num_frames": 2, "fps": None, "frames_indices": [0, 1]},
    ]


def test_image_samples_are_collated_as_before_and_rows_without_media_fail() -> None:
    proc = processor("qwen2_vl")
    pictured = Sample("i", "what colour is the circle?", ["red"], image((28, 56), seed=1))
    empty = Sample("e", "what colour?", ["red"], None)
    batch = PromptCollator(proc)([pictured, empty])
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 4, 8]]
    assert batch.image_sizes == [[(28, 56)]]
    assert [(f.question_id, f.error) for f in batch.failed] == [("e", "the row has no image")]
