"""Finished runs against the published numbers of the ledger (docs/ledger.csv, docs/reproduction.md).

python src/ledger.py RUN_DIR [RUN_DIR ...]          # run folders, or multirun / sweep folders
python src/ledger.py outputs/ --ledger my_ledger.csv

Prints, for every ledger row a run matches (model, strategy, budget, benchmark, protocol): paper, measured,
delta and the source; then the rows no run matched and the runs no row matched.
"""

from __future__ import annotations

import sys

from pore.app.ledger import main

if __name__ == "__main__":
    sys.exit(main())
