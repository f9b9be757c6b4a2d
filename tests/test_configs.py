"""The Hydra config tree (`conf/`) composes, and what it builds equals the Python registries' objects.

Composed with Hydra's compose API from the repository's own `conf/` folder, so a broken default list, an
interpolation that does not resolve or a config that drifts from `pore.build_strategy` fails here, not in
the middle of a GPU run. No data and no model are read.
"""

from __future__ import annotations

import dataclasses
import os

# Nothing may be fetched from a hub: switched off before `datasets` is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

import pore
from pore.adapters import ModelFacts
from pore.app.config import (
    build_benchmark,
    build_strategy,
    model_dtype,
)
from pore.app.evaluate import SettingsMismatchError, check_resumable, write_run_config
from pore.app.identity import register_resolvers, run_digest
from pore.assets import portable
from pore.data import BENCHMARKS, StreamSource
from pore.methods import METHODS
from pore.priors import PRIORS

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
GROUPS = ("model", "data", "strategy", "trainer", "logger")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]

Compose = Callable[..., DictConfig]


@pytest.fixture(scope="module")
def compose() -> Iterator[Compose]:
    """`compose(*overrides)`: the config as `python src/run.py <overrides>` would see it."""
    register_resolvers()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        # Composing takes ~0.1 s; the tests only read the configs, so one composition per override list.
        yield functools.cache(lambda *overrides: hydra.compose("config", overrides=list(overrides)))


def _holds(composed: object, own: object) -> bool:
    """Whether `composed` has every setting of `own` at its value (mappings compared key by key)."""
    if isinstance(own, dict):
        return isinstance(composed, dict) and all(
            k in composed and _holds(composed[k], v) for k, v in own.items()
        )
    return composed == own


