"""DRG evaluation (PAPER.md "Evaluation"): Pass@1, Pass@k and Maj@k at three levels (DRG, base DRG
and CC/MCC status), from k sampled answers per case.

    python recipes/drg/evaluate.py --eval.model=outputs/grpo/hf --eval.data=data/test.jsonl [--eval.out=eval.json]
    torchrun --nproc_per_node N recipes/drg/evaluate.py --eval.model=... --eval.data=... --eval.engine=vllm
    python recipes/drg/evaluate.py --help      # every config key with its default

Sampling defaults are the paper's: temperature 0.6, top-p 0.95, k = 8, at most 4096 new tokens.
Each rank samples its shard of the cases (case i goes to rank i % world_size), with a progress bar
on rank 0; rank 0 gathers the answers, computes the metrics (evaluate_metrics.py), prints a table
and writes the JSON (default: MODEL/eval_<data file name>.json).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python recipes/drg/evaluate.py` from anywhere

import torch.distributed as dist
from tqdm import tqdm

from minigrpo.cli import run_command
from minigrpo.config import RolloutConfig, check, load_config, section, split_cli
from minigrpo.dist import DistInfo, broadcast_object, init_distributed
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, write_json_atomic
from minigrpo.model import check_model_dir, load_tokenizer
from minigrpo.rollout import RolloutEngine, SamplingParams, make_engine
from minigrpo.seeding import derive_seed

from recipes.drg.evaluate_metrics import LEVELS, METRICS, evaluate_cases, extract_answer
from recipes.drg.prompts import build_prompt_ids
from recipes.drg.records import read_cases

LEVEL_NAMES = {"drg": "DRG", "base": "base DRG", "severity": "CC/MCC"}


@dataclass(slots=True)
class EvalSettings:
    """How to sample and score: evaluate.py's `eval` section, and the demo's."""

    k: int = 8  # sampled answers per case
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096
    engine: Literal["torch", "vllm"] = "torch"
    seed: int = 0
    max_cases: int = 0  # 0 = all
    batch_cases: int = 16  # prompts per generate() call (each gives k rows)
    gpu_memory_utilization: float = 0.85  # vLLM on GPU only

    def __post_init__(self) -> None:
        check(self.k >= 1, "eval.k", f"must be >= 1, got {self.k}")
        check(self.engine in ("torch", "vllm"), "eval.engine", f"must be torch or vllm, got {self.engine!r}")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "eval.temperature/top_p",
              "temperature must be >= 0 and top_p in (0, 1]")
        check(self.max_new_tokens >= 1 and self.batch_cases >= 1, "eval.max_new_tokens/batch_cases", "must be >= 1")
        check(self.max_cases >= 0, "eval.max_cases", "must be >= 0")


@dataclass(slots=True)
class EvalTarget(EvalSettings):
    """evaluate.py's `eval` section: the settings plus what to evaluate and where the JSON goes."""

    model: str = ""  # HF model folder (config.json, *.safetensors, tokenizer)
    data: str = ""  # test cases JSONL (records.py schema)
    out: str = ""  # metrics JSON; "" = MODEL/eval_<data file name>.json


@dataclass(slots=True)
class EvalConfig:
    eval: EvalTarget = section(EvalTarget)


def build_engine(model_path: str, settings: EvalSettings, dist_info: DistInfo) -> RolloutEngine:
    """The rollout engine of `settings.engine`, loaded from `model_path` on this rank's device."""
    rollout = RolloutConfig(engine=settings.engine, max_new_tokens=settings.max_new_tokens,
                            gpu_memory_utilization=settings.gpu_memory_utilization, sleep_between_steps=False)
    return make_engine(rollout, model_path, dist_info.device, derive_seed(settings.seed, rank=dist_info.rank))


