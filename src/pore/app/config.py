"""Objects built from the Hydra config tree (`conf/`): strategy, benchmark, model, trainer, logger."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from pore.app import network
from pore.data import BENCHMARKS, Benchmark, StreamSource
from pore.data.protocol import BenchmarkProtocol, Protocol
from pore.errors import UserError, one_line
from pore.strategy import Strategy


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_strategy(cfg: DictConfig) -> Strategy:
    """The run's strategy as composed (`Strategy.resolve` fits it to the model). What is typed on the command
    line is meant as typed: layers are this model's own (a preset's `reference_depth` does not scale them),
    and a prior setting holds for every data set (a preset's `<key>_by_data` table does not replace it)."""
    strategy = Strategy.from_mapping(_plain(cfg.strategy))
    if overridden("strategy.layer") and not overridden("strategy.reference_depth"):
        strategy = strategy.replace(layer=strategy.layer)
    typed = {key for key in strategy.prior.params if overridden(f"strategy.prior.{key}")}
    if typed:
        strategy = strategy.replace(prior={key: strategy.prior.params[key] for key in typed})
    return strategy


def overridden(key: str) -> bool:
    """Whether `key` was set on the command line (Hydra's task overrides) of this run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    keys = {str(token).split("=", 1)[0].lstrip("+~") for token in HydraConfig.get().overrides.task}
    return key in keys


# The per-benchmark maps that protocol files held before each benchmark's data config did (issue 17); the
# config.yaml of a run folder from then still has them, and the figures of such runs read it back.
LEGACY_PROTOCOL_MAPS = ("pad_to_square", "max_new_tokens", "answer_rule", "prompt")


def _protocol_settings(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The protocol node (`conf/protocol/`; configs without a protocol group get `default`) and the data
    config's `protocols` (the benchmark's variants of each protocol)."""
    node = dict(_plain(cfg.get("protocol")) or {"name": "default"})
    data = cfg.get("data")
    variants = dict(_plain(data.get("protocols")) or {}) if data is not None else {}
    legacy = {key: node.pop(key) or {} for key in LEGACY_PROTOCOL_MAPS if key in node}
    if legacy and data is not None:  # maps keyed by benchmark, with a `default` entry (prompt: none)
        benchmark = str(data.benchmark)
        entry = {key: values.get(benchmark, values.get("default")) for key, values in legacy.items()}
        entry["prompt"] = legacy.get("prompt", {}).get(benchmark)
        name = str(node.get("name", "default"))
        variants = {name: {key: value for key, value in entry.items() if value is not None}}
    return node, variants


def build_protocol(cfg: DictConfig) -> Protocol:
    """The evaluation protocol (`conf/protocol/`); configs without a protocol group get `default`."""
    return Protocol.from_mapping(_protocol_settings(cfg)[0])


def build_benchmark_protocol(cfg: DictConfig) -> BenchmarkProtocol:
    """The benchmark's variant of the run's protocol: `data.protocols.<protocol>` over the protocol's
    `benchmark_defaults` (token limit, answer rule, pad to square, prompt options)."""
    node, variants = _protocol_settings(cfg)
    return Protocol.from_mapping(node).for_benchmark(variants)


def build_benchmark(cfg: DictConfig) -> tuple[Benchmark, StreamSource]:
    data = cfg.data
    variant = build_benchmark_protocol(cfg)
    benchmark = BENCHMARKS.get(data.benchmark)(
        columns=_plain(data.columns) or {},
        protocol=variant.protocol,
        answer_rule=variant.answer_rule,
        # The protocol's prompt options (textvqa: ocr) under the data's own (data.options wins).
        **{**variant.prompt, **(_plain(data.options) or {})},
    )
    limit = data.limit
    if limit is not None and (int(limit) != limit or limit < 1):
        raise ValueError(f"data.limit must be a positive integer or null, got {limit}")
    return benchmark, StreamSource(
        str(data.path), data.config, str(data.split), None if limit is None else int(limit)
    )


def uses_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.accelerator)
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def model_dtype(cfg: DictConfig) -> torch.dtype:
    """`model.dtype`; `auto`: on a GPU the protocol's precision (`protocol.dtype`: LLaVA's float16 under
    protocol=llava) or bfloat16, on CPU float32."""
    name = str(cfg.model.dtype)
    if name == "auto":
        if not uses_gpu(cfg):
            return torch.float32
        return getattr(torch, build_protocol(cfg).dtype or "bfloat16")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"model.dtype must be auto or a torch dtype name (bfloat16, float16, float32), got {name!r}"
        )
    return dtype


