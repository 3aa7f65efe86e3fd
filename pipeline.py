"""Main job: the LLM-QAT pipeline on the default model (SmolLM2-135M-Instruct), on a CPU.

    python pipeline.py [key=value ...]        # or: bash run_pipeline.sh (sets up .venv first)

Settings: configs/pipeline.yaml (schema utils.pipeline.PipelineConfig); any key=value overrides.
"""

import sys

from utils.config import load_config
from utils.logging import setup_logging
from utils.pipeline import PipelineConfig, run


def main(argv=None) -> None:
    setup_logging()
    cfg = load_config(PipelineConfig, sys.argv[1:] if argv is None else argv, default_yaml="configs/pipeline.yaml")
    run(cfg)


if __name__ == "__main__":
    main()
