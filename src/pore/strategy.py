"""A strategy = a pruning method + a reweighting prior + their hyperparameters, registered by name.

The names of the fields are the config keys that users and sweeps set: `strategy.keep`, `strategy.layer`,
`strategy.prior.alpha`, `strategy.prior.sigma`, `strategy.prior.position`, `strategy.options.<name>`.

Multi-stage methods (PyramidDrop) give lists: `strategy.layer=[8,16,24] strategy.ratio=[0.5,0.25,0.125]`
prunes before layers 8, 16 and 24, keeping 50 / 25 / 12.5 % of each image's tokens from there on.

`strategy.positions` says which RoPE positions the kept tokens get: `original` (their place in the unpruned
prompt, FastV's mask-based pruning), `compact` (0..L'-1 over the kept sequence, and decoding continues from
the compacted length: what PyramidDrop, SparseVLM and FasterVLM do by removing the tokens), or `official`
(default): the method's own choice (`PruningMethod.official_positions`; docs/methods.md).

`strategy.reference_depth` says that `layer` is written for a language model of that many layers: on a model
of another depth the layers are scaled proportionally (`validate(num_layers)` returns the scaled strategy).
The PyramidDrop presets split a 32-layer LLM into four equal stages (8/16/24), so they set 32: a 40-layer
LLM prunes before 10/20/30, the 4-layer embedded model before 1/2/3. null = the layers as written.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pore.calibration.priorfile import embedded_prior_path
from pore.errors import did_you_mean
from pore.methods import METHODS
from pore.priors import PriorConfig
from pore.registry import Registry

POSITIONS = ("official", "original", "compact")


@dataclass(frozen=True)
class PruningStage:
    """One pruning point: before decoder layer `layer`, keep `keep` tokens (or `ratio` of them) per image."""

    layer: int
    keep: int | None
    ratio: float | None
    reweight: bool  # whether the prior multiplies the scores at this stage

    def budget(self, tokens_in_image: int) -> int:
        """How many of an image's `tokens_in_image` prunable tokens (counted before any pruning) to keep."""
        if self.keep is not None:
            return int(self.keep)
        return max(1, round(self.ratio * tokens_in_image))


