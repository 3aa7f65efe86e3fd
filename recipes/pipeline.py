"""The main job: the whole LLM-QAT pipeline on the default model, on a CPU, stage by stage.

    bash run_pipeline.sh                                         # SmolLM2-135M on a CPU (configs/main_job.yaml)
    python pipeline.py out_dir=runs/small generate.n_vocab=8 train.max_steps=2 eval.limit=4

Stages, each the same `run(cfg)` its entry point calls (outputs under `out_dir`):

    1 generate  recipes.generate (generate_data.py)  gen_data/gen.chunk.XX.jsonl, shards 0..shards-1
    2 merge     recipes.merge (merge_gen_data.py)      gen_data/all_gen.jsonl (+ all_gen.stats.json)
    3 train     recipes.train (train.py)             qat-<tag>/student/, train_metrics.json
    4-6 eval    recipes.evaluate (evaluate.py)       eval/fp.json, eval/rtn-<tag>.json, eval/qat-<tag>.json
    7 report    utils.eval.report + utils.plots      table.md, table.json, pipeline.png, timings.json

`<tag>` is `quant.tag()` (W4A8KV8). The sections `generate`, `merge`, `train` and `eval` are the
entry points' own schemas, so every stage setting is a `key=value` (`generate.n_vocab=8`,
`train.max_steps=2`, `eval.limit=4`); `quant.*` (or `w_bits=...`) sets the one W-A-KV setting
that RTN and QAT share. The pipeline sets the fields that connect the stages (`WIRED`: models,
paths, shard, quant); giving one of them is an error.

Skip / resume: each stage's recipe says whether its outputs are already valid: a shard whose
metadata says complete with the same settings (`recipes.generate.is_complete`; an unfinished
shard resumes), an `all_gen.jsonl` whose provenance names exactly these shards' contents
(`recipes.merge.is_current`), a student whose provenance has this run's train config and the same
model and data fingerprints (`recipes.train.is_trained`),
an evaluation whose results JSON holds every task under the same key: evaluation settings and the
model's content fingerprint (recipes/evaluate.py, utils/eval/cache.py). The report is rebuilt
every run (seconds). Evaluation data are probed first: a task whose data cannot
be read (no data_dir / $LLMQAT_DATA_DIR and no internet, or a missing file) is skipped and named,
and generation, merge and training still run.

Progress: each stage logs `stage i/N`, the elapsed time and a rough ETA (`estimates`: rates of
SmolLM2-135M on the 2-core CPU, rescaled by how long the stages run so far took); inside a stage
the tqdm bars of generation, training and evaluation show their own rates.

Scaling to Llama-7B on 8 GPUs: the same stages, through their entry points (this one-process
pipeline trains with backend=none, which cannot hold a 7B student, teacher and AdamW state), with
config values only:

    sh run_generate.sh 8 model=/path/llama-7b n_vocab=4000 max_length=2048 batch_size=32 dtype=bfloat16
        # = CUDA_VISIBLE_DEVICES=i python generate_data.py i model=... for i in 0..7 (8 x 4000 = LLaMA's
        #   32000 ids; the original used 64 x 500; shard i resumes if killed)
    python merge_gen_data.py                               # gen_data/gen.chunk.*.jsonl -> gen_data/all_gen.jsonl
    sh run_train.sh 4 8 8 model=/path/llama-7b backend=fsdp nproc=8 data.train=gen_data/all_gen.jsonl \\
        output_dir=runs/llama7b-w4a8kv8 model_max_length=1024 per_device_batch_size=1 learning_rate=2e-5 \\
        max_steps=10000 gradient_checkpointing=true save_steps=500 resume=auto
        # FSDP2, bf16 autocast over fp32 weights, bf16 teacher; one epoch = train_blocks / 8 steps
        # (train_blocks is logged and written to train_metrics.json)
    python evaluate.py model=runs/llama7b-w4a8kv8/student seqlen=2048 output=runs/llama7b-w4a8kv8/eval.json
    sh run_table.sh model=/path/llama-7b settings=[4-8-8] methods=[fp,rtn] \\
        qat=[runs/llama7b-w4a8kv8/student] eval.seqlen=2048 cache_dir=runs/table-llama7b output=runs/table-llama7b/table.md

Evaluation (evaluate.py, run_table.sh) runs on the GPU when there is one (`device=auto`; add
`dtype=bfloat16` to evaluate.py, `eval.dtype=bfloat16` to run_table.sh, for 7B). The PTQ baselines (quantize_ptq.py: SmoothQuant, GPTQ) still build their
students on the CPU, which for 7B is slow.
"""

