"""Distillation-based QAT of a W/A/KV fake-quantized student from its full-precision self.

    sh run_train.sh 4 8 8 data.train=gen_data/all_gen.jsonl max_steps=100       # the usual launcher
    python train.py quant.w_bits=4 quant.a_bits=8 quant.kv_bits=8 max_steps=2   # one process
    python train.py --launch-plan backend=fsdp nproc=2                          # prints "fsdp 2"

All settings: utils/trainer.py `TrainConfig` (defaults), configs/train.yaml (values), `key=value`.
"""

import sys

from utils.config import ConfigError, load_config
from utils.logging import setup_logging
from utils.trainer import TrainConfig, run


def main(argv) -> int:
    launch_plan = "--launch-plan" in argv
    argv = [a for a in argv if a != "--launch-plan"]
    try:
        cfg = load_config(TrainConfig, argv, default_yaml="configs/train.yaml")
    except ConfigError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    if launch_plan:  # run_train.sh asks which launcher and how many processes
        print(cfg.backend, cfg.nproc)
        return 0
    setup_logging()
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
