"""The paper's eight zero-shot tasks as lm-evaluation-harness 0.4 builds them.

    docs = load_task("piqa", data_dir="../shared/data", limit=200)   # list[MCDoc], first 200

Each row becomes an `MCDoc`: one (context, continuation) request per choice, the gold index and the
choice strings whose character length `acc_norm` divides by. Prompts, splits, target delimiter " "
and metrics follow the harness's task YAMLs (0.4):

| task | split | context | choices | metrics |
|---|---|---|---|---|
| boolq | validation | "{passage}\\nQuestion: {question}?\\nAnswer:" | no / yes | acc |
| piqa | validation | "Question: {goal}\\nAnswer:" | sol1 / sol2 | acc, acc_norm |
| siqa | validation | "Q: {context} {question}\\nA:" | answerA..C | acc |
| hellaswag | validation | preprocess(activity_label: ctx_a ctx_b.capitalize()) | endings | acc, acc_norm |
| winogrande | validation (xl) | sentence up to "_" with each option | rest of the sentence | acc |
| arc_easy / arc_challenge | test | "Question: {question}\\nAnswer:" | choice texts | acc, acc_norm |
| openbookqa | test (main) | "{question_stem}" | choice texts | acc, acc_norm |

WinoGrande uses partial scoring: the contexts differ (the option is substituted into the blank) and
the shared continuation after the blank is what is scored. The local HellaSwag file is llama.cpp's
preprocessed text, in which ctx_b was not capitalized (see shared/data/README.md): close to, not
identical with, the harness's HellaSwag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional

from quant.errors import UserError
from utils.eval.datasets import c4_texts, local_file, resolve_data_dir, wikitext2_rows
from utils.io import iter_jsonl

DELIMITER = " "


@dataclass(frozen=True)
class MCDoc:
    """One multiple-choice example: request i = (contexts[i], continuations[i])."""

    contexts: list
    continuations: list
    choices: list  # strings whose character length acc_norm normalizes by
    gold: int


@dataclass(frozen=True)
class TaskSpec:
    local: str  # file under the data directory
    hub: tuple  # (path, name, split) for datasets.load_dataset
    to_doc: Callable[[dict], MCDoc]
    acc_norm: bool


def _same_context(context: str, choices: list, gold: int) -> MCDoc:
    return MCDoc([context] * len(choices), [DELIMITER + c for c in choices], list(choices), int(gold))


def boolq_doc(row: dict) -> MCDoc:
    label = row["label"]
    gold = {"true": 1, "false": 0}[label.lower()] if isinstance(label, str) else int(label)
    return _same_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], gold)


def piqa_doc(row: dict) -> MCDoc:
    return _same_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], row["label"])


def siqa_doc(row: dict) -> MCDoc:
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return _same_context(f"Q: {row['context']} {row['question']}\nA:", choices, int(row["label"]) - 1)


def hellaswag_preprocess(text: str) -> str:
    """The harness's HellaSwag cleaning: drop [bracket] markers, " [title]" -> ". ", squeeze spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_doc(row: dict) -> MCDoc:
    if "activity_label_and_ctx" in row:  # llama.cpp's preprocessed file: already cleaned
        query, endings = row["activity_label_and_ctx"], row["endings"]
    else:
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
        endings = [hellaswag_preprocess(e) for e in row["endings"]]
    return _same_context(query, list(endings), int(row["label"]))


def winogrande_doc(row: dict) -> MCDoc:
    sentence = row["sentence"]
    blank = sentence.index("_")
    contexts = [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]]
    target = DELIMITER + sentence[blank + 1 :].strip()
    return MCDoc(contexts, [target, target], contexts, {"1": 0, "2": 1}[str(row["answer"])])


def _choice_lists(row: dict) -> tuple[str, list, list]:
    """(stem, texts, labels) from the original ARC/OBQA layout or the flattened HF one."""
    question = row["question"]
    if isinstance(question, dict):
        return question["stem"], [c["text"] for c in question["choices"]], [c["label"] for c in question["choices"]]
    stem = row.get("question_stem", question)
    return stem, list(row["choices"]["text"]), list(row["choices"]["label"])


def arc_doc(row: dict) -> MCDoc:
    stem, texts, labels = _choice_lists(row)
    return _same_context(f"Question: {stem}\nAnswer:", texts, labels.index(row["answerKey"]))


