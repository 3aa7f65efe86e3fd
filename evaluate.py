"""Perplexity (WikiText-2, C4) and zero-shot accuracy (8 tasks) of a full-precision or quantized model.

    python evaluate.py model=smollm2-135m tasks=[wikitext2,piqa] limit=200 seqlen=2048 \
        w_bits=4 a_bits=8 kv_bits=8 data_dir=../shared/data output=runs/eval/w4a8kv8.json
    python evaluate.py model=runs/w4a8kv8/student     # a saved student: its quant config is used
    python evaluate.py model=runs/w4a8kv8/student kv_bits=4   # ... with only kv_bits changed (32 = off)

All settings: recipes/evaluate.py `EvalConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
Without data_dir, $LLMQAT_DATA_DIR names the local data directory; without either, the HF hub.
"""

import sys

from recipes.evaluate import EvalConfig, run
from utils.cli import run_entry_point


def main(argv) -> int:
    return run_entry_point("evaluate.py", EvalConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
