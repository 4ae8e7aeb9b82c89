"""Scored groups -> the loss loop's micro-batches, with named per-token fields, and the step's counts.

An `RLMicroBatch` is the model's input rows (`layout.ScoredRows`: per completion, or one row per
group sharing the prompt) plus the tensors the loss reads, all in completion space (S, C): one row
per completion, 0 where no token is scored. The advantage and the sampler's log-probs are set here;
the old policy's and the reference's log-probs are attached later in the step.

Micro-batches take `micro_batch_size` consecutive completions, the same split with either layout;
with the shared prompt, the completions of one group inside a micro-batch share one prompt row. So
a group may be split over two micro-batches (its prompt is then computed in each), and every
aggregation, the DRG-Sapphire micro-batch-local one included, sees the same micro-batches with or
without sharing. A `micro_batch_size` that is a multiple of G computes each prompt exactly once.

`pack_groups` also makes the step's global counts (tokens, sequences, micro-batches) in one
collective, before any forward pass, so every micro-batch loss is divided by the same step-global
normaliser (see docs/MATH.md), and pads every rank to the same number of micro-batches (FSDP's
collectives must match).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from minigrpo.dist import comm_device
from minigrpo.grpo import StepCounts
from minigrpo.rl.groups import Group
from minigrpo.rl.layout import ScoredRows, per_completion_rows, shared_prompt_rows


@dataclass(slots=True)
class RLMicroBatch:
    rows: ScoredRows  # what the model reads, and where each scored token goes
    mask: Tensor  # (S, C) 1 on scored completion tokens
    adv: Tensor  # (S, C) advantage of each token's completion
    sampler_logp: Tensor  # (S, C) the rollout engine's log-probs of the sampled tokens
    old_logp: Tensor | None = None  # (S, C) behaviour policy, when the batch is reused (updates > 1)
    ref_logp: Tensor | None = None  # (S, C) frozen reference, when a KL term is used

    def to(self, device: torch.device) -> RLMicroBatch:
        return RLMicroBatch(
            self.rows.to(device), self.mask.to(device), self.adv.to(device), self.sampler_logp.to(device)
        )


def _micro_batch(
    groups: list[Group], members: list[tuple[int, int]], adv: Tensor, pad_id: int, shared_prompt: bool
) -> RLMicroBatch:
    """The micro-batch of completions `members` = [(group index, sample index)], in step order."""
    completions = [groups[g].completions[j] for g, j in members]
    if shared_prompt:  # one row per group part: the prompt the sampler saw, then its completions here
        parts = []
        for g, part in itertools.groupby(members, key=lambda member: member[0]):
            same_prompt = [groups[g].completions[j] for _, j in part]
            parts.append((same_prompt[0].prompt_ids, [c.token_ids for c in same_prompt]))
        rows = shared_prompt_rows(parts, pad_id)
    else:
        rows = per_completion_rows([(c.prompt_ids, c.token_ids) for c in completions], pad_id)
    mask = rows.completion_mask()  # (S, C)
    sampled = [torch.as_tensor(c.logprobs, dtype=torch.float32).reshape(-1) for c in completions]
    sampler_logp = rows.scatter(torch.cat(sampled))  # same order as the scored tokens
    per_completion = torch.tensor([float(adv[g, j]) for g, j in members], dtype=torch.float32)  # (S,)
    return RLMicroBatch(rows, mask, per_completion[:, None] * mask, sampler_logp)


def _empty_micro_batch(pad_id: int) -> RLMicroBatch:
    """One pad token, nothing scored: its rank joins the micro-batch's FSDP collectives and adds
    exactly zero to the loss and the gradients."""
    rows = per_completion_rows([([pad_id], [])], pad_id)
    zeros = torch.zeros(rows.shape)
    rows.input_tokens = 0
    return RLMicroBatch(rows, zeros, zeros.clone(), zeros.clone())


def _counts_over_ranks(tokens: int, sequences: int, micro_batches: int) -> list[int]:
    """[sums over ranks of the three counts, then the max number of micro-batches], from one all-gather."""
    local = torch.tensor([tokens, sequences, micro_batches], dtype=torch.long, device=comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        stacked = torch.stack(parts)  # (world, 3)
    else:
        stacked = local[None]
    return torch.cat([stacked.sum(0), stacked[:, 2].max()[None]]).tolist()


def pack_groups(
    groups: list[Group],
    adv: Tensor,
    micro_batch_size: int,
    pad_id: int,
    max_completion_tokens: int,
    shared_prompt: bool = True,
) -> tuple[list[RLMicroBatch], StepCounts]:
    """This rank's micro-batches (on CPU; `.to(device)` them) and the step's global counts.

    adv: (len(groups), G) advantages, one per completion. Every rank returns the same number of
    micro-batches: ranks with fewer get empty ones that score nothing.
    """
    members = [(g, j) for g, group in enumerate(groups) for j in range(len(group.completions))]
    chunks = [members[i : i + micro_batch_size] for i in range(0, len(members), micro_batch_size)]
    micro_batches = [_micro_batch(groups, chunk, adv, pad_id, shared_prompt) for chunk in chunks]
    tokens = sum(len(groups[g].completions[j].token_ids) for g, j in members)
    total_tokens, total_sequences, total_micro_batches, most = _counts_over_ranks(tokens, len(members), len(chunks))
    micro_batches += [_empty_micro_batch(pad_id) for _ in range(most - len(micro_batches))]
    return micro_batches, StepCounts(total_tokens, total_sequences, total_micro_batches, max_completion_tokens)