def _as_tuple(value: Any) -> Any:
    """Lists (from YAML / Hydra) become tuples, so that a strategy stays immutable and hashable."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Strategy:
    """How to prune. `keep` (image tokens kept per image) wins over `ratio` (share kept) when both are set.

    `layer`, `keep` and `ratio` are single values for one pruning stage, or lists of one value per stage
    (`keep` / `ratio` may stay single values, then every stage uses them). `reweight` says whether the prior
    applies at every stage (`all`) or only at the first (`first`). `options` are the method's own settings.
    """

    name: str = "none"
    method: str = "none"
    layer: int | tuple[int, ...] = 2
    keep: int | tuple[int, ...] | None = None
    ratio: float | tuple[float, ...] | None = 0.25
    prior: PriorConfig = field(default_factory=PriorConfig)
    reweight: Literal["all", "first"] = "all"
    options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    positions: Literal["official", "original", "compact"] = "official"
    reference_depth: int | None = (
        None  # `layer` is written for an LLM this deep (scaled to others); None: as is
    )

    def __post_init__(self) -> None:
        for key in ("layer", "keep", "ratio"):
            object.__setattr__(self, key, _as_tuple(getattr(self, key)))
        object.__setattr__(self, "options", dict(self.options or {}))
        # A measured prior (pore_calibrated) reads the profile of the layer it prunes at (the first stage's).
        first = self.layers[0] if self.layers and isinstance(self.layers[0], int) else None
        object.__setattr__(self, "prior", self.prior.at_layer(first))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> Strategy:
        """Build from a nested mapping (e.g. a Hydra `strategy` node); unknown keys are an error."""
        settings = dict(settings)
        prior = settings.pop("prior", None) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            hint = "".join(did_you_mean(name, names) for name in unknown)
            raise ValueError(f"unknown strategy settings {unknown}{hint}; valid settings: {sorted(names)}")
        prior_config = prior if isinstance(prior, PriorConfig) else PriorConfig.from_mapping(prior)
        return cls(**settings, prior=prior_config)

    def replace(self, **changes: Any) -> Strategy:
        """A copy with some settings changed; `prior` may be a mapping of prior settings to update. New
        `layer`s are the model's own (`reference_depth` is cleared unless it is given too)."""
        prior = changes.pop("prior", None)
        if isinstance(prior, Mapping):
            current = {k: v for k, v in dataclasses.asdict(self.prior).items() if k != "params"}
            prior = PriorConfig.from_mapping({**current, **self.prior.params, **prior})
        if prior is not None:
            changes["prior"] = prior
        if "layer" in changes:  # layers given for a model are that model's layers: no preset scaling
            changes.setdefault("reference_depth", None)
        return dataclasses.replace(self, **changes)

    @property
    def prunes(self) -> bool:
        return METHODS.get(self.method).prunes

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers before which tokens are pruned, one per stage."""
        return self.layer if isinstance(self.layer, tuple) else (self.layer,)

    def stages(self) -> list[PruningStage]:
        """The pruning stages in layer order (call `validate` first for readable errors)."""
        count = len(self.layers)

        def per_stage(value: Any) -> tuple:
            return value if isinstance(value, tuple) else (value,) * count

        keeps, ratios = per_stage(self.keep), per_stage(self.ratio)
        return [
            PruningStage(layer, keep, ratio, reweight=self.reweight == "all" or index == 0)
            for index, (layer, keep, ratio) in enumerate(zip(self.layers, keeps, ratios, strict=True))
        ]

    def for_depth(self, num_layers: int) -> Strategy:
        """This strategy on a `num_layers`-layer language model: layers written for `reference_depth`
        layers scaled proportionally (round(K * num_layers / reference_depth)); as is without one."""
        if self.reference_depth is None:
            return self
        reference = self.reference_depth
        if isinstance(reference, bool) or not isinstance(reference, int) or reference < 1:
            raise ValueError(
                f"strategy.reference_depth must be a positive integer or null, got {reference!r}"
            )
        self._check_types()
        lowest = 1 if METHODS.get(self.method).attention_queries is not None else 0
        written = self.layers
        fits_reference = all(lowest <= k < reference for k in written) and all(
            b > a for a, b in itertools.pairwise(written)
        )
        if (
            num_layers == reference or not fits_reference
        ):  # nothing to scale, or validate() says what is wrong
            return dataclasses.replace(self, reference_depth=None)
        scaled = tuple(max(lowest, round(layer * num_layers / reference)) for layer in self.layers)
        if any(b <= a for a, b in itertools.pairwise(scaled)) or scaled[-1] >= num_layers:
            stages, room = len(scaled), num_layers - lowest
            fix = (
                f"e.g. strategy.layer={list(range(lowest, lowest + stages))} strategy.reference_depth=null"
                if stages <= room
                else f"this model has room for at most {room} stages: give fewer layers, keeps and ratios"
            )
            raise ValueError(
                f"strategy.layer={list(self.layers)} (written for a {reference}-layer language model) does "
                f"not scale to this {num_layers}-layer model (it gives {list(scaled)}); set increasing "
                f"layers in [{lowest}, {num_layers - 1}], {fix}"
            )
        layer = scaled if isinstance(self.layer, tuple) else scaled[0]
        return dataclasses.replace(self, layer=layer, reference_depth=None)

    def _check_types(self) -> None:
        """Numbers where numbers belong (the command line turns `strategy.keep=abc` into a string)."""
        kinds = {"layer": (int, "an integer layer index"), "keep": (int, "a positive integer")}
        kinds["ratio"] = ((int, float), "a number in (0, 1]")
        for key, (kind, wanted) in kinds.items():
            value = getattr(self, key)
            for item in value if isinstance(value, tuple) else (value,):
                if item is None and key != "layer":
                    continue
                if isinstance(item, bool) or not isinstance(item, kind):
                    raise ValueError(
                        f"strategy.{key} must be {wanted} (or a list of them, one per stage), got {item!r}"
                    )

    def validate(self, num_layers: int | None = None) -> Strategy:
        """Check every setting; returns the strategy to use (self, or its layers scaled to `num_layers`
        when `reference_depth` is set), so it chains. Errors name the valid range."""
        method = METHODS.get(self.method)
        self.prior.validate()
        method.check_options(self.options)
        if not self.prunes:
            return self
        if self.positions not in POSITIONS:
            raise ValueError(
                f"strategy.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}"
            )
        if self.reweight not in ("all", "first"):
            raise ValueError(f"strategy.reweight must be 'all' or 'first', got {self.reweight!r}")
        if not self.layers:
            raise ValueError("strategy.layer must name at least one layer")
        self._check_types()
        if num_layers is not None and self.reference_depth is not None:
            return self.for_depth(num_layers).validate(num_layers)
        layers = self.layers
        for key in ("keep", "ratio"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != len(layers):
                raise ValueError(
                    f"strategy.{key} has {len(value)} values but strategy.layer names {len(layers)} stages; "
                    f"give one value per stage or a single value"
                )
        if any(b <= a for a, b in itertools.pairwise(layers)):
            raise ValueError(f"strategy.layer must list increasing layers, got {list(layers)}")
        for stage in self.stages():
            if stage.keep is None and stage.ratio is None:
                raise ValueError("set strategy.keep (tokens kept per image) or strategy.ratio (share kept)")
            if stage.keep is not None and (
                isinstance(stage.keep, bool) or int(stage.keep) != stage.keep or stage.keep < 1
            ):
                raise ValueError(f"strategy.keep must be a positive integer, got {stage.keep}")
            if stage.keep is None and not 0.0 < stage.ratio <= 1.0:  # also rejects NaN
                raise ValueError(f"strategy.ratio must be in (0, 1], got {stage.ratio}")
            # Methods scored by the language model's attention read it in layer K-1, so K >= 1; the others
            # may prune before the first layer (K = 0: the language model never sees the dropped tokens).
            lowest = 1 if method.attention_queries is not None else 0
            if num_layers is not None and not lowest <= stage.layer < num_layers:
                reason = (
                    "pruning happens before layer K and is scored in layer K-1"
                    if lowest
                    else "pruning happens before layer K"
                )
                raise ValueError(
                    f"strategy.layer must be in [{lowest}, {num_layers - 1}] for this {num_layers}-layer "
                    f"language model ({reason}), got {stage.layer}"
                )
        return self

    def budget(self, tokens_in_image: int) -> int:
        """How many of an image's `tokens_in_image` prunable tokens the first stage keeps."""
        return self.stages()[0].budget(tokens_in_image)

    def resolved_positions(self) -> Literal["original", "compact"]:
        """`positions` with `official` replaced by the method's own choice."""
        if self.positions == "official":
            return METHODS.get(self.method).official_positions
        return self.positions


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

