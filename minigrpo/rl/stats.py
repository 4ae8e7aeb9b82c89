"""Statistics of one GRPO step, summed over micro-batches and ranks before they become means.

Every mean is (sum over all ranks) / (count over all ranks), never a mean of per-rank means, so the
logged numbers do not depend on how the step was split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from minigrpo.dist import all_gather_object, all_reduce_sum, comm_device

SUM_KEYS = ("loss", "tokens", "ratio_sum", "kl_sum", "clip_low_count", "clip_high_count", "clip_dual_count", "entropy_sum", "sampler_diff_sum", "trained_tokens")


class StepStats:
    def __init__(self):
        self.sums = {k: 0.0 for k in SUM_KEYS}
        self.ratio_min, self.ratio_max = float("inf"), float("-inf")
        self.grad_norms: list[float] = []
        self.has_kl = False

    def add_loss(self, loss: torch.Tensor, s: dict, entropy: torch.Tensor, logp: torch.Tensor, mb) -> None:
        """Add one micro-batch: its loss, `grpo_loss` statistics, entropy and sampler-vs-trainer gap."""
        mask = mb.loss_mask
        self.sums["loss"] += float(loss)
        for k in ("tokens", "ratio_sum", "clip_low_count", "clip_high_count", "clip_dual_count", "kl_sum"):
            if k in s:
                self.sums[k] += float(s[k])
        self.has_kl |= "kl_sum" in s
        if float(s["tokens"]) > 0:
            self.ratio_min = min(self.ratio_min, float(s["ratio_min"]))
            self.ratio_max = max(self.ratio_max, float(s["ratio_max"]))
        self.sums["entropy_sum"] += float((entropy.float() * mask).sum())
        # |log pi_trainer - log pi_sampler| on the sampled tokens: engine/trainer mismatch (bf16, kernels, stale weights)
        self.sums["sampler_diff_sum"] += float(((logp - mb.token_fields["sampler_logp"]).abs() * mask).sum())
        attn = mb.attention_mask if mb.attention_mask is not None else torch.ones_like(mb.input_ids)
        self.sums["trained_tokens"] += float(attn.sum())

    def reduce(self, groups: list, n_tokens: int, info: dict, over_long: int) -> dict:
        """Global metrics of the step (a collective: every rank calls it)."""
        rewards = [r for g in groups for r in g.rewards]
        lengths = [len(c.token_ids) for g in groups for c in g.completions]
        truncated = [c.finish_reason == "length" for g in groups for c in g.completions]
        # Every rank must reduce a vector of the same length: agree on the component names (a rank left
        # with no groups, e.g. after DAPO filtering, has none of its own).
        component_names = sorted(set().union(*all_gather_object(sorted({k for g in groups for k in g.components}))))
        resampled = "resampled" in info
        names = list(SUM_KEYS) + ["n_rewards", "reward_sum", "reward_sq", "len_sum", "truncated", "zero_var", "groups"]
        local = [self.sums[k] for k in SUM_KEYS] + [
            len(rewards), sum(rewards), sum(r * r for r in rewards), sum(lengths), sum(truncated),
            sum(g.zero_variance for g in groups), len(groups),
        ]  # fmt: skip
        for k in ("groups_generated", "groups_dropped"):
            names.append(k)
            local.append(float(info.get(k, 0)))
        for c in component_names:
            names.append("component_" + c)
            local.append(sum(x for g in groups for x in g.components.get(c, [])))
        if resampled:
            names += ["resample_attempts", "resample_std"]
            local += [sum(g.attempts for g in groups), sum(g.std for g in groups)]
        total = dict(zip(names, all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()))
        extremes = torch.tensor([-self.ratio_min, self.ratio_max, -min(lengths, default=1 << 30), max(lengths, default=0)], dtype=torch.float64, device=comm_device())
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        n, tok = max(total["n_rewards"], 1), max(total["tokens"], 1)
        mean = total["reward_sum"] / n
        m = {
            "loss": total["loss"],
            "reward_mean": mean,
            "reward_std": max(total["reward_sq"] / n - mean * mean, 0.0) ** 0.5,
            "zero_variance_frac": total["zero_var"] / max(total["groups"], 1),
            "groups": int(total["groups"]),
            "completion_len_mean": total["len_sum"] / n,
            "completion_len_min": int(-extremes[2]) if total["n_rewards"] else 0,
            "completion_len_max": int(extremes[3]),
            "truncated_frac": total["truncated"] / n,
            "completion_tokens": n_tokens,
            "completion_tokens_total": total["len_sum"],
            "entropy": total["entropy_sum"] / tok,
            "ratio_mean": total["ratio_sum"] / tok,
            "ratio_min": float(-extremes[0]),
            "ratio_max": float(extremes[1]),
            "clip_low_frac": total["clip_low_count"] / tok,
            "clip_high_frac": total["clip_high_count"] / tok,
            "clip_dual_frac": total["clip_dual_count"] / tok,
            "sampler_logp_diff": total["sampler_diff_sum"] / tok,
            "grad_norm": self.grad_norms[-1] if self.grad_norms else 0.0,
            "trained_tokens_total": total["trained_tokens"],
            "over_long_prompts": over_long,
        }
        if self.has_kl:
            m["kl_mean"] = total["kl_sum"] / tok
        for c in component_names:
            m[f"reward_{c}"] = total["component_" + c] / n
        if "correct" in component_names:
            m["accuracy"] = m["reward_correct"]
        if "groups_dropped" in info:
            m["groups_dropped"] = int(total["groups_dropped"])
        if resampled:  # over the groups trained on
            m["resample_attempts_mean"] = total["resample_attempts"] / max(total["groups"], 1)
            m["resample_final_std_mean"] = total["resample_std"] / max(total["groups"], 1)
        return m
