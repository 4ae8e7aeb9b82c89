"""The paper's findings in miniature (PAPER.md "Findings to reproduce"), on CPU, resumable.

    python -m recipes.drg.study [--config recipes/drg/configs/study.yaml] [--section.key=value ...]
    torchrun --nproc_per_node 2 recipes/drg/study.py [...]      # each cell data-parallel over 2 ranks
    python -m recipes.drg.study --help                          # every key with its study value

Over one synthetic case pool and one fixed test set (data/), with one untrained model per seed
(model-s{seed}/: a random Qwen2 and the recipe's tokenizer), the study runs these cells, each in its
own folder cells/s{seed}/NAME and skipped when its done.json exists (an interrupted study resumes;
an unfinished cell starts again):
    base        evaluate the untrained model (the cold-start arm's "before")
    sft-N       SFT on the first N pool cases (study.sft_epochs epochs), evaluate
    grpo-N      GRPO from sft-N's export, the same grpo section for every arm, evaluate
    grpo-cold   GRPO from the untrained model (the cold-start arm), evaluate
Evaluation: Pass@1 / Pass@k / Maj@k at DRG, base DRG and CC/MCC on the test set, each with a 95%
bootstrap interval over test cases; the GRPO gains with paired intervals (the same cases resampled
before and after). With several seeds, each case's values are averaged over seeds before the
bootstrap, and the spread of the seeds' means is reported beside it. "Best RL Pass@1" is the final
GRPO model's (one evaluation per run). Outputs (study.output_dir): study.json, results.md,
scaling.png, before_after.png, grpo_curves.png (study_report.py writes them).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `torchrun recipes/drg/study.py` from the root

from minigrpo.cli import run_command
from minigrpo.config import ConfigError, check, load_config, section, split_cli, to_dict
from minigrpo.dist import barrier, broadcast_object, init_distributed
from minigrpo.help import print_help, wants_help
from minigrpo.io import atomic_write_text, write_json_atomic
from recipes.drg import grpo_run, sft
from recipes.drg.demo import DemoModel, DemoSetup, build_model, grpo_config, sft_config, tokenizer_corpus, write_cases
from recipes.drg.evaluate import EvalSettings, evaluate_model
from recipes.drg.grpo_run import DrgTrainConfig
from recipes.drg.records import read_cases
from recipes.drg.sft import DrgSFTConfig
from recipes.drg.study_report import write_report

STUDY_YAML = Path(__file__).resolve().parent / "configs" / "study.yaml"
MARKER = ".drg-study"
DONE = "done.json"
# Keys that may change between runs of one study folder: they add or drop cells, not change them.
GROWABLE = ("seeds", "sft_sizes", "cold_start", "output_dir")


@dataclass(slots=True)
class StudySetup:
    output_dir: str = "outputs/drg-study"
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # model init, SFT and GRPO seed of each repeat
    data_seed: int = 0  # the case pool and the test set: one for every seed
    principals: list[str] = field(default_factory=lambda: ["J18", "K56"])  # ICD-10-CM prefixes; [] = all
    num_drgs: int = 0  # keep K of the reachable DRGs; 0 = all
    difficulty: Literal["easy", "medium", "hard"] = "easy"
    sft_sizes: list[int] = field(default_factory=lambda: [50, 100, 200, 400])  # SFT examples per arm, ascending
    sft_epochs: float = 4.0  # SFT steps = ceil(sft_epochs * N / sft.data.batch_size)
    grpo_cases: int = 400  # the GRPO prompts (one pool for every arm)
    test_cases: int = 200
    cold_start: bool = True  # add the arm GRPO-from-the-untrained-model
    level: float = 0.95  # interval coverage
    resamples: int = 2000  # bootstrap resamples

    def __post_init__(self) -> None:
        check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "study.seeds", "one or more, each once")
        sizes = self.sft_sizes
        check(len(sizes) >= 1 and all(n >= 1 for n in sizes) and sizes == sorted(set(sizes)), "study.sft_sizes",
              f"must be positive, ascending and distinct, got {sizes}")
        check(self.sft_epochs > 0, "study.sft_epochs", "must be > 0")
        check(min(self.grpo_cases, self.test_cases) >= 1, "study.grpo_cases/test_cases", "must be >= 1")
        check(0 < self.level < 1 and self.resamples >= 1, "study.level/resamples", "need 0 < level < 1, resamples >= 1")


@dataclass(slots=True)
class StudyConfig:
    study: StudySetup = section(StudySetup)
    model: DemoModel = section(DemoModel)
    sft: DrgSFTConfig = section(DrgSFTConfig)
    grpo: DrgTrainConfig = section(DrgTrainConfig)
    eval: EvalSettings = section(EvalSettings)


@dataclass(frozen=True, slots=True)
class Cell:
    seed: int
    name: str  # base, sft-N, grpo-N, grpo-cold
    kind: Literal["base", "sft", "grpo"]
    size: int = 0  # SFT examples behind the cell's model (0: none)

    def folder(self, root: Path) -> Path:
        return root / "cells" / f"s{self.seed}" / self.name


def plan(setup: StudySetup) -> list[Cell]:
    """Every cell in run order: per seed, the untrained model, then each arm's SFT and GRPO, then cold start."""
    cells = []
    for seed in setup.seeds:
        cells.append(Cell(seed, "base", "base"))
        for n in setup.sft_sizes:
            cells += [Cell(seed, f"sft-{n}", "sft", n), Cell(seed, f"grpo-{n}", "grpo", n)]
        if setup.cold_start:
            cells.append(Cell(seed, "grpo-cold", "grpo"))
    return cells


