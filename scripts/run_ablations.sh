#!/usr/bin/env bash
# The paper's ablations on the default model at W4A8KV8 (docs/RESULTS.md, section 2b), with the
# same recipe and budget as the grid (150 steps x 256 tokens, lr 1e-4): QAT on self-generated data
# (runs/w4a8kv8, the grid's 4-8-8 student, trained here if missing) vs on WikiText-2 validation text vs on
# C4 text (data ablation), and logit KD vs plain cross-entropy on the generated data (loss
# ablation); each student gets a table row on the eight tasks + WikiText-2 / C4 perplexity
# (runs/table/ablations.md, .json).
#   bash scripts/run_ablations.sh          # ~70 min on a 2-core CPU (4 trainings of 11 min + 5 table rows)
# Real-text sets, written once under runs/ablation/ (about the size of the generated set, 35k tokens):
# the first 368 non-empty rows of the WikiText-2 *validation* split (the test split is evaluated)
# and the first 106 documents under 4,000 characters of the local C4 validation subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${LLMQAT_DATA_DIR:-../shared/data}
GEN=gen_data/all_gen.jsonl
RECIPE=(max_steps=150 model_max_length=256 learning_rate=1e-4 warmup_steps=10 logging_steps=10 eval_steps=50)
mkdir -p runs/ablation
"$PY" - "$DATA" <<'EOF'
import sys
from pathlib import Path
from utils.eval.datasets import c4_texts, wikitext2_rows
from utils.io import atomic_write_text
import json

data, out = sys.argv[1], Path("runs/ablation")
wiki = [r for r in wikitext2_rows("validation", data) if r.strip()][:368]
c4 = [t for t in c4_texts(data) if len(t) < 4000][:106]
for name, rows in (("wikitext2_val", wiki), ("c4_short", c4)):
    path = out / f"{name}.jsonl"
    if not path.is_file():
        atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in rows))
    print(f"{path}: {len(rows)} rows, {sum(map(len, rows))} characters")
EOF
train() {  # train RUN DATA [key=value ...]
  local run=$1 data=$2
  shift 2
  [ -f "$run/student/quant_config.json" ] || sh run_train.sh 4 8 8 data.train="$data" output_dir="$run" "${RECIPE[@]}" "$@"
}
train runs/w4a8kv8 $GEN  # the grid's 4-8-8 student (scripts/run_grid.sh trains the same one)
train runs/kd_wikitext2 runs/ablation/wikitext2_val.jsonl
train runs/kd_c4 runs/ablation/c4_short.jsonl
train runs/ce_gen $GEN kd_loss_scale=0 ce_loss_scale=1
sh run_table.sh limit=50 ppl_limit=4 "data_dir=$DATA" settings=[4-8-8] methods=[fp,rtn] \
  qat=[runs/w4a8kv8/student,runs/kd_wikitext2/student,runs/kd_c4/student,runs/ce_gen/student] \
  output=runs/table/ablations.md
