"""Post-training quantization baselines (RTN, SmoothQuant, GPTQ) saved as student folders.

    python quantize_ptq.py method=gptq model=smollm2-135m w_bits=4 a_bits=8 kv_bits=8 \
        calib=gen_data/all_gen.jsonl output_dir=runs/ptq/gptq-W4A8KV8
    python evaluate.py model=runs/ptq/gptq-W4A8KV8 limit=200      # evaluated like a QAT student

All settings: quant/baselines.py `PTQConfig` (defaults), configs/ptq.yaml (values), `key=value`.
"""

import sys

from quant.baselines import PTQConfig, run
from utils.config import ConfigError, load_config
from utils.logging import setup_logging


def main(argv) -> int:
    try:
        cfg = load_config(PTQConfig, argv, default_yaml="configs/ptq.yaml")
    except ConfigError as err:
        print(f"quantize_ptq.py: {err}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"quantize_ptq.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
