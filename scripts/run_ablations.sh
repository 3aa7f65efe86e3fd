#!/usr/bin/env bash
# The paper's ablations on the default model at W4A8KV8 (docs/RESULTS.md, section 2b), with the
# grid's recipe and budget: QAT on self-generated data (configs/qat_smollm2_w4a8kv8.yaml: runs/w4a8kv8,
# the grid's 4-8-8 student, trained here if missing) vs on WikiText-2 validation text
# (configs/ablations/kd_wikitext2.yaml) vs on C4 text (configs/ablations/kd_c4.yaml): the data ablation;
# logit KD vs plain cross-entropy on the generated data (configs/ablations/ce_gen.yaml): the loss
# ablation. Each student gets a table row with the grid's evaluation (configs/grid.yaml: eight tasks +
# WikiText-2 / C4 perplexity) in runs/table/ablations.md, .json.
#   bash scripts/run_ablations.sh          # wall-clock: docs/RESULTS.md section 2b
# Real-text sets, written once under runs/ablation/ (about the size of the generated set):
# the first 368 non-empty rows of the WikiText-2 *validation* split (the test split is evaluated)
# and the first 106 documents under 4,000 characters of the local C4 validation subset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DATA=${LLMQAT_DATA_DIR:-../shared/data}
"$PY" scripts/ablation_texts.py --data-dir "$DATA" --out runs/ablation
train() {  # train RUN CONFIG: the student RUN/student from configs/CONFIG.yaml, unless it exists
  [ -f "$1/student/quant_config.json" ] || sh run_train.sh 4 8 8 config="configs/$2.yaml"
}
train runs/w4a8kv8 qat_smollm2_w4a8kv8  # the grid's 4-8-8 student (scripts/run_grid.sh trains the same one)
train runs/kd_wikitext2 ablations/kd_wikitext2
train runs/kd_c4 ablations/kd_c4
train runs/ce_gen ablations/ce_gen
sh run_table.sh config=configs/grid.yaml "eval.data_dir=$DATA" settings=[4-8-8] methods=[fp,rtn] \
  qat=[runs/w4a8kv8/student,runs/kd_wikitext2/student,runs/kd_c4/student,runs/ce_gen/student] \
  output=runs/table/ablations.md
