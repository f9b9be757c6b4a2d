"""Everything the engine reads from transformers that moves between releases, in one place.

The pruner hooks into public extension points (forward pre-hooks with kwargs, the attention interface,
`create_causal_mask`, `DynamicCache`), but the *names* it reads there change from release to release:

- the KV cache: multimodal, language-model and decoder-layer forwards take it as `past_key_values` up to
  5.23 and as `cache` from 5.24 (`past_key_values` is deprecated, to go away in 5.40); the hooks see
  whichever name the caller used, so both are read here;
- `create_causal_mask` takes the cache as `past_key_values` up to 5.23 and as `cache` from 5.24;
- generate() may encode the images before the prefill (5.23 on): the multimodal forward then gets
  `mm_encoder_outputs` instead of `pixel_values`, and no `image_sizes`;
- masks per layer type (`config.layer_types`: `full_attention`, `sliding_attention`) and the bidirectional
  blocks of image tokens (Gemma 3) are built as the modelling code of 5.17-5.24 builds them: full layers
  OR(causal, block), sliding layers AND(window, OR(causal, block)) (`block_sequence_ids`, `blockwise_overlay`,
  `sliding_window_overlay` of `transformers.masking_utils`).

The engine (`pore.engine.pruner`), the benchmark's fixed-index reduction (`pore.app.bench.reduce`) and
calibration read these through the functions below, never by version checks of their own.

`TESTED` is the range the whole suite has passed on (pyproject.toml bounds the install to it). A release
outside it may rename something again; the engine's tripwires (`PruningTripwire` below) then stop the run
instead of letting it prune nothing.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from functools import cache
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers.cache_utils import Cache
from transformers.masking_utils import (
    blockwise_overlay,
    create_causal_mask,
    create_sliding_window_causal_mask,
    sliding_window_overlay,
)

# Oldest and newest transformers releases the suite has passed on (keep in sync with pyproject.toml).
OLDEST_TESTED = "5.17.0"
NEWEST_TESTED = "5.24.0"

# Keyword of the KV cache in model forwards, newest first.
CACHE_KEYWORDS = ("cache", "past_key_values")

# Keys of a multimodal forward that carry images already run through the vision encoder.
PRE_ENCODED_IMAGES_KEY = "mm_encoder_outputs"


class PruningTripwire(RuntimeError):
    """The model ran in a way the engine cannot prune: most likely a transformers release renamed what the
    engine reads. Raised instead of returning answers of a model that was silently not pruned."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} (transformers {transformers.__version__}; pore is tested with {tested_range()}). "
            f"If this transformers release is newer, install one in that range "
            f"(pip install 'transformers{tested_specifier()}') or see docs/compatibility.md"
        )


def version() -> Version:
    return Version(transformers.__version__)


def tested_specifier() -> str:
    """The pip specifier of the tested range, e.g. '>=5.17,<5.25'."""
    newest = Version(NEWEST_TESTED)
    return f">={OLDEST_TESTED},<{newest.major}.{newest.minor + 1}"


def tested_range() -> str:
    return f"transformers {OLDEST_TESTED} to {NEWEST_TESTED}"


def is_tested_version(value: str | Version | None = None) -> bool:
    """Whether `value` (default: the installed release) lies in the tested range (any patch release)."""
    current = Version(str(value)) if value is not None else version()
    newest = Version(NEWEST_TESTED)
    return Version(OLDEST_TESTED) <= current < Version(f"{newest.major}.{newest.minor + 1}")


def warn_if_untested() -> None:
    """A warning (once per process) when the installed transformers lies outside the tested range."""
    if not is_tested_version():
        warnings.warn(
            f"transformers {transformers.__version__} is outside the range pore is tested with "
            f"({tested_range()}): pruning may break in ways the tripwires do not catch; run the test suite "
            f"on it first (docs/compatibility.md)",
            stacklevel=3,
        )


