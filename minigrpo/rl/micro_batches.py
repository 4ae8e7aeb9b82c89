"""Scored groups -> the loss loop's micro-batches, with named per-token fields, and the step's counts.

An `RLMicroBatch` is a padded `batch.MicroBatch` (one completion per row, target space: column t
scores the token at t + 1) plus the tensors the loss reads, each (B, T) and 0 where nothing is
scored: the advantage, the sampler's log-probs, and (attached later in the step) the old policy's
and the reference's log-probs.

`pack_groups` also makes the step's global counts (tokens, sequences, micro-batches) in one
collective, before any forward pass, so every micro-batch loss is divided by the same step-global
normaliser (see docs/MATH.md), and pads every rank to the same number of micro-batches (FSDP's
collectives must match).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from minigrpo.batch import MicroBatch, Sample, empty_micro_batch, make_micro_batches
from minigrpo.dist import comm_device
from minigrpo.grpo import StepCounts, token_advantages
from minigrpo.rl.groups import Group


@dataclass(slots=True)
class RLMicroBatch:
    rows: MicroBatch  # ids, masks, positions, targets: what the model reads
    adv: Tensor  # (B, T) advantage of each scored token's completion
    sampler_logp: Tensor  # (B, T) the rollout engine's log-probs of the sampled tokens
    old_logp: Tensor | None = None  # (B, T) behaviour policy, when the batch is reused (updates > 1)
    ref_logp: Tensor | None = None  # (B, T) frozen reference, when a KL term is used

    @property
    def mask(self) -> Tensor:
        return self.rows.loss_mask  # (B, T) 1 on scored completion tokens

    def to(self, device: torch.device) -> RLMicroBatch:
        return RLMicroBatch(self.rows.to(device), self.adv.to(device), self.sampler_logp.to(device))


def _rl_micro_batch(rows: MicroBatch, adv: list[float], sampler_logp: list[Tensor]) -> RLMicroBatch:
    mask = rows.loss_mask  # (B, T); row b scores its completion's tokens left to right
    sampler = torch.zeros_like(mask)
    if sampler_logp:
        sampler[mask.bool()] = torch.cat(sampler_logp)  # row-major order = each row's tokens in order
    advantages = token_advantages(torch.tensor(adv, dtype=torch.float32), mask)  # (B, T)
    return RLMicroBatch(rows, advantages, sampler)


def _counts_over_ranks(tokens: int, sequences: int, micro_batches: int) -> tuple[Tensor, Tensor]:
    """(sum over ranks, max over ranks) of the three counts, from one all-gather."""
    local = torch.tensor([tokens, sequences, micro_batches], dtype=torch.long, device=comm_device())
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return local, local
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    stacked = torch.stack(parts)  # (world, 3)
    return stacked.sum(0), stacked.max(0).values


def pack_groups(
    groups: list[Group], adv: Tensor, micro_batch_size: int, pad_id: int, max_completion_tokens: int
) -> tuple[list[RLMicroBatch], StepCounts]:
    """This rank's micro-batches (on CPU; `.to(device)` them) and the step's global counts.

    adv: (len(groups), G) advantages, one per completion. Every rank returns the same number of
    micro-batches: ranks with fewer get empty ones that score nothing (exactly zero loss and gradient).
    """
    completions = [c for group in groups for c in group.completions]
    samples = [Sample(c.prompt_ids, c.token_ids) for c in completions]
    rows = make_micro_batches(samples, micro_batch_size, pad_id)
    flat_adv = adv.reshape(-1).tolist()  # (P_local * G,) in completion order
    micro_batches = [
        _rl_micro_batch(
            mb,
            [flat_adv[i] for i in mb.sample_indices],
            [torch.as_tensor(completions[i].logprobs, dtype=torch.float32).reshape(-1) for i in mb.sample_indices],
        )
        for mb in rows
    ]
    tokens = sum(len(c.token_ids) for c in completions)
    total, most = _counts_over_ranks(tokens, len(completions), len(micro_batches))
    total_tokens, total_sequences, total_micro_batches, _, _, most_micro_batches = torch.cat([total, most]).tolist()
    for _ in range(most_micro_batches - len(micro_batches)):
        empty = empty_micro_batch(pad_id)
        micro_batches.append(RLMicroBatch(empty, torch.zeros_like(empty.loss_mask), torch.zeros_like(empty.loss_mask)))
    counts = StepCounts(total_tokens, total_sequences, total_micro_batches, max_completion_tokens)
    return micro_batches, counts
