"""The GRPO math, one function per equation. Imports only torch.

Notation (shapes in comments): P prompts, G samples per prompt, B = P * G completions, T completion
tokens (padded). `logp`, `old_logp`, `ref_logp` are log-probs of the sampled tokens under the current
policy, the policy that generated them and the frozen reference; `mask` is 1 on real completion
tokens; `adv` is the advantage.

    advantages        GRPO   A_i = (r_i - mean(r)) / (std(r) + eps)           grpo_advantages
                      Dr.GRPO A_i = r_i - mean(r)                             drgrpo_advantages
                      RLOO   A_i = r_i - mean_{j != i} r_j                    rloo_advantages
    ratio             rho_t = exp(clamp(logp_t - old_logp_t, -c, c))          importance_ratio
    surrogate         l_t = -min(rho_t A, clip(rho_t, 1-eps_low, 1+eps_high) A)  clipped_surrogate
                      dual-clip (A < 0): l_t = min(l_t, -c_dual A)
    KL to reference   k1, k2, k3 (Schulman 2020)                              kl_k1 / kl_k2 / kl_k3
    per-token loss    l_t + beta * k_t
    aggregation       seq-mean-token-mean (GRPO)                              seq_mean_token_mean
                      sum_t l_t / N, N = a normaliser given by the caller     token_sum_over
                        DAPO token-mean: N = completion tokens in the whole step (all ranks)
                        Dr. GRPO:        N = constant, B * L_max
                        DRG-Sapphire:    N = completion tokens of the local micro-batch
    beta schedules    constant; cosine  beta_t = beta * (1 + cos(pi t / T)) / 2   constant_beta / cosine_beta
    sampler mismatch  rho = pi_old / mu (mu: the rollout engine), token or sequence level  sampler_correction
                      TIS  w = min(rho, C)                                     truncated_is_weights
                      MIS / IcePop  w = rho on [low, high], else 0              masked_is_weights
                      decoupled PPO (AReaL)  w = pi_prox / pi_behav, 0 above the cap  decoupled_is_weights
    composed          grpo_loss(...) -> loss; loss_stats(...) -> LossStats (sums, added over micro-batches)

Each variant family has one registry, the only place its names live (the config validates against
them): ADVANTAGES, KL_ESTIMATORS, BETA_SCHEDULES, AGGREGATIONS (name -> normaliser factory),
SAMPLER_CORRECTIONS and CORRECTION_LEVELS.

The loss aggregations are written so that summing `grpo_loss` over any split of the step's
completions into micro-batches (and ranks) gives the loss of the whole step, provided the caller
passes the step-global normaliser (token count or number of sequences). See docs/MATH.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- advantages


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G] with G >= 2 samples per prompt, got shape {tuple(rewards.shape)}")


def _zero_constant_groups(rewards: Tensor, adv: Tensor) -> Tensor:
    """A group whose rewards are all equal carries no signal: make its advantage exactly 0.

    Without this, r - mean(r) is a rounding residue (mean([0.7] * 3) != 0.7 in floating point),
    which GRPO's division by std + eps would turn into a spurious gradient.
    """
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # (P, 1)
    return torch.where(constant, torch.zeros_like(adv), adv)


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """GRPO: A_i = (r_i - mean_j r_j) / (std_j r_j + eps), std unbiased (G - 1).

    Shao et al. 2024, "DeepSeekMath", eq. (3) (outcome supervision); unbiased std as in TRL.
    A group whose rewards are all equal gets A = 0 exactly (as in every estimator here).
    """
    _check_groups(rewards)
    mean = rewards.mean(dim=1, keepdim=True)  # (P, 1)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)  # (P, 1)
    return _zero_constant_groups(rewards, (rewards - mean) / (std + eps))  # (P, G)


def drgrpo_advantages(rewards: Tensor) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_j r_j (no division by the group std).

    Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective", sec. 3.2.
    """
    _check_groups(rewards)
    return _zero_constant_groups(rewards, rewards - rewards.mean(dim=1, keepdim=True))  # (P, G)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO: A_i = r_i - 1/(G-1) sum_{j != i} r_j  (= G/(G-1) * (r_i - mean)).

    Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!"; Ahmadian et al. 2024.
    """
    _check_groups(rewards)
    G = rewards.shape[1]
    leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)  # (P, G)
    return _zero_constant_groups(rewards, rewards - leave_one_out_mean)


ADVANTAGES: dict[str, Callable[[Tensor], Tensor]] = {
    "grpo": grpo_advantages,
    "drgrpo": drgrpo_advantages,
    "rloo": rloo_advantages,
}


def token_advantages(adv: Tensor, mask: Tensor) -> Tensor:
    """Broadcast one advantage per completion to its tokens: A_{i,t} = A_i on real tokens, 0 on padding."""
    return adv.reshape(-1, 1).to(mask.dtype) * mask  # (B, T)


# ----------------------------------------------------------------------------- ratio and surrogate


def importance_ratio(logp: Tensor, old_logp: Tensor, max_log_ratio: float = 20.0) -> Tensor:
    """rho_t = pi_theta(o_t) / pi_old(o_t) = exp(clamp(logp_t - old_logp_t, -c, c)).

    The clamp only guards exp() against overflow; with c = 20 it never binds in healthy runs
    (ratios that far out are clipped by the surrogate anyway).
    """
    return torch.exp(torch.clamp(logp - old_logp, -max_log_ratio, max_log_ratio))


def clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float = 0.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped surrogate loss, clip-higher bounds, optional dual clip.

        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)
    Schulman et al. 2017 (PPO); separate eps_low / eps_high ("clip-higher") from Yu et al. 2025 (DAPO).
    Dual clip (Ye et al. 2020, "Mastering Complex Control in MOBA Games", c > 1): for A_t < 0,
        l_t = min(l_t, -c A_t)
    so a huge ratio on a negative-advantage token cannot make the loss unbounded.

    Zero-gradient (clipped) regions: A > 0 and rho > 1 + eps_high ("high"); A < 0 and
    rho < 1 - eps_low ("low"); A < 0 and rho > c ("dual"). Returns (loss (B, T), masks of each region).
    """
    unclipped = ratio * adv  # (B, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # (B, T)
    loss = -torch.minimum(unclipped, clipped)
    regions = {
        "clip_high": (adv > 0) & (ratio > 1.0 + eps_high),
        "clip_low": (adv < 0) & (ratio < 1.0 - eps_low),
    }
    if dual_clip > 0:
        dual = (adv < 0) & (ratio > dual_clip)
        loss = torch.where(dual, -dual_clip * adv, loss)
        regions["clip_dual"] = dual
    return loss, regions


