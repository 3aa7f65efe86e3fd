#!/usr/bin/env bash
# One GPU check: the gpu-marked tests, then generation, QAT-KD step, evaluation, FSDP2, export and vLLM
# measured on SmolLM2-135M, written to one JSON report (about 5 minutes on one H200; on a CPU the
# same code runs at tiny scale in about a minute). Options: benchmarks/gpu_check.py.
#   bash scripts/gpu_check.sh                                  # -> runs/gpu_check.json
#   bash scripts/gpu_check.sh output=runs/h200.json data_dir=../shared/data
# Environment: .venv is used when it exists; otherwise it is made by scripts/setup_env.sh. When the
# python3 on PATH already imports a CUDA torch, .venv is made first and sees python3's packages (a
# .pth file: --system-site-packages alone misses them when python3 is itself a venv), so setup_env.sh
# finds that torch and does not install its CPU wheel over it. Offline, put wheels in .whl/ (pip
# then installs from there only); a failed install is reported and the check goes on with what is
# importable. Exit code: 1 if a step failed, 0 otherwise (skipped steps included).
set -euo pipefail
cd "$(dirname "$0")/.."
purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
if [ ! -x .venv/bin/python ]; then
  if python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv || python3 -m venv --without-pip --system-site-packages .venv
    purelib python3 > "$(purelib .venv/bin/python)/_cuda_torch_host.pth"
  fi
  if [ -d .whl ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl"; fi
  PIP_DEFAULT_TIMEOUT=10 PIP_RETRIES=1 bash scripts/setup_env.sh \
    || echo "gpu_check: scripts/setup_env.sh failed; going on with what .venv can import" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export LLMQAT_NO_PROGRESS=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
exec .venv/bin/python benchmarks/gpu_check.py "$@"
