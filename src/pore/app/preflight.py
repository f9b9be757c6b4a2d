"""Everything about a run that can be checked before the weights load, checked before they load.

From the composed config: the strategy's keys and values, the benchmark and its data (the path opens, the
columns the benchmark needs are there, there is at least one row), the dtype and the logger; against the
model's *config* (`AutoConfig`, a small JSON file, no weights): the strategy's layers against the language
model's depth (presets written for another depth are scaled here, see `Strategy.reference_depth`) and its
budgets against the image-token count when that is fixed (LLaVA-1.5), and padding suppression against the
run's preprocessing (the image processor's config). A hub id is only asked for when the hub is reachable
(`pore.app.network`). A failed check raises a `UserError`: one line, exit status 2, nothing written.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from pore.adapters import ModelFacts, adapter_class_for_config
from pore.app import checks, network
from pore.app import config as build
from pore.data import Benchmark, DataError, StreamSource
from pore.data.loading import column_names, count_rows, open_stream
from pore.data.protocol import processor_pads
from pore.errors import UserError, one_line
from pore.strategy import Strategy

log = logging.getLogger("pore")
LOGGER_KINDS = ("csv", "wandb", "none")


@dataclass(frozen=True)
class RunPlan:
    """The checked pieces of a run, ready to be used once the weights load."""

    strategy: Strategy  # validated, layers resolved for this model
    benchmark: Benchmark
    source: StreamSource
    facts: ModelFacts
    questions: int | None  # how many questions the run has (None: not known before streaming)


def read_model_facts(path: str, adapter: str | None = None) -> ModelFacts:
    """The model's config (no weights): its family, its LLM depth and (when fixed) its tokens per image."""
    from transformers import AutoConfig

    build.check_model_path(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        reason = one_line(error).split(". ")[0].rstrip(".")
        raise UserError(
            f"cannot read the config of model.path {path!r} ({reason}); {network.unreachable_hint(path)}"
        ) from None
    return adapter_class_for_config(config, adapter).facts(config)


def images_padded(cfg: DictConfig, facts: ModelFacts) -> bool | None:
    """Whether the run pads images to a square: the protocol's variant for this family, or the image
    processor itself (its config files, no weights); None when the processor cannot be read."""
    if build.build_benchmark_protocol(cfg).pads(facts.pads_to_square):
        return True
    try:
        from transformers import AutoProcessor

        # The processor the run loads (AutoImageProcessor alone may pick another class, e.g. a fast one).
        return processor_pads(AutoProcessor.from_pretrained(str(cfg.model.path)).image_processor)
    except Exception:  # e.g. Qwen's processor without torchvision: the pruner checks it once loaded
        return None


def layer_origin(error: ValueError, cfg: DictConfig, strategy: Strategy, facts: ModelFacts) -> str:
    """The strategy's complaint, and where a layer the user never typed came from (a preset written for
    another depth) with the layers that fit this model."""
    message = one_line(error)
    if not message.startswith("strategy.layer must be in") or build.overridden("strategy.layer"):
        return message
    stages, lowest = len(strategy.layers), strategy.lowest_layer
    room = (facts.num_layers or 0) - lowest
    fix = (
        f"give this model's layers, e.g. 'strategy.layer={list(range(lowest, lowest + stages))}'"
        if stages <= room
        else f"this model has room for {room} stages: give fewer layers (and one keep or ratio per stage)"
    )
    return (
        f"{message}: strategy.layer={list(strategy.layers)} comes from strategy={cfg.strategy.name}, "
        f"written for a deeper model; {fix}"
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
    checks.check_seed(cfg)
    checks.check_trainer(cfg.trainer)
    checks.check_attention(cfg.model, build.uses_gpu(cfg))
    checks.check_output_dir(Path(str(cfg.output_dir)))
    checks.check_data_path(cfg.data)
    checks.check_max_failed(cfg.data)
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
        strategy.resolve(
            data=str(cfg.data.name)
        )  # what needs no model: said before the model's config is read
        benchmark, source = build.build_benchmark(cfg)
        network.offline_unless_reachable([str(cfg.model.path), str(cfg.data.path)])
        facts = read_model_facts(str(cfg.model.path), cfg.model.adapter)
        if strategy.prior.suppress_padding:
            facts = dataclasses.replace(facts, images_padded=images_padded(cfg, facts))
        try:
            resolved = strategy.resolve(facts, data=str(cfg.data.name))
        except ValueError as error:
            raise UserError(layer_origin(error, cfg, strategy, facts)) from error
        if resolved.layers != strategy.layers:
            log.info(
                "strategy.layer %s is written for a %d-layer language model: pruning before layers %s "
                "of this %d-layer model (strategy.reference_depth=null keeps them as written)",
                list(strategy.layers),
                strategy.reference_depth,
                list(resolved.layers),
                facts.num_layers,
            )
        check_data(benchmark, source)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as error:  # the checks' own messages name the setting
        raise UserError(one_line(error)) from error
    return RunPlan(resolved, benchmark, source, facts, count_questions(benchmark, source))


def count_questions(benchmark: Benchmark, source: StreamSource) -> int | None:
    """The run's number of questions when known without streaming: rows of a local parquet folder (all of
    them count unless the benchmark keeps a subset), capped by data.limit."""
    filtered = type(benchmark).keep_row is not Benchmark.keep_row
    rows = None if filtered else count_rows(source.path, source.config, source.split)
    if source.limit is None:
        return rows
    return source.limit if rows is None else min(rows, source.limit)
