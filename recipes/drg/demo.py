"""The DRG-Sapphire pipeline in miniature, on CPU: `torchrun --nproc_per_node 2 recipes/drg/train.py`.

    [1/6] data + model   synthetic cases over a few DRGs (synthetic.py, labelled by drgpy); a small
                         random Qwen2 with a BPE tokenizer trained on the recipe's own text
    [2/6] SFT            CoT rows + knowledge rows (sft.py)
    [3/6] eval SFT       Pass@1 / Pass@k / Maj@k at DRG, base DRG and CC/MCC (evaluate.py)
    [4/6] GRPO           from the SFT export (train.py)
    [5/6] eval GRPO
    [6/6] summary        summary.json, summary.md, grpo_curves.png

Settings live in configs/demo.yaml (class DemoConfig); `train.py --demo [--config X] [--a.b=v]`
overrides them. Output: demo.output_dir (default outputs/drg-demo), replaced on a re-run only if
it holds a previous demo's marker file.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from minigrpo.config import ConfigError, check, load_config, section

from recipes.drg.evaluate import EvalSettings, format_table, write_json_atomic
from recipes.drg.sft import DrgSFTConfig
from recipes.drg.train import DrgTrainConfig

DEMO_YAML = Path(__file__).resolve().parent / "configs" / "demo.yaml"
MARKER = ".drg-demo"


@dataclass(slots=True)
class DemoSetup:
    output_dir: str = "outputs/drg-demo"
    seed: int = 0
    # Label space. A tiny model learns a handful of DRGs on CPU; two base DRGs with three severities
    # each keep the base easy and the CC/MCC status hard, so the two levels of the metrics differ.
    principals: list[str] = field(default_factory=lambda: ["J18", "K56"])  # ICD-10-CM prefixes; [] = all
    num_drgs: int = 0  # keep K of the reachable DRGs; 0 = all
    difficulty: Literal["easy", "medium", "hard"] = "easy"
    sft_cases: int = 400
    grpo_cases: int = 400
    test_cases: int = 48

    def __post_init__(self) -> None:
        check(self.num_drgs >= 0, "demo.num_drgs", "must be >= 0")
        check(min(self.sft_cases, self.grpo_cases, self.test_cases) >= 1, "demo.*_cases", "must be >= 1")


@dataclass(slots=True)
class DemoModel:
    """A small Qwen2 built from scratch (minigrpo.tiny's presets are too small or too slow here)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_positions: int = 1024

    def __post_init__(self) -> None:
        check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "must be a multiple of model.num_heads")
        check(self.num_heads % self.num_kv_heads == 0, "model.num_heads", "must be a multiple of model.num_kv_heads")


@dataclass(slots=True)
class DemoConfig:
    demo: DemoSetup = section(DemoSetup)
    model: DemoModel = section(DemoModel)
    sft: DrgSFTConfig = section(DrgSFTConfig)
    grpo: DrgTrainConfig = section(DrgTrainConfig)
    eval: EvalSettings = section(EvalSettings)


# ----------------------------------------------------------------------------- pieces


def tokenizer_corpus(cases: list[dict]) -> list[str]:
    """The recipe's own text: prompts (repeated, so their words become single tokens), v34 titles, notes, CoT."""
    from recipes.drg.prompts import DRG_INTRODUCTION, QUESTION, SYSTEM_PROMPT
    from recipes.drg.tables import load_tables

    texts = [SYSTEM_PROMPT, DRG_INTRODUCTION, QUESTION] * 20
    texts += sorted(load_tables().descriptions)
    for c in cases:
        texts += [c["problem"], c.get("cot", "")]
    return texts


