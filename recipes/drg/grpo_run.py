"""The DRG GRPO run (PAPER.md "Training"): its config, its inputs and `run`.

The recipe supplies three things and nothing else: prompts (the chat-templated question around each
case's brief hospital course, prompts.py), a reward function (rewards.py, chosen by data.reward) and
the config. Everything else is minigrpo.trainer. Every input is checked before anything is written.
Entry point: train.py; the demo (demo.py) calls `run` for its GRPO phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from minigrpo.config import check, section
from minigrpo.model import load_tokenizer
from minigrpo.rl.prompts import Prompt
from minigrpo.trainer import GRPORunConfig, GRPOTrainer

from recipes.drg.prompts import build_prompt_ids
from recipes.drg.records import read_cases
from recipes.drg.rewards import DrgReward, make_reward


@dataclass(slots=True)
class DrgDataConfig:
    """The recipe's own section: which cases, which reward."""

    train_file: str = ""  # DRG cases JSONL (records.py schema: problem + solution per row)
    max_cases: int = 0  # 0 = all
    reward: Literal["strict", "dense", "balanced"] = "dense"
    compat: bool = False  # reproduce the reference code's reward quirks (rewards.py)
    cot_first_penalty: float = 0.0  # <= 0; rewards.SUGGESTED_COT_FIRST_PENALTY is -1.0

    def __post_init__(self) -> None:
        check(self.max_cases >= 0, "data.max_cases", "must be >= 0")
        penalty = self.cot_first_penalty
        check(penalty <= 0, "data.cot_first_penalty", f"must be <= 0 (a penalty), got {penalty}")


@dataclass(slots=True)
class DrgTrainConfig(GRPORunConfig):
    """minigrpo's GRPO run config plus the recipe's `data` section (the trainer ignores it)."""

    data: DrgDataConfig = section(DrgDataConfig)


def build_prompts(cases: list[dict], tokenizer) -> list[Prompt]:
    """One Prompt per case: chat-templated ids, the gold title as reward metadata, a stable id."""
    ids = [str(c.get("note_id") or f"row{i}") for i, c in enumerate(cases)]
    if len(set(ids)) != len(ids):  # curriculum records refer to prompts by id: it must be unique
        ids = [f"row{i}" for i in range(len(cases))]
    return [
        Prompt(pid, build_prompt_ids(tokenizer, case["problem"]), {"solution": case["solution"]})
        for pid, case in zip(ids, cases)
    ]


def load_inputs(cfg: DrgTrainConfig) -> tuple[list[Prompt], DrgReward]:
    """(prompts, reward_fn): every check of the run's inputs, before anything is written."""
    check(bool(cfg.data.train_file), "data.train_file", "is required (a DRG cases JSONL)")
    check(bool(cfg.model.path), "model.path", "is required (a local HF model folder, e.g. an SFT export OUTPUT_DIR/hf)")
    reward_fn = make_reward(cfg.data.reward, compat=cfg.data.compat, cot_first_penalty=cfg.data.cot_first_penalty)
    cases = read_cases(cfg.data.train_file, require_rows=True)
    if cfg.data.max_cases:
        cases = cases[: cfg.data.max_cases]
    tokenizer = load_tokenizer(cfg.model.path, require_chat_template=True)
    return build_prompts(cases, tokenizer), reward_fn


def run(cfg: DrgTrainConfig) -> list[dict]:
    """GRPO on the DRG cases of `cfg`; per-step metrics (also OUTPUT_DIR/metrics.jsonl).

    Keeps the process group alive, so a larger pipeline (the demo) can evaluate afterwards.
    """
    prompts, reward_fn = load_inputs(cfg)
    return GRPOTrainer(cfg, prompts, reward_fn).train()  # run.steps 0 = one epoch, counted by the trainer