# ----------------------------------------------------------------------------- KL estimators
# Schulman 2020, "Approximating KL Divergence". With tokens sampled from pi_theta and
# log_r = ref_logp - logp, each k is an estimate of KL(pi_theta || pi_ref). Used as a loss term,
# their gradients differ (on-policy, gradient through logp only):
#   k1: grad = grad logp            -> expectation 0: no pull towards the reference at all
#   k2: grad = (logp - ref) grad logp -> expectation = grad KL(pi_theta || pi_ref) (reverse KL)
#   k3: grad = (1 - r) grad logp    -> expectation = grad KL(pi_ref || pi_theta) (forward KL)
# (Tang & Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL".)
# k3 is the GRPO default (DeepSeekMath eq. 4; the DRG-Sapphire runs).


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = -log r = logp - ref_logp. Unbiased for KL, high variance, can be negative."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log r)^2 / 2. Biased, low variance, >= 0."""
    return 0.5 * (ref_logp - logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor, max_log_ratio: float = 20.0) -> Tensor:
    """k3 = r - 1 - log r, r = pi_ref / pi_theta. Unbiased for KL, >= 0, 0 iff the policies agree."""
    log_r = torch.clamp(ref_logp - logp, -max_log_ratio, max_log_ratio)
    return torch.exp(log_r) - 1.0 - log_r


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}

# ----------------------------------------------------------------------------- aggregation
# Each maps per-token losses (B, T) and mask (B, T) to a scalar. The normaliser is an argument:
# passing the step-global value makes the sum over micro-batches equal the loss of the whole step.


