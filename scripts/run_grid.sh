#!/usr/bin/env bash
# The LLM-QAT README grid on the default model (docs/RESULTS.md, section 2): for each W-A-KV setting
# a QAT student (configs/qat_smollm2_w4a8kv8.yaml with output_dir=runs/w<W>a<A>kv<KV>) and the RTN /
# SmoothQuant (A < 16) / GPTQ / QAT rows of configs/grid.yaml (eight zero-shot tasks + WikiText-2 and C4
# perplexity), then the whole table (runs/table/table.md, .json), the recovered-% chart
# (runs/table/recovered.png) and the held-out KD loss of every setting (runs/table/training_curves.png).
#   bash scripts/run_grid.sh                    # all eight settings (wall-clock: docs/RESULTS.md section 2)
#   bash scripts/run_grid.sh 4-8-4 4-16-16      # some settings (the table holds every cached row)
#   GRID_METHODS=rtn bash scripts/run_grid.sh    # QAT + RTN rows first, the SmoothQuant / GPTQ baselines later
# Idempotent: a setting whose student exists is not retrained; table rows are cached in runs/table.
# Needs gen_data/all_gen.jsonl (sh run_generate.sh 2 config=configs/gen_smollm2.yaml, then
# python merge_gen_data.py) and the evaluation data (LLMQAT_DATA_DIR, default ../shared/data).
# Calibration: SmoothQuant on the self-generated set (configs/grid.yaml, data-free); GPTQ on WikiText-2
# validation tokens with dampening 0.1, set below (the generated set is too small for GPTQ: docs/evaluation.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ALL="4-8-4 4-8-8 4-6-16 4-8-16 4-16-16 8-8-4 8-8-8 8-8-16"
SETTINGS=${*:-$ALL}
DATA=${LLMQAT_DATA_DIR:-../shared/data}
GEN=gen_data/all_gen.jsonl
METHODS=${GRID_METHODS:-rtn smoothquant gptq}  # GRID_METHODS=rtn: RTN + QAT rows only (the baselines later)
TABLE=(config=configs/grid.yaml "eval.data_dir=$DATA")
if [ ! -f "$GEN" ]; then
  echo "missing $GEN: sh run_generate.sh 2 config=configs/gen_smollm2.yaml && python merge_gen_data.py" >&2
  exit 1
fi
students=()
for s in $SETTINGS; do
  IFS=- read -r w a kv <<< "$s"
  run="runs/w${w}a${a}kv${kv}"
  if [ ! -f "$run/student/quant_config.json" ]; then
    echo "== QAT $s -> $run"
    sh run_train.sh "$w" "$a" "$kv" config=configs/qat_smollm2_w4a8kv8.yaml output_dir="$run"
  fi
  students+=("$run/student")
  echo "== table rows $s"
  first=fp,rtn
  case " $METHODS " in *" smoothquant "*) first=$first,smoothquant ;; esac
  sh run_table.sh "${TABLE[@]}" settings="[$s]" methods="[$first]" qat="[$run/student]" output=runs/table/last.md
  case " $METHODS " in *" gptq "*)
    sh run_table.sh "${TABLE[@]}" settings="[$s]" methods=[gptq] output=runs/table/last.md ;;
  esac
done
# The whole table from the cache: every setting whose rows exist (nothing is re-evaluated).
done_settings=()
done_students=()
for s in $ALL; do
  IFS=- read -r w a kv <<< "$s"
  if [ -f "runs/w${w}a${a}kv${kv}/student/quant_config.json" ] && \
     [ -f "runs/table/results/rtn-W${w}A${a}KV${kv}.json" ]; then
    done_settings+=("$s")
    done_students+=("runs/w${w}a${a}kv${kv}/student")
  fi
done
join() { local IFS=,; echo "$*"; }
# only_cached: a SmoothQuant / GPTQ row not evaluated yet (GRID_METHODS=rtn) is left out, not built
sh run_table.sh "${TABLE[@]}" settings="[$(join "${done_settings[@]}")]" methods=[fp,rtn,smoothquant,gptq] \
  only_cached=true qat="[$(join "${done_students[@]}")]"
PYTHONPATH=. "${PYTHON:-.venv/bin/python}" -m utils.plots recovered runs/table/table.json runs/table/recovered.png \
  "SmolLM2-135M: recovered % of the FP -> RTN WikiText-2 perplexity gap"
curves=()
for s in "${done_settings[@]}"; do
  IFS=- read -r w a kv <<< "$s"
  curves+=("$s=runs/w${w}a${a}kv${kv}/metrics.jsonl")
done
PYTHONPATH=. "${PYTHON:-.venv/bin/python}" -m utils.plots curves runs/table/training_curves.png "${curves[@]}"
