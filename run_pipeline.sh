#!/usr/bin/env bash
# The main job, from a fresh clone: create .venv, then run the pipeline on SmolLM2-135M-Instruct.
#   bash run_pipeline.sh [key=value ...]      e.g. bash run_pipeline.sh ppl_windows=4
# Evaluation data: data_dir=... or LLMQAT_DATA_DIR (default here: ../shared/data when it exists).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${LLMQAT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export LLMQAT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python pipeline.py "$@"
