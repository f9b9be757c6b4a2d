"""Wall-clock benchmark of visual-token pruning: prefill, generation and memory against the budget.

python src/bench.py                                   # LLaVA-1.5-7B shapes, random weights, on the GPU
python src/bench.py bench.architecture=llava15_small bench.batch_sizes=[1,4] bench.budgets=[576,192,64]
python src/bench.py model=tiny_llava bench.budgets=[64,16]    # the shipped checkpoint, its own weights
python src/bench.py --help                            # every setting (conf/bench.yaml)

Exit status: 0 when every setting was measured (out of memory counts as a measurement: the row says oom),
1 when a setting failed with an error (listed at the end; the report is still written), 2 for a mistake in
the settings (one line, before the model is built).
"""

from __future__ import annotations

from pore.app.bench.main import bench
from pore.app.cli import main

if __name__ == "__main__":
    main(bench, "bench")
