"""The built-in benchmarks: each module of this package registers its benchmark in `BENCHMARKS` when
imported (all of them are, here), so a new benchmark is one file here and one YAML in conf/data/.
"""

from pore.registry import import_submodules

import_submodules(__name__, __path__)
