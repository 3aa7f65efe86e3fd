#!/usr/bin/env bash
# The test command (CI runs exactly this): set up .venv if needed, then run the whole suite, slow tests
# (multi-process, real model) included. A plain `pytest` runs only the fast ones.
#   bash scripts/run_tests.sh [pytest args]       # e.g. -m 'not slow', tests/quant
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The shared evaluation data beside the checkout, when it is there (tests that need it skip otherwise).
if [ -z "${LLMQAT_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export LLMQAT_DATA_DIR="$(cd ../shared/data && pwd)"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
exec .venv/bin/python -m pytest -q -m "slow or not slow" "$@"
