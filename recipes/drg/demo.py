"""The DRG-Sapphire pipeline in miniature, on CPU.

    torchrun --nproc_per_node 2 recipes/drg/demo.py [--config X] [--section.key=value ...]
    torchrun --nproc_per_node 2 recipes/drg/train.py      # the same with configs/demo.yaml (`make demo`)
    python recipes/drg/demo.py --help                     # every config key with its demo value

    [1/6] data + model   synthetic cases over a few DRGs (prep/synthetic.py, labelled by drgpy); a small
                         random Qwen2 (minigrpo.tiny) with a BPE tokenizer trained on the recipe's own text
    [2/6] SFT            CoT rows + knowledge rows (sft.py)
    [3/6] eval SFT       Pass@1 / Pass@k / Maj@k at DRG, base DRG and CC/MCC (evaluate.py)
    [4/6] GRPO           from the SFT export (grpo_run.py)
    [5/6] eval GRPO
    [6/6] summary        summary.json, summary.md, grpo_curves.png

Settings live in configs/demo.yaml (class DemoConfig). Output: demo.output_dir (default
outputs/drg-demo), replaced on a re-run only if it holds a previous demo's marker file.
"""

from __future__ import annotations

import math
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `torchrun recipes/drg/demo.py` from the repo root

from safetensors import safe_open

from minigrpo.cli import run_command
from minigrpo.config import ConfigError, check, load_config, section, split_cli
from minigrpo.dist import barrier, broadcast_object, init_distributed
from minigrpo.help import print_help, wants_help
from minigrpo.io import atomic_write_text, write_jsonl_atomic
from minigrpo.tiny import TinyPreset, build_tiny

from recipes.drg import grpo_run, sft
from recipes.drg.demo_summary import Banner, write_summary
from recipes.drg.evaluate import EvalSettings, evaluate_model, format_table
from recipes.drg.grpo_run import DrgTrainConfig
from recipes.drg.prep.synthetic import generate
from recipes.drg.prompts import DRG_INTRODUCTION, QUESTION, SYSTEM_PROMPT
from recipes.drg.records import read_cases
from recipes.drg.sft import DrgSFTConfig
from recipes.drg.tables import load_tables

DEMO_YAML = Path(__file__).resolve().parent / "configs" / "demo.yaml"
MARKER = ".drg-demo"
SPLITS = ("sft", "grpo", "test")


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
    """The sizes of the demo's Qwen2 (a minigrpo.tiny preset of its own: tiny's is too small, small's too slow)."""

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


# ----------------------------------------------------------------------------- phase 1: data + model


def tokenizer_corpus(cases: list[dict]) -> list[str]:
    """The recipe's own text: prompts (repeated, so their words become single tokens), v34 titles, notes, CoT."""
    texts = [SYSTEM_PROMPT, DRG_INTRODUCTION, QUESTION] * 20
    texts += sorted(load_tables().descriptions)
    for c in cases:
        texts += [c["problem"], c.get("cot", "")]
    return texts


def build_model(out: Path, texts: list[str], m: DemoModel, seed: int) -> Path:
    """Tokenizer + random Qwen2 of size `m`, saved in HF format (atomically) at `out`."""
    return build_tiny(out, texts, TinyPreset(**asdict(m)), seed)


