"""A strategy = a pruning method + a reweighting prior + where and how much to prune.

Strategies are not defined in Python: the named presets are config files (conf/strategy/, composing
conf/method/ and conf/prior/), read by `pore.presets.build_strategy` and by the command-line programs alike.
This module is what such a config becomes, and `Strategy.resolve`, the one place where a strategy is checked
and fitted to a model: what the engine runs is what `resolve` returns.

The names of the fields are the config keys that users and sweeps set: `strategy.keep`, `strategy.layer`,
`strategy.prior.alpha`, `strategy.prior.sigma`, `strategy.prior.position`, `strategy.options.<name>`.

Multi-stage methods (PyramidDrop) give lists: `strategy.layer=[8,16,24] strategy.ratio=[0.5,0.25,0.125]`
prunes before layers 8, 16 and 24, keeping 50 / 25 / 12.5 % of each image's tokens from there on.

`strategy.positions` says which RoPE positions the kept tokens get: `original` (their place in the unpruned
prompt, FastV's mask-based pruning), `compact` (0..L'-1 over the kept sequence, and decoding continues from
the compacted length: what PyramidDrop, SparseVLM and FasterVLM do by removing the tokens), or `official`
(default): the method's own choice (`PruningMethod.official_positions`; docs/methods.md).

`strategy.reference_depth` says that `layer` is written for a language model of that many layers: on a model
of another depth the layers are scaled proportionally (round(K * depth / reference_depth); stages that round
to the same layer move up one layer each, where the model has room). The PyramidDrop presets split a 32-layer
LLM into four equal stages (8/16/24), so they set 32: a 40-layer LLM prunes before 10/20/30, the 4-layer
embedded model before 1/2/3; HiMAP's 2/8 becomes 1/2 there. null = the layers as written.

A method says which half of PoRe it takes (`PruningMethod.prior_use`): attention-scored methods any prior,
[CLS]-attention methods only padding suppression, similarity / diversity methods none; `resolve` refuses
the rest in one line, as it refuses more stages than a method has a rule for (`PruningMethod.max_stages`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pore.adapters.base import ModelFacts
from pore.errors import did_you_mean
from pore.methods import METHODS
from pore.methods.requests import VISION_REQUESTS
from pore.priors import PriorConfig
from pore.priors.base import BY_DATA

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


def _spread(layers: tuple[int, ...]) -> tuple[int, ...]:
    """Scaled layers made increasing: a stage that rounds onto the previous one's layer moves up one."""
    spread: list[int] = []
    for layer in layers:
        spread.append(max(layer, spread[-1] + 1) if spread else layer)
    return tuple(spread)


