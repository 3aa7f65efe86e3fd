#!/usr/bin/env bash
# Distillation QAT: run_train.sh W A KV [key=value ...]  (bits 2..8, or 16 = full precision)
#   sh run_train.sh 4 8 8 config=configs/qat_smollm2_w4a8kv8.yaml      # the SmolLM2 QAT recipe
#   sh run_train.sh 4 8 8 backend=fsdp nproc=2 resume=auto     # 2 processes: GPUs, else CPU + gloo
#   sh run_train.sh 4 8 8 attn_implementation=eager max_grad_norm=0   # eager attention, no clipping (HF's 0)
#   NNODES=2 RDZV_ENDPOINT=node0:29500 sh run_train.sh 4 8 8 backend=fsdp nproc=16   # on each of 2 nodes
#   LAUNCHER=srun NNODES=2 sh run_train.sh 4 8 8 backend=fsdp nproc=16   # once, inside a Slurm allocation
#   LAUNCHER=deepspeed NNODES=2 HOSTFILE=hostfile sh run_train.sh 4 8 8 backend=deepspeed nproc=16
# Every key is a field of recipes/train.py TrainConfig (defaults there; config=FILE.yaml merges an
# experiment from configs/). nproc (all processes, on all nodes) comes from the command line, else
# $NPROC, else the config. Launcher ($LAUNCHER): torchrun (default; rendezvous c10d at $RDZV_ENDPOINT
# when NNODES > 1), srun (MASTER_ADDR: the allocation's first node unless set) or deepspeed
# ($HOSTFILE). DRY_RUN=1 prints the launch command instead of running it. Protocol: docs/training.md.
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
LAUNCHER=${LAUNCHER:-torchrun} NNODES=${NNODES:-1}
fail() { echo "run_train.sh: $*" >&2; exit 2; }

plan=$("$PY" train.py --launch-plan "${args[@]}")
nproc=${plan#* }
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || fail "NNODES must be >= 1, got '$NNODES'"
[ $((nproc % NNODES)) -eq 0 ] || fail "nproc=$nproc processes do not split evenly over NNODES=$NNODES nodes"
per_node=$((nproc / NNODES))
script=(train.py "${args[@]}")
case "$LAUNCHER" in
  torchrun)
    if [ "$NNODES" -gt 1 ]; then
      [ -n "${RDZV_ENDPOINT:-}" ] || fail "NNODES=$NNODES needs RDZV_ENDPOINT=HOST:PORT (a node every node reaches)"
      cmd=("$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$per_node" --rdzv-backend c10d
           --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-llmqat}" "${script[@]}")
    elif [ "$nproc" -gt 1 ]; then
      cmd=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" "${script[@]}")
    else
      cmd=("$PY" "${script[@]}")
    fi ;;
  srun)
    master=${MASTER_ADDR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?LAUNCHER=srun runs inside a Slurm allocation (sbatch / salloc)}" | head -n 1)}
    cmd=(env "MASTER_ADDR=$master" "MASTER_PORT=${MASTER_PORT:-29500}" srun --nodes "$NNODES" --ntasks "$nproc"
         --ntasks-per-node "$per_node" "$PY" "${script[@]}") ;;
  deepspeed)
    [ "$NNODES" -eq 1 ] || [ -n "${HOSTFILE:-}" ] || fail "LAUNCHER=deepspeed with NNODES=$NNODES needs HOSTFILE"
    ds=$(dirname "$PY")/deepspeed
    [ -x "$ds" ] || ds=deepspeed
    cmd=("$ds" ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$NNODES" --num_gpus "$per_node"
         --master_port "${MASTER_PORT:-29500}" --no_local_rank "${script[@]}") ;;
  *) fail "LAUNCHER must be torchrun, srun or deepspeed, got '$LAUNCHER'" ;;
esac
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
if [ "$nproc" -gt 1 ] && [ "$NNODES" -eq 1 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # CPU + gloo: one thread per process
  fi
fi
exec "${cmd[@]}"
