"""Everything about a run that can be checked before the weights load, checked before they load.

From the composed config: the strategy's keys and values, the benchmark and its data (the path opens, the
columns the benchmark needs are there, there is at least one row), the dtype and the logger; against the
model's *config* (`AutoConfig`, a small JSON file, no weights): the strategy's layers against the language
model's depth (presets written for another depth are scaled here, see `Strategy.reference_depth`) and its
budgets against the image-token count when that is fixed (LLaVA-1.5). A failed check raises a `UserError`:
one line, exit status 2, nothing written.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from omegaconf import DictConfig

from pore import config as build
from pore.data import Benchmark, DataError, StreamSource
from pore.data.loading import column_names, count_rows, open_stream
from pore.errors import UserError
from pore.strategy import Strategy

log = logging.getLogger("pore")
LOGGER_KINDS = ("csv", "wandb", "none")


@dataclass(frozen=True)
class ModelFacts:
    """What the model's config says about the token budget and the layers."""

    model_type: str
    num_layers: int | None  # decoder layers of the language model
    image_tokens: int | None  # prunable tokens per image when fixed (LLaVA-1.5); None when it varies


@dataclass(frozen=True)
class RunPlan:
    """The checked pieces of a run, ready to be used once the weights load."""

    strategy: Strategy  # validated, layers resolved for this model
    benchmark: Benchmark
    source: StreamSource
    facts: ModelFacts
    questions: int | None  # how many questions the run has (None: not known before streaming)


def read_model_facts(path: str) -> ModelFacts:
    """The model's config (no weights): its family, its LLM depth and (when fixed) its tokens per image."""
    from transformers import AutoConfig

    build.check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot read the config of model.path {path!r}: {error}. Without network access, point "
            "model.path at a local checkpoint folder (save_pretrained / huggingface-cli download)"
        ) from None
    text = config.get_text_config()
    layers = getattr(text, "num_hidden_layers", None)
    image_tokens = None
    if config.model_type == "llava":  # one fixed square grid per image
        vision = config.vision_config
        image_tokens = (vision.image_size // vision.patch_size) ** 2
    return ModelFacts(str(config.model_type), None if layers is None else int(layers), image_tokens)


def check_budgets(strategy: Strategy, facts: ModelFacts) -> None:
    """Fixed budgets (`keep`) against the tokens an image has, and budgets that never grow between stages."""
    if not strategy.prunes:
        return
    keeps = [stage.keep for stage in strategy.stages()]
    if facts.image_tokens is not None:
        for keep in keeps:
            if keep is not None and keep > facts.image_tokens:
                n = facts.image_tokens
                raise UserError(
                    f"strategy.keep={keep} is larger than the {n} prunable image tokens of an image of this "
                    f"model; use keep <= {n}, or strategy.ratio for a share of each image"
                )
    fixed = [keep for keep in keeps if keep is not None]
    if len(fixed) == len(keeps) and any(b > a for a, b in itertools.pairwise(fixed)):
        raise UserError(
            f"strategy.keep={fixed} grows from stage to stage; each stage keeps at most the last's"
        )


def check_data(benchmark: Benchmark, source: StreamSource) -> None:
    """The data opens, has the benchmark's columns and at least one row (read undecoded: cheap)."""
    stream = open_stream(source.path, source.config, source.split)
    benchmark.check_columns(column_names(stream))
    where = f"data.path {source.path!r} (config {source.config!r}, split {source.split!r})"
    quiet = logging.getLogger("datasets")  # it logs an ERROR of its own before raising on an empty file
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        first = next(iter(stream), None)
    except Exception as error:  # pyarrow raises ArrowInvalid on a parquet file without rows
        if "BatchSize must be greater than 0" not in str(error):
            raise DataError(f"cannot read the rows of {where}: {type(error).__name__}: {error}") from error
        first = None
    finally:
        quiet.setLevel(level)
    if first is None:
        raise DataError(
            f"{where} has no rows (an empty parquet file?); point data.path at the benchmark's data"
        )


def check_settings(cfg: DictConfig) -> None:
    """Settings read after the weights load: checked now, with the setting's name."""
    build.model_dtype(cfg)
    kind = str(cfg.logger.kind)
    if kind not in LOGGER_KINDS:
        raise UserError(f"unknown logger.kind {kind!r}; choose one of: {', '.join(LOGGER_KINDS)}")
    tokens = cfg.max_new_tokens  # null: the protocol's limit for the benchmark
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise UserError(f"max_new_tokens must be an integer >= 1 (or null: the protocol's), got {tokens!r}")
    for key in ("batch_size", "num_workers"):
        value = cfg.data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "batch_size" else 0):
            raise UserError(
                f"data.{key} must be an integer >= {1 if key == 'batch_size' else 0}, got {value!r}"
            )


def preflight(cfg: DictConfig) -> RunPlan:
    """Check the run; returns the validated strategy (layers resolved for this model) and the data source."""
    try:
        check_settings(cfg)
        strategy = build.build_strategy(cfg)
        if _overridden("strategy.layer") and not _overridden("strategy.reference_depth"):
            strategy = strategy.replace(layer=strategy.layer)  # layers typed for this model: not scaled
        strategy.validate()
        benchmark, source = build.build_benchmark(cfg)
        facts = read_model_facts(str(cfg.model.path))
        resolved = strategy.validate(num_layers=facts.num_layers)
        if resolved.layers != strategy.layers:
            log.info(
                "strategy.layer %s is written for a %d-layer language model: pruning before layers %s "
                "of this %d-layer model (strategy.reference_depth=null keeps them as written)",
                list(strategy.layers),
                strategy.reference_depth,
                list(resolved.layers),
                facts.num_layers,
            )
        check_budgets(resolved, facts)
        check_data(benchmark, source)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as error:  # the checks' own messages name the setting
        raise UserError(_one_line(error)) from error
    return RunPlan(resolved, benchmark, source, facts, count_questions(benchmark, source))


def count_questions(benchmark: Benchmark, source: StreamSource) -> int | None:
    """The run's number of questions when known without streaming: rows of a local parquet folder (all of
    them count unless the benchmark keeps a subset), capped by data.limit."""
    filtered = type(benchmark).keep_row is not Benchmark.keep_row
    rows = None if filtered else count_rows(source.path, source.config, source.split)
    if source.limit is None:
        return rows
    return source.limit if rows is None else min(rows, source.limit)


def _overridden(key: str) -> bool:
    """Whether `key` was set on the command line (Hydra's task overrides) of this run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = {str(token).split("=", 1)[0].lstrip("+~") for token in HydraConfig.get().overrides.task}
    return key in keys


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
