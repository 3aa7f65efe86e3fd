#!/usr/bin/env bash
# Distillation QAT: run_train.sh W A KV [key=value ...]  (bits 2..8, or 16 = full precision)
#   sh run_train.sh 4 8 8 config=configs/qat_smollm2_w4a8kv8.yaml      # the SmolLM2 QAT recipe
#   sh run_train.sh 4 8 8 backend=fsdp nproc=2 resume=auto     # 2 processes: GPUs, else CPU + gloo
#   sh run_train.sh 4 8 8 attn_implementation=eager max_grad_norm=0   # eager attention, no clipping (HF's 0)
# Every key is a field of recipes/train.py TrainConfig (defaults there; config=FILE.yaml merges an
# experiment from configs/). nproc comes from the command line, else $NPROC, else the config; the
# launcher is torchrun for nproc > 1. Protocol: docs/training.md.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
if [ "$#" -lt 3 ]; then
  echo "usage: sh run_train.sh W_BITS A_BITS KV_BITS [key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")"
W=$1 A=$2 KV=$3
shift 3
args=("quant.w_bits=$W" "quant.a_bits=$A" "quant.kv_bits=$KV")
if [ -n "${NPROC:-}" ]; then args+=("nproc=$NPROC"); fi
args+=("$@")
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
plan=$("$PY" train.py --launch-plan "${args[@]}")
nproc=${plan#* }
if [ "$nproc" -gt 1 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CPU + gloo: one thread per process
  fi
  exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" train.py "${args[@]}"
fi
exec "$PY" train.py "${args[@]}"