from __future__ import annotations

import json
import logging
import operator
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from quant.config import QuantConfig
from quant.errors import UserError
from recipes import evaluate, generate, merge, train
from recipes.evaluate import EvalConfig
from recipes.generate import GenerateConfig
from recipes.merge import MergeConfig
from recipes.train import TrainConfig
from utils.config import to_yaml
from utils.eval.report import NAMES, add_recovered, table_row, write_table
from utils.eval.tasks import PPL_TASKS, data_errors
from utils.io import atomic_write_text, write_json
from utils.logging import print0
from utils.plots import save_results_plot
from utils.progress import StageClock, hms

logger = logging.getLogger(__name__)

# Section fields the pipeline sets itself (they connect the stages).
WIRED = {"generate": ("model", "shard", "out_dir"), "merge": ("in_dir", "output"),
         "train": ("model", "output_dir", "quant", "data.train"), "eval": ("model", "output", "quant", "data_dir")}
# Rough SmolLM2-135M speeds on a 2-core CPU, for the first ETA only (StageClock rescales it by the
# stages that ran).
RATES = {"gen_tok_s": 200.0, "train_tok_s": 45.0, "fp_ex_s": 3.5, "quant_ex_s": 2.0, "fp_ppl_tok_s": 400.0,
         "quant_ppl_tok_s": 250.0, "load_s": 5.0}


@dataclass
class PipelineConfig:
    """Main-job settings (the main job's values: configs/main_job.yaml).

    Args:
        model: alias, HF folder or .gguf file: the teacher, the RTN model and the student's start.
        data_dir: evaluation data (else $LLMQAT_DATA_DIR, else the Hugging Face hub).
        out_dir: every output of every stage.
        shards: generation shards 0..shards-1, each `generate.n_vocab` start ids.
        quant: the W-A-KV setting of the RTN row and of QAT.
        generate, merge, train, eval: the stages' own schemas; `WIRED` fields are set by the pipeline.
    """

    model: str = "smollm2-135m"
    data_dir: Optional[str] = None
    out_dir: str = "runs/pipeline"
    shards: int = 2
    quant: QuantConfig = field(default_factory=lambda: QuantConfig(w_bits=4, a_bits=8, kv_bits=8))
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.shards < 1:
            raise UserError(f"shards must be >= 1, got {self.shards}")
        for section, names in WIRED.items():
            value, default = getattr(self, section), type(getattr(self, section))()
            for name in names:
                if operator.attrgetter(name)(value) != operator.attrgetter(name)(default):
                    raise UserError(f"{section}.{name} is set by the pipeline (from model, out_dir, quant, "
                                     f"data_dir); leave it out")


@dataclass(frozen=True)
class Paths:
    out: Path
    gen_dir: Path
    data: Path
    train_dir: Path
    student: Path
    eval_dir: Path

    @classmethod
    def of(cls, cfg: PipelineConfig) -> "Paths":
        out, tag = Path(cfg.out_dir), cfg.quant.tag()
        train_dir = out / f"qat-{tag}"
        return cls(out, out / "gen_data", out / "gen_data" / "all_gen.jsonl", train_dir, train_dir / "student",
                   out / "eval")


# ---- the stages' configs (pure) -------------------------------------------------------------------


def generate_configs(cfg: PipelineConfig, p: Paths) -> list[GenerateConfig]:
    return [replace(cfg.generate, model=cfg.model, shard=i, out_dir=str(p.gen_dir)) for i in range(cfg.shards)]


def merge_config(cfg: PipelineConfig, p: Paths) -> MergeConfig:
    return replace(cfg.merge, in_dir=str(p.gen_dir), output=str(p.data))


def train_config(cfg: PipelineConfig, p: Paths) -> TrainConfig:
    return replace(cfg.train, model=cfg.model, output_dir=str(p.train_dir), quant=cfg.quant,
                   data=replace(cfg.train.data, train=str(p.data)))


