#!/usr/bin/env bash
# Data-free data generation: run_generate.sh N [key=value ...] runs shards 0..N-1 of generate_data.py,
# at most one process per visible GPU at a time, or NPROC_CPU at a time on a CPU machine.
#   sh run_generate.sh 2 config=configs/gen_smollm2.yaml && python merge_gen_data.py
#   sh run_generate.sh 64                  # the original: 64 shards x 500 start ids (LLaMA, 32k vocab)
#   SHARD_OFFSET=64 sh run_generate.sh 64  # a second node: shards 64..127 (multi-node: docs/data.md)
# Every key is a field of recipes/generate.py GenerateConfig (defaults there; config=FILE.yaml merges an
# experiment from configs/). A killed run resumes when started again. Protocol: docs/data.md.
#
# Scheduling: G visible GPUs (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`) make G lanes; lane g runs
# shards g, g+G, g+2G, ... one after another with CUDA_VISIBLE_DEVICES set to the g-th visible GPU,
# so one model per GPU and shard i always on GPU i mod G. Without GPUs, NPROC_CPU lanes (default 1),
# each with torch threads = cores / NPROC_CPU. A failed shard does not stop the others; the script
# then exits 1 naming it. DRY_RUN=1 prints each lane's commands instead of running them.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
if [ "$#" -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: sh run_generate.sh N_SHARDS [key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")"
N=$1
shift
OFFSET=${SHARD_OFFSET:-0}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

visible_gpus() {  # one GPU id per line: CUDA_VISIBLE_DEVICES ("" or -1: none), else nvidia-smi's list
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    [[ "$CUDA_VISIBLE_DEVICES" =~ ^- ]] || tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | sed '/^$/d'
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | awk '/^GPU/ {print n++}' || true
  fi
}

mapfile -t GPUS < <(visible_gpus)
extra=()
if [ "${#GPUS[@]}" -gt 0 ]; then
  LANES=${#GPUS[@]}
else
  LANES=${NPROC_CPU:-1}
  [[ "$LANES" =~ ^[1-9][0-9]*$ ]] || { echo "run_generate.sh: NPROC_CPU must be >= 1" >&2; exit 2; }
  if [ "$LANES" -gt 1 ]; then
    threads=$(( $(nproc) / LANES ))
    extra=("num_threads=$(( threads > 0 ? threads : 1 ))")
  fi
fi
failures=$(mktemp)
trap 'rm -f "$failures"' EXIT

lane() {  # lane L: shards L, L+LANES, ... one after another
  local l=$1 i shard dev
  shift
  for ((i = l; i < N; i += LANES)); do
    shard=$((OFFSET + i))
    cmd=("$PY" generate_data.py "$shard" "${extra[@]}" "$@")
    if [ "${#GPUS[@]}" -gt 0 ]; then dev=${GPUS[$l]}; cmd=(env "CUDA_VISIBLE_DEVICES=$dev" "${cmd[@]}"); fi
    if [ -n "${DRY_RUN:-}" ]; then
      echo "lane $l: ${cmd[*]}"
    elif ! "${cmd[@]}"; then
      echo "run_generate.sh: shard $shard failed${dev:+ on GPU $dev}" >&2
      echo "$shard" >>"$failures"
    fi
  done
}

pids=()
for ((l = 0; l < LANES && l < N; l++)); do
  lane "$l" "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
if [ -s "$failures" ]; then
  echo "run_generate.sh: $(wc -l <"$failures") of $N shards failed: $(sort -n "$failures" | paste -sd ' ');" \
    "run the same command again to resume them" >&2
  exit 1
fi
