"""DRG SFT (PAPER.md "Training", knowledge infusion): chain-of-thought rows + the 28 knowledge rows.

    torchrun --nproc_per_node N recipes/drg/sft.py --config recipes/drg/configs/sft_7b.yaml \\
        --model.path=/models/Qwen2.5-7B-Instruct --cases.train_file=data/sft_cases.jsonl
    python recipes/drg/sft.py --help      # every config key with its default

The recipe turns DRG cases (records.py schema; each needs a `cot` target, as synthetic.py writes)
into minigrpo.sft rows and runs minigrpo's SFT loop on them:

    case      -> prompt = [system, user] messages of prompts.build_messages(problem), completion = cot
    knowledge -> prompt = [user] message with the corpus prompt, completion = the list of v34 titles

Nothing is written before every check has passed: minigrpo.sft checks the rows in memory, the
tokenizer and the output folder (a fresh run, or a resume of the same config and data); only then
does rank 0 write the rows, atomically, to OUTPUT_DIR/sft_rows.jsonl, the file the run's config
names. A prebuilt prompt/completion file can be given instead as --data.train_file.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `torchrun recipes/drg/sft.py` from the repo root

from minigrpo import sft
from minigrpo.cli import run_command
from minigrpo.config import check, load_config, section, split_cli
from minigrpo.dist import barrier
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, write_jsonl_atomic
from minigrpo.model import check_model_dir
from minigrpo.sft import SFTConfig

from recipes.drg.prompts import build_messages, format_completion
from recipes.drg.records import read_cases
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
        """The config minigrpo.sft runs: data.train_file names the recipe's rows when built from cases."""
        if not self.cases.train_file:
            return self
        return replace(self, data=replace(self.data, train_file=str(Path(self.run.output_dir) / ROWS_FILE)))


def case_rows(cases: list[dict], missing_cot: str = "error", where: str = "cases") -> list[dict]:
    """SFT rows (chat prompt + CoT completion) for DRG cases; ValueError naming a row without a CoT.

    Each row's `source` names the case it came from (minigrpo.sft ignores the key).
    """
    rows = []
    for i, case in enumerate(cases):
        source = f"{where}: row {i + 1} ({case.get('note_id', '?')})"
        cot = case.get("cot")
        if not isinstance(cot, str) or not cot.strip():
            if missing_cot == "error":
                raise DataError(f"{source} has no 'cot' target for SFT "
                                "(set cases.missing_cot=answer_only to train on the answer alone)")
            cot = format_completion("", case["solution"])
        rows.append({"prompt": build_messages(case["problem"]), "completion": cot, "source": source})
    return rows


def knowledge_rows(repeats: int = 1) -> list[dict]:
    """The 28 knowledge rows as single-turn chats."""
    rows = [
        {"prompt": [{"role": "user", "content": r["prompt"]}], "completion": r["completion"]}
        for r in load_knowledge_rows()
    ]
    return [{**row, "source": f"knowledge row {i + 1}"} for i, row in enumerate(rows * repeats)]


def build_rows(cfg: CasesConfig) -> list[dict]:
    """All SFT rows for `cfg`; errors name the cases file and row."""
    cases = read_cases(cfg.train_file, require_rows=True)
    if cfg.max_cases:
        cases = cases[: cfg.max_cases]
    rows = case_rows(cases, cfg.missing_cot, cfg.train_file)
    if cfg.knowledge:
        rows += knowledge_rows(cfg.knowledge_repeats)
    return rows


def prepare_rows(cfg: SFTConfig, rows: list[dict]) -> sft.Prepared:
    """minigrpo.sft's checks and tokenization of `rows` under `cfg`; an error names the row's case."""
    try:
        return sft.prepare(cfg, rows)
    except DataError as e:
        head, _, rest = str(e).partition(": ")
        if not (head.startswith("row ") and head[4:].isdigit()):
            raise
        raise DataError(f"{rows[int(head[4:]) - 1]['source']}: {rest}") from None


def run(cfg: DrgSFTConfig) -> dict:
    """Check everything, write the rows (rank 0), then minigrpo SFT. Returns the last step's metrics.

    Keeps the process group alive, so a larger pipeline (the demo) can go on to GRPO.
    """
    check(bool(cfg.cases.train_file or cfg.data.train_file), "cases.train_file",
          "a DRG cases file (or a prebuilt data.train_file) is required")
    check(bool(cfg.model.path), "model.path", "is required (a local HF model folder)")
    check_model_dir(cfg.model.path)
    sft_cfg = cfg.sft_config()
    if not cfg.cases.train_file:
        return sft.train(sft_cfg, sft.prepare(sft_cfg))
    rows = build_rows(cfg.cases)  # every rank checks the same input
    trainer = sft.SFTTrainer(sft_cfg, prepare_rows(sft_cfg, rows))  # checks the run folder; writes nothing
    if trainer.dist.is_main:
        write_jsonl_atomic(sft_cfg.data.train_file, rows)  # the file the run's config.json names
    barrier()
    return trainer.train()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, DrgSFTConfig)
    return run_command(lambda: run(load_config(DrgSFTConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())
