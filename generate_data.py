"""Data-free training data, one shard: the teacher generates from every start token of its slice.

    CUDA_VISIBLE_DEVICES=0 python generate_data.py 0        # shard 0 -> gen_data/gen.chunk.00.jsonl
    sh run_generate.sh 4                                     # shards 0..3 (one per GPU, or in turn on CPU)
    python generate_data.py 2 model=smollm2-135m n_vocab=500 greedy_lengths=[3,4,5] max_length=2048 \
        batch_size=32 seed=0 out_dir=gen_data
    torchrun --nproc_per_node 8 generate_data.py             # no shard given: shard = $RANK ($SLURM_PROCID)

Start ids: a seeded random order of the vocabulary that shards partition (start_ids=random, the paper),
or consecutive ids (start_ids=walk, the original code). A saved student generates from its full-precision
weights unless quantized=true. A killed shard resumes where it stopped when run again. Then: python merge_gen_data.py.
All settings: recipes/generate.py `GenerateConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
"""

import sys

from recipes.generate import GenerateConfig, run
from utils.cli import run_entry_point


def main(argv) -> int:
    if argv and argv[0].isdigit():  # the original's positional shard index
        argv = [f"shard={argv[0]}", *argv[1:]]
    return run_entry_point("generate_data.py", GenerateConfig, run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