def sample_completions(engine: RolloutEngine, tokenizer, cases: list[dict], settings: EvalSettings, rank: int = 0,
                       progress: bool = False) -> list[list[str]]:
    """k decoded completions for each case, generated `batch_cases` prompts at a time; each batch seeded
    by derive_seed(eval.seed, step=its first case, rank=rank)."""
    stop = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    out = []
    bar = tqdm(total=len(cases), desc=f"eval (k={settings.k}, rank 0)", unit="case", disable=not progress)
    for start in range(0, len(cases), settings.batch_cases):
        chunk = cases[start : start + settings.batch_cases]
        ids = [build_prompt_ids(tokenizer, case["problem"]) for case in chunk]
        sampling = SamplingParams(settings.temperature, settings.top_p, 0, settings.max_new_tokens, stop,
                                  seed=derive_seed(settings.seed, step=start, rank=rank))
        for group in engine.generate(ids, settings.k, sampling):
            out.append([tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group])
        bar.update(len(chunk))
    bar.close()
    return out


def score(completions: list[list[str]], cases: list[dict], settings: EvalSettings) -> dict:
    """The metrics of evaluate_metrics.py, plus the share of well-formed answers and the mean length."""
    answers = [[extract_answer(t) for t in group] for group in completions]
    metrics = evaluate_cases(answers, [c["solution"] for c in cases])
    flat = [t for group in completions for t in group]
    metrics["format_rate"] = sum(a is not None for group in answers for a in group) / len(flat)
    metrics["completion_chars_mean"] = sum(len(t) for t in flat) / len(flat)
    metrics["settings"] = {f.name: getattr(settings, f.name) for f in fields(EvalSettings)}
    return metrics


def evaluate_model(model_path: str, cases: list[dict], settings: EvalSettings, engine=None, tokenizer=None) -> dict:
    """Metrics of the model at `model_path` on `cases`, on every rank (computed on rank 0, broadcast).

    Keys: "drg/pass@1" ... "severity/maj@k" (fractions), "cases", "k", "format_rate" (share of
    well-formed completions), "completion_chars_mean", "eval_seconds", "settings".
    """
    if settings.max_cases:
        cases = cases[: settings.max_cases]
    if not cases:
        raise DataError("no cases to evaluate")
    t0 = time.perf_counter()
    info = init_distributed()
    tokenizer = tokenizer or load_tokenizer(model_path, require_chat_template=True)
    engine = engine or build_engine(model_path, settings, info)
    mine = list(range(info.rank, len(cases), info.world_size))
    texts = sample_completions(engine, tokenizer, [cases[i] for i in mine], settings, info.rank, info.is_main)
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, list(zip(mine, texts)))
    metrics = None
    if info.is_main:
        by_case = dict(pair for part in gathered for pair in part)
        metrics = score([by_case[i] for i in range(len(cases))], cases, settings)
        metrics["eval_seconds"] = time.perf_counter() - t0
    return broadcast_object(metrics)


def format_table(results: dict[str, dict], k: int | None = None) -> str:
    """A markdown table: one row per (level, metric), one column per named result (percent)."""
    names = list(results)
    k = k or int(next(iter(results.values()))["k"])
    lines = ["| level | metric | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for level in LEVELS:
        for metric in METRICS:
            label = metric.replace("@k", f"@{k}").replace("pass", "Pass").replace("maj", "Maj")
            cells = [f"{100 * results[n][f'{level}/{metric}']:.1f}" for n in names]
            lines.append(f"| {LEVEL_NAMES[level]} | {label} | " + " | ".join(cells) + " |")
    format_ok = [f"{100 * results[n].get('format_rate', float('nan')):.1f}" for n in names]
    lines.append("| all | format ok | " + " | ".join(format_ok) + " |")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> dict:
    """Check the inputs, evaluate, and (rank 0) print the table and write the JSON; returns the metrics."""
    target = cfg.eval
    check(bool(target.model), "eval.model", "is required (a local HF model folder)")
    check(bool(target.data), "eval.data", "is required (a DRG test cases JSONL)")
    check_model_dir(target.model)
    cases = read_cases(target.data, require_rows=True)
    metrics = evaluate_model(target.model, cases, target)
    if init_distributed().is_main:
        out = Path(target.out or Path(target.model) / f"eval_{Path(target.data).stem}.json")
        write_json_atomic(out, {"model": target.model, "data": target.data, **metrics})
        print(format_table({Path(target.model).name or "model": metrics}, target.k))
        print(f"{int(metrics['cases'])} cases, k={target.k}, {metrics['eval_seconds']:.1f}s -> {out}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, EvalConfig)
    return run_command(lambda: run(load_config(EvalConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())
