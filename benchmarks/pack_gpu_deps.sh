#!/usr/bin/env bash
# Prepare what `python src/bench.py` needs on a GPU machine whose image lacks it, in .gpu-deps/ (git-ignored
# locally), to be carried there (the device tool's `carry`, or copied).
#
# The lent H100 / H200 image has torch, transformers and accelerate but not hydra-core, omegaconf and
# antlr4-python3-runtime, which are pure Python: they are copied from this interpreter's site-packages.
# With --flash-attn, flash-attn's source distribution is fetched too: PyPI has no binary wheel of it (only
# GitHub releases do), so it has to be built on the GPU machine (see the README's benchmark section).
#
#   bash benchmarks/pack_gpu_deps.sh [--flash-attn]
#   # there:  PYTHONPATH=src:.gpu-deps python3 src/bench.py ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
rm -rf .gpu-deps
mkdir -p .gpu-deps
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu-deps/' "$exclude" 2>/dev/null || echo '/.gpu-deps/' >>"$exclude"
"$PYTHON" - <<'PY'
import importlib
import pathlib
import shutil

for name in ("hydra", "omegaconf", "antlr4"):
    source = pathlib.Path(importlib.import_module(name).__file__).parent
    shutil.copytree(source, pathlib.Path(".gpu-deps") / name, ignore=shutil.ignore_patterns("__pycache__"))
    print(f"copied {name} from {source}")
PY
if [[ "${1:-}" == "--flash-attn" ]]; then
    # Metadata only (no CUDA build here): the sdist is built on the GPU machine.
    FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: \
        --no-build-isolation -d .gpu-deps flash-attn==2.8.3.post2
fi
du -sh .gpu-deps
