"""Compare finished runs on the same questions, or draw the Pareto fronts of a multirun / sweep folder.

python src/compare.py RUN_A RUN_B [RUN_C ...]          # each run against the first: paired differences,
                                                       # McNemar, answer agreement, kept-token overlap
python src/compare.py RUN_A RUN_B --reference RUN_NONE # plus agreement with the unpruned run
python src/compare.py --pareto multirun/<date>_<time>  # accuracy against prefill TFLOPs, the front marked
python src/compare.py --pareto FOLDER --bench outputs/bench/<report>.json   # and against measured time

Runs of other benchmarks, protocols or question sets are refused with one line (exit status 2).
docs/statistics.md explains every number.
"""

from __future__ import annotations

import sys

from pore.app.compare import main

if __name__ == "__main__":
    sys.exit(main())
