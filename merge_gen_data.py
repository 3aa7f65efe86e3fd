"""Merge the generated shards into one shuffled, deduplicated training file, and print statistics.

    python merge_gen_data.py                                   # gen_data/gen.chunk.*.jsonl -> gen_data/all_gen.jsonl
    python merge_gen_data.py in_dir=gen_data output=gen_data/all_gen.jsonl seed=42 skip_bad=true

All settings: utils/merge.py `MergeConfig` (defaults), configs/merge.yaml (values), `key=value`.
"""

import sys

from utils.config import ConfigError, load_config
from utils.io import JsonlError
from utils.logging import setup_logging
from utils.merge import MergeConfig, run


def main(argv) -> int:
    try:
        cfg = load_config(MergeConfig, argv, default_yaml="configs/merge.yaml")
    except ConfigError as err:
        print(f"merge_gen_data.py: {err}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        run(cfg)
    except (FileNotFoundError, JsonlError) as err:
        print(f"merge_gen_data.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