def build_model(out: Path, texts: list[str], m: DemoModel, seed: int) -> Path:
    """Tokenizer + random Qwen2 of size `m`, saved in HF format (atomically) at `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from minigrpo.tiny import train_tokenizer

    tokenizer = train_tokenizer(texts, m.vocab_size)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
        max_position_embeddings=m.max_positions, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def count_parameters(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def prepare_output_dir(out: Path) -> str | None:
    """Empty `out` for a fresh run; an error message if it holds something that is not a demo's."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            return f"{out} exists and is not a previous demo output (no {MARKER} file); choose another demo.output_dir"
        print(f"demo: replacing the previous demo output in {out}", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by recipes/drg/demo.py; the folder is replaced when the demo runs again\n")
    return None


class Banner:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.t0, self.times, self.current = total, enabled, time.perf_counter(), {}, None
        self.last, self.cpu0 = self.t0, time.process_time()

    def __call__(self, index: int, name: str) -> None:
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = round(now - self.last, 1)
        self.current, self.last = name, now
        if self.enabled:
            print(f"\n{'=' * 20} [{index}/{self.total}] {name}  (t+{now - self.t0:.0f}s) {'=' * 20}", flush=True)

    def finish(self) -> dict:
        now = time.perf_counter()
        if self.current:
            self.times[self.current] = round(now - self.last, 1)
        self.times["total"] = round(now - self.t0, 1)
        # CPU seconds of this process: close to the wall time on an otherwise idle machine (one thread per rank)
        self.times["cpu_rank0"] = round(time.process_time() - self.cpu0, 1)
        return self.times


def reward_trend(history: list[dict], key: str, window: int = 5) -> tuple[float, float]:
    """Mean of `key` over the first and the last `window` GRPO steps."""
    values = [h[key] for h in history if h.get(key) is not None]
    w = max(1, min(window, len(values) // 2 or 1))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def write_summary(out: Path, cfg: DemoConfig, evals: dict, history: list[dict], times: dict, data_info: dict) -> dict:
    from recipes.drg.plot import plot_metrics

    first_r, last_r = reward_trend(history, "reward_mean")
    first_a, last_a = reward_trend(history, "accuracy")
    summary = {
        "eval": evals,
        "grpo": {"steps": len(history), "reward_first": first_r, "reward_last": last_r, "accuracy_first": first_a, "accuracy_last": last_a,
                 "reward_mean_per_step": [h["reward_mean"] for h in history], "accuracy_per_step": [h.get("accuracy") for h in history]},
        "data": data_info,
        "seconds": times,
        "config": asdict(cfg),
    }  # fmt: skip
    write_json_atomic(out / "summary.json", summary)
    plot = None
    try:
        plot = plot_metrics(history_rows(history), out / "grpo_curves.png", title=f"DRG demo GRPO ({data_info['num_drgs']} DRGs, reward {cfg.grpo.data.reward})")
    except ImportError:
        print("demo: matplotlib is not installed; skipping the plot (pip install matplotlib)", file=sys.stderr)
    w = max(1, min(5, len(history) // 2 or 1))
    md = [
        "# DRG demo summary",
        "",
        f"{data_info['num_drgs']} DRGs; {data_info['sft_cases']} SFT / {data_info['grpo_cases']} GRPO / {data_info['test_cases']} test cases; "
        f"eval k={cfg.eval.k}, T={cfg.eval.temperature}, top-p={cfg.eval.top_p}. Percent.",
        "",
        format_table(evals, cfg.eval.k),
        "",
        f"GRPO {len(history)} steps: mean reward {first_r:.3f} (first {w} steps) -> {last_r:.3f} (last {w}); "
        f"training accuracy {first_a:.3f} -> {last_a:.3f}.",
        "",
        "Seconds per phase: " + ", ".join(f"{k} {v}" for k, v in times.items()),
        "",
        f"Plot: {plot.name if plot else '(matplotlib missing)'}; step metrics: grpo/metrics.jsonl, sft/metrics.jsonl.",
    ]
    text = "\n".join(md) + "\n"
    (out / "summary.md").write_text(text, encoding="utf-8")
    return summary


def history_rows(history: list[dict]) -> list[dict]:
    return [{"step": i + 1, **h} for i, h in enumerate(history)]


# ----------------------------------------------------------------------------- the pipeline


def run(cfg: DemoConfig) -> dict:
    """The whole demo; returns the summary (on every rank; only rank 0 writes files)."""
    from minigrpo.dist import barrier, broadcast_object, init_distributed

    from recipes.drg import sft, train
    from recipes.drg.evaluate import evaluate_model
    from recipes.drg.records import read_cases, write_jsonl_atomic

    info = init_distributed()
    main_rank = info.is_main
    out = Path(cfg.demo.output_dir)
    say = (lambda *a: print(*a, flush=True)) if main_rank else (lambda *a: None)
    banner = Banner(6, main_rank)
    banner(1, "data + model")

    problem = prepare_output_dir(out) if main_rank else None
    problem = broadcast_object(problem)
    if problem:
        raise ConfigError(problem)
    data = {k: out / "data" / f"{k}.jsonl" for k in ("sft", "grpo", "test")}
    model_dir = out / "model"
    if main_rank:
        from recipes.drg.prep.synthetic import generate

        d = cfg.demo
        n = d.sft_cases + d.grpo_cases + d.test_cases
        cases = generate(n, seed=d.seed, difficulty=d.difficulty, num_drgs=d.num_drgs or None, principals=d.principals or None)
        parts = {"sft": cases[: d.sft_cases], "grpo": cases[d.sft_cases : d.sft_cases + d.grpo_cases], "test": cases[d.sft_cases + d.grpo_cases :]}
        for k, rows in parts.items():
            write_jsonl_atomic(data[k], rows)
        labels = sorted({c["solution"] for c in cases})
        say(f"demo: {n} synthetic cases over {len(labels)} DRGs -> {out / 'data'}")
        for t in labels:
            say(f"  {sum(c['solution'] == t for c in cases):4d}  {t}")
        build_model(model_dir, tokenizer_corpus(parts["sft"]), cfg.model, d.seed)
        params = count_parameters(model_dir)
        say(f"demo: model {params / 1e6:.2f}M parameters ({cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}) -> {model_dir}")
    barrier()
    test_cases = read_cases(data["test"])
    data_info = {"num_drgs": len({c["solution"] for c in test_cases + read_cases(data["sft"])}), "sft_cases": cfg.demo.sft_cases,
                 "grpo_cases": cfg.demo.grpo_cases, "test_cases": cfg.demo.test_cases}  # fmt: skip

    banner(2, "SFT (CoT rows" + (" + knowledge rows)" if cfg.sft.cases.knowledge else ")"))
    sft_cfg = replace(cfg.sft, model=replace(cfg.sft.model, path=str(model_dir)), cases=replace(cfg.sft.cases, train_file=str(data["sft"])),
                      run=replace(cfg.sft.run, output_dir=str(out / "sft"), seed=cfg.demo.seed))  # fmt: skip
    sft.run(sft_cfg)
    sft_model = str(out / "sft" / "hf")

    evals = {}
    banner(3, "evaluate the SFT model")
    evals["SFT"] = evaluate_model(sft_model, test_cases, cfg.eval)
    say(format_table({"SFT": evals["SFT"]}, cfg.eval.k))

    banner(4, "GRPO")
    grpo_cfg = replace(cfg.grpo, model=replace(cfg.grpo.model, path=sft_model), data=replace(cfg.grpo.data, train_file=str(data["grpo"])),
                       run=replace(cfg.grpo.run, output_dir=str(out / "grpo"), seed=cfg.demo.seed))  # fmt: skip
    history = train.run(grpo_cfg)

    banner(5, "evaluate the GRPO model")
    evals["SFT+GRPO"] = evaluate_model(str(out / "grpo" / "hf"), test_cases, cfg.eval)

    banner(6, "summary")
    times = banner.finish()
    summary = None
    if main_rank:
        summary = write_summary(out, cfg, evals, history, times, data_info)
        say((out / "summary.md").read_text())
        say(f"demo: wrote {out}/summary.md, summary.json, grpo_curves.png")
    return broadcast_object(summary)


def load_demo_config(argv: list[str]) -> DemoConfig:
    from minigrpo.config import split_cli

    config_path, overrides = split_cli(argv)
    return load_config(DemoConfig, config_path or DEMO_YAML, overrides)


def main(argv: list[str] | None = None) -> int:
    from minigrpo.cli import run_command

    return run_command(lambda: run(load_demo_config(list(sys.argv[1:] if argv is None else argv))))

if __name__ == "__main__":
    sys.exit(main())
