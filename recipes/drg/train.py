"""DRG GRPO (PAPER.md "Training"): rule-based DRG rewards on DRG cases, with minigrpo's GRPO loop.

    torchrun --nproc_per_node 8 recipes/drg/train.py --config recipes/drg/configs/best_config.yaml \\
        --model.path=outputs/sft/hf --data.train_file=data/grpo_cases.jsonl [--section.key=value ...]
    python recipes/drg/train.py --help                  # every config key with its default
    torchrun --nproc_per_node 2 recipes/drg/train.py    # no arguments: the CPU demo (demo.py, `make demo`)

The entry point only: the run's config, inputs and `run` are in grpo_run.py, the demo in demo.py
(both import grpo_run, neither imports this file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `torchrun recipes/drg/train.py` from the repo root

from minigrpo.cli import run_command
from minigrpo.config import load_config, split_cli
from minigrpo.help import print_help, wants_help

from recipes.drg import demo
from recipes.drg.grpo_run import DrgDataConfig, DrgTrainConfig, build_prompts, load_inputs, run

__all__ = ["DrgDataConfig", "DrgTrainConfig", "build_prompts", "load_inputs", "main", "run"]


def run_demo() -> int:
    """`train.py` with no arguments: say so, then run the CPU demo (it says what it writes where)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print("train.py: no arguments, so this is the CPU demo (recipes/drg/demo.py, configs/demo.yaml); "
              "for GRPO on your own cases see `recipes/drg/train.py --help`", flush=True)
    return demo.main([])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, DrgTrainConfig)
    if not argv:
        return run_demo()
    return run_command(lambda: run(load_config(DrgTrainConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())
