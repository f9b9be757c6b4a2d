"""Shared builders for the pipeline tests: a tiny checkpoint and benchmark parquet files, all offline."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "src" / "run.py"

# Offline, and one OpenMP thread per process: the tests run several CPU processes on a 2-core machine, where
# spinning OpenMP threads slow each other down by an order of magnitude.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

VQA_FEATURES = datasets.Features(
    {
        "question_id": datasets.Value("int64"),
        "question": datasets.Value("string"),
        "answers": datasets.Sequence(datasets.Value("string")),
        "image": datasets.Image(),
    }
)


def png_bytes(seed: int, size: tuple[int, int] = (40, 56)) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_vqa_parquet(folder: Path, samples: int, corrupt: tuple[int, ...] = (), shards: int = 1) -> Path:
    """A VQAv2-schema benchmark with `samples` rows; rows in `corrupt` carry bytes that are not an image."""
    rows = [
        {
            "question_id": i,
            "question": f"what colour is the shape {i}?",
            "answers": ["red"] * 5 + ["blue"] * 5 if i % 2 else ["yes"] * 10,
            "image": {"bytes": b"not an image" if i in corrupt else png_bytes(i), "path": None},
        }
        for i in range(samples)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_list(rows, features=VQA_FEATURES)
    for shard in range(shards):
        part = table.shard(num_shards=shards, index=shard, contiguous=True)
        part.to_parquet(str(folder / f"test-{shard:05d}-of-{shards:05d}.parquet"))
    return folder


def run_program(
    *argv: str, program: str = "run", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python src/<program>.py <argv>` in this process: the same entry (`pore.app.cli.main`) with the same
    task and config, its exit status, stdout and stderr. Most tests of the programs run this way (a fresh
    interpreter per run costs seconds of imports); `run_cli` runs the real subprocess where a test needs one
    (several processes, a kill, a lock held by another process, the smoke test)."""
    from pore.app.cli import main

    if program == "run":
        from pore.app.evaluate import evaluate as task
    elif program == "calibrate":
        from pore.app.calibrate import calibrate as task
    else:
        from pore.app.bench.main import bench as task
    config = {"run": "config", "calibrate": "calibrate", "bench": "bench"}[program]
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    saved_env = dict(os.environ)
    os.environ.update({**OFFLINE_ENV, **(env or {})})
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main(task, config, list(argv), program=str(REPO / "src" / f"{program}.py"))
    except SystemExit as exit:
        code = exit.code
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(
        ["src/" + program + ".py", *argv], returncode, stdout.getvalue(), stderr.getvalue()
    )


def script_main(name: str) -> Callable[[list[str]], int]:
    """`main` of the argparse program src/<name>.py (viz, sweep): a script, not part of the package."""
    spec = importlib.util.spec_from_file_location(f"{name}_command", REPO / "src" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_cli(
    *overrides: str, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **OFFLINE_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(RUN), *overrides],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