def _as_tuple(value: Any) -> Any:
    """Lists (from YAML / Hydra) become tuples, so that a strategy stays immutable and hashable."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Strategy:
    """How to prune. `keep` (image tokens kept per image) wins over `ratio` (share kept) when both are set.

    `layer`, `keep` and `ratio` are single values for one pruning stage, or lists of one value per stage
    (`keep` / `ratio` may stay single values, then every stage uses them). `reweight` says whether the prior
    applies at every stage (`all`) or only at the first (`first`). `options` are the method's own settings.
    The defaults are those of conf/strategy/none.yaml (a test keeps them equal).
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
    # `layer` is written for an LLM this deep (scaled to others by `resolve`); None: as written
    reference_depth: int | None = None

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
        `layer`s are the model's own (`reference_depth` is cleared unless it is given too), and a prior
        setting given here holds for every data set (its `<key>_by_data` table is dropped)."""
        prior = changes.pop("prior", None)
        if isinstance(prior, Mapping):
            current = {k: v for k, v in dataclasses.asdict(self.prior).items() if k != "params"}
            params = {k: v for k, v in self.prior.params.items() if k.removesuffix(BY_DATA) not in prior}
            prior = PriorConfig.from_mapping({**current, **params, **prior})
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

    @property
    def lowest_layer(self) -> int:
        """Methods scored by the language model's attention read it in layer K-1, so K >= 1 (K >= j for a
        method that reads layer K-j); the others may prune before the first layer (K = 0:
        the language model never sees the dropped tokens)."""
        return METHODS.get(self.method).lowest_layer()

    def stages(self) -> list[PruningStage]:
        """The pruning stages in layer order (`resolve` first for readable errors)."""
        count = len(self.layers)

        def per_stage(value: Any) -> tuple:
            return value if isinstance(value, tuple) else (value,) * count

        keeps, ratios = per_stage(self.keep), per_stage(self.ratio)
        return [
            PruningStage(layer, keep, ratio, reweight=self.reweight == "all" or index == 0)
            for index, (layer, keep, ratio) in enumerate(zip(self.layers, keeps, ratios, strict=True))
        ]

    def budget(self, tokens_in_image: int) -> int:
        """How many of an image's `tokens_in_image` prunable tokens the first stage keeps."""
        return self.stages()[0].budget(tokens_in_image)

    # ------------------------------------------------------------------ resolution

    def resolve(self, model: ModelFacts | None = None, data: str | None = None) -> Strategy:
        """Check every setting and fit the strategy to `model` and to the data set named `data`: the one
        place where a strategy becomes what the engine runs. Errors name the setting and the valid range.

        - layers written for `reference_depth` layers are scaled to the model's depth;
        - `positions=official` becomes the method's own choice (`original` where 3-D M-RoPE positions
          cannot be renumbered);
        - prior settings chosen per data set (`<key>_by_data`) are applied;
        - budgets are checked against the model's image tokens, padding suppression against the family.

        Without `model` only what does not depend on the model is checked. Resolving a resolved strategy
        against the same model returns it unchanged.
        """
        method = METHODS.get(self.method)
        prior = self.prior.for_data(data)
        prior.validate()
        method.check_options(self.options)
        resolved = dataclasses.replace(self, prior=prior)
        if not self.prunes:
            return resolved
        resolved._check_settings()
        resolved._check_method_fit()
        if model is not None:
            resolved = resolved._for_depth(model.num_layers)
            resolved = dataclasses.replace(resolved, positions=resolved._positions_for(model))
            resolved._check_model(model)
        return resolved

    def _check_settings(self) -> None:
        """What can be checked without a model: names, types, one value per stage, budgets."""
        if self.positions not in POSITIONS:
            raise ValueError(
                f"strategy.positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}"
            )
        if self.reweight not in ("all", "first"):
            raise ValueError(f"strategy.reweight must be 'all' or 'first', got {self.reweight!r}")
        if not self.layers:
            raise ValueError("strategy.layer must name at least one layer")
        self._check_types()
        reference = self.reference_depth
        if reference is not None and (
            isinstance(reference, bool) or not isinstance(reference, int) or reference < 1
        ):
            raise ValueError(
                f"strategy.reference_depth must be a positive integer or null, got {reference!r}"
            )
        for key in ("keep", "ratio"):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != len(self.layers):
                raise ValueError(
                    f"strategy.{key} has {len(value)} values but strategy.layer names {len(self.layers)} "
                    f"stages; give one value per stage or a single value"
                )
        if any(b <= a for a, b in itertools.pairwise(self.layers)):
            raise ValueError(f"strategy.layer must list increasing layers, got {list(self.layers)}")
        for stage in self.stages():
            if stage.keep is None and stage.ratio is None:
                raise ValueError("set strategy.keep (tokens kept per image) or strategy.ratio (share kept)")
            if stage.keep is not None and stage.keep < 1:
                raise ValueError(f"strategy.keep must be a positive integer, got {stage.keep}")
            if stage.keep is None and not 0.0 < stage.ratio <= 1.0:  # also rejects NaN
                raise ValueError(f"strategy.ratio must be in (0, 1], got {stage.ratio}")
        keeps = [stage.keep for stage in self.stages()]
        if None not in keeps and any(b > a for a, b in itertools.pairwise(keeps)):
            raise ValueError(
                f"strategy.keep={keeps} grows from stage to stage; each stage keeps at most the last's"
            )

    def _check_method_fit(self) -> None:
        """What the method has a rule for: its number of stages, and which half of a prior (PoRe) it takes."""
        method = METHODS.get(self.method)
        if method.max_stages is not None and len(self.layers) > method.max_stages:
            raise ValueError(
                f"{self.method}: its rule has at most {method.max_stages} pruning stages, but strategy.layer "
                f"names {len(self.layers)} ({list(self.layers)}); give at most {method.max_stages} layers"
            )
        weighs = self.prior.name != "none"
        if method.prior_use == "none" and (weighs or self.prior.suppress_padding):
            raise ValueError(
                f"{self.method}: it ranks by similarity / diversity, not attention, so there is no attention "
                "bias for a prior to correct; set strategy.prior.name=none and "
                "strategy.prior.suppress_padding=false"
            )
        if method.prior_use == "suppression" and weighs:
            raise ValueError(
                f"{self.method}: it ranks by the vision tower's [CLS] attention, which takes only PoRe's "
                "padding suppression (strategy.prior.suppress_padding=true), not position weights; set "
                "strategy.prior.name=none"
            )

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

    def _for_depth(self, num_layers: int | None) -> Strategy:
        """Layers written for `reference_depth` layers scaled to a `num_layers`-layer model, then checked
        against its depth; `reference_depth` is cleared either way."""
        reference, lowest = self.reference_depth, self.lowest_layer
        scaled = self.layers
        if num_layers is not None and reference is not None and num_layers != reference:
            rounded = tuple(max(lowest, round(layer * num_layers / reference)) for layer in self.layers)
            scaled = _spread(rounded)
            fits_reference = all(lowest <= k < reference for k in self.layers)
            broken = any(b <= a for a, b in itertools.pairwise(scaled)) or scaled[-1] >= num_layers
            if fits_reference and broken:
                stages, room = len(scaled), num_layers - lowest
                fix = (
                    f"e.g. strategy.layer={list(range(lowest, lowest + stages))} "
                    "strategy.reference_depth=null"
                    if stages <= room
                    else f"this model has room for at most {room} stages: give fewer layers, keeps and ratios"
                )
                raise ValueError(
                    f"strategy.layer={list(self.layers)} (written for a {reference}-layer language model) "
                    f"does not scale to this {num_layers}-layer model (it gives {list(rounded)}); set "
                    f"increasing layers in [{lowest}, {num_layers - 1}], {fix}"
                )
            if not fits_reference:  # the layers as written are wrong: say so in the model's own terms
                scaled = self.layers
        if num_layers is not None:
            for layer in scaled:
                if not lowest <= layer < num_layers:
                    reason = "pruning happens before layer K"
                    if lowest:
                        reason += (
                            " and is scored in layer K-1" if lowest == 1 else f" and reads layer K-{lowest}"
                        )
                    raise ValueError(
                        f"strategy.layer must be in [{lowest}, {num_layers - 1}] for this {num_layers}-layer "
                        f"language model ({reason}), got {layer}"
                    )
        layer = scaled if isinstance(self.layer, tuple) else scaled[0]
        return dataclasses.replace(self, layer=layer, reference_depth=None)

    def _positions_for(self, model: ModelFacts) -> Literal["original", "compact"]:
        """`positions` for this model: `official` becomes the method's own choice.

        Qwen2-VL's 3-D M-RoPE gives image tokens (t, row, col) positions and the text after an image the
        largest of them + 1; no official code of these methods compacts such positions, and renumbering
        them would break the 2-D layout the model was trained with, so `official` keeps the original
        positions there and an explicit `compact` is refused.
        """
        wanted = (
            METHODS.get(self.method).official_positions if self.positions == "official" else self.positions
        )
        if wanted == "compact" and model.multimodal_rope:
            if self.positions == "compact":
                raise ValueError(
                    f"strategy.positions=compact renumbers 1-D RoPE positions, but {model.family} models use "
                    f"3-D M-RoPE positions that cannot be compacted; use strategy.positions=original (or "
                    f"official, which keeps them for this family)"
                )
            return "original"
        return wanted

    def _check_model(self, model: ModelFacts) -> None:
        """Budgets against the model's image tokens; padding suppression against the family and the run; a
        method that reads the vision tower against a family whose tower gives nothing per visual token."""
        method = METHODS.get(self.method)
        reads_tower = method.vision_attention or any(isinstance(r, VISION_REQUESTS) for r in method.requests)
        if reads_tower and model.vision_requests is False:
            raise ValueError(
                f"{self.method} scores with the vision tower's [CLS] attention / features per visual token, "
                f"which {model.family} models do not give (no [CLS] token, or tokens that merge patches); "
                "choose a method scored by the language model's attention (e.g. strategy=fastv)"
            )
        last = model.last_prunable_layer
        if last is not None and max(self.layers) > last:
            raise ValueError(
                f"strategy.layer={list(self.layers)} cuts at layer {max(self.layers)}, but {model.family} "
                f"models can only be pruned at layers <= {last}: {model.prunable_layers_reason}; choose "
                f"layers <= {last}"
            )
        if model.image_tokens is not None:
            for stage in self.stages():
                if stage.keep is not None and stage.keep > model.image_tokens:
                    n = model.image_tokens
                    raise ValueError(
                        f"strategy.keep={stage.keep} is larger than the {n} prunable image tokens of an "
                        f"image of this model; use keep <= {n}, or strategy.ratio for a share of each image"
                    )
        if self.prior.suppress_padding and not model.pads_to_square:
            raise ValueError(
                f"prior.suppress_padding drops tokens of the pad-to-square border, but {model.family} models "
                f"do not pad images to a square; set strategy.prior.suppress_padding=false"
            )
        if self.prior.suppress_padding and model.images_padded is False:
            raise ValueError(
                "prior.suppress_padding drops tokens of the pad-to-square border, but these images were not "
                "padded to a square (the llava-hf processor resizes and centre-crops them: no border); use "
                "protocol=llava (LLaVA-1.5's expand2square padding) or strategy.prior.suppress_padding=false"
            )
