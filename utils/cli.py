"""The shared `main()` of the root entry points: config -> logging -> `run(cfg)` -> exit code.

    sys.exit(run_entry_point("train.py", TrainConfig, run, sys.argv[1:]))

Two kinds of failure: a `UserError` (bad config value or key, missing file, malformed data line,
a model that cannot be quantized as asked; quant/errors.py) prints one line `prog: error: ...` to
stderr and returns exit code 2. Anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence, Type, TypeVar

from quant.errors import UserError
from utils.config import load_config
from utils.logging import setup_logging

T = TypeVar("T")


def run_entry_point(prog: str, schema: Type[T], run: Callable[[T], object], argv: Sequence[str],
                    on_result: Optional[Callable[[object], None]] = None) -> int:
    """Load `schema` from `argv` (`config=FILE` picks an experiment YAML), run it, map user errors to 2.

    `on_result(result)` may print a summary.
    """
    try:
        cfg = load_config(schema, argv)
        setup_logging()
        result = run(cfg)
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    if on_result is not None:
        on_result(result)
    return 0
