"""DRG SFT (PAPER.md "Training", knowledge infusion): chain-of-thought rows + the 28 knowledge rows.

    torchrun --nproc_per_node N recipes/drg/sft.py --config recipes/drg/configs/sft_7b.yaml \
        --model.path /models/Qwen2.5-7B-Instruct --cases.train_file data/sft_cases.jsonl

The recipe turns DRG cases (records.py schema; each needs a `cot` target, as synthetic.py writes)
into minigrpo.sft rows and runs minigrpo's SFT loop on them:

    case      -> prompt = [system, user] messages of prompts.build_messages(problem), completion = cot
    knowledge -> prompt = [user] message with the corpus prompt, completion = the list of v34 titles

The rows go to OUTPUT_DIR/sft_rows.jsonl (written atomically by rank 0, after every input check).
A prebuilt prompt/completion file can be given instead as --data.train_file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `torchrun recipes/drg/sft.py` from the repo root

from minigrpo.config import check, load_config, section, split_cli
from minigrpo.model import check_model_dir
from minigrpo.sft import SFTConfig

from recipes.drg.prompts import build_messages, format_completion
from recipes.drg.records import read_cases, write_jsonl_atomic
from recipes.drg.tables import load_knowledge_rows

ROWS_FILE = "sft_rows.jsonl"


@dataclass(slots=True)
class CasesConfig:
    train_file: str = ""  # DRG cases JSONL (records.py schema + `cot`); "" = use data.train_file as is
    max_cases: int = 0  # 0 = all
    knowledge: bool = True  # add the 28 knowledge rows (v34 titles overall and per MDC)
    knowledge_repeats: int = 1  # copies of each knowledge row
    missing_cot: Literal["error", "answer_only"] = "error"  # answer_only: an empty think block + the gold title

    def __post_init__(self) -> None:
        check(self.max_cases >= 0, "cases.max_cases", "must be >= 0")
        check(self.knowledge_repeats >= 1, "cases.knowledge_repeats", "must be >= 1")


@dataclass(slots=True)
class DrgSFTConfig(SFTConfig):
    """minigrpo.sft's config plus `cases`; data.train_file is filled in from the cases."""

    cases: CasesConfig = section(CasesConfig)

    def __post_init__(self) -> None:
        pass  # model.path and the data source are checked by run(), which knows about `cases`

    def sft_config(self) -> SFTConfig:
        """The config minigrpo.sft runs: data.train_file points at the recipe's rows when built from cases."""
        from dataclasses import replace

        return replace(self, data=replace(self.data, train_file=str(Path(self.run.output_dir) / ROWS_FILE))) if self.cases.train_file else self


def case_rows(cases: list[dict], missing_cot: str = "error", where: str = "cases") -> list[dict]:
    """SFT rows (chat prompt + CoT completion) for DRG cases; ValueError naming a row without a CoT."""
    rows = []
    for i, case in enumerate(cases):
        cot = case.get("cot")
        if not isinstance(cot, str) or not cot.strip():
            if missing_cot == "error":
                raise ValueError(f"{where}: row {i + 1} ({case.get('note_id', '?')}) has no 'cot' target for SFT (set cases.missing_cot=answer_only to train on the answer alone)")
            cot = format_completion("", case["solution"])
        rows.append({"prompt": build_messages(case["problem"]), "completion": cot})
    return rows


def knowledge_rows(repeats: int = 1) -> list[dict]:
    """The 28 knowledge rows as single-turn chats."""
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"]} for r in load_knowledge_rows()]
    return rows * repeats


def build_rows(cfg: CasesConfig) -> list[dict]:
    """All SFT rows for `cfg`: every input check happens here, before anything is written."""
    cases = read_cases(cfg.train_file)
    if cfg.max_cases:
        cases = cases[: cfg.max_cases]
    rows = case_rows(cases, cfg.missing_cot, cfg.train_file)
    if cfg.knowledge:
        rows += knowledge_rows(cfg.knowledge_repeats)
    return rows


def run(cfg: DrgSFTConfig) -> dict:
    """Build the rows (rank 0 writes them), then minigrpo SFT. Returns the last step's metrics.

    Keeps the process group alive, so a larger pipeline (the demo) can go on to GRPO.
    """
    from minigrpo import sft
    from minigrpo.dist import barrier, init_distributed

    check(bool(cfg.cases.train_file or cfg.data.train_file), "cases.train_file", "a DRG cases file (or a prebuilt data.train_file) is required")
    check(bool(cfg.model.path), "model.path", "is required (a local HF model folder)")
    check_model_dir(cfg.model.path)
    rows = build_rows(cfg.cases) if cfg.cases.train_file else None  # every rank checks the same input
    info = init_distributed()
    sft_cfg = cfg.sft_config()
    if rows is not None and info.is_main:
        write_jsonl_atomic(sft_cfg.data.train_file, rows)
    barrier()
    prepared = sft.prepare(sft_cfg)
    return sft.train(sft_cfg, prepared)


def main(argv: list[str] | None = None) -> int:
    from minigrpo.cli import run_command

    return run_command(lambda: run(load_config(DrgSFTConfig, *split_cli(sys.argv[1:] if argv is None else argv))))

if __name__ == "__main__":
    sys.exit(main())
