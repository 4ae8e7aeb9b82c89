"""The rollout interface: what the GRPO trainer asks of an engine, and what it gets back.

    engine.generate(prompts, n, SamplingParams(...)) -> completions[len(prompts)][n]
    engine.load_weights(named_tensors)               -> engine.version += 1
    engine.sleep() / engine.wake_up()                 free / restore accelerator memory (no-ops where moot)

Semantics shared by every engine (the tests hold both engines to them):
- `temperature == 0` is greedy decoding (argmax); top-k/top-p are then ignored and the reported
  log-probs are those of the untempered distribution (temperature 1).
- `Completion.logprobs[i]` is log p(token_i) under the distribution the token was sampled from:
  softmax(logits / temperature), restricted to the top-k / top-p set and renormalised when those
  are on. With top_k=0 and top_p=1 this is exactly what the trainer computes
  (`LogprobModel(..., temperature=T)`). With truncation on, the trainer's full-distribution
  log-prob is lower by log(mass kept); that gap is a property of the sampler, not an error.
- Stop tokens are exactly `SamplingParams.stop_token_ids` (the tokenizer's eos is not added
  implicitly; pass `engine.eos_token_ids` to stop on it). A stop token is the last entry of
  `token_ids` and sets finish_reason="stop"; otherwise "length".
- A completion may not run past the engine's context: max new tokens is capped at
  `max_context() - len(prompt)`; a prompt that already fills the context is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # same seed + same request -> same completions

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(slots=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens, the stop token included when finish_reason == "stop"
    logprobs: list[float]  # per generated token, see the module docstring for which distribution
    finish_reason: Literal["stop", "length"]
    weight_version: int  # engine.version when this completion was generated

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def max_context(self) -> int: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


def check_request(
    prompts: list[list[int]], n: int, sampling: SamplingParams, max_context: int, vocab_size: int
) -> list[int]:
    """Validate a generate() call; return each prompt's max new tokens (capped by the context)."""
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an integer >= 1, got {n!r}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to generate")
    budgets = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty (a completion needs at least one prompt token)")
        if len(p) >= max_context:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; the engine's context is {max_context}, leaving no room to generate"
            )
        lo, hi = min(p), max(p)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i} has token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size})")
        budgets.append(min(sampling.max_new_tokens, max_context - len(p)))
    for t in sampling.stop_token_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"stop token id {t} is outside the vocabulary [0, {vocab_size})")
    return budgets
