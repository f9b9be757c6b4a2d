"""Every mistake of issue 18 ends with one line `error: ...` on stderr and exit status 2, before the weights
load: the programs run in process (`run_program`, src/viz.py's and src/sweep.py's `main`) on the shipped
tiny model, with the mistake as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline_fixtures import REPO, run_program, script_main, write_vqa_parquet
from pore.app import network

NO_GPU = not torch.cuda.is_available()
ARCHITECTURE_7B = REPO / "assets" / "architectures" / "llava15_7b.json"


RUN_SETTINGS = ["data.limit=2", "logger=none", "figures.enabled=false"]


def spatial(output_dir: Path, *more: str) -> list[str]:
    return [*RUN_SETTINGS, f"output_dir={output_dir}", *more]


def assert_one_line(result: subprocess.CompletedProcess, fragment: str) -> str:
    """Exit status 2, `error: ...` as the last line of stderr, no traceback, the weights never loaded."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Loading weights" not in result.stdout + result.stderr
    return last


def huge_architecture(folder: Path) -> Path:
    """LLaVA-1.5-7B's shapes with 4000 decoder layers: weights no machine's memory holds."""
    raw = json.loads(ARCHITECTURE_7B.read_text())
    raw["text_config"]["num_hidden_layers"] = 4000
    path = folder / "huge.json"
    path.write_text(json.dumps(raw))
    return path


# (what the user typed, the program, a fragment of the one line it must print); `{tmp}` is a fresh folder.
CASES = [
    (["output_dir={tmp}/a-file"], "run", "output_dir {tmp}/a-file is a file; choose a folder"),
    (["output_dir={tmp}/a-file/run"], "run", "output_dir {tmp}/a-file/run is under {tmp}/a-file, which is a"),
    (["output_dir=/sys/pore-test/run"], "run", "cannot write into output_dir /sys/pore-test/run ("),
    (["seed=abc"], "run", "seed must be an integer, got 'abc'"),
    (["trainer.devices=0"], "run", "trainer.devices must be a positive number of devices, auto (all), or a"),
    (["stratgy=fastv"], "run", "unknown setting stratgy (did you mean strategy?)"),
    (
        ["strategy=fastvv"],
        "run",
        "unknown strategy 'fastvv' (did you mean fastv?); choose one of: ",  # sorted; grows with methods
    ),
    (
        ["model="],
        "run",
        "model= names no model; choose one of: gemma3_12b, gemma3_27b, gemma3_4b, gemma4_26b_a4b,",  # sorted
    ),
    (["data=gqaa"], "run", "unknown data 'gqaa' (did you mean gqa?); choose one of: gqa, mmbench,"),
    (["protocol=lava"], "run", "unknown protocol 'lava' (did you mean llava?); choose one of: default,"),
    (["logger=wandbb"], "run", "unknown logger 'wandbb' (did you mean wandb?); choose one of: csv, none,"),
    (["data.path=README.md"], "run", "data.path 'README.md' is a file; point it at the folder of the"),
    (
        ["strategy=sparsevlm"],
        "run",
        "got 7: strategy.layer=[3, 7, 16] comes from strategy=sparsevlm, written for a deeper model; give "
        "this model's layers, e.g. 'strategy.layer=[1, 2, 3]'",
    ),
    (
        [
            "strategy=pore_authors_pdrop",
            "'strategy.layer=[1,2,3]'",
            "strategy.prior.sigma_by_data={spatial: 2}",
        ],
        "run",
        "Could not override 'strategy.prior.sigma_by_data'. to add keys to it, write "
        "+strategy.prior.sigma_by_data={spatial: 2}",
    ),
    (
        ["strategy=pore_authors_fastv", "strategy.keep=16"],
        "run",
        "these images were not padded to a square (the llava-hf processor resizes and centre-crops them: no "
        "border); use protocol=llava",
    ),
    (["data.max_failed=2"], "run", "data.max_failed must be a share in [0, 1]"),
    (
        ["strategy.keep=[1,2"],
        "run",
        "cannot read the override 'strategy.keep=[1,2': no viable alternative at",
    ),
    (["calibrate.layers=[9]"], "calibrate", "calibrate.layers must name layers K in [1, 3] of this 4-layer"),
    (["calibrate.layers=[a]"], "calibrate", "calibrate.layers must be a list of layer numbers"),
    (["bench.architecture={tmp}/huge.json"], "bench", "GiB of weights in torch.float32, more than this"),
]
GPU_CASES = [  # a machine without a GPU
    (["trainer.accelerator=gpu"], "run", "trainer.accelerator=gpu needs a GPU, but torch sees none on this"),
    (
        ["trainer=ddp"],
        "run",
        "for several processes on the CPU write trainer=ddp trainer.accelerator=cpu trainer.devices=2",
    ),
    (
        ["model.attn_implementation=flash_attention_2"],
        "run",
        "model.attn_implementation=flash_attention_2 runs only on a CUDA GPU, and this run is on the CPU",
    ),
    (["bench.device=cuda"], "bench", "bench.device=cuda but no CUDA device is visible"),
]


