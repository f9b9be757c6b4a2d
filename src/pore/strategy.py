"""A strategy = a pruning method + a reweighting prior + their hyperparameters, registered by name.

The names of the fields are the config keys that users and sweeps set: `strategy.keep`, `strategy.layer`,
`strategy.prior.alpha`, `strategy.prior.sigma`, `strategy.prior.position`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pore.methods import METHODS
from pore.priors import PriorConfig
from pore.registry import Registry


@dataclass(frozen=True)
class Strategy:
    """How to prune. `keep` (image tokens kept per image) wins over `ratio` (share kept) when both are set."""

    name: str = "none"
    method: str = "none"
    layer: int = 2
    keep: int | None = None
    ratio: float | None = 0.25
    prior: PriorConfig = field(default_factory=PriorConfig)
    seed: int = 0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> Strategy:
        """Build from a nested mapping (e.g. a Hydra `strategy` node); unknown keys are an error."""
        settings = dict(settings)
        prior = settings.pop("prior", None) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise ValueError(f"unknown strategy settings {unknown}; valid settings: {sorted(names)}")
        prior_config = prior if isinstance(prior, PriorConfig) else PriorConfig.from_mapping(prior)
        return cls(**settings, prior=prior_config)

    def replace(self, **changes: Any) -> Strategy:
        """A copy with some settings changed; `prior` may be a mapping of prior settings to update."""
        prior = changes.pop("prior", None)
        if isinstance(prior, Mapping):
            current = {k: v for k, v in dataclasses.asdict(self.prior).items() if k != "params"}
            prior = PriorConfig.from_mapping({**current, **self.prior.params, **prior})
        if prior is not None:
            changes["prior"] = prior
        return dataclasses.replace(self, **changes)

    @property
    def prunes(self) -> bool:
        return METHODS.get(self.method).prunes

    def validate(self, num_layers: int | None = None) -> Strategy:
        """Check every setting; returns self so it chains. Errors name the valid range."""
        METHODS.get(self.method)
        self.prior.validate()
        if not self.prunes:
            return self
        if self.keep is None and self.ratio is None:
            raise ValueError("set strategy.keep (tokens kept per image) or strategy.ratio (share kept)")
        if self.keep is not None and (
            isinstance(self.keep, bool) or int(self.keep) != self.keep or self.keep < 1
        ):
            raise ValueError(f"strategy.keep must be a positive integer, got {self.keep}")
        if self.keep is None and not 0.0 < self.ratio <= 1.0:  # also rejects NaN
            raise ValueError(f"strategy.ratio must be in (0, 1], got {self.ratio}")
        if num_layers is not None and not 1 <= self.layer < num_layers:
            raise ValueError(
                f"strategy.layer must be in [1, {num_layers - 1}] for this {num_layers}-layer language model "
                f"(pruning happens before layer K and is scored in layer K-1), got {self.layer}"
            )
        return self

    def budget(self, tokens_in_image: int) -> int:
        """How many of an image's `tokens_in_image` prunable tokens to keep."""
        if self.keep is not None:
            return int(self.keep)
        return max(1, round(self.ratio * tokens_in_image))


STRATEGIES: Registry[Strategy] = Registry("strategy")
STRATEGIES.add("none", Strategy(name="none", method="none"))
STRATEGIES.add("fastv", Strategy(name="fastv", method="fastv"))
STRATEGIES.add("random", Strategy(name="random", method="random"))
# PoRe defaults: the FastV curve in the PoRe code falls from 1.0 to about 0.39 over the 24 rows of LLaVA-1.5,
# so both predefined priors end near 0.4 at the bottom row (1 - 0.6 = 0.4; exp(-0.95) = 0.39).
STRATEGIES.add(
    "pore_linear",
    Strategy(name="pore_linear", method="fastv", prior=PriorConfig("linear", params={"alpha": 0.6})),
)
STRATEGIES.add(
    "pore_exponential",
    Strategy(
        name="pore_exponential", method="fastv", prior=PriorConfig("exponential", params={"sigma": 0.95})
    ),
)


def build_strategy(name: str, **overrides: Any) -> Strategy:
    """A predefined strategy with some settings changed, e.g. `build_strategy("pore_linear", keep=64)`."""
    return STRATEGIES.get(name).replace(**overrides)
