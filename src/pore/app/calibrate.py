"""`python src/calibrate.py`: measure a model's position bias on a data set and write prior files + pictures.

The model and data come from the same config groups as an evaluation (`model=`, `data=`), the data is
streamed with the evaluation's own code (BenchmarkStream + PromptCollator, the model's chat template), and
the model runs unpruned. For every pruning layer K in `calibrate.layers` (default: `strategy.layer`) it
writes `<output_dir>/layer<K>.json` (see `pore.priors.calibrated`), `layer<K>_heatmap.png` and
`layer<K>_by_row.png`, and prints the fitted prior parameters.
"""

from __future__ import annotations

import datetime
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from pore.app import checks, network
from pore.app import config as build
from pore.app.preflight import check_data, read_model_facts
from pore.calibration.measure import Calibrator
from pore.data import Benchmark, BenchmarkStream, PromptCollator, StreamSource
from pore.errors import UserError, one_line
from pore.priors.calibrated import LAYER_FILE, save_prior_file

log = logging.getLogger("pore")


def calibration_layers(cfg: DictConfig) -> list[int]:
    """`calibrate.layers` (a list or one number), else the strategy's first pruning layer."""
    layers = OmegaConf.select(cfg, "calibrate.layers")
    if layers is None:
        layers = cfg.strategy.layer
    if isinstance(layers, (int, str)):
        layers = [layers]
    return sorted({int(layer) for layer in layers})


def _metadata(cfg: DictConfig, calibrator: Calibrator, model: torch.nn.Module) -> dict[str, Any]:
    data = cfg.data
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": str(cfg.model.path),
        "model_name": str(cfg.model.name),
        "adapter": calibrator.adapter.name,
        "attn_implementation": str(cfg.model.attn_implementation),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "data": {
            "name": str(data.name),
            "benchmark": str(data.benchmark),
            "path": str(data.path),
            "config": data.config,
            "split": str(data.split),
            "limit": data.limit,
        },
        "samples": calibrator.samples,
    }


def summary(results: dict[int, dict[str, Any]]) -> str:
    """A table of the fitted parameters per layer (what the user copies into a config)."""
    lines = [
        "layer K (scores layer K-1) |  grids | linear alpha (r2) | exponential sigma (r2) | bottom half",
        "-" * 98,
    ]
    for layer, prior in sorted(results.items()):
        fits = prior["fits"]
        bottom = next(iter(prior["buckets"].values()))["bottom_half_share"]

        def show(form: str, parameter: str, fits: dict = fits) -> str:
            fit = fits.get(form)
            if not fit:
                return "-"
            r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.3f}"
            return f"{fit[parameter]:+.3f} ({r2})"

        lines.append(
            f"{layer:>7d} ({layer - 1:>2d})            | {prior['count']:>6d} | "
            f"{show('linear', 'alpha'):>17} | "
            f"{show('exponential', 'sigma'):>22} | {100 * bottom:>9.1f} %"
        )
    return "\n".join(lines)


def check_calibration(cfg: DictConfig) -> tuple[list[int], Benchmark, StreamSource]:
    """What the calibration can check before the weights load (as `pore.app.preflight` for a run): the
    settings, the layers against the model's depth (from its config), the data; a `UserError` otherwise."""
    checks.check_seed(cfg)
    checks.check_trainer(cfg.trainer)
    checks.check_attention(cfg.model, build.uses_gpu(cfg))
    checks.check_output_dir(Path(str(cfg.output_dir)))
    checks.check_data_path(cfg.data)
    try:
        layers = calibration_layers(cfg)
    except (TypeError, ValueError):
        raise UserError(
            f"calibrate.layers must be a list of layer numbers (e.g. [1,2,3]) or null, got "
            f"{OmegaConf.select(cfg, 'calibrate.layers')!r}"
        ) from None
    try:
        benchmark, source = build.build_benchmark(cfg)
        network.offline_unless_reachable([str(cfg.model.path), str(cfg.data.path)])
        depth = read_model_facts(str(cfg.model.path), cfg.model.adapter).num_layers
        outside = [layer for layer in layers if depth is not None and not 1 <= layer < depth]
        if not layers:
            raise UserError("calibrate.layers is empty; give at least one layer, e.g. calibrate.layers=[2]")
        if outside:
            raise UserError(
                f"calibrate.layers must name layers K in [1, {depth - 1}] of this {depth}-layer language "
                f"model (pruning before layer K is scored in layer K-1), got {outside}"
            )
        check_data(benchmark, source)
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as error:  # the checks' own messages name the setting
        raise UserError(one_line(error)) from error
    return layers, benchmark, source


