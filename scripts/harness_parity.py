"""Our zero-shot evaluator against lm-evaluation-harness itself, example by example (offline).

    /path/to/venv-with-lm_eval/bin/python scripts/harness_parity.py model=smollm2-135m limit=200 \
        data_dir=../shared/data output=runs/harness_parity.json

lm-evaluation-harness (`pip install lm-eval`, optional: not in requirements.txt) runs its own `hf`
model class on the same float32 HF folder, with task YAMLs written here that read the local task files
(`data_dir`, no hub) and state the harness's prompts in its own template language (the built-in YAMLs
point at hub datasets whose layout differs from the official files we hold). Our side is
`utils.eval.zeroshot.evaluate_docs` with its defaults (packed scoring). For every task the script
reports n, both accuracies, the largest per-choice log-likelihood difference and the examples whose
prediction differs. HellaSwag: the local file is llama.cpp's preprocessed text, so both sides score
that text (the harness's own HellaSwag preprocessing needs fields the file lacks).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.loading import convert_gguf, load_model, resolve_model  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.eval.datasets import local_file, resolve_data_dir  # noqa: E402
from utils.eval.tasks import TASKS, load_task  # noqa: E402
from utils.eval.zeroshot import evaluate_docs  # noqa: E402

# task -> the harness-style YAML body (its prompt, choices and target in the harness's Jinja language,
# on the official files' layout), "!function" lines refer to the utils.py written next to them
YAMLS = {
    "piqa": """doc_to_text: "Question: {{goal}}\\nAnswer:"
doc_to_choice: "{{[sol1, sol2]}}"
doc_to_target: label""",
    "arc_easy": """doc_to_text: "Question: {{question.stem}}\\nAnswer:"
doc_to_choice: "{{question.choices | map(attribute='text') | list}}"
doc_to_target: !function utils.choice_target""",
    "arc_challenge": """doc_to_text: "Question: {{question.stem}}\\nAnswer:"
doc_to_choice: "{{question.choices | map(attribute='text') | list}}"
doc_to_target: !function utils.choice_target""",
    "openbookqa": """doc_to_text: "{{question.stem}}"
doc_to_choice: "{{question.choices | map(attribute='text') | list}}"
doc_to_target: !function utils.choice_target""",
    "boolq": """doc_to_text: "{{passage}}\\nQuestion: {{question}}?\\nAnswer:"
doc_to_choice: ["no", "yes"]
doc_to_target: !function utils.boolq_target""",
    "siqa": """doc_to_text: "Q: {{context}} {{question}}\\nA:"
doc_to_choice: "{{[answerA, answerB, answerC]}}"
doc_to_target: !function utils.siqa_target""",
    "winogrande": """doc_to_text: !function utils.winogrande_text
doc_to_choice: !function utils.winogrande_choices
doc_to_target: !function utils.winogrande_target""",
    "hellaswag": """doc_to_text: "{{activity_label_and_ctx}}"