# PoRe with the prior measured by src/calibrate.py (default: the embedded model's own calibration folder;
# a folder holds layer<K>.json per pruning layer, and the strategy's layer picks its file).
STRATEGIES.add(
    "pore_calibrated",
    Strategy(
        name="pore_calibrated",
        method="fastv",
        prior=PriorConfig("calibrated", params={"path": embedded_prior_path(), "form": "profile"}),
    ),
)

LINEAR = PriorConfig("linear", params={"alpha": 0.6})
EXPONENTIAL = PriorConfig("exponential", params={"sigma": 0.95})
# PyramidDrop's published schedule for 32-layer LLMs: before layers 8 / 16 / 24, keep 50 / 25 / 12.5 %.
# Scored, as the official code, with layer K's own norm + q / k projections on layer K's input. The stages
# split the LLM into four equal parts, so other depths get the same split (reference_depth).
PDROP = {
    "layer": (8, 16, 24),
    "ratio": (0.5, 0.25, 0.125),
    "options": {"score_from": "own_layer"},
    "reference_depth": 32,
}
STRATEGIES.add("pdrop", Strategy(name="pdrop", method="pdrop", **PDROP))
# SparseVLM's official v1 schedule for LLaVA-1.5 (32 layers): scored in layers 2 / 6 / 15 and pruned right
# after them (K = 3 / 7 / 16), keeping its budget table for 192 / 128 / 96 / 64 tokens on average
# (Gumpest/SparseVLMs llava/model/language_model/score.py, USE_VERSION=1_0), raters from the embeddings.
SPARSEVLM_LAYERS = (3, 7, 16)
SPARSEVLM_BUDGETS = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
SPARSEVLM = {
    "layer": SPARSEVLM_LAYERS,
    "keep": SPARSEVLM_BUDGETS[192],
    "ratio": None,
    "options": {"raters": "official", "recycle": "none"},
}
STRATEGIES.add("sparsevlm", Strategy(name="sparsevlm", method="sparsevlm", **SPARSEVLM))
for _average in (128, 96, 64):
    STRATEGIES.add(
        f"sparsevlm_{_average}",
        Strategy(
            name=f"sparsevlm_{_average}",
            method="sparsevlm",
            **{**SPARSEVLM, "keep": SPARSEVLM_BUDGETS[_average]},
        ),
    )