def token_sum_over(per_token: Tensor, mask: Tensor, normaliser: float | Tensor) -> Tensor:
    """L = sum_{i,t} mask_{i,t} l_{i,t} / N.

    N = completion tokens in the whole step over all ranks -> DAPO token-mean (Yu et al. 2025, eq. 8);
    N = B * L_max, a constant -> Dr. GRPO (Liu et al. 2025, eq. 3: no length normalisation);
    N = mask.sum() of the local micro-batch -> the DRG-Sapphire/TRL-0.15 normaliser (`drg_compat`).
    """
    return (per_token * mask).sum() / normaliser


def seq_mean_token_mean(per_token: Tensor, mask: Tensor, num_sequences: float | Tensor) -> Tensor:
    """L = (1/B) sum_i (1/|o_i|) sum_t l_{i,t}: mean over tokens of a completion, then over completions.

    Shao et al. 2024 (DeepSeekMath) eq. (3). B is the number of completions in the whole step, so
    micro-batch losses add up to the step's loss. Empty completions contribute 0.
    """
    per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B,)
    return per_seq.sum() / num_sequences


Aggregate = Callable[[Tensor, Tensor], Tensor]  # (per_token (B, T), mask (B, T)) -> scalar


@dataclass(frozen=True, slots=True)
class StepCounts:
    """Sizes of one optimizer step over all ranks: what the normalisers divide by."""

    tokens: int  # scored completion tokens
    sequences: int  # completions
    micro_batches: int  # micro-batches holding samples, summed over ranks
    max_completion_tokens: int  # L_max of the sampler


AGGREGATIONS: dict[str, Callable[[StepCounts], Aggregate]] = {
    # DAPO: every completion token of the step weighs the same
    "token_mean": lambda n: lambda x, m: token_sum_over(x, m, max(n.tokens, 1)),
    # GRPO: every completion weighs the same
    "seq_mean_token_mean": lambda n: lambda x, m: seq_mean_token_mean(x, m, max(n.sequences, 1)),
    # Dr. GRPO: B * L_max
    "constant": lambda n: lambda x, m: token_sum_over(x, m, max(n.sequences, 1) * n.max_completion_tokens),
    # DRG-Sapphire / TRL 0.15: token-mean per micro-batch, averaged over micro-batches and ranks
    "drg_compat": lambda n: lambda x, m: token_sum_over(x, m, m.sum().clamp(min=1) * max(n.micro_batches, 1)),
}


# ----------------------------------------------------------------------------- beta schedules


def constant_beta(beta: float, step: int, total_steps: int) -> float:
    """beta_t = beta."""
    return beta


def cosine_beta(beta: float, step: int, total_steps: int) -> float:
    """beta_t = beta * (1 + cos(pi * t / T)) / 2: beta at t = 0, 0 at t = T (DRG-Sapphire "KL decay")."""
    t = min(max(step, 0), total_steps)
    return beta * 0.5 * (1.0 + math.cos(math.pi * t / max(total_steps, 1)))


BETA_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {"constant": constant_beta, "cosine": cosine_beta}

# ----------------------------------------------------------------------------- sampler-mismatch correction
# The engine that sampled a completion (mu: vLLM in bf16, or a server whose weights are k versions old)
# is not the policy the trainer scores it with (pi_old: the trainer's weights before this update, the
# "proximal" policy). A correction weights token t's surrogate by a detached w_t, a function of
#     rho_t = pi_old(o_t) / mu(o_t)                              token level
#     rho_i = prod_t rho_t, broadcast over the tokens of o_i     sequence level
# and the loss becomes aggregate(w_t l_t + beta k_t): the KL term is not weighted. Each has the
# decoupled-PPO form E_mu[w_t min(u_t A_t, clip(u_t) A_t)] with u_t = pi_theta / pi_old (Hilton et al.
# 2021; Fu et al. 2025): the surrogate's ratio is against the trainer's own pi_old, never against mu.
# With mu == pi_old every rho is exactly 1 and so is every w (each band contains 1).
# A masked token contributes 0 and keeps its place in the normaliser (as in IcePop and AReaL), so the
# normaliser stays the step-global count and micro-batch losses still add up to the step's loss.