def eval_configs(cfg: PipelineConfig, p: Paths, tasks: list) -> dict[str, EvalConfig]:
    """Row name -> EvalConfig: FP, RTN at `quant`, and the QAT student (its saved quant config)."""
    base, tag = replace(cfg.eval, tasks=tasks, data_dir=cfg.data_dir), cfg.quant.tag()
    return {"FP": replace(base, model=cfg.model, quant=QuantConfig(), output=str(p.eval_dir / "fp.json")),
            "RTN": replace(base, model=cfg.model, quant=cfg.quant, output=str(p.eval_dir / f"rtn-{tag}.json")),
            "QAT": replace(base, model=str(p.student), output=str(p.eval_dir / f"qat-{tag}.json"))}


def estimates(cfg: PipelineConfig) -> dict[str, float]:
    """Rough seconds per stage (RATES; about 0.7 x max_length tokens per generated sequence)."""
    g, t, e, r = cfg.generate, cfg.train, cfg.eval, RATES
    gen_tokens = cfg.shards * g.n_vocab * len(g.greedy_lengths) * 0.7 * g.max_length
    train_tokens = t.max_steps * t.per_device_batch_size * t.gradient_accumulation_steps * t.model_max_length
    examples = sum(task not in PPL_TASKS for task in e.tasks) * (e.limit or 1000)
    ppl_tokens = sum(task in PPL_TASKS for task in e.tasks) * (e.ppl_limit or e.limit or 100) * e.seqlen
    fp = r["load_s"] + examples / r["fp_ex_s"] + ppl_tokens / r["fp_ppl_tok_s"]
    quant = r["load_s"] + examples / r["quant_ex_s"] + ppl_tokens / r["quant_ppl_tok_s"]
    return {"generate": cfg.shards * r["load_s"] + gen_tokens / r["gen_tok_s"], "merge": 2.0,
            "train": 2 * r["load_s"] + train_tokens / r["train_tok_s"], "eval FP": fp, "eval RTN": quant,
            "eval QAT": quant, "report": 1.0}


def stage_generate(cfg: PipelineConfig, p: Paths, clock: StageClock) -> None:
    gcfgs = generate_configs(cfg, p)
    with clock.stage("generate", f"{cfg.shards} shards x {cfg.generate.n_vocab} start ids x greedy "
                                 f"{cfg.generate.greedy_lengths}, max_length {cfg.generate.max_length} -> "
                                 f"{p.gen_dir}") as stage:
        todo = [g for g in gcfgs if not generate.is_complete(g)]
        if not todo:
            stage.skip(f"all {len(gcfgs)} shards complete with these settings")
        for i, gcfg in enumerate(todo):
            logger.info("shard %d (%d/%d to generate)", gcfg.shard, i + 1, len(todo))
            generate.run(gcfg)


def stage_merge(cfg: PipelineConfig, p: Paths, clock: StageClock) -> None:
    mcfg = merge_config(cfg, p)
    with clock.stage("merge", f"{p.gen_dir}/gen.chunk.*.jsonl -> {p.data}") as stage:
        if merge.is_current(mcfg):
            stage.skip(f"{p.data} was merged from these shards (provenance)")
            return
        logger.info("the pipeline uses shards 0..%d only: 'missing shards' counts the whole vocabulary",
                    cfg.shards - 1)
        merge.run(mcfg)


def stage_train(cfg: PipelineConfig, p: Paths, clock: StageClock) -> dict:
    tcfg = train_config(cfg, p)
    with clock.stage("train", f"QAT {cfg.quant.tag()} by distillation, {tcfg.max_steps} steps x "
                              f"{tcfg.model_max_length} tokens -> {p.student}") as stage:
        if train.is_trained(tcfg):
            stage.skip(f"{p.student} was trained with this config on this data (provenance)")
        else:
            train.run(tcfg)
    return json.loads((p.train_dir / "train_metrics.json").read_text())


def stage_eval(name: str, ecfg: Optional[EvalConfig], clock: StageClock, skipped: dict) -> Optional[dict]:
    """One row (FP, RTN or QAT) through evaluate.py, which reuses a result under the same key."""
    what = (f"{ecfg.model} on {ecfg.tasks} (limit {ecfg.limit}, ppl {ecfg.ppl_limit} windows x {ecfg.seqlen}) "
            f"-> {ecfg.output}" if ecfg else "no task has evaluation data")
    with clock.stage(f"eval {name}", what) as stage:
        if ecfg is None:
            stage.skip(f"no evaluation data for {', '.join(skipped)}")
            return None
        payload = evaluate.cached_payload(ecfg)
        if payload is not None:
            stage.skip(f"{ecfg.output} holds this row's results (same config_hash)")
            return payload
        return evaluate.run(ecfg)