# ----------------------------------------------------------------------------- the study folder


def fixed_config(cfg: StudyConfig) -> dict:
    """The config minus the keys that only add or drop cells: what every cell of a study shares."""
    tree = to_dict(cfg)
    tree["study"] = {k: v for k, v in tree["study"].items() if k not in GROWABLE}
    return tree


def prepare_folder(cfg: StudyConfig, root: Path) -> str | None:
    """Claim `root` for this study or check that it holds this study; an error message otherwise."""
    saved = root / "study_config.json"
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            return f"{root} exists and is not a study folder (no {MARKER} file); choose another study.output_dir"
        previous = json.loads(saved.read_text()) if saved.exists() else {}
        current = json.loads(json.dumps(fixed_config(cfg)))  # as saved: tuples -> lists
        changed = sorted(k for k in current if previous.get(k) != current[k])
        if changed:
            return (f"{root} holds a study with other settings (sections {changed}); only study."
                    f"{'/'.join(GROWABLE[:3])} may change on resume: choose another study.output_dir")
        return None
    atomic_write_text(root / MARKER, "written by recipes/drg/study.py; cells with a done.json are skipped on resume\n")
    write_json_atomic(saved, fixed_config(cfg))
    return None


def make_inputs(cfg: StudyConfig, root: Path) -> dict[str, Path]:
    """data/{pool,grpo,test}.jsonl and model-s{seed}/ (rank 0, once; kept on resume)."""
    setup = cfg.study
    data = {"sft": root / "data" / "pool.jsonl", "grpo": root / "data" / "grpo.jsonl",
            "test": root / "data" / "test.jsonl"}
    if not all(p.exists() for p in data.values()):
        cases = DemoSetup(output_dir=str(root), seed=setup.data_seed, principals=setup.principals,
                          num_drgs=setup.num_drgs, difficulty=setup.difficulty, sft_cases=max(setup.sft_sizes),
                          grpo_cases=setup.grpo_cases, test_cases=setup.test_cases)
        write_cases(cases, data)
    pool = read_cases(data["sft"])
    for seed in setup.seeds:
        model_dir = root / f"model-s{seed}"
        if not (model_dir / "config.json").exists():
            build_model(model_dir, tokenizer_corpus(pool), cfg.model, seed)
    return data


# ----------------------------------------------------------------------------- one cell


def sft_steps(setup: StudySetup, size: int, batch_size: int) -> int:
    return math.ceil(setup.sft_epochs * size / batch_size)