def calibrate(cfg: DictConfig) -> dict[int, Path]:
    """Run the calibration described by `cfg`; returns the prior file written for each layer."""
    layers, benchmark, source = check_calibration(cfg)
    output_dir = Path(str(cfg.output_dir))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot write into output_dir {output_dir} ({error.strerror or error}); choose a folder you can "
            "write to"
        ) from None
    torch.manual_seed(int(cfg.seed))
    model, calibrator, failed = measure(cfg, layers, BenchmarkStream(benchmark, source))
    metadata = {**_metadata(cfg, calibrator, model), "failed": failed}
    written: dict[int, Path] = {}
    priors: dict[int, dict[str, Any]] = {}
    for layer, result in calibrator.results().items():
        priors[layer] = result.to_prior(metadata)
        written[layer] = save_prior_file(priors[layer], output_dir / LAYER_FILE.format(layer=layer))
    figures = draw(priors, output_dir) if bool(cfg.calibrate.figures) else {}
    if str(cfg.logger.kind) == "wandb":
        _log_wandb(cfg, priors, figures, written)
    print(summary(priors))
    for layer, path in written.items():
        print(f"layer {layer}: {path}")
    if figures:
        print(f"pictures in {output_dir}: {', '.join(sorted(p.name for p in figures.values()))}")
    print(
        f"use it: python src/run.py model={cfg.model.name} strategy=pore_calibrated "
        f"strategy.prior.path={output_dir} strategy.prior.form=profile"
    )
    return written


def measure(cfg: DictConfig, layers: list[int], stream: BenchmarkStream) -> tuple[Any, Calibrator, int]:
    """The model run unpruned over the stream, the calibrator attached: (model, calibrator, failed rows)."""
    model, processor = build.load_model_and_processor(cfg)
    device = torch.device("cuda" if build.uses_gpu(cfg) else "cpu")
    model.to(device)
    loader = DataLoader(
        stream,
        batch_size=int(cfg.data.batch_size),
        num_workers=int(cfg.data.num_workers),
        collate_fn=PromptCollator(processor),
    )
    settings = cfg.calibrate
    calibrator = Calibrator(
        model,
        layers,
        adapter=cfg.model.adapter,
        gravity=bool(settings.gravity),
        gravity_directions=int(settings.gravity_directions),
        seed=int(cfg.seed),
    )
    started, images, failed = time.perf_counter(), 0, 0
    with calibrator:
        for batch in loader:
            failed += len(batch.failed)
            if batch.inputs is None:
                continue
            inputs = {key: value.to(device) for key, value in batch.inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            images += calibrator.update(inputs, pad_token_id=processor.tokenizer.pad_token_id)
    if calibrator.gravity_error:
        log.warning("gravity not computed: %s", calibrator.gravity_error)
    log.info(
        "measured %d image grids (%d rows failed) in %.1f s", images, failed, time.perf_counter() - started
    )
    return model, calibrator, failed


def draw(priors: dict[int, dict[str, Any]], output_dir: Path) -> dict[str, Path]:
    """Each layer's heatmap (one per grid size) and by-row profile, and the layers together by row."""
    from pore.app.viz.figures import plot_calibration_by_row, plot_calibration_heatmap

    figures: dict[str, Path] = {}
    for layer, prior in priors.items():
        figures[f"layer{layer}_heatmap"] = plot_calibration_heatmap(
            prior, output_dir / f"layer{layer}_heatmap.png"
        )
        figures[f"layer{layer}_by_row"] = plot_calibration_by_row(
            [prior], output_dir / f"layer{layer}_by_row.png"
        )
        for key in list(prior["buckets"])[1:]:  # grids that vary (tiles, resolutions): one each
            figures[f"layer{layer}_heatmap_{key}"] = plot_calibration_heatmap(
                prior, output_dir / f"layer{layer}_heatmap_{key}.png", bucket=key
            )
    if len(priors) > 1:
        figures["by_row_layers"] = plot_calibration_by_row(
            list(priors.values()), output_dir / "by_row_layers.png", fits=False
        )
    return figures


def _log_wandb(
    cfg: DictConfig, priors: dict[int, dict[str, Any]], figures: dict[str, Path], files: dict[int, Path]
) -> None:
    """One W&B run (job type `calibration`): the pictures as images, the fits in the summary, the files."""
    import wandb

    logger = cfg.logger
    run = wandb.init(
        project=logger.project,
        entity=logger.entity,
        name=logger.name or f"calibrate/{cfg.model.name}/{cfg.data.name}",
        group=logger.group,
        tags=list(logger.tags or []),
        job_type="calibration",
        dir=str(cfg.output_dir),
        mode=str(logger.mode),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    run.log({f"calibration/{name}": wandb.Image(str(path)) for name, path in figures.items()})
    for layer, prior in priors.items():
        for form, fit in (prior.get("fits") or {}).items():
            parameter = "alpha" if form == "linear" else "sigma"
            run.summary[f"layer{layer}/{form}/{parameter}"] = fit[parameter]
            run.summary[f"layer{layer}/{form}/r2"] = fit["r2"]
        run.summary[f"layer{layer}/count"] = prior["count"]
    for path in files.values():
        run.save(str(path), base_path=str(path.parent), policy="now")
    run.finish()
