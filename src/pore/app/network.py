"""Is the Hugging Face hub reachable? Asked once per process, before the first hub id is read.

Without network, every hub request of `huggingface_hub` and `datasets` is retried with back-off (about
34 s for a model and its data, each retry logged), and then fails with a message that does not say that
the network is the cause. One short connection attempt tells it in a moment: when it fails, the run goes
on in offline mode (`HF_HUB_OFFLINE=1`: what is in the local cache is used, nothing else is requested)
and says so once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger("pore")
TIMEOUT_S = 3.0
_checked: dict[str, bool] = {}  # endpoint -> reachable, for this process


def is_hub_id(path: str) -> bool:
    """`owner/name` (or a bare `name`, as `load_dataset` reads it) that is not a local path: what
    `from_pretrained` / `load_dataset` ask the hub for."""
    return path.count("/") <= 1 and not path.startswith((".", "/", "~")) and not Path(path).exists()


def offline() -> bool:
    """Whether this process already runs the hub libraries offline."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def reachable(url: str, timeout: float = TIMEOUT_S) -> bool:
    """One TCP connection to the endpoint's host (DNS failure or a dropped connection: not reachable)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def go_offline() -> None:
    """Offline mode for the hub libraries of this process and of the processes it starts. They read
    HF_HUB_OFFLINE when imported, so their module-level switches are set as that variable would have."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    try:
        import datasets

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:  # datasets is only needed for the benchmark data
        pass


def offline_unless_reachable(paths: Iterable[str]) -> bool:
    """When one of `paths` is a hub id and the hub cannot be reached, switch to offline mode (said once).
    Returns whether the hub libraries run offline."""
    if offline():
        return True
    hub_ids = [path for path in paths if is_hub_id(str(path))]
    if not hub_ids:
        return False
    url = endpoint()
    if url not in _checked:
        _checked[url] = reachable(url)
        if not _checked[url]:
            log.warning(
                "no network access to %s: the hub is not asked again in this run (HF_HUB_OFFLINE=1); %s "
                "must be in the local cache",
                url,
                ", ".join(hub_ids),
            )
    if not _checked[url]:
        go_offline()
    return not _checked[url]


def unreachable_hint(path: str) -> str:
    """The end of a message about a hub id that could not be read."""
    if offline() and is_hub_id(path):
        return (
            f"{path!r} is a hub id that is not in the local cache, and the hub is not reachable (offline); "
            f"download it where there is network (huggingface-cli download {path}) or point to a local folder"
        )
    return "without network access, point to a local folder (save_pretrained / huggingface-cli download)"