def count_parameters(model_dir: Path) -> int:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def prepare_output_dir(out: Path) -> str | None:
    """Empty `out` for a fresh run; an error message if it holds something that is not a demo's."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            return f"{out} exists and is not a previous demo output (no {MARKER} file); choose another demo.output_dir"
        print(f"demo: replacing the previous demo output in {out}", flush=True)
        shutil.rmtree(out)
    atomic_write_text(out / MARKER, "written by recipes/drg/demo.py; the folder is replaced when the demo runs again\n")
    return None


def write_cases(setup: DemoSetup, data: dict[str, Path]) -> dict[str, list[dict]]:
    """Generate the synthetic cases, split them sft / grpo / test, write each split; print the labels."""
    n = setup.sft_cases + setup.grpo_cases + setup.test_cases
    cases = generate(n, seed=setup.seed, difficulty=setup.difficulty, num_drgs=setup.num_drgs or None,
                     principals=setup.principals or None)
    cut = (setup.sft_cases, setup.sft_cases + setup.grpo_cases)
    parts = {"sft": cases[: cut[0]], "grpo": cases[cut[0] : cut[1]], "test": cases[cut[1] :]}
    for name, rows in parts.items():
        write_jsonl_atomic(data[name], rows)
    labels = sorted({c["solution"] for c in cases})
    print(f"demo: {n} synthetic cases over {len(labels)} DRGs -> {data['sft'].parent}", flush=True)
    for title in labels:
        print(f"  {sum(c['solution'] == title for c in cases):4d}  {title}", flush=True)
    return parts


def make_data_and_model(cfg: DemoConfig, out: Path, main_rank: bool) -> tuple[dict[str, Path], Path]:
    """Rank 0 writes the cases and builds the model; every rank gets their paths."""
    problem = broadcast_object(prepare_output_dir(out) if main_rank else None)
    if problem:
        raise ConfigError(problem)
    data = {name: out / "data" / f"{name}.jsonl" for name in SPLITS}
    model_dir = out / "model"
    if main_rank:
        parts = write_cases(cfg.demo, data)
        build_model(model_dir, tokenizer_corpus(parts["sft"]), cfg.model, cfg.demo.seed)
        size = f"{count_parameters(model_dir) / 1e6:.2f}M parameters"
        shape = f"{cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}"
        print(f"demo: model {size} ({shape}) -> {model_dir}", flush=True)
    barrier()
    return data, model_dir


# ----------------------------------------------------------------------------- phases 2 and 4: SFT, GRPO


def sft_config(base: DrgSFTConfig, model_dir: str | Path, cases: Path, out: Path, seed: int) -> DrgSFTConfig:
    """`base` with its model, cases, output folder and seed filled in (the demo's and the study's SFT runs)."""
    return replace(base, model=replace(base.model, path=str(model_dir)),
                   cases=replace(base.cases, train_file=str(cases)),
                   run=replace(base.run, output_dir=str(out), seed=seed))


def grpo_config(base: DrgTrainConfig, model_dir: str | Path, cases: Path, out: Path, seed: int) -> DrgTrainConfig:
    """`base` with its model, cases, output folder and seed filled in (the demo's and the study's GRPO runs)."""
    return replace(base, model=replace(base.model, path=str(model_dir)),
                   data=replace(base.data, train_file=str(cases)),
                   run=replace(base.run, output_dir=str(out), seed=seed))


# ----------------------------------------------------------------------------- the pipeline


def announce(cfg: DemoConfig, out: Path) -> None:
    """What the demo is about to do, and where it writes, before it writes anything."""
    d, sft_steps = cfg.demo, cfg.sft.run.steps or "one epoch of"
    print(f"demo: the DRG pipeline in miniature: {d.sft_cases} SFT / {d.grpo_cases} GRPO / {d.test_cases} test "
          f"synthetic cases, a {cfg.model.num_layers}-layer Qwen2 built from scratch, SFT {sft_steps} steps, "
          f"GRPO {cfg.grpo.run.steps or 'one epoch of'} steps, Pass@1 / Pass@{cfg.eval.k} / Maj@{cfg.eval.k} "
          f"before and after GRPO (with configs/demo.yaml about 10 minutes on 2 CPU cores)", flush=True)
    print(f"demo: writing {out.resolve()} (data/, model/, sft/, grpo/, summary.md, summary.json, grpo_curves.png)",
          flush=True)


def run(cfg: DemoConfig) -> dict:
    """The whole demo; returns the summary (on every rank; only rank 0 writes files)."""
    main_rank = init_distributed().is_main
    out = Path(cfg.demo.output_dir)
    if main_rank:
        announce(cfg, out)
    banner = Banner(6, main_rank)
    banner(1, "data + model")
    data, model_dir = make_data_and_model(cfg, out, main_rank)
    test_cases = read_cases(data["test"])

    banner(2, "SFT (CoT rows" + (" + knowledge rows)" if cfg.sft.cases.knowledge else ")"))
    sft.run(sft_config(cfg.sft, model_dir, data["sft"], out / "sft", cfg.demo.seed))
    sft_model = str(out / "sft" / "hf")
    banner(3, "evaluate the SFT model")
    evals = {"SFT": evaluate_model(sft_model, test_cases, cfg.eval)}
    if main_rank:
        print(format_table({"SFT": evals["SFT"]}, cfg.eval.k), flush=True)

    banner(4, "GRPO")
    history = grpo_run.run(grpo_config(cfg.grpo, sft_model, data["grpo"], out / "grpo", cfg.demo.seed))
    banner(5, "evaluate the GRPO model")
    evals["SFT+GRPO"] = evaluate_model(str(out / "grpo" / "hf"), test_cases, cfg.eval)

    banner(6, "summary")
    times = banner.finish()
    summary = None
    if main_rank:
        labels = {c["solution"] for c in test_cases + read_cases(data["sft"])}
        counts = {f"{name}_cases": getattr(cfg.demo, f"{name}_cases") for name in SPLITS}
        data_info = {"num_drgs": len(labels), **counts}
        summary = write_summary(out, cfg, evals, history, times, data_info)
    return broadcast_object(summary)


def load_demo_config(argv: list[str]) -> DemoConfig:
    config_path, overrides = split_cli(argv)
    return load_config(DemoConfig, config_path or DEMO_YAML, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, load_demo_config([]))
    return run_command(lambda: run(load_demo_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