def run_cell(cfg: StudyConfig, cell: Cell, root: Path, data: dict[str, Path], test: list[dict]) -> dict:
    """Train (SFT or GRPO) and evaluate one cell's model; its record (written by the caller)."""
    folder, untrained = cell.folder(root), root / f"model-s{cell.seed}"
    record: dict = {"seed": cell.seed, "cell": cell.name, "kind": cell.kind, "size": cell.size}
    if cell.kind == "base":
        model = untrained
    elif cell.kind == "sft":
        base = replace(cfg.sft, cases=replace(cfg.sft.cases, max_cases=cell.size),
                       run=replace(cfg.sft.run, steps=sft_steps(cfg.study, cell.size, cfg.sft.data.batch_size)))
        record["sft"] = sft.run(sft_config(base, untrained, data["sft"], folder / "run", cell.seed))
        model = folder / "run" / "hf"
    else:
        start = cell.folder(root).with_name(f"sft-{cell.size}") / "run" / "hf" if cell.size else untrained
        record["history"] = grpo_run.run(grpo_config(cfg.grpo, start, data["grpo"], folder / "run", cell.seed))
        model = folder / "run" / "hf"
    record["eval"] = evaluate_model(str(model), test, cfg.eval)
    return record


class Progress:
    """Cells done / total with an ETA from the mean time of the cells of each kind run so far."""

    def __init__(self, cells: list[Cell], enabled: bool):
        self.cells, self.enabled, self.t0 = cells, enabled, time.perf_counter()
        self.seconds: dict[str, list[float]] = {}
        self.done = 0

    def eta(self) -> float | None:
        runs = [s for times in self.seconds.values() for s in times]
        if not runs:
            return None
        fallback = [sum(runs) / len(runs)]
        left = [self.seconds.get(c.kind, fallback) for c in self.cells[self.done :]]
        return sum(sum(times) / len(times) for times in left)

    def __call__(self, cell: Cell, seconds: float | None) -> None:
        self.done += 1
        if seconds is not None:
            self.seconds.setdefault(cell.kind, []).append(seconds)
        if self.enabled:
            how = "skipped (done.json)" if seconds is None else f"{seconds:.0f}s"
            eta = self.eta()
            eta_text = "?" if eta is None else f"{eta / 60:.1f} min"
            print(f"study: {self.done}/{len(self.cells)} cells done (s{cell.seed}/{cell.name} {how}); elapsed "
                  f"{(time.perf_counter() - self.t0) / 60:.1f} min, ETA {eta_text}", flush=True)


# ----------------------------------------------------------------------------- the study


def run(cfg: StudyConfig) -> dict | None:
    """Every cell not yet done, then the report; returns the study summary (rank 0; None elsewhere)."""
    info = init_distributed()
    root = Path(cfg.study.output_dir)
    problem = broadcast_object(prepare_folder(cfg, root) if info.is_main else None)
    if problem:
        raise ConfigError(problem)
    data = broadcast_object(make_inputs(cfg, root) if info.is_main else None)
    barrier()
    test = read_cases(data["test"])
    cells = plan(cfg.study)
    if info.is_main:
        print(f"study: {len(cells)} cells ({len(cfg.study.seeds)} seeds x (base, SFT sizes {cfg.study.sft_sizes}"
              f"{', cold start' if cfg.study.cold_start else ''})) -> {root.resolve()}", flush=True)
    progress, t0 = Progress(cells, info.is_main), time.perf_counter()
    records = []
    for cell in cells:
        done = cell.folder(root) / DONE
        if broadcast_object(done.exists() if info.is_main else None):
            records.append(json.loads(done.read_text()))
            progress(cell, None)
            continue
        if info.is_main and cell.folder(root).exists():
            shutil.rmtree(cell.folder(root))  # an unfinished cell from an interrupted run: start it again
        barrier()
        start = time.perf_counter()
        record = run_cell(cfg, cell, root, data, test)
        record["seconds"] = round(time.perf_counter() - start, 1)
        if info.is_main:
            write_json_atomic(done, record)
        records.append(record)
        progress(cell, record["seconds"])
    if not info.is_main:
        return None
    return write_report(root, cfg, records, round(time.perf_counter() - t0, 1), sys.argv)


def load_study_config(argv: list[str]) -> StudyConfig:
    config_path, overrides = split_cli(argv)
    return load_config(StudyConfig, config_path or STUDY_YAML, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, load_study_config([]))
    return run_command(lambda: run(load_study_config(argv)))


if __name__ == "__main__":
    sys.exit(main())