def cache_from(kwargs: Mapping[str, Any]) -> Cache | None:
    """The KV cache handed to a forward, under whichever keyword this release (or the caller) uses.

    Raises `PruningTripwire` when a `Cache` sits under a keyword this module does not know: the engine would
    otherwise take every decoding step for a new prompt.
    """
    for keyword in CACHE_KEYWORDS:
        value = kwargs.get(keyword)
        if value is not None:
            return value
    unknown = [key for key, value in kwargs.items() if isinstance(value, Cache)]
    if unknown:
        raise PruningTripwire(
            f"the KV cache reached the model under the keyword {unknown[0]!r}, which pore does not read "
            f"(it reads {list(CACHE_KEYWORDS)})"
        )
    return None


@cache
def _mask_cache_keyword() -> str:
    parameters = inspect.signature(create_causal_mask).parameters
    for keyword in CACHE_KEYWORDS:
        if keyword in parameters:
            return keyword
    raise PruningTripwire(
        f"transformers.masking_utils.create_causal_mask takes none of {list(CACHE_KEYWORDS)}; its parameters "
        f"are {list(parameters)}"
    )


# Layer types whose masks `causal_mask` builds (a language model with another kind is refused by the Pruner).
MASKED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_config(config: Any, layer_idx: int) -> Any:
    """Decoder layer `layer_idx`'s own config where the layers differ (transformers' heterogeneous configs,
    `per_layer_config`: Gemma 4's global layers have other head sizes than its sliding ones, and reading
    `head_dim` off the model's config raises there), else `config` itself."""
    per_layer = getattr(config, "per_layer_config", None)
    return per_layer[layer_idx] if per_layer is not None else config


def layer_type(config: Any, layer_idx: int) -> str:
    """The attention kind of decoder layer `layer_idx` (`config.layer_types`; full attention without it)."""
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer_idx] if layer_types else "full_attention"


def causal_mask(
    config: Any,
    inputs_embeds: torch.Tensor,
    padding: torch.Tensor,
    cache: Cache | None,
    layer_idx: int,
    block_ids: torch.Tensor | None = None,
) -> Any:
    """transformers' own causal + padding mask for decoder layer `layer_idx`, in the format of the model's
    attention backend (None, a 4-D bool / float mask, or a 2-D mask for FlashAttention), for the layer's kind:
    a sliding-window layer gets the window (counted in positions of the sequence it runs on).

    inputs_embeds: (B, Q, D) the layer's queries; padding: (B, KV) bool, real tokens among the keys (the
    cached ones followed by the queries); block_ids: (B, KV) long, tokens of one bidirectional block (an
    image, Gemma 3) share an id >= 0, -1 elsewhere (None: causal only).
    """
    arguments = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": padding,
        "position_ids": None,
        "layer_idx": layer_idx,
        _mask_cache_keyword(): cache,
    }
    if layer_type(config, layer_idx) == "sliding_attention":
        if block_ids is None:
            return create_sliding_window_causal_mask(**arguments)
        # As Gemma 3's modelling code composes them: AND(window, OR(causal, block)).
        return create_causal_mask(
            **arguments,
            or_mask_function=blockwise_overlay(block_ids),
            and_mask_function=sliding_window_overlay(config.sliding_window),
        )
    if block_ids is None:
        return create_causal_mask(**arguments)
    return create_causal_mask(**arguments, block_sequence_ids=block_ids)


def pre_encoded_images(image_inputs: Mapping[str, Any]) -> Any | None:
    """The image encoder's outputs when generate() ran it before the prefill (transformers >= 5.23), else
    None. A `ModelOutput` whose `pooler_output` holds one (tokens, D) tensor per image."""
    return (image_inputs.get(PRE_ENCODED_IMAGES_KEY) or {}).get("image")


def pre_encoded_videos(image_inputs: Mapping[str, Any]) -> Any | None:
    """The same for videos: `pooler_output` holds one (tokens, D) tensor per video (all its frames)."""
    return (image_inputs.get(PRE_ENCODED_IMAGES_KEY) or {}).get("video")
