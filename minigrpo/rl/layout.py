"""How a micro-batch's completions are laid out for the model, and where their scores go.

Two layouts, one output. Either way the scored tokens come back in *completion space*: (S, C), one
row per completion (S of them), C = the longest completion of the micro-batch, 0 where no token is.
The loss, advantages and every log-prob field live there, so the layout changes nothing downstream.

    per completion  one row per completion, [prompt, completion], right-padded; the prompt is
                    computed G times per group
    shared prompt   one row per group, [prompt, c_1, ..., c_G]: the prompt is computed once, each
                    completion attends to the prompt and to its own causal prefix only, and its
                    positions continue from the prompt's end, as in its own row. The first token of
                    every completion is predicted from the prompt's last hidden state, so that state
                    is scored G times; its gradient is the sum over the G completions, exactly the
                    per-completion gradient (autograd of the gather).

The model reads `input_ids`, `attention_mask` (a 2D padding mask, or the shared-prompt rows'
`attention.SharedPromptMask`: sdpa models then score only the query-key pairs it allows, other ones
get it as a dense (R, 1, T, T) bool mask), `position_ids`, and scores only the rows in `score_index`
(into the flattened (R * T) hidden states) against `targets`: the LM head never runs on prompt or
padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from minigrpo.attention import SharedPromptMask


@dataclass(slots=True)
class ScoredRows:
    input_ids: Tensor  # (R, T) int64
    attention_mask: Tensor | SharedPromptMask  # (R, T) 1 = real token, or the shared-prompt rows' mask
    position_ids: Tensor  # (R, T)
    score_index: Tensor  # (N,) int64, flat index into (R * T) of the hidden state predicting each scored token
    targets: Tensor  # (N,) int64, the scored tokens
    out_index: Tensor  # (N,) int64, flat index into (S * C) completion space
    shape: tuple[int, int]  # (S, C)
    input_tokens: int  # real tokens through the model (for tokens/s)

    def to(self, device: torch.device) -> ScoredRows:
        move = [
            t.to(device, non_blocking=True)
            for t in (
                self.input_ids,
                self.attention_mask,
                self.position_ids,
                self.score_index,
                self.targets,
                self.out_index,
            )
        ]
        return ScoredRows(*move, self.shape, self.input_tokens)

    def scatter(self, values: Tensor) -> Tensor:
        """(N,) per scored token -> (S, C) completion space, 0 elsewhere (differentiable)."""
        S, C = self.shape
        flat = values.new_zeros(S * C).scatter(0, self.out_index, values)
        return flat.view(S, C)

    def completion_mask(self) -> Tensor:
        """(S, C) float: 1 on scored completion tokens."""
        return self.scatter(torch.ones(self.out_index.numel(), device=self.out_index.device))


def _completion_space(lengths: Sequence[int]) -> tuple[list[int], tuple[int, int]]:
    """Flat (S * C) index of every completion token, completions in order, tokens in order."""
    C = max(max(lengths, default=0), 1)
    return [i * C + k for i, n in enumerate(lengths) for k in range(n)], (len(lengths), C)


def per_completion_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> ScoredRows:
    """One right-padded row [prompt, completion] per (prompt ids, completion ids) pair."""
    T = max(len(p) + len(c) for p, c in pairs)
    R = len(pairs)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((R, T), dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    score_index, targets = [], []
    for r, (prompt, completion) in enumerate(pairs):
        P, L = len(prompt), len(prompt) + len(completion)
        input_ids[r, :L] = torch.as_tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[r, :L] = 1
        position_ids[r, :L] = torch.arange(L)
        score_index += [r * T + P - 1 + k for k in range(len(completion))]  # token P+k predicted at P-1+k
        targets += list(completion)
    out_index, shape = _completion_space([len(c) for _, c in pairs])
    tokens = sum(len(p) + len(c) for p, c in pairs)
    return ScoredRows(
        input_ids,
        attention_mask,
        position_ids,
        torch.tensor(score_index, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(out_index, dtype=torch.long),
        shape,
        tokens,
    )


def shared_prompt_rows(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> ScoredRows:
    """One row [prompt, c_1, ..., c_G] per (prompt ids, [completion ids]) group, with the mask and
    positions described in the module docstring (the mask as a `SharedPromptMask`)."""
    row_lengths = [len(p) + sum(len(c) for c in cs) for p, cs in groups]
    T, R = max(row_lengths), len(groups)
    input_ids = torch.full((R, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    score_index, targets, spans = [], [], []
    for r, (prompt, completions) in enumerate(groups):
        P = len(prompt)
        if P == 0:
            raise ValueError(
                f"group {r}: empty prompt (the first completion token needs a position to be predicted from)"
            )
        input_ids[r, :P] = torch.as_tensor(list(prompt), dtype=torch.long)
        position_ids[r, :P] = torch.arange(P)
        start = P
        for completion in completions:
            n = len(completion)
            end = start + n
            input_ids[r, start:end] = torch.as_tensor(list(completion), dtype=torch.long)
            position_ids[r, start:end] = torch.arange(P, P + n)
            # token 0 is predicted by the prompt's last position, token k > 0 by the completion's token k - 1
            score_index += [r * T + (P - 1 if k == 0 else start + k - 1) for k in range(n)]
            targets += list(completion)
            spans.append((r, start, n))
            start = end
    out_index, shape = _completion_space([n for _, _, n in spans])
    return ScoredRows(
        input_ids,
        SharedPromptMask.build([len(p) for p, _ in groups], spans, T),
        position_ids,
        torch.tensor(score_index, dtype=torch.long),
        torch.tensor(targets, dtype=torch.long),
        torch.tensor(out_index, dtype=torch.long),
        shape,
        sum(row_lengths),
    )
