"""The temporal prior: PoRe's correction applied over the frames of a video.

A causal LM's attention favours late tokens; in a video the late tokens are the late frames, so attention
ranking keeps the last frames over the first ones for the same reason it keeps the bottom rows of an image.
This prior weighs a token by its frame's normalised position q = frame / (frames - 1) in [0, 1] (0 for
images and one-frame videos): w = exp(-frame_sigma * q - space_sigma * p), where p is the usual position
inside the frame (`strategy.prior.position`), so `space_sigma > 0` corrects both biases at once.
"""

from __future__ import annotations

import torch

from pore.priors.base import PRIORS


def frame_position(frame: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """q = frame / (frames - 1) in [0, 1] (float64); 0 where there is one frame."""
    return frame.double() / (frames - 1).clamp(min=1).double()


@PRIORS.register("temporal")
def temporal_prior(
    p: torch.Tensor,
    frame: torch.Tensor,
    frames: torch.Tensor,
    frame_sigma: float = 1.0,
    space_sigma: float = 0.0,
) -> torch.Tensor:
    """w = exp(-frame_sigma * q - space_sigma * p), both sigmas >= 0: earlier frames (and rows) weigh more."""
    for name, value in (("frame_sigma", frame_sigma), ("space_sigma", space_sigma)):
        if not value >= 0.0:  # also rejects NaN
            raise ValueError(f"temporal prior: {name} must be >= 0, got {value}")
    return torch.exp(-frame_sigma * frame_position(frame, frames) - space_sigma * p)
