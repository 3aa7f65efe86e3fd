"""Export a fake-quant student to a deployable low-bit artifact (packed safetensors or GGUF).

    python export.py student=runs/w4a8kv8/student format=packed output=exports/w4a8kv8-packed
    python export.py student=runs/q4_0/student format=gguf_q4_0 output=exports/student.Q4_0.gguf
    python export.py student=DIR format=gguf_q8_0 output=x.gguf tokenizer_from=smollm2-135m

All settings: utils/export.py `ExportConfig` (defaults), configs/export.yaml (values), `key=value`.
Reload a packed export with `quant.packed.load_packed(DIR)`; run a GGUF in llama.cpp.
"""

import sys

from utils.config import ConfigError, load_config
from utils.export import ExportConfig, run
from utils.logging import setup_logging


def main(argv) -> int:
    try:
        cfg = load_config(ExportConfig, argv, default_yaml="configs/export.yaml")
    except ConfigError as err:
        print(f"export.py: {err}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        result = run(cfg)
    except (FileNotFoundError, ValueError, NotImplementedError) as err:
        print(f"export.py: error: {err}", file=sys.stderr)
        return 2
    print(f"{result['format']}: {result['output']} ({result['bytes'] / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