@pytest.mark.parametrize(
    ("typed", "program", "fragment"),
    [
        *CASES,
        *[pytest.param(*case, marks=pytest.mark.skipif(not NO_GPU, reason="a GPU")) for case in GPU_CASES],
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_each_mistake_is_one_line_and_exit_2(
    typed: list[str], program: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    huge_architecture(tmp_path)
    monkeypatch.chdir(REPO)  # data.path=README.md: the repository's README, a file
    argv = [token.replace("{tmp}", str(tmp_path)).strip("'") for token in typed]
    if program == "run":
        chosen = any(token.startswith("output_dir=") for token in argv)
        argv = [*RUN_SETTINGS, *([] if chosen else [f"output_dir={tmp_path / 'out'}"]), *argv]
    elif program == "calibrate":
        argv = [*argv, "data.limit=2", f"output_dir={tmp_path / 'calibration'}"]
    else:
        argv = ["model=tiny_llava", "bench.budgets=[64,16]", *argv]
    assert_one_line(run_program(*argv, program=program), fragment.replace("{tmp}", str(tmp_path)))
    assert not (tmp_path / "out").exists()  # nothing written for a refused run


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run_program(*spatial(folder / "run"))
    finally:
        folder.chmod(0o755)
    assert_one_line(result, f"output_dir {folder / 'run'} cannot be written ({folder} is read-only")


def test_a_lock_file_that_is_not_a_lock_is_named(tmp_path: Path) -> None:
    out = tmp_path / "garbage"
    out.mkdir()
    (out / "run.lock").write_text("garbage")
    os.utime(out / "run.lock", (time.time() - 60, time.time() - 60))
    assert_one_line(
        run_program(*spatial(out)),
        f"{out}/run.lock is not a lock written by this program (it holds 'garbage', not a pid, host and "
        f"start time); if no run is writing into {out}, delete {out}/run.lock and run again",
    )


def test_unknown_choices_of_a_multirun_are_one_line(tmp_path: Path) -> None:
    result = run_program("--multirun", "strategy=fastv,pore_lnear", *spatial(tmp_path / "m"))
    assert_one_line(result, "unknown strategy 'pore_lnear' (did you mean pore_linear?)")


def test_a_hub_id_without_network_is_said_once_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a machine without network and without HF_HUB_OFFLINE: the hub libraries online, as a fresh
    process starts them (this test session sets them offline)."""
    import datasets
    import huggingface_hub.constants

    if network.reachable(network.endpoint()):
        pytest.skip("the hub is reachable from here")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(network, "_checked", {})
    online = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    started = time.monotonic()
    result = run_program(*spatial(tmp_path / "hub", "model.path=pore-tests/no-such-model"), env=online)
    assert time.monotonic() - started < 20  # not 34 s of retries
    assert_one_line(
        result,
        "cannot read the config of model.path 'pore-tests/no-such-model' (",
    )
    assert (
        "is a hub id that is not in the local cache, and the hub is not reachable (offline)" in result.stderr
    )
    output = result.stdout + result.stderr
    assert output.count("no network access to https://huggingface.co") == 1
    assert "Retrying" not in output


def test_a_missing_sweep_file_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pore.app.sweeps.cli import main

    monkeypatch.chdir(REPO)
    assert main(["sweeps/no_such_sweep.yaml"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(
        "error: sweep file sweeps/no_such_sweep.yaml does not exist; give a W&B sweep file"
    )
    assert "sweeps/strategy_grid.yaml" in last


def test_viz_on_a_missing_folder_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        script_main("viz")([str(tmp_path / "nowhere")])
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path / 'nowhere'} is not a folder; give the output_dir of an evaluation run\n"
    )


def test_a_run_without_a_scored_sample_fails_and_viz_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every image corrupt: the run fails with the count and the first errors (its rows stay), and
    src/viz.py on its folder says there is nothing to draw."""
    data = write_vqa_parquet(tmp_path / "corrupt", samples=4, corrupt=(0, 1, 2, 3))
    out = tmp_path / "failed"
    result = run_program(
        "data=vqav2", f"data.path={data}", "data.config=null", "data.split=test", *spatial(out)[1:]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: no sample was scored: all 4 samples failed (first errors: 0: unreadable image: "
        "UnidentifiedImageError: cannot identify image file; 1: unreadable image"
    )
    assert f"the rows are in {out / 'predictions.jsonl'}" in last
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        script_main("viz")([str(out)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"error: {out} has no answered question to draw (its run failed"
    )
