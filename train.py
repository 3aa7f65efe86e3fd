"""Distillation-based QAT of a W/A/KV fake-quantized student from its full-precision self.

    sh run_train.sh 4 8 8 data.train=gen_data/all_gen.jsonl max_steps=100       # the usual launcher
    python train.py quant.w_bits=4 quant.a_bits=8 quant.kv_bits=8 max_steps=2   # one process
    python train.py --launch-plan backend=fsdp nproc=2                          # prints "fsdp 2"

All settings: recipes/train.py `TrainConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
"""

import sys

from quant.errors import UserError
from recipes.train import TrainConfig, run
from utils.cli import run_entry_point
from utils.config import load_config
from utils.distributed import exit_process


def main(argv) -> int:
    if "--launch-plan" in argv:  # run_train.sh asks which launcher and how many processes
        try:
            cfg = load_config(TrainConfig, [a for a in argv if a != "--launch-plan"])
        except UserError as err:
            print(f"train.py: error: {err}", file=sys.stderr)
            return 2
        print(cfg.backend, cfg.nproc)
        return 0
    return run_entry_point("train.py", TrainConfig, run, argv)


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # sys.exit, or os._exit after a distributed run (see its docstring)
