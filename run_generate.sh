#!/usr/bin/env bash
# Data-free data generation: run_generate.sh N [key=value ...] runs shards 0..N-1 of generate_data.py,
# one process per GPU at once (CUDA_VISIBLE_DEVICES=i), or one after another on a CPU machine.
#   sh run_generate.sh 2 config=configs/gen_smollm2.yaml && python merge_gen_data.py
#   sh run_generate.sh 64                  # the original: 64 shards x 500 start ids (LLaMA, 32k vocab)
# Every key is a field of recipes/generate.py GenerateConfig (defaults there; config=FILE.yaml merges an
# experiment from configs/). A killed run resumes when started again. Protocol: docs/data.md.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
if [ "$#" -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: sh run_generate.sh N_SHARDS [key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")"
N=$1
shift
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -eq 0 ]; then
  for ((i = 0; i < N; i++)); do "$PY" generate_data.py "$i" "$@"; done
  exit 0
fi
pids=()
for ((i = 0; i < N; i++)); do
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) "$PY" generate_data.py "$i" "$@" &
  pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
if [ "$failed" -gt 0 ]; then
  echo "run_generate.sh: $failed of $N shards failed; run the same command again to resume them" >&2
  exit 1
fi
