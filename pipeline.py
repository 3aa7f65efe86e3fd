"""Main job: the LLM-QAT pipeline (generate -> merge -> QAT -> evaluate FP / RTN / QAT -> table) on a CPU.

    bash run_pipeline.sh [key=value ...]          # sets up .venv first, then runs this file
    python pipeline.py out_dir=runs/small generate.n_vocab=8 train.max_steps=2 eval.limit=4

Settings: configs/main_job.yaml (schema recipes.pipeline.PipelineConfig, whose docstring lists the
stages, the skip / resume rules and the same pipeline on Llama-7B with 8 GPUs); any key=value overrides.
"""

import sys

from recipes.pipeline import PipelineConfig, run
from utils.cli import run_entry_point


def main(argv) -> int:
    return run_entry_point("pipeline.py", PipelineConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