def check_model_path(path: str) -> None:
    """A local folder that exists, or something shaped like a hub id (owner/name)."""
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise FileNotFoundError(
            f"model.path {path!r} is not a local checkpoint folder nor a hub id (owner/name); "
            "the embedded model lives in the repository's assets/ folder (or set PORE_ASSETS)"
        )


def load_model_and_processor(cfg: DictConfig) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(cfg.model.path)
    check_model_path(path)
    # Processor settings of the model config (e.g. Qwen's min_pixels / max_pixels); null = the protocol's
    # for this checkpoint type (lmms-eval's Qwen pixel limits), else the checkpoint's own.
    processor_options = {
        key: value for key, value in (_plain(cfg.model.get("processor")) or {}).items() if value is not None
    }
    try:
        protocol = build_protocol(cfg)
        if protocol.processor:
            from transformers import AutoConfig

            processor_options = {
                **protocol.processor_options(AutoConfig.from_pretrained(path).model_type),
                **processor_options,
            }
        processor = AutoProcessor.from_pretrained(path, **processor_options)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=model_dtype(cfg), attn_implementation=str(cfg.model.attn_implementation)
        )
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise
        raise UserError(
            f"cannot build the processor of {path!r}: {one_line(error)}; Qwen2-VL processors need "
            "torchvision in transformers 5: pip install -e '.[qwen]'"
        ) from error
    except OSError as error:
        raise UserError(
            f"cannot load model.path {path!r} ({one_line(error).split('. ')[0].rstrip('.')}); "
            f"{network.unreachable_hint(path)}"
        ) from error
    # Batched generation needs every prompt to end at the last position.
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def build_logger(cfg: DictConfig, output_dir: Path) -> Logger | bool:
    logger = cfg.logger
    kind = str(logger.kind)
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(save_dir=str(output_dir), name="csv", version="")
    if kind == "wandb":
        name = logger.name or f"{cfg.model.name}/{cfg.data.name}/{cfg.strategy.name}"
        return WandbLogger(
            project=logger.project,
            entity=logger.entity,
            name=name,
            group=logger.group,
            tags=list(logger.tags or []),
            save_dir=str(output_dir),
            mode=str(logger.mode),
        )
    raise ValueError(f"unknown logger.kind {kind!r}; choose one of: csv, wandb, none")


def build_trainer(cfg: DictConfig, logger: Logger | bool, callbacks: list[Any]) -> L.Trainer:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    trainer = cfg.trainer
    try:
        return L.Trainer(
            accelerator=str(trainer.accelerator),
            devices=trainer.devices,
            strategy=trainer.strategy,
            num_nodes=int(trainer.num_nodes),
            logger=logger,
            callbacks=callbacks,
            use_distributed_sampler=False,  # the benchmark stream splits itself across ranks and workers
            enable_model_summary=False,
            enable_checkpointing=False,
        )
    except MisconfigurationException as error:  # what pore.app.checks does not know of Lightning's rules
        raise UserError(
            f"Lightning refuses the trainer settings ({one_line(error)}); set trainer.accelerator, "
            "trainer.devices and trainer.strategy (conf/trainer/) to what this machine has"
        ) from None


def is_first_process() -> bool:
    """Whether this is global rank 0, before the Trainer exists (launchers set these in other ranks)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def share_cpu_threads(trainer: L.Trainer) -> None:
    """Several CPU processes on one machine share its cores (else their OpenMP threads spin on each other)."""
    if trainer.accelerator.__class__.__name__ == "CPUAccelerator" and trainer.num_devices > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))
