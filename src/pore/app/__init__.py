"""The application layer: what the command-line programs run on top of the library.

Hydra configs in, objects out (`config`, `cli`, `preflight`), the Lightning evaluation (`evaluate`,
`evaluation`), the calibration runner (`calibrate`), sweeps, pictures (`viz`) and the speed benchmark
(`bench`). The library (`pore.engine`, `pore.methods`, `pore.priors`, `pore.adapters`, `pore.data`,
`pore.metrics`, ...) never imports this package (tests/test_layers.py checks it).
"""
