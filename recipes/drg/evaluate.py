"""DRG evaluation (PAPER.md "Evaluation"): Pass@1, Pass@k and Maj@k for the DRG, the base DRG and the
CC/MCC status, from k sampled answers per case.

    python recipes/drg/evaluate.py --model outputs/grpo/hf --data data/test.jsonl [--out eval.json]
    torchrun --nproc_per_node N recipes/drg/evaluate.py --model ... --data ...   # cases sharded over ranks

Sampling defaults are the paper's: temperature 0.6, top-p 0.95, k = 8, at most 4096 new tokens.
Each rank samples its shard of the cases (case i goes to rank i % world_size); rank 0 gathers the
answers, computes the metrics (evaluate_metrics.py), prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `python recipes/drg/evaluate.py` from anywhere

from recipes.drg.evaluate_metrics import LEVELS, METRICS, evaluate_cases, extract_answer

LEVEL_NAMES = {"drg": "DRG", "base": "base DRG", "severity": "CC/MCC"}


@dataclass(slots=True)
class EvalSettings:
    k: int = 8
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096
    engine: Literal["torch", "vllm"] = "torch"
    seed: int = 0
    max_cases: int = 0  # 0 = all
    batch_cases: int = 16  # prompts per generate() call (each gives k rows)
    gpu_memory_utilization: float = 0.85  # vLLM on GPU only

    def __post_init__(self) -> None:
        from minigrpo.config import check

        check(self.k >= 1, "eval.k", f"must be >= 1, got {self.k}")
        check(self.engine in ("torch", "vllm"), "eval.engine", f"must be torch or vllm, got {self.engine!r}")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "eval.temperature/top_p", "temperature must be >= 0 and top_p in (0, 1]")
        check(self.max_new_tokens >= 1 and self.batch_cases >= 1, "eval.max_new_tokens/batch_cases", "must be >= 1")
        check(self.max_cases >= 0, "eval.max_cases", "must be >= 0")


def build_engine(model_path: str, settings: EvalSettings, dist_info):
    """The trainer's engine of `settings.engine`, loaded from `model_path` on this rank's device."""
    from minigrpo.config import RolloutConfig
    from minigrpo.rollout import make_engine

    rollout = RolloutConfig(engine=settings.engine, max_new_tokens=settings.max_new_tokens, gpu_memory_utilization=settings.gpu_memory_utilization, sleep_between_steps=False)
    return make_engine(rollout, model_path, dist_info.device, settings.seed + dist_info.rank)


def sample_completions(engine, tokenizer, cases: list[dict], settings: EvalSettings, seed: int, progress: bool = False) -> list[list[str]]:
    """k decoded completions for each case, generated `batch_cases` prompts at a time."""
    from minigrpo.rollout import SamplingParams

    from recipes.drg.prompts import build_prompt_ids

    stop = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    out = []
    for start in range(0, len(cases), settings.batch_cases):
        chunk = cases[start : start + settings.batch_cases]
        ids = [build_prompt_ids(tokenizer, c["problem"]) for c in chunk]
        sampling = SamplingParams(settings.temperature, settings.top_p, 0, settings.max_new_tokens, stop, seed=seed + start)
        for group in engine.generate(ids, settings.k, sampling):
            out.append([tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in group])
        if progress:
            print(f"eval: {len(out)}/{len(cases)} cases sampled on rank 0 ({settings.k} each)", flush=True)
    return out


def evaluate_model(model_path: str, cases: list[dict], settings: EvalSettings, engine=None, tokenizer=None) -> dict:
    """Metrics of the model at `model_path` on `cases`, on every rank (computed on rank 0, broadcast).

    Keys: "drg/pass@1" ... "severity/maj@k" (fractions), "cases", "k", "format_rate" (share of
    well-formed completions), "completion_chars_mean", "eval_seconds".
    """
    from minigrpo.dist import broadcast_object, init_distributed
    from minigrpo.model import load_tokenizer

    import torch.distributed as dist

    if settings.max_cases:
        cases = cases[: settings.max_cases]
    if not cases:
        raise ValueError("no cases to evaluate")
    t0 = time.perf_counter()
    info = init_distributed()
    tokenizer = tokenizer or load_tokenizer(model_path, require_chat_template=True)
    engine = engine or build_engine(model_path, settings, info)
    mine = list(range(info.rank, len(cases), info.world_size))
    texts = sample_completions(engine, tokenizer, [cases[i] for i in mine], settings, settings.seed + 1_000_003 * info.rank, info.is_main) if mine else []
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, list(zip(mine, texts)))
    metrics = None
    if info.is_main:
        by_case = dict(pair for part in gathered for pair in part)
        completions = [by_case[i] for i in range(len(cases))]
        answers = [[extract_answer(t) for t in group] for group in completions]
        metrics = evaluate_cases(answers, [c["solution"] for c in cases])
        flat = [t for group in completions for t in group]
        metrics["format_rate"] = sum(a is not None for group in answers for a in group) / len(flat)
        metrics["completion_chars_mean"] = sum(len(t) for t in flat) / len(flat)
        metrics["eval_seconds"] = time.perf_counter() - t0
        metrics["settings"] = asdict(settings)
    return broadcast_object(metrics)


def format_table(results: dict[str, dict], k: int | None = None) -> str:
    """A markdown table: one row per (level, metric), one column per named result (percent)."""
    names = list(results)
    k = k or int(next(iter(results.values()))["k"])
    header = "| level | metric | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for level in LEVELS:
        for metric in METRICS:
            label = metric.replace("@k", f"@{k}").replace("pass", "Pass").replace("maj", "Maj")
            cells = [f"{100 * results[n][f'{level}/{metric}']:.1f}" for n in names]
            lines.append(f"| {LEVEL_NAMES[level]} | {label} | " + " | ".join(cells) + " |")
    lines.append("| all | format ok | " + " | ".join(f"{100 * results[n].get('format_rate', float('nan')):.1f}" for n in names) + " |")
    return "\n".join(lines)


def write_json_atomic(path: str | Path, obj) -> None:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF model folder (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--data", required=True, help="test cases JSONL (records.py schema)")
    ap.add_argument("--out", default="", help="metrics JSON (default: MODEL/eval_<data name>.json)")
    defaults = EvalSettings()
    for name in ("k", "temperature", "top_p", "max_new_tokens", "seed", "max_cases", "batch_cases", "gpu_memory_utilization"):
        value = getattr(defaults, name)
        ap.add_argument(f"--{name}", type=type(value), default=value)
    ap.add_argument("--engine", choices=["torch", "vllm"], default=defaults.engine)
    args = ap.parse_args(argv)

    from minigrpo.dist import destroy_distributed, init_distributed
    from minigrpo.model import ModelLoadError, check_model_dir

    from recipes.drg.records import read_cases

    try:
        settings = EvalSettings(**{k: v for k, v in vars(args).items() if k not in ("model", "data", "out")})
        check_model_dir(args.model)
        cases = read_cases(args.data)
        info = init_distributed()
        metrics = evaluate_model(args.model, cases, settings)
    except (ValueError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if info.is_main:
        out = Path(args.out or Path(args.model) / f"eval_{Path(args.data).stem}.json")
        write_json_atomic(out, {"model": str(args.model), "data": str(args.data), **metrics})
        print(format_table({Path(args.model).name or "model": metrics}, settings.k))
        print(f"{int(metrics['cases'])} cases, k={settings.k}, {metrics['eval_seconds']:.1f}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
