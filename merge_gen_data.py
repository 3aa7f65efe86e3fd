"""Merge the generated shards into one shuffled, deduplicated training file, and print statistics.

    python merge_gen_data.py                                   # gen_data/gen.chunk.*.jsonl -> gen_data/all_gen.jsonl
    python merge_gen_data.py in_dir=gen_data output=gen_data/all_gen.jsonl seed=42 skip_bad=true
    python merge_gen_data.py allow_mixed=true                  # merge shards made with different settings

Shards whose metadata differ (model, tokenizer, max_length, sampling, seed, ...) or is missing are
refused (exit code 2, naming the keys and shards) unless allow_mixed=true. Next to the output:
all_gen.stats.json (statistics) and all_gen.provenance.json (what made it; training checks it).

All settings: recipes/merge.py `MergeConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
"""

import sys

from recipes.merge import MergeConfig, run
from utils.cli import run_entry_point


def main(argv) -> int:
    return run_entry_point("merge_gen_data.py", MergeConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