def _first(limit: Optional[int]) -> str:
    return "all" if limit is None else f"the first {limit}"


def report_notes(cfg: PipelineConfig, skipped: dict, train_metrics: dict) -> list[str]:
    e = cfg.eval
    return [f"{cfg.model}; QAT: {train_metrics.get('steps')} steps on {cfg.shards} shards of data-free text "
            f"(final KD loss {train_metrics.get('final_kd', float('nan')):.4f}).",
            f"Zero-shot: {_first(e.limit)} examples per task, accuracy in %, acc_norm where defined. "
            f"Perplexity (WikiText-2 test): {_first(e.ppl_limit if e.ppl_limit is not None else e.limit)} windows "
            f"of {e.seqlen} tokens. recovered % = (QAT - RTN) / (FP - RTN), with its paired 95 % interval.",
            *[f"Skipped (no evaluation data): {t}: {why}" for t, why in skipped.items()]]


def stage_report(cfg: PipelineConfig, p: Paths, clock: StageClock, tasks: list, payloads: dict, skipped: dict,
                 train_metrics: dict) -> list[dict]:
    setting = "-".join(str(b) for b in (cfg.quant.w_bits, cfg.quant.a_bits, cfg.quant.kv_bits))
    settings = {"FP": "16-16-16", "RTN": setting, "QAT": setting}
    with clock.stage("report", f"{p.out / 'table.md'}, {p.out / 'pipeline.png'}"):
        rows = [table_row(name, settings[name], payload["results"], tasks) for name, payload in payloads.items()]
        add_recovered(rows)
        text = write_table(rows, tasks, p.out / "table.md", report_notes(cfg, skipped, train_metrics))
        if rows:
            zero_shot = [t for t in tasks if t not in PPL_TASKS]
            acc = zero_shot + (["avg"] if len(zero_shot) > 1 else [])
            save_results_plot(rows, acc, p.out / "pipeline.png", f"{cfg.model}: FP vs RTN vs QAT at "
                              f"{cfg.quant.tag()}", names={**NAMES, "wikitext2": "WikiText-2"})
        else:
            logger.warning("no plot: nothing was evaluated")
    print0(f"\n{text}")
    return rows


def _write_timings(p: Paths, clock: StageClock) -> None:
    """timings.json: the seconds of each stage's last real run (skipped runs do not overwrite them)."""
    path = p.out / "timings.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    ran = {k: v for k, v in clock.timings.items() if not v["skipped"]}
    write_json(path, {**old, **ran, "last_run_total_s": round(time.perf_counter() - clock.start, 1)})


def run(cfg: PipelineConfig) -> dict:
    """Generate, merge, train, evaluate FP / RTN / QAT, report; returns rows, skipped tasks, timings."""
    p = Paths.of(cfg)
    p.out.mkdir(parents=True, exist_ok=True)
    logger.info("resolved config:\n%s", to_yaml(cfg))
    atomic_write_text(p.out / "pipeline_config.yaml", to_yaml(cfg))
    skipped = data_errors(cfg.eval.tasks, cfg.data_dir)
    tasks = [t for t in cfg.eval.tasks if t not in skipped]
    for task, why in skipped.items():
        logger.warning("no data for %s: its FP / RTN / QAT evaluations will be skipped (%s)", task, why)
    clock = StageClock(estimates(cfg))
    stage_generate(cfg, p, clock)
    stage_merge(cfg, p, clock)
    train_metrics = stage_train(cfg, p, clock)
    ecfgs = eval_configs(cfg, p, tasks) if tasks else dict.fromkeys(("FP", "RTN", "QAT"))
    payloads = {name: stage_eval(name, ecfg, clock, skipped) for name, ecfg in ecfgs.items()}
    rows = stage_report(cfg, p, clock, tasks, {k: v for k, v in payloads.items() if v}, skipped, train_metrics)
    _write_timings(p, clock)
    if skipped:
        logger.warning("skipped evaluations (no data): %s for FP, RTN %s and QAT", ", ".join(skipped),
                       cfg.quant.tag())
    logger.info("pipeline done in %s; outputs in %s", hms(time.perf_counter() - clock.start), p.out)
    return {"rows": rows, "skipped": skipped, "timings": clock.timings}