def test_the_groups_have_options() -> None:
    """The glob below found the config files (an empty group would make the next test vacuous)."""
    found = {group for group, _ in OPTIONS}
    assert found == set(GROUPS)
    assert {"none", "fastv", "pore_linear", "pore_exponential", "random"} <= {
        option for group, option in OPTIONS if group == "strategy"
    }


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_of_every_group_composes(compose: Compose, group: str, option: str) -> None:
    """`<group>=<option>` puts that file under `<group>` (a file with a `defaults:` list: its own settings on
    top of what it inherits), and every interpolation resolves."""
    cfg = compose(f"{group}={option}")
    expected = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    # What conf/config.yaml itself sets in the group for every option (data.max_failed), after the file.
    expected.update(OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml")).get(group) or {})
    composed = OmegaConf.to_container(cfg[group], resolve=False)
    if expected.pop("defaults", None) is None:
        assert composed == expected
    else:
        assert _holds(composed, expected), f"{group}/{option}.yaml's own settings did not win"
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert set(resolved) >= {*GROUPS, "output_dir", "seed", "max_new_tokens"}
    assert re.fullmatch(r"outputs/[^/]+/[^/]+/[^/]+-[0-9a-f]{6}", resolved["output_dir"])


STRATEGY_NAMES = sorted(path.stem for path in (CONF / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_the_python_api_composes_each_preset_as_the_run_does(compose: Compose, name: str) -> None:
    """`pore.build_strategy(name)` (the library's composition of conf/strategy/<name>.yaml alone) is the
    strategy `python src/run.py strategy=<name>` runs (the whole run config composed): one source."""
    built = build_strategy(compose(f"strategy={name}"))
    library = pore.build_strategy(name)
    if name == "cdpruner":  # its CLIP pair is the model's (model.text_encoder): the run fills it in
        assert library.options["text_encoder"] is None and built.options["text_encoder"] == "embedded"
        library = dataclasses.replace(library, options={**library.options, "text_encoder": "embedded"})
    assert library == built
    assert built.name == name
    built.resolve(ModelFacts("llava", 32, pads_to_square=True))


def test_the_base_preset_states_the_dataclass_defaults() -> None:
    """conf/strategy/none.yaml (method/none + prior/none) and `Strategy()` agree on every default (the prior
    file also carries the parametric priors' knobs, at the prior functions' defaults)."""
    composed, default = pore.build_strategy("none"), pore.Strategy()
    assert dataclasses.replace(composed, prior=default.prior) == default
    assert dataclasses.replace(composed.prior, params={}) == default.prior
    assert composed.prior.params == {"alpha": 0.6, "sigma": 0.95}


def test_method_and_prior_files_state_the_code_defaults() -> None:
    """Every conf/method/<name>.yaml of a registered method lists its options at the method's defaults, and
    conf/prior/none.yaml holds the parametric priors' defaults: the files show what the code does."""
    import inspect

    from pore.presets import compose_preset, names

    for name in names("method"):
        node = compose_preset("method", name)
        parameters = inspect.signature(METHODS.get(node["method"]).__init__).parameters
        defaults = {key: parameters[key].default for key in METHODS.get(node["method"]).option_names()}
        assert {key: defaults[key] for key in node["options"]} == node["options"], name
    prior = compose_preset("prior", "none")
    for prior_name, key in (("linear", "alpha"), ("exponential", "sigma")):
        assert inspect.signature(PRIORS.get(prior_name)).parameters[key].default == prior[key]


def test_strategy_config_values_by_hand(compose: Compose) -> None:
    """The values users read in the README table: PoRe linear alpha 0.6, exponential sigma 0.95, K = 2."""
    linear = build_strategy(compose("strategy=pore_linear"))
    assert (linear.method, linear.layer, linear.keep, linear.ratio) == ("fastv", 2, None, 0.25)
    assert (linear.prior.name, linear.prior.hyperparameters()) == ("linear", {"alpha": 0.6})
    exponential = build_strategy(compose("strategy=pore_exponential"))
    assert (exponential.prior.name, exponential.prior.hyperparameters()) == ("exponential", {"sigma": 0.95})
    overridden = build_strategy(
        compose("strategy=pore_linear", "strategy.keep=64", "strategy.prior.alpha=0.3")
    )
    assert (overridden.keep, overridden.budget(576), overridden.prior.hyperparameters()) == (
        64,
        64,
        {"alpha": 0.3},
    )
    assert build_strategy(compose("strategy=fastv")).budget(576) == 144  # ratio 0.25 of 24 x 24 tokens


DATA_NAMES = sorted(path.stem for path in (CONF / "data").glob("*.yaml"))


@pytest.mark.parametrize("name", DATA_NAMES)
def test_every_data_config_builds_its_benchmark(compose: Compose, name: str) -> None:
    """build_benchmark gives the configured benchmark class and stream source, reading no data; a public
    benchmark's source is its repository under the default hub organisation."""
    cfg = compose(f"data={name}")
    benchmark, source = build_benchmark(cfg)
    assert isinstance(benchmark, BENCHMARKS.get(str(cfg.data.benchmark)))
    assert benchmark.name == cfg.data.benchmark
    assert source == StreamSource(str(cfg.data.path), cfg.data.config, str(cfg.data.split), None)
    if "hub_org" in cfg.data:
        repository = hub_repository(cfg)
        assert source == StreamSource(f"lmms-lab-encoder/{repository}", cfg.data.config, cfg.data.split, None)


def hub_repository(cfg: DictConfig) -> str:
    """The repository name of a public benchmark's `data.path` (`${.hub_org}/<repository>`), unresolved."""
    path = OmegaConf.to_container(cfg.data, resolve=False)["path"]
    assert path.startswith("${.hub_org}/"), path
    return path.removeprefix("${.hub_org}/")


def test_hub_path_follows_hub_org(compose: Compose) -> None:
    """Every data config reads a repository under data.hub_org (data.hub_org=lmms-lab points a public
    benchmark at the pre-2026 organisation) or a shipped asset (the spatial benchmark)."""
    hub = [name for name in DATA_NAMES if "hub_org" in compose(f"data={name}").data]
    assert {"gqa", "pope_random", "mmbench"} <= set(hub)
    for name in DATA_NAMES:
        if name not in hub:
            assert OmegaConf.to_container(compose(f"data={name}").data)["path"].startswith("${asset:")
            continue
        repository = hub_repository(compose(f"data={name}"))
        assert compose(f"data={name}").data.path == f"lmms-lab-encoder/{repository}"
        assert compose(f"data={name}", "data.hub_org=lmms-lab").data.path == f"lmms-lab/{repository}"


def test_benchmark_options_reach_the_benchmark(compose: Compose) -> None:
    """POPE's subset and GQA's image table come from `data.options`."""
    subsets = {
        name: build_benchmark(compose(f"data={name}"))[0].subset for name in DATA_NAMES if "pope" in name
    }
    assert subsets == {
        "pope": None,
        "pope_adversarial": "adversarial",
        "pope_popular": "popular",
        "pope_random": "random",
    }
    gqa, _ = build_benchmark(compose("data=gqa"))
    assert (gqa.image_config, gqa.image_split) == ("testdev_balanced_images", "testdev")
    remapped, _ = build_benchmark(compose("data=vqav2", "+data.columns.answers=labels"))
    assert remapped.columns["answers"] == "labels"


def test_data_limit_must_be_a_positive_integer(compose: Compose) -> None:
    """data.limit=5 reaches the source; 0 and 2.5 are refused with the setting's name."""
    assert build_benchmark(compose("data=vqav2", "data.limit=5"))[1].limit == 5
    for bad in ("0", "2.5"):
        with pytest.raises(ValueError, match=r"data\.limit must be a positive integer or null"):
            build_benchmark(compose("data=vqav2", f"data.limit={bad}"))


def test_output_dir_changes_with_the_answers_settings_only(compose: Compose) -> None:
    """The default run folder's digest follows strategy settings, not batch size or loader workers."""
    base = compose("data=vqav2", "strategy=pore_linear").output_dir
    assert re.fullmatch(r"outputs/tiny_llava/vqav2/pore_linear-[0-9a-f]{6}", base)
    fresh = hydra.compose("config", overrides=["data=vqav2", "strategy=pore_linear"])  # not the cached one
    assert fresh.output_dir == base
    same = [
        compose("data=vqav2", "strategy=pore_linear", "data.batch_size=1").output_dir,
        compose("data=vqav2", "strategy=pore_linear", "data.num_workers=0").output_dir,
    ]
    assert same == [base, base]
    other = {
        compose("data=vqav2", "strategy=pore_linear", "strategy.keep=64").output_dir,
        compose("data=vqav2", "strategy=pore_linear", "strategy.prior.alpha=0.3").output_dir,
        compose("data=vqav2", "strategy=pore_linear", "data.limit=10").output_dir,
        compose("data=vqav2", "strategy=pore_linear", "max_new_tokens=8").output_dir,
    }
    assert len(other) == 4 and base not in other


def test_model_dtype(compose: Compose) -> None:
    """auto is float32 on a CPU and bfloat16 on a GPU; names map to torch dtypes; others are refused."""
    assert model_dtype(compose("model.dtype=auto", "trainer.accelerator=cpu")) == torch.float32
    assert model_dtype(compose("model.dtype=auto", "trainer.accelerator=gpu")) == torch.bfloat16
    assert model_dtype(compose("model.dtype=float16", "trainer.accelerator=cpu")) == torch.float16
    with pytest.raises(ValueError) as caught:
        model_dtype(compose("model.dtype=half_precision"))
    assert str(caught.value) == (
        "model.dtype must be auto or a torch dtype name (bfloat16, float16, float32), got 'half_precision'"
    )
    with pytest.raises(ValueError, match="a torch dtype name"):
        model_dtype(compose("model.dtype=Tensor"))  # a torch attribute, but not a dtype


def test_check_resumable(compose: Compose, tmp_path: Path) -> None:
    """A folder with answers is resumed only with the same answer-changing settings; loader logistics may
    differ; the refusal names the keys that differ. A folder without answers is free."""
    overrides = ("data=vqav2", "strategy=pore_linear", "strategy.keep=64")
    check_resumable(compose(*overrides), tmp_path)  # no config.yaml yet: nothing to compare
    OmegaConf.save(compose(*overrides), tmp_path / "config.yaml", resolve=True)
    check_resumable(compose("data=vqav2", "strategy.keep=32"), tmp_path)  # no answers yet: free
    (tmp_path / "predictions.jsonl").write_text('{"question_id": "1"}\n')

    check_resumable(compose(*overrides), tmp_path)
    check_resumable(compose(*overrides, "data.batch_size=2", "data.num_workers=0"), tmp_path)

    with pytest.raises(SettingsMismatchError) as caught:
        check_resumable(compose("data=vqav2", "strategy=pore_linear", "strategy.keep=32"), tmp_path)
    assert str(caught.value) == (
        f"{tmp_path} holds a run with other settings (strategy.keep: 64 -> 32); "
        "choose another output_dir, or delete that folder to start over"
    )
    with pytest.raises(SettingsMismatchError, match=r"\(max_new_tokens: None -> 8\)"):
        check_resumable(compose(*overrides, "max_new_tokens=8"), tmp_path)
    with pytest.raises(SettingsMismatchError, match=r"\(data.limit: None -> 3\)"):
        check_resumable(compose(*overrides, "data.limit=3"), tmp_path)


def test_a_moved_checkout_keeps_its_folder_digests(
    compose: Compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shipped assets enter the digest and the resume check by their place in the assets folder."""
    here = OmegaConf.to_container(compose("strategy=pore_calibrated"), resolve=True)
    assert here["model"]["path"].startswith(str(REPO))
    digest = run_digest(
        here["model"], here["data"], here["strategy"], here["protocol"], here["max_new_tokens"]
    )
    calibrated = compose("strategy=pore_calibrated")
    write_run_config(calibrated, tmp_path, build_strategy(calibrated))
    monkeypatch.setenv("PORE_ASSETS", str(tmp_path / "elsewhere" / "assets"))
    moved = hydra.compose("config", overrides=["strategy=pore_calibrated"])
    moved_plain = OmegaConf.to_container(moved, resolve=True)
    assert moved_plain["model"]["path"] == str(tmp_path / "elsewhere" / "assets" / "tiny-llava")
    assert moved_plain["output_dir"] == here["output_dir"] and here["output_dir"].endswith(digest)
    # A folder written by the old checkout is resumed by the moved one, and still refuses other settings.
    (tmp_path / "predictions.jsonl").write_text('{"question_id": "1"}\n')
    check_resumable(moved, tmp_path)
    with pytest.raises(SettingsMismatchError, match=r"\(strategy.keep: None -> 8\)"):
        check_resumable(
            hydra.compose("config", overrides=["strategy=pore_calibrated", "strategy.keep=8"]), tmp_path
        )
    assert portable(str(tmp_path / "elsewhere" / "assets" / "tiny-llava")) == "asset:tiny-llava"
    assert portable("/data/gqa") == "/data/gqa"
