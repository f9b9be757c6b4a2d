"""Checks of the run settings that Lightning, transformers or the file system would otherwise reject late.

Each raises a `UserError`: one line naming the setting, what is wrong and how to fix it. They need neither
the weights nor the data, so `pore.app.preflight` runs them first. Without them, `trainer.accelerator=gpu`
on a machine without a GPU, `trainer.devices=0`, `seed=abc` or an `output_dir` that is a file end in a
traceback once the weights are loaded, or after the run's files were written.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from pore.errors import UserError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# The packages transformers needs for each FlashAttention backend.
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
DDP_ON_CPU = "trainer=ddp trainer.accelerator=cpu trainer.devices=2"


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_seed(cfg: DictConfig) -> None:
    if not is_integer(cfg.seed):
        raise UserError(f"seed must be an integer, got {cfg.seed!r}")


def check_max_failed(data: DictConfig) -> None:
    share = data.get("max_failed")
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise UserError(
            f"data.max_failed must be a share in [0, 1] (0.05 = up to 5 % of the samples may fail), "
            f"got {share!r}"
        )


def _devices_valid(devices: Any) -> bool:
    if isinstance(devices, (list, ListConfig)):
        return bool(devices) and all(is_integer(item) and item >= 0 for item in devices)
    if is_integer(devices):
        return devices >= 1 or devices == -1
    return isinstance(devices, str) and (devices == "auto" or devices.replace(",", "").strip().isdigit())


def _device_count(devices: Any) -> int | None:
    """How many devices a `trainer.devices` value asks for (None: all of them, 'auto' or -1)."""
    if isinstance(devices, (list, ListConfig)):
        return len(devices)
    if is_integer(devices):
        return None if devices == -1 else devices
    if isinstance(devices, str) and devices != "auto":
        parts = [part for part in devices.split(",") if part.strip()]
        return len(parts) if "," in devices else int(devices)
    return None


def check_trainer(trainer: DictConfig) -> None:
    """trainer.accelerator / devices / num_nodes against what Lightning accepts and this machine has."""
    accelerator, devices, strategy = str(trainer.accelerator), trainer.devices, str(trainer.strategy)
    if accelerator not in ACCELERATORS:
        raise UserError(f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got {accelerator!r}")
    if not _devices_valid(devices):
        raise UserError(
            f"trainer.devices must be a positive number of devices, auto (all), or a list of GPU indices, "
            f"got {devices!r}"
        )
    nodes = trainer.num_nodes
    if not is_integer(nodes) or nodes < 1:
        raise UserError(f"trainer.num_nodes must be an integer >= 1, got {nodes!r}")
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        fix = "run on the CPU with trainer.accelerator=cpu (or auto)"
        if "ddp" in strategy:
            fix = f"for several processes on the CPU write {DDP_ON_CPU}"
        raise UserError(
            f"trainer.accelerator={accelerator}{' (trainer=ddp)' if 'ddp' in strategy else ''} needs a GPU, "
            f"but torch sees none on this machine (torch.cuda.is_available() is False); {fix}"
        )
    wanted = _device_count(devices)
    if accelerator in ("gpu", "cuda") and wanted is not None and wanted > gpus:
        raise UserError(
            f"trainer.devices={devices} asks for {wanted} GPUs, but this machine has {gpus}; "
            f"use trainer.devices={gpus} or trainer.devices=auto"
        )


def check_attention(model: DictConfig, on_gpu: bool) -> None:
    """FlashAttention needs a CUDA GPU and its package: said now, not as an import error after the weights."""
    name = str(model.attn_implementation)
    package = FLASH_PACKAGES.get(name)
    if package is None:
        return
    if not on_gpu:
        raise UserError(
            f"model.attn_implementation={name} runs only on a CUDA GPU, and this run is on the CPU; "
            "use model.attn_implementation=sdpa (the default) or eager"
        )
    if importlib.util.find_spec(package) is None:
        raise UserError(
            f"model.attn_implementation={name} needs the {package} package, which is not installed; "
            "install it (pip install flash-attn --no-build-isolation) or use model.attn_implementation=sdpa"
        )


def check_output_dir(path: Path) -> None:
    """`output_dir` can be a folder this process writes into: not a file, not under one, not read-only."""
    for folder in (path, *path.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            where = "is a file" if folder == path else f"is under {folder}, which is a file"
            raise UserError(f"output_dir {path} {where}; choose a folder for the run's files")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(
                f"output_dir {path} cannot be written ({folder} is read-only for this user); choose a "
                "folder you can write to"
            )
        return


def check_data_path(data: DictConfig) -> None:
    """A local file is not a benchmark: the data is a folder of parquet files (or a hub id)."""
    path = str(data.path)
    if Path(path).expanduser().is_file():
        raise UserError(
            f"data.path {path!r} is a file; point it at the folder of the benchmark's parquet files "
            "(or a hub id owner/name)"
        )
