"""AdamW, learning-rate schedules and global-norm gradient clipping (DTensor-aware).

    optimizer = build_optimizer(model, cfg.optim)
    norm = clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)   # total norm before clipping
    set_lr(optimizer, lr_at(step, total_steps, cfg.optim)); optimizer.step(); optimizer.zero_grad()

The schedule is a pure function of the step (no scheduler object), so a resumed run only needs the
step number to be back on the same learning rate.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from minigrpo.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on 1-D tensors (norm scales, biases).

    The parameters may be FSDP2 DTensor shards: AdamW is elementwise, so each rank updates its own
    shard and optimizer state is sharded the same way.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # The multi-tensor (foreach) path pays off on CUDA; on CPU the per-tensor loop is as fast.
    cuda = any(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=cuda)


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up from lr/warmup_steps to lr over ceil(warmup_ratio * total) steps, then either
    constant, or cosine decay to min_lr_ratio * lr at the last step (Loshchilov & Hutter, SGDR 2017).
    """
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _local_grad(p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the local gradient tensor, whether it is a shard whose square-sum must be summed over ranks)."""
    g = p.grad
    if isinstance(g, DTensor):
        sharded = not all(isinstance(pl, Replicate) for pl in g.placements)
        return g.to_local(), sharded
    return g, False


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of all gradients (fp32): sqrt(sum over ranks of local shards' square sums).

    FSDP2 shards are disjoint (Shard(0)), so summing the local square sums over ranks counts every
    element exactly once; replicated or plain tensors are counted once, not world_size times.
    """
    sharded_sq, replicated_sq, mesh_group, device = None, None, None, None
    for p in parameters:
        if p.grad is None:
            continue
        g, sharded = _local_grad(p)
        sq = g.detach().float().pow(2).sum()
        device = sq.device
        if sharded:
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
            mesh_group = p.grad.device_mesh.get_group()
        else:
            replicated_sq = sq if replicated_sq is None else replicated_sq + sq
    if device is None:
        return torch.zeros(())
    total = torch.zeros((), device=device)
    if sharded_sq is not None:
        if dist.get_world_size(mesh_group) > 1:
            dist.all_reduce(sharded_sq, group=mesh_group)
        total = total + sharded_sq
    if replicated_sq is not None:
        total = total + replicated_sq
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)); return the norm before clipping.

    `max_norm <= 0` only measures. The scale is applied without a host sync (no `if` on a tensor).
    """
    params = [p for p in parameters if p.grad is not None]
    norm = grad_norm(params)
    if max_norm > 0 and params:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            g, _ = _local_grad(p)
            g.mul_(scale.to(g.device, g.dtype))
    return norm
