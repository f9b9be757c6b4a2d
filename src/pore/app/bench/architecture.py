"""Build the benchmarked model from its architecture alone: no hub access, random weights unless given.

Speed does not depend on the weights, so the benchmark needs only the exact shapes. They come from a JSON
config in `assets/architectures/` (the LLaVA-1.5 checkpoints' config.json written out, because the hub is
not reachable from the benchmark machines), or from a local checkpoint folder's own config.json.

On a GPU the model is constructed directly on the device in the benchmark dtype with transformers' weight
initialisation switched off, then filled with a cheap seeded normal draw: building the 7B model this way
takes seconds instead of minutes of CPU-side initialisation followed by a 14 GB copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PretrainedConfig
from transformers.initialization import no_init_weights

from pore.assets import assets_root

ARCHITECTURES_DIR = assets_root() / "architectures"


@dataclass(frozen=True)
class Architecture:
    """Where a model's shapes come from, and whether real weights sit next to them."""

    name: str
    source: str  # the JSON file or checkpoint folder read
    config: PretrainedConfig
    weights: str | None  # a local checkpoint folder with weights, else None


def _without_comments(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Drop `_source`-style keys: JSON has no comments, and config classes would keep them as attributes."""
    return {
        key: _without_comments(value) if isinstance(value, Mapping) else value
        for key, value in raw.items()
        if not key.startswith("_")
    }


def config_from_dict(raw: Mapping[str, Any]) -> PretrainedConfig:
    """A transformers config from a plain dict naming its `model_type` (like a checkpoint's config.json)."""
    raw = _without_comments(raw)
    model_type = raw.get("model_type")
    if not model_type:
        raise ValueError("an architecture needs a model_type (e.g. 'llava')")
    return AutoConfig.for_model(**raw)


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def resolve_architecture(name: str | None, model_name: str, model_path: str | None) -> Architecture:
    """Find the architecture to benchmark.

    `name` (the `bench.architecture` setting) may be a JSON file, a checkpoint folder, or the name of a file
    in `assets/architectures/`; when it is None the model's own is used: `assets/architectures/<model_name>
    .json` if shipped, else `<model_path>/config.json` when `model_path` is a local folder.
    """
    candidates: list[Path] = []
    if name:
        candidates += [Path(name).expanduser(), ARCHITECTURES_DIR / f"{name}.json"]
    else:
        candidates.append(ARCHITECTURES_DIR / f"{model_name}.json")
        if model_path:
            candidates.append(Path(model_path).expanduser())
    for path in candidates:
        if path.is_dir() and (path / "config.json").is_file():
            config = config_from_dict(json.loads((path / "config.json").read_text()))
            return Architecture(path.name, str(path), config, str(path) if _has_weights(path) else None)
        if path.is_file():
            config = config_from_dict(json.loads(path.read_text()))
            return Architecture(path.stem, str(path), config, None)
    shipped = sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))
    raise FileNotFoundError(
        f"no architecture for {name or model_name!r} (looked at {[str(p) for p in candidates]}); "
        f"set bench.architecture to a JSON config or checkpoint folder, or one of: {', '.join(shipped)}"
    )


def _is_norm_weight(name: str, parameter: torch.Tensor) -> bool:
    return parameter.dim() == 1 and "norm" in name.lower() and name.endswith("weight")


@torch.no_grad()
def random_init_(model: torch.nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Fill every parameter in place: N(0, std) for matrices and embeddings, 1 for norm scales, 0 for biases.

    This is what transformers' own init does for these models, minus its per-module Python dispatch; the
    values only have to be finite and well scaled (no NaN / inf through 32 bf16 layers), not trained.
    """
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if _is_norm_weight(name, parameter):
            parameter.fill_(1.0)
        elif parameter.dim() == 1:
            parameter.zero_()
        else:
            parameter.normal_(0.0, std, generator=generator)


def build_model(
    architecture: Architecture,
    device: torch.device | str,
    dtype: torch.dtype,
    attn_implementation: str = "sdpa",
    weights: str = "auto",
    seed: int = 0,
) -> torch.nn.Module:
    """The model in eval mode on `device`: the checkpoint's weights (`weights` = pretrained, or auto with a
    local checkpoint) or random ones (`random`, or auto without)."""
    if weights not in ("auto", "random", "pretrained"):
        raise ValueError(f"bench.weights must be auto, random or pretrained, got {weights!r}")
    if weights == "pretrained" and architecture.weights is None:
        raise FileNotFoundError(f"{architecture.source} has no weights; use bench.weights=random")
    if architecture.weights is not None and weights != "random":
        model = AutoModelForImageTextToText.from_pretrained(
            architecture.weights, dtype=dtype, attn_implementation=attn_implementation
        )
        return model.to(device).eval()
    config = architecture.config
    config._attn_implementation = attn_implementation
    for key in getattr(config, "sub_configs", {}):
        getattr(config, key)._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # Allocated on the device in `dtype` and left uninitialised by transformers, then filled once below.
        with torch.device(device), no_init_weights():
            model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    random_init_(model, std=float(getattr(config, "initializer_range", 0.02) or 0.02), seed=seed)
    return model.eval()


def count_parameters(architecture: Architecture) -> int:
    """Parameters of the full model, counted on the meta device (no memory, no weights, no network)."""
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(architecture.config)
    return sum(parameter.numel() for parameter in model.parameters())


def describe(architecture: Architecture) -> dict[str, Any]:
    """The shapes that matter for speed, for the JSON report."""
    config = architecture.config
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    summary: dict[str, Any] = {
        "name": architecture.name,
        "source": architecture.source,
        "model_type": config.model_type,
        "text": {
            key: getattr(text, key, None)
            for key in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
    }
    if vision is not None:
        summary["vision"] = {
            key: getattr(vision, key, None)
            for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
        }
    return summary