SAMPLER_RATIO_BAND = (0.9, 1.1)  # tokens with rho_t outside it are counted (a sampler-health metric)


def token_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho_t = log pi_old(o_t) - log mu(o_t) on real tokens, 0 on padding (detached)."""
    diff = (old_logp - sampler_logp).detach()  # (B, T)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff))


def sequence_log_ratio(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor) -> Tensor:
    """log rho_i = sum_t log rho_t over completion i, broadcast to its tokens (0 on padding).

    The sequence-level ratio of Yao et al. 2025 ("seq-TIS") and Liu, Li et al. 2025 ("seq-MIS").
    """
    per_seq = token_log_ratio(old_logp, sampler_logp, mask).sum(dim=1, keepdim=True)  # (B, 1)
    return torch.where(mask.bool(), per_seq, torch.zeros_like(per_seq))  # (B, T)


CORRECTION_LEVELS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


def truncated_is_weights(ratio: Tensor, low: float, high: float) -> Tensor:
    """TIS: w = min(rho, C), C = high; `low` is unused.

    Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (truncated
    importance sampling of the policy-gradient term by pi_trainer / pi_sampler; C = 2 in verl's TIS).
    """
    return torch.clamp(ratio, max=high)


def masked_is_weights(ratio: Tensor, low: float, high: float) -> Tensor:
    """MIS / IcePop: w = rho where low <= rho <= high, else 0 (the token or sequence is dropped).

    Ling team 2025, "Small Leak Can Sink a Great Ship: Boost RL Training on MoE with IcePop" (token level,
    M(k) = k on [alpha, beta], alpha = 0.5, beta = 5); at the sequence level Seq-MIS of Liu, Li et al. 2025,
    "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference Mismatch".
    """
    return torch.where((ratio >= low) & (ratio <= high), ratio, torch.zeros_like(ratio))


def decoupled_is_weights(ratio: Tensor, low: float, high: float) -> Tensor:
    """Decoupled PPO's behaviour weight: w = pi_prox / pi_behav, 0 where it exceeds the cap (high); `low` unused.

    Fu et al. 2025, "AReaL: A Large-Scale Asynchronous Reinforcement Learning System for Language
    Reasoning", the decoupled objective (proximal policy = the trainer's weights before the update,
    behaviour policy = the sampler, possibly versions behind); tokens above `behav_imp_weight_cap` are
    filtered out. Hilton et al. 2021, "Batch size-invariance for policy optimization", for the decoupling.
    """
    return masked_is_weights(ratio, 0.0, high)


# "none" (the config's default) is no entry here: w = 1, the estimator that ignores the mismatch.
SAMPLER_CORRECTIONS: dict[str, Callable[[Tensor, float, float], Tensor]] = {
    "tis": truncated_is_weights,
    "mis": masked_is_weights,
    "decoupled": decoupled_is_weights,
}


@dataclass(frozen=True, slots=True)
class SamplerCorrection:
    """A sampler correction evaluated on one micro-batch; every tensor (B, T), detached, 0 on padding."""

    weights: Tensor  # w_t, for grpo_loss(weights=...); 1 on real tokens without a correction
    ratio: Tensor  # rho at the correction's level, before truncation or masking
    token_ratio: Tensor  # rho_t at the token level, whatever the correction's level (the sampler gap)
    truncated: Tensor  # bool: a real token whose weight was capped (0 < w != rho)
    masked: Tensor  # bool: a real token dropped (w = 0)


def sampler_correction(
    old_logp: Tensor,  # (B, T) pi_old: the trainer's weights before this update
    sampler_logp: Tensor,  # (B, T) mu: the rollout engine's log-probs of the sampled tokens
    mask: Tensor,  # (B, T) 1 on completion tokens
    weigh: Callable[[Tensor, float, float], Tensor] | None = None,  # e.g. SAMPLER_CORRECTIONS["tis"]; None: w = 1
    level: Callable[[Tensor, Tensor, Tensor], Tensor] = token_log_ratio,  # e.g. CORRECTION_LEVELS["sequence"]
    *,
    low: float = 0.0,
    high: float = 2.0,
    max_log_ratio: float = 20.0,
) -> SamplerCorrection:
    """w = weigh(exp(clamp(log rho, -c, c)), low, high) with log rho from `level`; w = 0 on padding.

    The clamp only guards exp(): a sequence ratio of e^20 is far outside every band and cap. Without
    `weigh` the weights are 1 and only the ratios are of use (the sampler-gap diagnostics).
    """
    real = mask.bool()
    zero = torch.zeros((), dtype=old_logp.dtype, device=old_logp.device)
    token_ratio = torch.where(real, torch.exp(torch.clamp(token_log_ratio(old_logp, sampler_logp, mask),
                                                          -max_log_ratio, max_log_ratio)), zero)  # (B, T)
    if level is token_log_ratio:
        ratio = token_ratio
    else:
        log_ratio = torch.clamp(level(old_logp, sampler_logp, mask), -max_log_ratio, max_log_ratio)
        ratio = torch.where(real, torch.exp(log_ratio), zero)  # (B, T)
    if weigh is None:
        weights = real.to(old_logp.dtype)  # (B, T)
        return SamplerCorrection(weights, ratio, token_ratio, torch.zeros_like(real), torch.zeros_like(real))
    weights = torch.where(real, weigh(ratio, low, high), zero).detach()  # (B, T)
    masked = real & (weights == 0)
    return SamplerCorrection(weights, ratio, token_ratio, real & ~masked & (weights != ratio), masked)


# ----------------------------------------------------------------------------- the composed loss


def grpo_loss(
    logp: Tensor,  # (B, T) current policy, requires grad
    old_logp: Tensor,  # (B, T) behaviour policy; logp.detach() when strictly on-policy
    adv: Tensor,  # (B, T) per-token advantages
    mask: Tensor,  # (B, T) 1 on completion tokens
    aggregate: Aggregate,  # e.g. AGGREGATIONS["token_mean"](counts)
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    ref_logp: Tensor | None = None,  # (B, T) reference policy; needed when beta > 0
    beta: float = 0.0,
    kl: Callable[[Tensor, Tensor], Tensor] = kl_k3,
    max_log_ratio: float = 20.0,
    weights: Tensor | None = None,  # (B, T) sampler correction w_t (SamplerCorrection.weights); None = 1
) -> Tensor:
    """loss = aggregate(w_t l_t + beta * k(logp_t, ref_logp_t)), with l_t the clipped surrogate.

    w_t (detached: no gradient flows through it) weights the policy-gradient term only; see
    `sampler_correction`. Without `weights` the loss is the uncorrected one.
    """
    mask = mask.to(logp.dtype)
    ratio = importance_ratio(logp, old_logp, max_log_ratio)  # (B, T)
    per_token, _ = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip)
    if weights is not None:
        per_token = weights.detach().to(per_token.dtype) * per_token
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        per_token = per_token + beta * kl(logp, ref_logp)
    return aggregate(per_token, mask)


@dataclass(slots=True)
class LossStats:
    """Sums behind the loss's diagnostics over the masked tokens of one or more calls (0-dim tensors,
    detached, on the loss's device). `a + b` combines micro-batches without a host sync; means are
    taken once per step, after the ranks' sums are reduced."""

    tokens: Tensor
    ratio_sum: Tensor
    ratio_min: Tensor  # +inf when no token is scored
    ratio_max: Tensor  # -inf when no token is scored
    clip_low_count: Tensor
    clip_high_count: Tensor
    clip_dual_count: Tensor
    kl_sum: Tensor  # 0 without a reference
    # the sampler correction (all 0, and +-inf for min / max, when none is given)
    is_ratio_sum: Tensor  # rho at the correction's level, before truncation or masking
    is_ratio_min: Tensor
    is_ratio_max: Tensor
    is_weight_sum: Tensor  # w
    is_truncated_count: Tensor  # tokens whose weight was capped (0 < w != rho)
    is_masked_count: Tensor  # tokens dropped (w = 0)
    sampler_outside_count: Tensor  # tokens with rho_t outside SAMPLER_RATIO_BAND, at the token level

    def __add__(self, other: LossStats) -> LossStats:
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name.endswith("_min"):
                merged[f.name] = torch.minimum(a, b)
            else:
                merged[f.name] = torch.maximum(a, b) if f.name.endswith("_max") else a + b
        return LossStats(**merged)


