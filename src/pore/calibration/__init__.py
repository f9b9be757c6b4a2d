"""Measured spatial priors: a model's position bias from data, fitted and used without any training.

- `pore.calibration.measure`: run a model unpruned and average the last prompt token's attention over every
  image grid position at the scoring layer(s) (`Calibrator`), and the RoPE-only "gravity" of a content-free
  query/key pair (`RopeGravity`).
- `pore.calibration.fit`: least-squares fits of the `linear` and `exponential` prior forms to a profile.
- `pore.priors.calibrated`: the prior file (JSON, `pore-prior/1`) and the weights of the `calibrated`
  prior (`strategy=pore_calibrated strategy.prior.path=... strategy.prior.form=...`).
- `pore.app.calibrate`: the `src/calibrate.py` command (data streamed with the evaluation's own code).

Only the light modules are imported here; the runner (model loading, data) is imported where it is used.
"""

from pore.calibration.fit import FORMS as FIT_FORMS
from pore.calibration.fit import Fit, fit_exponential, fit_forms, fit_linear
from pore.priors.calibrated import FORMAT, FORMS, PriorFile, load_prior_file, resolve_prior_path

__all__ = [
    "FIT_FORMS",
    "FORMAT",
    "FORMS",
    "Fit",
    "PriorFile",
    "fit_exponential",
    "fit_forms",
    "fit_linear",
    "load_prior_file",
    "resolve_prior_path",
]
