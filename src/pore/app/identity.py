"""What identifies a run: the settings that change its answers, and the digest that names its folder.

Light on purpose (no Lightning, no data stack): every program registers these resolvers before Hydra composes
its config, the speed benchmark too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pore import presets
from pore.assets import portable

# Settings that change what the model answers: a run folder is only resumed with the same values.
RUN_IDENTITY = ("model", "data", "strategy", "protocol", "max_new_tokens")
# Data settings that only change how fast rows are read (or when a run gives up), not which rows or answers.
DATA_LOGISTICS = ("batch_size", "num_workers", "max_failed")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def run_digest(*nodes: Any) -> str:
    """A 6-character digest of config nodes (ignoring data loader logistics), for default run folders.
    Paths of shipped assets count by their place in the assets folder, not where the checkout is."""
    plain = [portable(_plain(node)) for node in nodes]
    for node in plain:
        if isinstance(node, dict) and "benchmark" in node:
            for key in DATA_LOGISTICS:
                node.pop(key, None)
    return hashlib.blake2b(json.dumps(plain, sort_keys=True, default=str).encode(), digest_size=3).hexdigest()


def register_resolvers() -> None:
    """The resolvers of the run configs: the library's (`${asset:...}`) and `${run_digest:...}`."""
    presets.register_resolvers()
    if not OmegaConf.has_resolver("run_digest"):
        OmegaConf.register_new_resolver("run_digest", run_digest)
