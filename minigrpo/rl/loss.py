"""One micro-batch's GRPO loss and its diagnostics, as the config asks for them (the math is grpo.py).

`LossTerms.from_config` turns `loss.*` (and rollout.max_staleness, for the sampler correction's
"auto") into the functions and constants of grpo.py once; `micro_batch_loss` applies them. The
sampler ratio pi_old / pi_sampler is computed on every token for the metrics; its weights enter the
loss only when a correction is chosen, so with none the loss is exactly the uncorrected one.
`check_finite` is the step's one host sync of the loss loop: every rank raises the same error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from minigrpo import grpo
from minigrpo.config import LossConfig
from minigrpo.dist import comm_device
from minigrpo.rl.micro_batches import RLMicroBatch

NO_BAD_MICRO_BATCH = torch.iinfo(torch.long).max


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class LossTerms:
    eps_low: float
    eps_high: float
    dual_clip: float
    kl: Callable[[Tensor, Tensor], Tensor]
    max_log_ratio: float
    weigh: Callable | None  # grpo.SAMPLER_CORRECTIONS[...], or None: weights 1 (no correction)
    level: Callable  # grpo.CORRECTION_LEVELS[...]
    correction_low: float
    correction_high: float

    @classmethod
    def from_config(cls, loss: LossConfig, max_staleness: int) -> LossTerms:
        """`loss.sampler_correction` "auto" is none for synchronous runs and, for stale batches, decoupled
        PPO (AReaL) at the token level, TIS at the sequence level."""
        name = loss.sampler_correction
        if name == "auto":
            name = "none" if max_staleness == 0 else ("decoupled" if loss.correction_level == "token" else "tis")
        return cls(loss.eps_low, loss.eps_high, loss.dual_clip, grpo.KL_ESTIMATORS[loss.kl], loss.max_log_ratio,
                   grpo.SAMPLER_CORRECTIONS.get(name), grpo.CORRECTION_LEVELS[loss.correction_level],
                   loss.correction_low, loss.correction_high)


def micro_batch_loss(
    logp: Tensor, mb: RLMicroBatch, aggregate: grpo.Aggregate, beta: float, terms: LossTerms
) -> tuple[Tensor, grpo.LossStats]:
    """(loss, diagnostics) of one micro-batch; `logp` (S, C) is the policy's, with grad."""
    old = mb.old_logp if mb.old_logp is not None else logp.detach()  # strictly on-policy: ratio 1
    correction = grpo.sampler_correction(old, mb.sampler_logp, mb.mask, terms.weigh, terms.level,
                                         low=terms.correction_low, high=terms.correction_high,
                                         max_log_ratio=terms.max_log_ratio)
    clip = dict(eps_low=terms.eps_low, eps_high=terms.eps_high, dual_clip=terms.dual_clip, kl=terms.kl,
                max_log_ratio=terms.max_log_ratio)
    weights = correction.weights if terms.weigh is not None else None
    loss = grpo.grpo_loss(logp, old, mb.adv, mb.mask, aggregate, ref_logp=mb.ref_logp, beta=beta, weights=weights,
                          **clip)
    return loss, grpo.loss_stats(logp, old, mb.adv, mb.mask, ref_logp=mb.ref_logp, correction=correction, **clip)


def first_bad(flag: Tensor, index: int, loss: Tensor) -> Tensor:
    """The first micro-batch index whose loss is not finite, kept on device (-1 while all are)."""
    return torch.where((flag < 0) & ~torch.isfinite(loss), index, flag)


def check_finite(flag: Tensor, step: int, rank: int, world_size: int) -> None:
    """Raise on every rank the same error, naming the first non-finite micro-batch of the lowest rank."""
    code = torch.where(flag >= 0, flag * world_size + rank, NO_BAD_MICRO_BATCH)
    if dist.is_initialized() and world_size > 1:
        code = code.to(comm_device())
        dist.all_reduce(code, op=dist.ReduceOp.MIN)
    code = int(code)
    if code != NO_BAD_MICRO_BATCH:
        micro_batch, bad_rank = divmod(code, world_size)
        raise NonFiniteLossError(f"step {step}: non-finite loss in micro-batch {micro_batch} on rank {bad_rank} "
                                 "(check rewards and log-probs)")