doc_to_choice: "{{endings}}"
doc_to_target: label""",
}

# the harness's own WinoGrande functions restated (partial scoring: the option fills the blank in the
# context, the rest of the sentence is the scored continuation); the targets of the official layouts
UTILS = '''
def choice_target(doc):
    return [c["label"] for c in doc["question"]["choices"]].index(doc["answerKey"].strip())


def boolq_target(doc):
    label = doc["label"]
    return {"true": 1, "false": 0}[label.lower()] if isinstance(label, str) else int(label)


def siqa_target(doc):
    return int(doc["label"]) - 1


def winogrande_text(doc):
    return {"1": 0, "2": 1}[str(doc["answer"])]


def winogrande_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_choices(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + doc[o] for o in ("option1", "option2")]
'''


@dataclass
class ParityConfig:
    """Args:
    model: alias, HF folder or .gguf (the harness gets the float32 HF folder it resolves to).
    tasks: zero-shot tasks to compare; limit: first N examples of each (None: all).
    data_dir: local task files (else $LLMQAT_DATA_DIR); output: the JSON report.
    """
    model: str = "smollm2-135m"
    tasks: List[str] = field(default_factory=lambda: list(TASKS))
    limit: Optional[int] = 100
    data_dir: Optional[str] = None
    output: str = "runs/harness_parity.json"


def write_tasks(folder: Path, data_dir: Path, tasks: list) -> None:
    (folder / "utils.py").write_text(UTILS)
    for task in tasks:
        metrics = ["acc", "acc_norm"] if TASKS[task].acc_norm else ["acc"]
        metric_list = "\n".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true" for m in metrics)
        (folder / f"llmqat_{task}.yaml").write_text(
            f"task: llmqat_{task}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {local_file(data_dir, TASKS[task].local)}\n"
            f"test_split: test\noutput_type: multiple_choice\ntarget_delimiter: \" \"\n"
            f"{YAMLS[task]}\nmetric_list:\n{metric_list}\n")


def harness_scores(model_dir: str, folder: Path, tasks: list, limit: Optional[int]) -> dict:
    """task -> (per-example choice log-likelihoods, acc) from lm-evaluation-harness."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", batch_size=1,
                          tasks=[f"llmqat_{t}" for t in tasks], limit=limit, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder)), device="cpu")
    result = {}
    for task in tasks:
        samples = sorted(out["samples"][f"llmqat_{task}"], key=lambda s: s["doc_id"])
        scores = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
        metrics = out["results"][f"llmqat_{task}"]
        result[task] = {"scores": scores, "acc": metrics["acc,none"], "acc_norm": metrics.get("acc_norm,none")}
    return result


def main(argv) -> int:
    cfg = load_config(ParityConfig, argv)
    data_dir = resolve_data_dir(cfg.data_dir)
    if data_dir is None:
        raise SystemExit("harness_parity.py needs the local task files: data_dir=... or LLMQAT_DATA_DIR")
    folder, gguf = resolve_model(cfg.model)
    model_dir = convert_gguf(Path(folder) / gguf) if gguf else folder
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp), data_dir, cfg.tasks)
        theirs = harness_scores(model_dir, Path(tmp), cfg.tasks, cfg.limit)
    model, tok = load_model(model_dir)
    report = {"model": cfg.model, "model_dir": model_dir, "limit": cfg.limit, "tasks": {}}
    print(f"{'task':14s} {'n':>5s} {'ours acc':>9s} {'harness':>8s} {'max |dlogL|':>12s} {'pred differs':>12s}")
    for task in cfg.tasks:
        docs = load_task(task, str(data_dir), cfg.limit)
        ours_scores: list = []
        ours = evaluate_docs(model, tok, docs, TASKS[task].acc_norm, scores_out=ours_scores, desc=task)
        h = theirs[task]
        diffs = [abs(a - b) for x, y in zip(ours_scores, h["scores"]) for a, b in zip(x, y)]
        pred = [max(range(len(s)), key=s.__getitem__) for s in ours_scores]
        hpred = [max(range(len(s)), key=s.__getitem__) for s in h["scores"]]
        row = {"n": len(docs), "ours_acc": ours["acc"], "harness_acc": h["acc"], "ours_acc_norm": ours.get("acc_norm"),
               "harness_acc_norm": h["acc_norm"], "max_abs_loglik_diff": max(diffs),
               "choices_compared": len(diffs), "n_harness": len(h["scores"]),
               "examples_with_different_prediction": sum(a != b for a, b in zip(pred, hpred))}
        report["tasks"][task] = row
        print(f"{task:14s} {row['n']:5d} {100 * row['ours_acc']:9.2f} {100 * row['harness_acc']:8.2f} "
              f"{row['max_abs_loglik_diff']:12.2e} {row['examples_with_different_prediction']:12d}")
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.output).write_text(json.dumps(report, indent=1))
    print(f"wrote {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
