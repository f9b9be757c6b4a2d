"""The benchmark's settings: the `bench` section of conf/bench.yaml as a checked dataclass."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Targets:
    """The issue's acceptance targets, checked on the setting they are defined for."""

    batch: int = 32
    budget: int = 64
    implementation: str = "sdpa"
    min_speedup: float = 3.0
    min_achieved_over_ideal: float = 0.9
    max_overhead_pct: float = 2.0


@dataclass(frozen=True)
class BenchSettings:
    architecture: str | None = None
    weights: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    budgets: tuple[int, ...] = (576, 192, 128, 64)
    layer: int = 2
    strategies: tuple[str, ...] = ("fastv", "pore_linear")
    implementations: tuple[str, ...] = ("sdpa", "flash_attention_2")
    include_eager_fastv: bool = True
    prefix_tokens: int = 35
    suffix_tokens: int = 40
    warmup: int = 3
    repeats: int = 10
    instrumented_repeats: int = 5
    generate_repeats: int = 3
    new_tokens: int = 16
    seed: int = 0
    threads: int | None = None
    cpu_clock: str = "auto"
    profile: bool = False
    output: str | None = None
    targets: Targets = field(default_factory=Targets)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> BenchSettings:
        raw = dict(raw)
        prompt = raw.pop("prompt", None) or {}
        raw.setdefault("prefix_tokens", prompt.get("prefix_tokens", 35))
        raw.setdefault("suffix_tokens", prompt.get("suffix_tokens", 40))
        targets = Targets(**(raw.pop("targets", None) or {}))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown bench settings {unknown}; valid: {sorted(names | {'prompt'})}")
        for key in ("batch_sizes", "budgets", "strategies", "implementations"):
            if key in raw:
                value = raw[key]
                raw[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        settings = cls(**raw, targets=targets)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"bench.batch_sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"bench.budgets must be positive integers, got {list(self.budgets)}")
        if self.layer < 1:
            raise ValueError(f"bench.layer (K) must be >= 1, got {self.layer}")
        if self.repeats < 1 or self.warmup < 0 or self.generate_repeats < 0 or self.instrumented_repeats < 0:
            raise ValueError(
                "bench.repeats must be >= 1; warmup, generate_repeats, instrumented_repeats >= 0"
            )
        if self.new_tokens < 1:
            raise ValueError(f"bench.new_tokens must be >= 1, got {self.new_tokens}")
        if self.cpu_clock not in ("auto", "wall", "process"):
            raise ValueError(f"bench.cpu_clock must be auto, wall or process, got {self.cpu_clock!r}")
        unknown = set(self.implementations) - {"sdpa", "flash_attention_2", "eager"}
        if unknown:
            raise ValueError(f"bench.implementations: unknown {sorted(unknown)}; use sdpa, flash_attention_2")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("bench.device=cuda but no CUDA device is visible")
        return device

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"bench.dtype must be auto or a torch dtype name, got {self.dtype!r}")
        return dtype


def implementation_problem(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why attention implementation `name` cannot run here (None = it can)."""
    if name != "flash_attention_2":
        return None
    if device.type != "cuda":
        return "flash_attention_2 needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attention_2 needs float16 or bfloat16 weights, not {dtype}"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (see docs/benchmarking.md)"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return "flash_attn is installed but transformers cannot use it (version or GPU)"
    return None
