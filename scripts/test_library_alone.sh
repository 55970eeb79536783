#!/usr/bin/env bash
# The library's tests without the experiment harness (`make test-library`; CI runs it after `make test`).
#
# A fresh venv in /tmp (no system site-packages) with torch, pytest and pytest-timeout alone, and a copy of
# what the library's tests are made of: pyproject.toml (the pytest settings), metaopt/, tests/conftest.py and
# tests/metaopt/. Nothing of the harness is there to be found: experiments/, hydra_plugins/ and scripts/ are
# not copied and hydra, omegaconf, timm, wandb, torchvision are not installed, so a library test that imports
# the harness fails here. Arguments go to pytest (e.g. -m "" for the slow tests too, -k ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.14.1}

start=$SECONDS
work=$(mktemp -d /tmp/metaopt-library-alone.XXXXXX)
trap 'rm -rf "$work"' EXIT  # torch and its CUDA wheels: several GB

source_dir=$work/source
mkdir -p "$source_dir/tests"
cp pyproject.toml "$source_dir/"
cp -r metaopt "$source_dir/metaopt"
cp -r tests/__init__.py tests/conftest.py tests/metaopt "$source_dir/tests/"
find "$source_dir" -name __pycache__ -prune -exec rm -rf {} +

"$PYTHON" -m venv "$work/venv"
python=$work/venv/bin/python
"$python" -m pip install --quiet "$TORCH" "pytest>=8" "pytest-timeout>=2.3"
echo "venv and install: $((SECONDS - start)) s"

cd "$source_dir"
# the environment holds none of the harness (a harness import in a library test would fail, not pass)
"$python" - <<'EOF'
import importlib.util

present = [name for name in ("experiments", "hydra_plugins", "hydra", "omegaconf", "timm", "wandb", "torchvision")
           if importlib.util.find_spec(name) is not None]
if present:
    raise SystemExit(f"the library's environment holds harness packages: {present}")
EOF
tests_start=$SECONDS
PYTHONPATH=$source_dir OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$python" -m pytest -q -p no:cacheprovider tests/metaopt "$@"
echo "library tests: $((SECONDS - tests_start)) s; in all: $((SECONDS - start)) s"
