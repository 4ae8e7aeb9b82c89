"""Samples -> padded (or packed) tensors, micro-batches and the global token count of a step.

A `Sample` is one prompt + completion, with optional per-token fields (one value per completion
token: advantages, old / reference / sampler log-probs, ...) and per-sequence fields (reward,
group id, ...). A `MicroBatch` holds them as (B, T) tensors in *target space*: column t scores the
token at t + 1 (the model's hidden state at t predicts it), so `logp[b, t]` from `LogprobModel`
lines up with `token_fields["adv"][b, t]`. Per-sequence fields are broadcast to their sequence's
scored columns, so padded and packed rows read the same way; `seq_index[b, t]` says which sample a
column belongs to (-1 where nothing is scored), for per-sequence means.

Packing (several sequences in one row) relies on transformers' packed-sequence detection
(`masking_utils.find_packed_sequence_indices`, transformers 5): with `attention_mask=None` and
`position_ids` that restart at 0, the sdpa / eager causal mask is made block-diagonal, so packed
sequences do not attend to each other; `tests/test_batch.py` checks packed log-probs equal padded
ones (sdpa). flash_attention_2 derives varlen boundaries from the same position_ids (untested here:
no GPU in CI). Packed rows carry `attention_mask=None`; the padding at the end of a packed row is
its own segment that nothing scores.

Token counts are global: `global_token_count` sums the scored tokens of all micro-batches over all
ranks *before* any of them runs, and every micro-batch loss is divided by that same number, so the
gradient does not depend on how the step was split into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from minigrpo.dist import all_gather_object, comm_device
from minigrpo.model import IGNORE_INDEX, shift_targets


@dataclass(slots=True)
class Sample:
    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    token_fields: dict[str, torch.Tensor | Sequence[float]] = field(default_factory=dict)  # each (len(completion_ids),)
    seq_fields: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


@dataclass(slots=True)
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor | None  # (B, T) 1 = real token; None for packed rows
    position_ids: torch.Tensor  # (B, T) restarting at 0 for every sequence
    targets: torch.Tensor  # (B, T) next token where scored, else IGNORE_INDEX
    loss_mask: torch.Tensor  # (B, T) float, 1 where targets[b, t] is a scored completion token
    seq_index: torch.Tensor  # (B, T) int64, index of the sample (in the step's list) scored at t, else -1
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, T) float32, 0 where not scored
    sample_indices: list[int] = field(default_factory=list)  # the samples in this micro-batch
    input_tokens: int = 0  # real (non-padding) tokens, prompts included: for tokens/s

    @property
    def num_tokens(self) -> int:
        """Scored tokens in this micro-batch (local, not reduced)."""
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return MicroBatch(
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
            targets=move(self.targets),
            loss_mask=move(self.loss_mask),
            seq_index=move(self.seq_index),
            token_fields={k: move(v) for k, v in self.token_fields.items()},
            sample_indices=list(self.sample_indices),
            input_tokens=self.input_tokens,
        )


def _field_names(samples: Sequence[Sample]) -> list[str]:
    names: dict[str, None] = {}
    for s in samples:
        names.update(dict.fromkeys(s.token_fields))
        names.update(dict.fromkeys(s.seq_fields))
    return list(names)


def collate_rows(
    samples: Sequence[Sample], rows: Sequence[Sequence[int]], pad_id: int, packed: bool, pad_to_multiple: int = 1
) -> MicroBatch:
    """Lay out `samples[i]` for i in each row, left to right, into one (B, T) micro-batch.

    One sample per row with `packed=False` is ordinary right padding (attention_mask marks real
    tokens); several per row needs `packed=True` (position_ids delimit sequences).
    """
    lengths = [sum(len(samples[i]) for i in row) for row in rows]
    T = max(lengths, default=1)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    names = _field_names([samples[i] for row in rows for i in row])
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    completion_mask = torch.zeros((B, T), dtype=torch.bool)  # input space: token t is a completion token
    seq_index = torch.full((B, T), -1, dtype=torch.long)
    fields = {n: torch.zeros((B, T), dtype=torch.float32) for n in names}
    for b, row in enumerate(rows):
        start = 0
        for i in row:
            s = samples[i]
            P, C = len(s.prompt_ids), len(s.completion_ids)
            if P == 0:
                raise ValueError(
                    f"sample {i}: empty prompt (the first completion token needs a position to be predicted from)"
                )
            end = start + P + C
            input_ids[b, start:end] = torch.as_tensor([*s.prompt_ids, *s.completion_ids], dtype=torch.long)
            attention_mask[b, start:end] = 1
            position_ids[b, start:end] = torch.arange(P + C)
            completion_mask[b, start + P : end] = True
            # Target space: completion token j sits at input position start+P+j, scored at column start+P+j-1.
            cols = slice(start + P - 1, end - 1)
            seq_index[b, cols] = i
            for n, v in s.token_fields.items():
                v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
                if v.numel() != C:
                    raise ValueError(f"sample {i}: token field {n!r} has {v.numel()} values for {C} completion tokens")
                fields[n][b, cols] = v
            for n, v in s.seq_fields.items():
                fields[n][b, cols] = float(v)
            start = end
        if packed and start < T:
            # The padding tail restarts its positions too, so it forms its own (unscored) segment.
            position_ids[b, start:] = torch.arange(T - start)
    targets = shift_targets(input_ids, completion_mask)  # (B, T)
    loss_mask = (targets != IGNORE_INDEX).float()
    flat = [i for row in rows for i in row]
    real_tokens = sum(lengths)  # = attention_mask.sum(), without reading a tensor back
    return MicroBatch(
        input_ids,
        None if packed else attention_mask,
        position_ids,
        targets,
        loss_mask,
        seq_index,
        fields,
        flat,
        real_tokens,
    )


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Greedy first-fit packing of sequence indices into rows of at most `row_len` tokens, in order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"sequence {i} has {n} tokens, more than the packed row length {row_len}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(row_len - n)
    return rows


def group_rows(row_lengths: Sequence[int], micro_batch_size: int, max_tokens: int = 0) -> list[list[int]]:
    """Consecutive rows per micro-batch: at most `micro_batch_size` rows and, when `max_tokens` > 0,
    at most `max_tokens` padded tokens (rows x longest row). A row longer than the budget goes alone."""
    groups: list[list[int]] = []
    longest = 0
    for r, n in enumerate(row_lengths):
        if (
            groups
            and len(groups[-1]) < micro_batch_size
            and (max_tokens <= 0 or (len(groups[-1]) + 1) * max(longest, n) <= max_tokens)
        ):
            groups[-1].append(r)
            longest = max(longest, n)
        else:
            groups.append([r])
            longest = n
    return groups


def make_micro_batches(
    samples: Sequence[Sample],
    micro_batch_size: int,
    pad_id: int,
    pack_len: int = 0,
    pad_to_multiple: int = 1,
    max_tokens: int = 0,
) -> list[MicroBatch]:
    """Split this rank's samples into micro-batches of at most `micro_batch_size` rows (and at most
    `max_tokens` padded tokens each when > 0: long GRPO completions then get smaller micro-batches).

    pack_len = 0: one sample per row, right-padded to the longest in its micro-batch.
    pack_len > 0: samples packed into rows of `pack_len` tokens first (see module docstring).
    """
    if pack_len > 0:
        rows = pack_rows([len(s) for s in samples], pack_len)
    else:
        rows = [[i] for i in range(len(samples))]
    groups = group_rows([sum(len(samples[i]) for i in row) for row in rows], micro_batch_size, max_tokens)
    return [
        collate_rows(samples, [rows[r] for r in g], pad_id, packed=pack_len > 0, pad_to_multiple=pad_to_multiple)
        for g in groups
    ]


def empty_micro_batch(pad_id: int, field_names: Sequence[str] = ()) -> MicroBatch:
    """A one-token micro-batch that scores nothing: it runs forward/backward (so its rank joins the
    FSDP collectives of that micro-batch) and contributes exactly zero to the loss and gradients."""
    mb = collate_rows([Sample([pad_id], [], {}, {n: 0.0 for n in field_names})], [[0]], pad_id, packed=False)
    mb.input_tokens = 0
    return mb


def equalize_micro_batches(
    micro_batches: list[MicroBatch], pad_id: int, device: torch.device | None = None
) -> list[MicroBatch]:
    """Append empty micro-batches so every rank runs the same number (FSDP collectives must match)."""
    count = torch.tensor([len(micro_batches)], dtype=torch.long, device=device or comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    # A rank with no samples at all still needs the field names (the loss reads mb.token_fields[...]).
    local_names = list(micro_batches[0].token_fields) if micro_batches else []
    names = list(dict.fromkeys(n for part in all_gather_object(local_names) for n in part))
    return micro_batches + [empty_micro_batch(pad_id, names) for _ in range(int(count.item()) - len(micro_batches))]


def global_token_count(micro_batches: Sequence[MicroBatch], device: torch.device | None = None) -> int:
    """Scored tokens of the whole optimizer step: all micro-batches of all ranks."""
    local = sum(int(mb.loss_mask.sum().item()) for mb in micro_batches)
    count = torch.tensor([local], dtype=torch.long, device=device or comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count.item())