@torch.no_grad()
def loss_stats(
    logp: Tensor,  # (B, T) as passed to grpo_loss
    old_logp: Tensor,  # (B, T)
    adv: Tensor,  # (B, T)
    mask: Tensor,  # (B, T)
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float = 0.0,
    ref_logp: Tensor | None = None,
    kl: Callable[[Tensor, Tensor], Tensor] = kl_k3,
    max_log_ratio: float = 20.0,
    correction: SamplerCorrection | None = None,  # as passed to grpo_loss(weights=correction.weights)
) -> LossStats:
    """What `grpo_loss` did on the masked tokens: ratio sum / min / max, tokens in each clipped region
    (the regions of `clipped_surrogate`), the summed KL estimate when a reference is given, and the
    sampler correction's ratio sum / min / max, weight sum and truncated / masked / out-of-band counts.
    Sums are float64, so adding many micro-batches loses nothing."""
    real = mask.bool()
    ratio = importance_ratio(logp, old_logp, max_log_ratio)  # (B, T)
    _, regions = clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip)
    count = lambda region: (region & real).sum().double()  # noqa: E731
    zero = torch.zeros((), dtype=torch.float64, device=ratio.device)
    return LossStats(
        tokens=count(real),
        ratio_sum=(ratio * mask).sum().double(),
        ratio_min=torch.where(real, ratio, torch.inf).min().double(),
        ratio_max=torch.where(real, ratio, -torch.inf).max().double(),
        clip_low_count=count(regions["clip_low"]),
        clip_high_count=count(regions["clip_high"]),
        clip_dual_count=count(regions["clip_dual"]) if "clip_dual" in regions else zero,
        kl_sum=(kl(logp, ref_logp) * mask).sum().double() if ref_logp is not None else zero,
        **_correction_stats(correction, real),
    )


