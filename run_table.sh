#!/usr/bin/env bash
# The paper's table: FP / RTN / SmoothQuant / GPTQ (and QAT students) x W-A-KV settings.
#   sh run_table.sh                                              # default grid, full task sets (hours on a CPU)
#   sh run_table.sh limit=200 settings=[4-8-8,8-8-8] calib=wikitext2 qat=[runs/w4a8kv8/student]
# Every key is a field of recipes/table.py TableConfig (values in configs/table.yaml). Results are
# cached per row under cache_dir (runs/table): re-running only evaluates what is missing.
# About 3 min per row at limit=50 for SmolLM2-135M on a 2-core CPU (README, "Evaluation").
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m recipes.table "$@"
