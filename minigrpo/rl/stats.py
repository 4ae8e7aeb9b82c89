"""Statistics of one GRPO step: summed on device during the loss loop, reduced once at its end.

Every mean is (sum over all ranks) / (count over all ranks), never a mean of per-rank means, so the
logged numbers do not depend on how the step was split. The loss loop only adds device tensors (no
host sync); `reduce` makes one tensor all-gather for every number of the step, plus one object
all-gather for the reward-component names (a rank left with no groups has none of its own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from minigrpo.dist import all_gather_object, comm_device
from minigrpo.grpo import LossStats, StepCounts
from minigrpo.rl.groups import CORRECT, Group, RolloutInfo
from minigrpo.rl.micro_batches import RLMicroBatch


@dataclass(slots=True)
class LoopSums:
    """What the loss loop adds up, per rank: float64 0-dim tensors on the compute device."""

    loss: Tensor
    loss_stats: LossStats | None
    entropy: Tensor
    sampler_diff: Tensor  # sum of |log pi_trainer - log pi_sampler| on scored tokens
    trained_tokens: int  # real tokens through the model, prompts included (a Python count: no sync)


class StepStats:
    def __init__(self, device: torch.device, has_kl: bool):
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.sums = LoopSums(zero, None, zero, zero, 0)
        self.has_kl = has_kl
        self.grad_norm = 0.0  # of the last optimizer step, set by the trainer

    def add(self, loss: Tensor, stats: LossStats, entropy: Tensor, logp: Tensor, mb: RLMicroBatch) -> None:
        """Add one micro-batch (no host sync): its loss, `grpo.loss_stats`, entropy and sampler gap."""
        s, mask = self.sums, mb.mask
        s.loss = s.loss + loss.detach().double()
        s.loss_stats = stats if s.loss_stats is None else s.loss_stats + stats
        s.entropy = s.entropy + (entropy.detach().float() * mask).sum().double()
        # engine/trainer mismatch on the sampled tokens (bf16, kernels, stale weights)
        s.sampler_diff = s.sampler_diff + ((logp.detach() - mb.sampler_logp).abs() * mask).sum().double()
        s.trained_tokens += mb.rows.input_tokens

    def _local_vector(self, groups: list[Group], info: RolloutInfo, components: list[str]) -> tuple[list[str], Tensor]:
        s, ls = self.sums, self.sums.loss_stats
        device = s.loss.device
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        host = {
            "n_rewards": len(rewards),
            "reward_sum": sum(rewards),
            "reward_sq": sum(r * r for r in rewards),
            "len_sum": sum(lengths),
            "truncated": sum(c.finish_reason == "length" for g in groups for c in g.completions),
            "zero_var": sum(g.zero_variance for g in groups),
            "groups": len(groups),
            "groups_generated": info.groups_generated,
            "groups_dropped": info.groups_dropped or 0,
            "resample_attempts": sum(g.attempts for g in groups),
            "resample_std": sum(g.std for g in groups),
            "trained_tokens": s.trained_tokens,
            # extremes, all as maxima: min(x) = -max(-x)
            "neg_len_min": -min(lengths, default=1 << 30),
            "len_max": max(lengths, default=0),
            **{"component_" + c: sum(x for g in groups for x in g.components.get(c, [])) for c in components},
        }
        on_device = {"loss": s.loss, "entropy_sum": s.entropy, "sampler_diff_sum": s.sampler_diff}
        if ls is not None:  # extremes as maxima too: min(x) = -max(-x)
            on_device.update(
                tokens=ls.tokens, ratio_sum=ls.ratio_sum, kl_sum=ls.kl_sum, clip_low=ls.clip_low_count,
                clip_high=ls.clip_high_count, clip_dual=ls.clip_dual_count, neg_ratio_min=-ls.ratio_min,
                ratio_max=ls.ratio_max, is_ratio_sum=ls.is_ratio_sum, neg_is_ratio_min=-ls.is_ratio_min,
                is_ratio_max=ls.is_ratio_max, is_weight_sum=ls.is_weight_sum, is_truncated=ls.is_truncated_count,
                is_masked=ls.is_masked_count, sampler_outside=ls.sampler_outside_count,
            )
        host_values = torch.tensor(list(host.values()), dtype=torch.float64, device=device)
        vector = torch.cat([torch.stack(list(on_device.values())), host_values])
        return list(on_device) + list(host), vector

    def reduce(self, groups: list[Group], counts: StepCounts, info: RolloutInfo, over_long: int) -> dict:
        """Global metrics of the step (a collective: every rank calls it)."""
        components = sorted(set().union(*all_gather_object(sorted({k for g in groups for k in g.components}))))
        names, local = self._local_vector(groups, info, components)
        local = local.to(comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            stacked = torch.stack(parts)  # (world, K)
        else:
            stacked = local[None]
        extreme = {"neg_len_min", "len_max", "neg_ratio_min", "ratio_max", "neg_is_ratio_min", "is_ratio_max"}
        values = [stacked[:, i].max() if n in extreme else stacked[:, i].sum() for i, n in enumerate(names)]
        total = dict(zip(names, torch.stack(values).tolist()))
        total.setdefault("tokens", 0.0)
        return self._metrics(total, counts, info, over_long, components)

    def _metrics(
        self, total: dict, counts: StepCounts, info: RolloutInfo, over_long: int, components: list[str]
    ) -> dict:
        n, tok = max(total["n_rewards"], 1), max(total["tokens"], 1)
        mean = total["reward_sum"] / n
        m = {
            "loss": total["loss"],
            "reward_mean": mean,
            "reward_std": max(total["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
            "zero_variance_frac": total["zero_var"] / max(total["groups"], 1),
            "groups": int(total["groups"]),
            "completion_len_mean": total["len_sum"] / n,
            "completion_len_min": int(-total["neg_len_min"]) if total["n_rewards"] else 0,
            "completion_len_max": int(total["len_max"]),
            "truncated_frac": total["truncated"] / n,
            "completion_tokens": counts.tokens,
            "completion_tokens_total": total["len_sum"],
            "entropy": total["entropy_sum"] / tok,
            "ratio_mean": total.get("ratio_sum", 0.0) / tok,
            "ratio_min": float(-total.get("neg_ratio_min", float("-inf"))),
            "ratio_max": float(total.get("ratio_max", float("-inf"))),
            "clip_low_frac": total.get("clip_low", 0.0) / tok,
            "clip_high_frac": total.get("clip_high", 0.0) / tok,
            "clip_dual_frac": total.get("clip_dual", 0.0) / tok,
            "sampler_logp_diff": total["sampler_diff_sum"] / tok,
            # pi_old / sampler per token: its spread, and the correction's effect (rl/... grpo.sampler_correction)
            "sampler_ratio_outside_frac": total.get("sampler_outside", 0.0) / tok,  # outside [0.9, 1.1]
            "is_ratio_mean": total.get("is_ratio_sum", 0.0) / tok,
            "is_ratio_min": float(-total.get("neg_is_ratio_min", float("-inf"))),
            "is_ratio_max": float(total.get("is_ratio_max", float("-inf"))),
            "is_weight_mean": total.get("is_weight_sum", 0.0) / tok,
            "is_truncated_frac": total.get("is_truncated", 0.0) / tok,
            "is_masked_frac": total.get("is_masked", 0.0) / tok,
            "grad_norm": self.grad_norm,
            "trained_tokens_total": total["trained_tokens"],
            "over_long_prompts": over_long,
        }
        if self.has_kl:
            m["kl_mean"] = total["kl_sum"] / tok
        for c in components:
            m[f"reward_{c}"] = total["component_" + c] / n
        if CORRECT in components:
            m["accuracy"] = m[f"reward_{CORRECT}"]
        if info.groups_dropped is not None:
            m["groups_dropped"] = int(total["groups_dropped"])
        if info.resampled:  # over the groups trained on
            m["resample_attempts_mean"] = total["resample_attempts"] / max(total["groups"], 1)
            m["resample_final_std_mean"] = total["resample_std"] / max(total["groups"], 1)
        return m