def _correction_stats(correction: SamplerCorrection | None, real: Tensor) -> dict[str, Tensor]:
    """The sampler-correction fields of LossStats over the real tokens (0 and +-inf without a correction)."""
    zero = torch.zeros((), dtype=torch.float64, device=real.device)
    if correction is None:
        inf = torch.full((), torch.inf, dtype=torch.float64, device=real.device)
        names = ("is_ratio_sum", "is_weight_sum", "is_truncated_count", "is_masked_count", "sampler_outside_count")
        return {"is_ratio_min": inf, "is_ratio_max": -inf, **dict.fromkeys(names, zero)}
    rho, token = correction.ratio, correction.token_ratio
    low, high = SAMPLER_RATIO_BAND
    count = lambda region: (region & real).sum().double()  # noqa: E731
    return {
        "is_ratio_sum": torch.where(real, rho, zero).sum().double(),
        "is_ratio_min": torch.where(real, rho, torch.inf).min().double(),
        "is_ratio_max": torch.where(real, rho, -torch.inf).max().double(),
        "is_weight_sum": torch.where(real, correction.weights, zero).sum().double(),
        "is_truncated_count": count(correction.truncated),
        "is_masked_count": count(correction.masked),
        "sampler_outside_count": count((token < low) | (token > high)),
    }


def drg_sapphire_per_token_loss(logp: Tensor, adv: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """The reference DRG-Sapphire (TRL 0.15.1) per-token loss, written literally:

        -(exp(logp - logp.detach()) * A - beta * k3)

    Strictly on-policy (ratio 1, no clipping). Summed over the local micro-batch's tokens and divided by
    their count it is `grpo_loss(..., old_logp=logp.detach(), kl=kl_k3, aggregate=token_sum_over(local count))`.
    Not on the trainer's path: a reference that tests/test_grpo.py uses to show the two agree.
    """
    return -(torch.exp(logp - logp.detach()) * adv - beta * kl_k3(logp, ref_logp))
