"""The built-in benchmarks; importing this package registers them in `BENCHMARKS`."""

from pore.data.benchmarks import gqa, mmbench, mme, pope, scienceqa, spatial, textvqa, vqav2

__all__ = ["gqa", "mmbench", "mme", "pope", "scienceqa", "spatial", "textvqa", "vqav2"]
