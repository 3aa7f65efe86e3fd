#!/usr/bin/env bash
# The main job, from a fresh clone: create .venv, then run the whole pipeline on SmolLM2-135M-Instruct:
# data-free generation (2 shards) -> merge -> QAT W4A8KV8 (100 steps) -> evaluate FP / RTN / QAT
# (WikiText-2 ppl + PIQA, ARC-e, HellaSwag) -> runs/pipeline/table.md + pipeline.png (configs/main_job.yaml).
#   bash run_pipeline.sh [key=value ...]      e.g. bash run_pipeline.sh eval.limit=50 train.max_steps=50
# Re-running skips finished stages. Evaluation data: data_dir=... or LLMQAT_DATA_DIR (default here:
# ../shared/data when it exists); without any, the evaluations are skipped and named.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${LLMQAT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export LLMQAT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/python pipeline.py config=configs/main_job.yaml "$@"
