"""Post-training quantization baselines (RTN, SmoothQuant, GPTQ) saved as student folders.

    python quantize_ptq.py method=gptq model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 \
        calib=gen_data/all_gen.jsonl output_dir=runs/ptq/gptq-W4A8KV8
    python evaluate.py model=runs/ptq/gptq-W4A8KV8 limit=200      # evaluated like a QAT student
    python quantize_ptq.py method=smoothquant w_bits=8 a_bits=8 kv_bits=8 output_dir=runs/ptq/sq-W8A8KV8
        # alpha=auto (default): chosen on held-out calibration text and saved in llmqat_meta.json;
        # alpha=0.85 fixes it, smooth_down=true adds down_proj; gptq_true_sequential=false: one pass per layer

All settings: recipes/ptq.py `PTQConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
"""

import sys

from recipes.ptq import PTQConfig, run
from utils.cli import run_entry_point


def main(argv) -> int:
    return run_entry_point("quantize_ptq.py", PTQConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
