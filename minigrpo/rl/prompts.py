"""The prompts a GRPO run draws from: length limits, static curriculum filters, a resumable stream.

Recipes hand the trainer a list of `Prompt`s (token ids already chat-templated, plus the metadata
their reward function needs), or plain text / chat messages (`as_prompts`). This module knows
nothing of any task.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from minigrpo.config import ConfigError
from minigrpo.io import DataError
from minigrpo.seeding import derive_seed


@dataclass(slots=True)
class Prompt:
    id: str  # stable across runs: curriculum records refer to it
    ids: list[int]  # chat-templated prompt token ids
    metadata: dict = field(default_factory=dict)  # whatever the reward function needs (e.g. the gold answer)


PromptLike = Prompt | str | list[dict]


def as_prompts(items: Sequence[PromptLike], tokenizer) -> list[Prompt]:
    """Prompts from `Prompt`s (token ids given), plain text (tokenized as it is) or chat messages
    (`[{"role": ..., "content": ...}, ...]`, templated by the tokenizer with the generation prompt).
    Text and chat prompts get ids `prompt-<index>` and their text / messages as metadata."""
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, Prompt):
            prompts.append(item)
        elif isinstance(item, str):
            prompts.append(Prompt(f"prompt-{i}", list(tokenizer(item)["input_ids"]), {"prompt": item}))
        elif isinstance(item, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in item):
            ids = tokenizer.apply_chat_template(item, add_generation_prompt=True, tokenize=True, return_dict=False)
            prompts.append(Prompt(f"prompt-{i}", list(ids), {"messages": item}))
        else:
            raise TypeError(
                f"prompt {i}: expected a Prompt, a string or a list of {{role, content}} messages, "
                f"got {type(item).__name__}"
            )
    return prompts


def limit_prompt_length(
    prompts: Sequence[Prompt], max_tokens: int, policy: Literal["truncate", "reject"], why: str = "max_prompt_tokens"
) -> tuple[list[Prompt], int]:
    """Left-truncate (keeping the end, where the question and generation prompt sit) or drop
    prompts longer than `max_tokens`. Returns the kept prompts and how many were over the limit;
    the warning names the first prompts over it, and `why` the limit."""
    kept, over = [], []
    for p in prompts:
        if len(p.ids) <= max_tokens:
            kept.append(p)
            continue
        over.append(p)
        if policy == "truncate":
            kept.append(Prompt(p.id, p.ids[-max_tokens:], p.metadata))
    if over:
        action = "left-truncated" if policy == "truncate" else "rejected"
        names = ", ".join(f"{p.id} ({len(p.ids)} tokens)" for p in over[:3]) + (", ..." if len(over) > 3 else "")
        warnings.warn(
            f"{len(over)} of {len(prompts)} prompts are longer than {max_tokens} tokens ({why}) and "
            f"were {action}: {names}",
            stacklevel=2,
        )
    if not kept:
        raise DataError(f"no prompt left: all {len(prompts)} are longer than {max_tokens} tokens ({why})")
    return kept, len(over)


def prepare_prompts(
    items: Sequence[PromptLike], tokenizer, settings, context: int | None, max_new_tokens: int
) -> tuple[list[Prompt], int]:
    """A run's prompts: as token ids, cut to the length limit, filtered by the curriculum of `settings`
    (a config.GRPOConfig). Returns (prompts, how many were over the limit).

    Every prompt is checked here, at start, not when it is drawn: the limit is grpo.max_prompt_tokens
    or the model's `context` minus rollout.max_new_tokens, whichever is smaller."""
    if context is not None and context - max_new_tokens < 1:
        raise ConfigError(
            f"config key 'rollout.max_new_tokens': {max_new_tokens} leaves no room for a prompt "
            f"in the model's context of {context} tokens"
        )
    limit, why = settings.max_prompt_tokens, "grpo.max_prompt_tokens"
    if context is not None and context - max_new_tokens < limit:
        limit, why = (
            context - max_new_tokens,
            f"the model's context {context} - rollout.max_new_tokens {max_new_tokens}",
        )
    prompts, over_long = limit_prompt_length(as_prompts(items, tokenizer), limit, settings.over_long_prompts, why)
    if settings.curriculum != "none":
        prompts = apply_curriculum(prompts, load_prompt_records(settings.curriculum_records), settings.curriculum)
    return prompts, over_long


# ----------------------------------------------------------------------------- curriculum


def load_prompt_records(path: str | os.PathLike) -> dict[str, list[float]]:
    """A previous run's per-prompt record (`prompt_records.jsonl`): prompt id -> rewards of its last group."""
    if not os.path.isfile(path):
        raise DataError(f"curriculum records not found: {path}")
    records: dict[str, list[float]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                records[str(row["prompt_id"])] = [float(x) for x in row["correct"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DataError(f"{path}:{n}: malformed record ({e})") from None
    return records


def apply_curriculum(
    prompts: Sequence[Prompt],
    records: dict[str, list[float]],
    mode: Literal["none", "remove_easy", "remove_hard", "remove_both", "easy_to_hard"],
) -> list[Prompt]:
    """Static curriculum from a previous run's correctness per prompt (DRG-Sapphire ablations).

    easy = a zero-variance group that was all correct; hard = a zero-variance group all wrong.
    `easy_to_hard` orders prompts by the previous mean correctness, highest first (unseen prompts last),
    and the run then reads them in that order instead of shuffled.
    """

    def kind(p: Prompt) -> str:
        c = records.get(p.id)
        if not c:
            return "unseen"
        if all(x >= 1 for x in c):
            return "easy"
        if all(x <= 0 for x in c):
            return "hard"
        return "mixed"

    if mode == "none":
        return list(prompts)
    if mode == "easy_to_hard":
        mean = lambda p: sum(records[p.id]) / len(records[p.id]) if records.get(p.id) else -1.0  # noqa: E731
        return sorted(prompts, key=mean, reverse=True)
    drop = {"remove_easy": {"easy"}, "remove_hard": {"hard"}, "remove_both": {"easy", "hard"}}[mode]
    return [p for p in prompts if kind(p) not in drop]


# ----------------------------------------------------------------------------- the stream


class PromptStream:
    """An endless, resumable stream of prompt indices for one rank.

    Each epoch is a permutation seeded by (seed, epoch), or the given order when `shuffle=False`;
    rank r reads positions r, r + W, r + 2W, ... of it, so ranks never see the same prompt in an
    epoch. The state is two integers, saved in checkpoints.
    """

    def __init__(self, num_prompts: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_prompts < world_size:
            raise ValueError(f"{num_prompts} prompts cannot be split over {world_size} ranks")
        self.n, self.seed, self.rank, self.world, self.shuffle = num_prompts, seed, rank, world_size, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            g = torch.Generator().manual_seed(derive_seed(self.seed, step=self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        return order[self.rank :: self.world][: self.n // self.world]  # equal share per rank

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._epoch_order()