# FasterVLM and pooling decide from the image alone, so they prune before the language model, as published.
STRATEGIES.add(
    "fastervlm",
    Strategy(name="fastervlm", method="fastervlm", layer=0, options={"budget": "per_view"}),
)
STRATEGIES.add("pool", Strategy(name="pool", method="pool", layer=0))
STRATEGIES.add(
    "pool_average", Strategy(name="pool_average", method="pool", layer=0, options={"mode": "average"})
)
for _method, _settings in (("pdrop", PDROP), ("sparsevlm", {})):
    for _form, _prior in (("linear", LINEAR), ("exponential", EXPONENTIAL)):
        _name = f"pore_{_method}_{_form}"
        STRATEGIES.add(_name, Strategy(name=_name, method=_method, prior=_prior, **_settings))

# PoRe as its authors run it (intcomp/attention-bias, tag=after; docs/pore_presets.md): exponential weights
# over the raster index at the first stage only, padding suppression with each method's threshold, and for
# FastV the budget cut to the tokens that are not padding. The config files add a per-benchmark sigma table.
_AUTHORS_PRIOR = {"name": "exponential", "position": "index", "suppress_padding": True}
STRATEGIES.add(
    "pore_authors_fastv",
    Strategy(
        name="pore_authors_fastv",
        method="fastv",
        layer=2,
        keep=128,
        ratio=None,
        reweight="first",
        prior=PriorConfig(
            **_AUTHORS_PRIOR, pad_threshold=0.5, budget_from_unpadded=True, params={"sigma": 0.98}
        ),
    ),
)
STRATEGIES.add(
    "pore_authors_pdrop",
    Strategy(
        name="pore_authors_pdrop",
        method="pdrop",
        layer=(2, 10, 20),
        ratio=(0.32, 0.16, 0.08),
        reweight="first",
        prior=PriorConfig(**_AUTHORS_PRIOR, pad_threshold=0.01, params={"sigma": 1.915}),
    ),
)
STRATEGIES.add(
    "pore_authors_sparsevlm",
    Strategy(
        name="pore_authors_sparsevlm",
        method="sparsevlm",
        layer=(3, 7, 16),  # SparseVLM scores in layers 2 / 6 / 15 and prunes right after
        keep=(303, 110, 36),  # the official v1 table for RETAINED_TOKENS=128
        ratio=None,
        reweight="first",
        prior=PriorConfig(**_AUTHORS_PRIOR, pad_threshold=0.5, params={"sigma": 1.995}),
    ),
)


def build_strategy(name: str, **overrides: Any) -> Strategy:
    """A predefined strategy with some settings changed, e.g. `build_strategy("pore_linear", keep=64)`."""
    return STRATEGIES.get(name).replace(**overrides)
