"""torchrun driver of the distributed kill-and-resume tests (tests/recipes/test_train_backends_resume.py):
train.py whose every rank dies, like `kill -9` (os._exit, no cleanup), when step $LLMQAT_TEST_DIE_AT
starts. Not a test module itself.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/recipes/dying_train.py key=value ...
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train  # noqa: E402  (the root entry point, after the path is set)
from utils.train import loop  # noqa: E402

DIE_AT = int(os.environ["LLMQAT_TEST_DIE_AT"])
_real_step, _calls = loop.train_step, [0]


def _dying_step(*args, **kwargs):
    _calls[0] += 1
    if _calls[0] == DIE_AT:
        os._exit(137)
    return _real_step(*args, **kwargs)


loop.train_step = _dying_step

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
