"""Export a fake-quant student to a deployable low-bit artifact (packed, GGUF or compressed-tensors).

    python export.py student=runs/w4a8kv8/student format=packed output=exports/w4a8kv8-packed
    python export.py student=runs/q4_0/student format=gguf_q4_0 output=exports/student.Q4_0.gguf
    python export.py student=DIR format=gguf_q8_0 output=x.gguf tokenizer_from=smollm2-135m
    python export.py student=DIR format=compressed_tensors output=exports/w4a16-ct   # vLLM, transformers

All settings: recipes/export.py `ExportConfig` (defaults); `config=configs/<experiment>.yaml` and `key=value` override them.
Reload a packed export with `models.convert.load_packed(DIR)`; run a GGUF in llama.cpp.
"""

import sys

from recipes.export import ExportConfig, run
from utils.cli import run_entry_point


def _summary(result) -> None:
    print(f"{result['format']}: {result['output']} ({result['bytes'] / 1e6:.1f} MB)")
    for warning in result.get("warnings", []):
        print(f"warning: {warning}")


def main(argv) -> int:
    return run_entry_point("export.py", ExportConfig, run, argv, on_result=_summary)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