def openbookqa_doc(row: dict) -> MCDoc:
    if "question_stem" in row:  # HF layout: question_stem + flattened choices
        stem, texts, labels = row["question_stem"], list(row["choices"]["text"]), list(row["choices"]["label"])
    else:
        stem, texts, labels = _choice_lists(row)
    return _same_context(stem, texts, labels.index(row["answerKey"].strip()))


TASKS = {
    "boolq": TaskSpec("boolq/validation.jsonl", ("aps/super_glue", "boolq", "validation"), boolq_doc, False),
    "piqa": TaskSpec("piqa/validation.jsonl", ("baber/piqa", None, "validation"), piqa_doc, True),
    "siqa": TaskSpec("siqa/validation.jsonl", ("allenai/social_i_qa", None, "validation"), siqa_doc, False),
    "hellaswag": TaskSpec("hellaswag/validation.llamacpp_preprocessed.jsonl",
                          ("Rowan/hellaswag", None, "validation"), hellaswag_doc, True),
    "winogrande": TaskSpec("winogrande/validation.jsonl", ("allenai/winogrande", "winogrande_xl", "validation"),
                           winogrande_doc, False),
    "arc_easy": TaskSpec("arc_easy/test.jsonl", ("allenai/ai2_arc", "ARC-Easy", "test"), arc_doc, True),
    "arc_challenge": TaskSpec("arc_challenge/test.jsonl", ("allenai/ai2_arc", "ARC-Challenge", "test"), arc_doc, True),
    "openbookqa": TaskSpec("openbookqa/test.jsonl", ("allenai/openbookqa", "main", "test"), openbookqa_doc, True),
}
ZERO_SHOT_TASKS = tuple(TASKS)
PPL_TASKS = ("wikitext2", "c4", "wikitext2_val")  # wikitext2_val: the validation split, for choosing recipes
ALL_TASKS = PPL_TASKS + ZERO_SHOT_TASKS
WIKITEXT2_SPLITS = {"wikitext2": "test", "wikitext2_val": "validation"}  # perplexity task -> split


def numbered_rows(name: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> list[tuple[str, dict]]:
    """[(where, row)] of a task, `where` = "file:line" (local data directory) or "hub id[index]"."""
    spec = TASKS[name]
    local = resolve_data_dir(data_dir)
    if local is not None:
        path = local_file(local, spec.local)
        rows = [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)]
    else:
        from datasets import load_dataset

        path, config, split = spec.hub
        rows = [(f"{path}/{split}[{i}]", row) for i, row in enumerate(load_dataset(path, config, split=split))]
    return rows[:limit] if limit is not None else rows


def task_rows(name: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """Raw rows of a task: the local data directory if configured, else the Hugging Face hub."""
    return [row for _, row in numbered_rows(name, data_dir, limit)]


def _to_doc(name: str, where: str, row: dict) -> MCDoc:
    """The row's MCDoc; a row without a valid gold label (missing, unknown, out of range: e.g. the
    -1 of an unlabeled test split) is an error naming file:line, never an example scored as wrong."""
    try:
        doc = TASKS[name].to_doc(row)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise UserError(f"{where}: not a valid {name} row ({type(err).__name__}: {err})") from None
    if not 0 <= doc.gold < len(doc.choices):
        raise UserError(f"{where}: gold label {doc.gold} is not one of the {len(doc.choices)} choices of {name}")
    return doc


def load_task(name: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> list[MCDoc]:
    """The first `limit` examples of a zero-shot task as MCDocs.

    Raises:
        UserError: unknown task name, or a row without a valid gold label (naming file:line).
        FileNotFoundError: the local file is missing.
    """
    if name not in TASKS:
        raise UserError(f"unknown zero-shot task {name!r}; choose from {', '.join(TASKS)}")
    return [_to_doc(name, where, row) for where, row in numbered_rows(name, data_dir, limit)]


def data_errors(tasks, data_dir: Optional[str]) -> dict[str, str]:
    """Task -> why its evaluation data cannot be read (FileNotFoundError, offline hub, ...)."""
    errors = {}
    for task in tasks:
        try:
            if task in WIKITEXT2_SPLITS:
                wikitext2_rows(WIKITEXT2_SPLITS[task], data_dir)
            elif task == "c4":
                c4_texts(data_dir)
            else:
                task_rows(task, data_dir, 1)
        except OSError as err:  # FileNotFoundError (local), ConnectionError (offline hub)
            errors[task] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return errors
