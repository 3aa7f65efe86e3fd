#!/usr/bin/env bash
# The paper's table: FP / RTN / SmoothQuant / GPTQ (and QAT students) x W-A-KV settings.
#   sh run_table.sh                                              # default grid, full task sets (hours on a CPU)
#   sh run_table.sh config=configs/grid.yaml settings=[4-8-8] qat=[runs/w4a8kv8/student]
# Every key is a field of recipes/table.py TableConfig (defaults there; config=FILE.yaml merges an
# experiment from configs/). Results are cached per row under cache_dir (runs/table): re-running only
# evaluates what is missing. Protocol: docs/evaluation.md.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m recipes.table "$@"
