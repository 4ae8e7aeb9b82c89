"""Generate and score groups of completions, with dynamic resampling and DAPO-style filtering.

A group is one prompt's G completions and their rewards. Two ways of avoiding groups that carry no
signal (equal rewards -> zero advantage):
- dynamic resampling (DRG-Sapphire): regenerate a group whose reward std is below a threshold, up to
  K times, each time at a temperature drawn from a list; the "positive" variant also requires one
  reward above a threshold. The check is made on the *new* rewards each attempt.
- filtering (DAPO, Yu et al. 2025, "dynamic sampling"): drop zero-variance groups and draw more
  prompts until the batch is full again (bounded number of rounds).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, replace
from typing import Callable, Literal, Sequence

from minigrpo.rl.prompts import Prompt
from minigrpo.rollout.base import Completion, RolloutEngine, SamplingParams
from minigrpo.seeding import derive_seed

# (completion texts, prompt metadata) -> rewards, or (rewards, {component name: one value per completion})
RewardFn = Callable[[list[str], list[dict]], list[float] | tuple[list[float], dict[str, list[float]]]]

# A reward component of this name (1.0 / 0.0 per completion) is the task's correctness: it is logged
# as `accuracy` and recorded per prompt for curriculum filtering.
CORRECT = "correct"


@dataclass(slots=True)
class Group:
    prompt: Prompt
    completions: list[Completion]  # G of them
    texts: list[str]
    rewards: list[float]
    components: dict[str, list[float]]
    temperature: float
    attempts: int = 1

    @property
    def std(self) -> float:
        return statistics.pstdev(self.rewards) if len(self.rewards) > 1 else 0.0

    @property
    def zero_variance(self) -> bool:
        return all(r == self.rewards[0] for r in self.rewards)


@dataclass(slots=True)
class RolloutInfo:
    """How a step's groups were obtained (for the step's metrics)."""

    groups_generated: int  # first draw, before resampling or filtering
    groups_dropped: int | None = None  # zero-variance groups dropped by DAPO filtering (None: filtering off)
    resampled: bool = False  # dynamic resampling was on


def split_reward_output(output, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """A reward function's result -> (rewards, components); it may return the rewards alone."""
    rewards, components = output if isinstance(output, tuple) else (output, {})
    if len(rewards) != n:
        raise ValueError(f"reward function returned {len(rewards)} rewards for {n} completions")
    return [float(r) for r in rewards], components


@dataclass(slots=True)
class GroupSource:
    """Everything needed to turn prompts into scored groups."""

    engine: RolloutEngine
    decode: Callable[[list[int]], str]
    reward_fn: RewardFn
    sampling: SamplingParams  # at the run's temperature
    n: int  # samples per prompt
    base_seed: int = 0  # run.seed
    rank: int = 0
    step: int = 0
    attempt: int = 0  # generate() calls so far in this step

    def start_step(self, step: int) -> None:
        self.step, self.attempt = step, 0

    def generate(self, prompts: Sequence[Prompt], temperature: float | None = None) -> list[Group]:
        """Sample and score G completions per prompt. Each call of a step (first draw, resampling
        attempts, refills) gets its own seed: derive_seed(run seed, step, rank, attempt)."""
        seed = derive_seed(self.base_seed, step=self.step, rank=self.rank, attempt=self.attempt)
        self.attempt += 1
        sampling = replace(self.sampling, seed=seed)
        if temperature is not None:
            sampling = replace(sampling, temperature=temperature)
        outs = self.engine.generate([p.ids for p in prompts], self.n, sampling)  # [P][G]
        texts = [[self.decode(c.token_ids) for c in group] for group in outs]
        flat_texts = [t for g in texts for t in g]
        flat_meta = [p.metadata for p in prompts for _ in range(self.n)]
        rewards, components = split_reward_output(self.reward_fn(flat_texts, flat_meta), len(flat_texts))
        groups = []
        for i, p in enumerate(prompts):
            part = slice(i * self.n, (i + 1) * self.n)
            scores = {k: [float(x) for x in v[part]] for k, v in components.items()}
            groups.append(Group(p, outs[i], texts[i], rewards[part], scores, sampling.temperature))
        return groups


def needs_resample(group: Group, mode: Literal["std", "positive"], min_std: float, positive_threshold: float) -> bool:
    if group.std < min_std:
        return True
    return mode == "positive" and not any(r > positive_threshold for r in group.rewards)


def resample_groups(
    source: GroupSource,
    groups: list[Group],
    mode: Literal["std", "positive"],
    attempts: int,
    temperatures: Sequence[float],
    min_std: float,
    positive_threshold: float,
    rng: random.Random,
) -> list[Group]:
    """Regenerate failing groups up to `attempts` times; each attempt is judged on its own rewards.

    A group that never passes keeps its last attempt. `Group.attempts` counts generations.
    """
    groups = list(groups)
    for attempt in range(1, attempts + 1):
        failing = [i for i, g in enumerate(groups) if needs_resample(g, mode, min_std, positive_threshold)]
        if not failing:
            break
        temperature = rng.choice(list(temperatures))
        fresh = source.generate([groups[i].prompt for i in failing], temperature=temperature)
        for i, g in zip(failing, fresh):
            g.attempts = groups[i].attempts + 1
            groups[i] = g
    return groups


def fill_with_signal(
    source: GroupSource, first: list[Group], draw: Callable[[int], list[Prompt]], want: int, max_rounds: int
) -> tuple[list[Group], int]:
    """DAPO dynamic sampling: keep groups with reward variance, draw more prompts until `want` are kept.

    Returns (kept groups, number of zero-variance groups dropped). Stops after `max_rounds` extra
    generation rounds even if the batch is not full (then the step trains on fewer groups).
    """
    kept = [g for g in first if not g.zero_variance]
    dropped = len(first) - len(kept)
    for round_ in range(1, max_rounds + 1):
        if len(kept) >= want:
            break
        fresh = source.generate(draw(want - len(kept)))
        good = [g for g in fresh if not g.zero_variance]
        dropped += len(fresh) - len(good)
        kept.extend(good)
    return kept[:want], dropped


def group_records(groups: list[Group], step: int, with_completions: bool) -> tuple[list[dict], list[dict]]:
    """(prompt records, completions) of a step's groups, numbered as metrics.jsonl numbers the step.

    A prompt record holds the group's rewards and correctness (the `correct` component, else reward
    > 0): the input of a later run's curriculum. Completions hold the sampled text, which on real data
    is patient text: only when asked."""
    records = [
        {
            "step": step,
            "prompt_id": g.prompt.id,
            "rewards": g.rewards,
            "correct": g.components.get(CORRECT, [float(r > 0) for r in g.rewards]),
        }
        for g in groups
    ]
    completions = (
        [
            {"step": step, "prompt_id": g.prompt.id, "completion": text, "reward": r, "finish_reason": c.finish_reason}
            for g in groups
            for text, r, c in zip(g.texts, g.rewards, g.completions)
        ]
        if with_completions
        else []
    )
    return records, completions
