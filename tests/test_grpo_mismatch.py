"""Sampler-mismatch corrections (grpo.py): TIS, MIS / IcePop, decoupled PPO, in float64.

Hand-worked weights on small cases, the identity when the sampler equals the trainer, the exact
bands of truncation and masking, where gradients flow, and the statistics the trainer logs.
"""

import math

import pytest
import torch

from minigrpo import grpo
from minigrpo.config import ConfigError, LossConfig

LEVELS = list(grpo.CORRECTION_LEVELS)
CORRECTIONS = list(grpo.SAMPLER_CORRECTIONS)


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def logs(*values: float) -> torch.Tensor:
    return torch.tensor([math.log(v) for v in values])


def correction(old, sampler, mask, name, level="token", low=0.0, high=2.0):
    return grpo.sampler_correction(old, sampler, mask, grpo.SAMPLER_CORRECTIONS[name], grpo.CORRECTION_LEVELS[level],
                                   low=low, high=high)


def on_policy_batch(seed: int = 0, B: int = 4, T: int = 6):
    """logp (requires grad), advantages, a ragged mask, and sampler log-probs near the trainer's."""
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    adv = grpo.token_advantages(torch.randn(B, generator=g), torch.ones(B, T))
    lengths = torch.tensor([T, T - 2, 1, T - 1])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    adv = adv * mask
    sampler = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    return logp, adv, mask, sampler


# ----------------------------------------------------------------------------- hand-worked weights


def test_tis_token_hand_worked():
    old = logs(0.5, 1.0, 3.0)[None]  # pi_old
    sampler = torch.zeros(1, 3)  # mu = 1: rho = pi_old
    c = correction(old, sampler, torch.ones(1, 3), "tis", high=2.0)
    torch.testing.assert_close(c.ratio, torch.tensor([[0.5, 1.0, 3.0]]))
    torch.testing.assert_close(c.weights, torch.tensor([[0.5, 1.0, 2.0]]))
    assert c.truncated.tolist() == [[False, False, True]] and not c.masked.any()


def test_tis_sequence_hand_worked():
    # sequence 0: rho = 2 * 2 = 4 -> min(4, 2) = 2 on both tokens; sequence 1: 0.5 * 1.5 = 0.75 (one token padded)
    old = torch.stack([logs(2.0, 2.0, 1.0), logs(0.5, 1.5, 7.0)])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    c = correction(old, torch.zeros(2, 3), mask, "tis", level="sequence", high=2.0)
    torch.testing.assert_close(c.ratio, torch.tensor([[4.0, 4.0, 0.0], [0.75, 0.75, 0.0]]))
    torch.testing.assert_close(c.weights, torch.tensor([[2.0, 2.0, 0.0], [0.75, 0.75, 0.0]]))
    # the token-level ratio is kept for the sampler-gap metric
    torch.testing.assert_close(c.token_ratio, torch.tensor([[2.0, 2.0, 0.0], [0.5, 1.5, 0.0]]))


def test_mis_token_band_is_closed():
    rho = [0.4, 0.5, 1.0, 2.0, 2.5]
    c = correction(logs(*rho)[None], torch.zeros(1, 5), torch.ones(1, 5), "mis", low=0.5, high=2.0)
    torch.testing.assert_close(c.weights, torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0]]))
    assert c.masked.tolist() == [[True, False, False, False, True]] and not c.truncated.any()


def test_mis_sequence_drops_whole_completions():
    # rho_0 = 3 * 1 = 3 (outside [0.5, 2]); rho_1 = 1.5 * 0.8 = 1.2 (inside); rho_2 = 0.5 * 0.5 = 0.25 (outside)
    old = torch.stack([logs(3.0, 1.0), logs(1.5, 0.8), logs(0.5, 0.5)])
    c = correction(old, torch.zeros(3, 2), torch.ones(3, 2), "mis", level="sequence", low=0.5, high=2.0)
    torch.testing.assert_close(c.weights, torch.tensor([[0.0, 0.0], [1.2, 1.2], [0.0, 0.0]]))
    assert c.masked.sum() == 4


def test_decoupled_drops_tokens_above_the_cap_only():
    rho = [0.1, 1.5, 2.0, 3.0]
    c = correction(logs(*rho)[None], torch.zeros(1, 4), torch.ones(1, 4), "decoupled", low=0.9, high=2.0)
    # no lower end (AReaL's behav_imp_weight_cap filters the high side only); `low` is ignored
    torch.testing.assert_close(c.weights, torch.tensor([[0.1, 1.5, 2.0, 0.0]]))


def test_decoupled_ppo_loss_hand_worked():
    """A stale batch reused for a second update: u = pi_theta / pi_prox is clipped, w = pi_prox / mu weights it.

    AReaL: loss_t = w_t * -min(u_t A, clip(u_t, 1 - eps, 1 + eps) A), token-mean."""
    logp = logs(1.5, 0.9, 0.5)[None].requires_grad_()  # pi_theta
    prox = torch.zeros(1, 3)  # pi_prox = 1: u = pi_theta
    sampler = -logs(0.8, 1.0, 4.0)[None]  # mu = 1 / rho: rho = (0.8, 1.0, 4.0)
    adv, mask = torch.tensor([[1.0, -1.0, 1.0]]), torch.ones(1, 3)
    c = correction(prox, sampler, mask, "decoupled", high=2.0)
    loss = grpo.grpo_loss(logp, prox, adv, mask, grpo.AGGREGATIONS["token_mean"](grpo.StepCounts(3, 1, 1, 3)),
                          eps_low=0.2, eps_high=0.2, weights=c.weights)
    # token 0: u = 1.5, A > 0 -> clipped at 1.2, w = 0.8; token 1: u = 0.9, A < 0 -> -min(-0.9, -0.9) = 0.9, w = 1;
    # token 2: rho = 4 above the cap -> dropped
    expected = (0.8 * -1.2 + 1.0 * 0.9 + 0.0) / 3
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    # d/dlogp: token 0 clipped (0), token 1: w * -A * u / 3 = 0.9 / 3, token 2 dropped (0)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.3, 0.0]]))


# ----------------------------------------------------------------------------- identity


VALID = [(n, lv) for n in CORRECTIONS for lv in LEVELS if (n, lv) != ("decoupled", "sequence")]  # as LossConfig


@pytest.mark.parametrize("name,level", VALID)
def test_sampler_equal_to_trainer_is_exactly_the_identity(name, level):
    logp, adv, mask, _ = on_policy_batch()
    ref = logp.detach() - 0.1
    agg = grpo.AGGREGATIONS["seq_mean_token_mean"](grpo.StepCounts(int(mask.sum()), 4, 1, 6))
    c = correction(logp.detach(), logp.detach(), mask, name, level, low=0.5, high=2.0)
    assert torch.equal(c.weights, mask) and torch.equal(c.ratio, mask)
    plain = grpo.grpo_loss(logp, logp.detach(), adv, mask, agg, ref_logp=ref, beta=0.1)
    (grad_plain,) = torch.autograd.grad(plain, logp)
    corrected = grpo.grpo_loss(logp, logp.detach(), adv, mask, agg, ref_logp=ref, beta=0.1, weights=c.weights)
    (grad_corrected,) = torch.autograd.grad(corrected, logp)
    assert torch.equal(plain, corrected) and torch.equal(grad_plain, grad_corrected)


def test_no_weigh_function_gives_unit_weights_and_the_ratios():
    logp, _, mask, sampler = on_policy_batch()
    c = grpo.sampler_correction(logp.detach(), sampler, mask)
    assert torch.equal(c.weights, mask) and not c.truncated.any() and not c.masked.any()
    torch.testing.assert_close(c.ratio, torch.exp(logp.detach() - sampler) * mask)


def test_padding_garbage_never_reaches_the_weights():
    logp, adv, mask, sampler = on_policy_batch()
    sampler = torch.where(mask.bool(), sampler, torch.full_like(sampler, -torch.inf))
    for name in CORRECTIONS:
        for level in LEVELS:
            c = correction(logp.detach(), sampler, mask, name, level)
            assert torch.isfinite(c.weights).all() and torch.equal(c.weights * (1 - mask), torch.zeros_like(mask))


# ----------------------------------------------------------------------------- bands and gradients


@pytest.mark.parametrize("name", CORRECTIONS)
def test_truncation_and_masking_act_exactly_on_their_bands(name):
    rho = torch.tensor([0.25, 0.49, 0.5, 0.51, 0.99, 1.0, 1.01, 1.99, 2.0, 2.01, 5.0, 40.0])
    old = torch.log(rho)[None]
    low, high = 0.5, 2.0
    c = correction(old, torch.zeros_like(old), torch.ones_like(old), name, low=low, high=high)
    w, r = c.weights[0], c.ratio[0]
    torch.testing.assert_close(r, rho)
    inside = (rho >= low) & (rho <= high)
    if name == "tis":
        torch.testing.assert_close(w, torch.minimum(rho, torch.tensor(high)))
        assert torch.equal(c.truncated[0], rho > high) and not c.masked.any()
    elif name == "mis":
        torch.testing.assert_close(w, torch.where(inside, rho, 0.0))
        assert torch.equal(c.masked[0], ~inside) and not c.truncated.any()
    else:
        torch.testing.assert_close(w, torch.where(rho <= high, rho, 0.0))
        assert torch.equal(c.masked[0], rho > high) and not c.truncated.any()
    assert torch.equal(w[~(c.masked[0] | c.truncated[0])], rho[~(c.masked[0] | c.truncated[0])])  # untouched: exact


@pytest.mark.parametrize("name", CORRECTIONS)
@pytest.mark.parametrize("level", LEVELS)
def test_gradient_is_the_weighted_policy_gradient_and_skips_the_weights(name, level):
    """On-policy: d loss / d logp_t = -w_t A_t / N; the weight is a constant (stop-gradient): nothing
    flows into the sampler's or the proximal log-probs, and a dropped token has exactly zero gradient."""
    logp, adv, mask, sampler = on_policy_batch(seed=3)
    sampler.requires_grad_()
    old = logp.detach().clone().requires_grad_()  # a proximal policy that (wrongly) carries grad
    n = int(mask.sum())
    c = correction(old, sampler, mask, name, level, low=0.8, high=1.2)
    assert not c.weights.requires_grad
    loss = grpo.grpo_loss(logp, logp.detach(), adv, mask, grpo.AGGREGATIONS["token_mean"](grpo.StepCounts(n, 4, 1, 6)),
                          eps_low=10.0, eps_high=10.0, weights=c.weights)
    loss.backward()
    assert sampler.grad is None and old.grad is None
    torch.testing.assert_close(logp.grad, -c.weights * adv / n)
    assert torch.equal(logp.grad[c.masked], torch.zeros(int(c.masked.sum())))


def test_kl_term_is_not_weighted():
    logp, adv, mask, sampler = on_policy_batch(seed=5)
    ref = logp.detach() - 0.2
    agg = grpo.AGGREGATIONS["token_mean"](grpo.StepCounts(int(mask.sum()), 4, 1, 6))
    c = correction(logp.detach(), sampler, mask, "mis", low=0.9, high=1.1)
    assert c.masked.any()
    zero_adv = torch.zeros_like(adv)
    with_weights = grpo.grpo_loss(logp, logp.detach(), zero_adv, mask, agg, ref_logp=ref, beta=0.3, weights=c.weights)
    without = grpo.grpo_loss(logp, logp.detach(), zero_adv, mask, agg, ref_logp=ref, beta=0.3)
    assert torch.equal(with_weights, without)


def test_corrected_loss_invariant_to_micro_batch_split():
    """Masked tokens keep their place in the normaliser, so micro-batch losses add up to the step's loss."""
    logp, adv, mask, sampler = on_policy_batch(seed=7)
    counts = grpo.StepCounts(int(mask.sum()), 4, 2, 6)
    for aggregation in ("token_mean", "seq_mean_token_mean", "constant"):
        agg = grpo.AGGREGATIONS[aggregation](counts)
        for level in LEVELS:
            c = correction(logp.detach(), sampler, mask, "mis", level, low=0.8, high=1.25)
            whole = grpo.grpo_loss(logp, logp.detach(), adv, mask, agg, weights=c.weights)
            halves = sum(grpo.grpo_loss(logp[s], logp.detach()[s], adv[s], mask[s], agg, weights=c.weights[s])
                         for s in (slice(0, 1), slice(1, 4)))
            torch.testing.assert_close(whole, halves)


# ----------------------------------------------------------------------------- statistics


def test_loss_stats_of_a_correction_hand_worked():
    old = torch.stack([logs(0.5, 1.0, 3.0), logs(1.05, 0.95, 1.0)])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    c = correction(old, torch.zeros(2, 3), mask, "tis", high=2.0)
    s = grpo.loss_stats(old, old, torch.zeros(2, 3), mask, correction=c)
    assert s.is_ratio_sum.item() == pytest.approx(0.5 + 1 + 3 + 1.05 + 0.95)
    assert (s.is_ratio_min.item(), s.is_ratio_max.item()) == pytest.approx((0.5, 3.0))
    assert s.is_weight_sum.item() == pytest.approx(0.5 + 1 + 2 + 1.05 + 0.95)
    assert (s.is_truncated_count.item(), s.is_masked_count.item()) == (1, 0)
    assert s.sampler_outside_count.item() == 2  # 0.5 and 3.0 lie outside [0.9, 1.1]; 1.05 and 0.95 inside
    for field in ("is_ratio_sum", "is_ratio_min", "is_weight_sum", "is_masked_count", "sampler_outside_count"):
        value = getattr(s, field)
        assert value.dim() == 0 and value.dtype == torch.float64 and not value.requires_grad


def test_loss_stats_add_up_over_micro_batches():
    logp, adv, mask, sampler = on_policy_batch(seed=11)
    c = correction(logp.detach(), sampler, mask, "mis", "token", low=0.8, high=1.25)
    whole = grpo.loss_stats(logp, logp.detach(), adv, mask, correction=c)
    parts = []
    for s in (slice(0, 2), slice(2, 4)):
        part = grpo.SamplerCorrection(c.weights[s], c.ratio[s], c.token_ratio[s], c.truncated[s], c.masked[s])
        parts.append(grpo.loss_stats(logp[s], logp.detach()[s], adv[s], mask[s], correction=part))
    summed = parts[0] + parts[1]
    for name in grpo.LossStats.__slots__:
        torch.testing.assert_close(getattr(summed, name), getattr(whole, name), msg=name)


def test_loss_stats_without_a_correction_are_neutral_under_addition():
    logp, adv, mask, sampler = on_policy_batch(seed=13)
    c = correction(logp.detach(), sampler, mask, "tis", high=1.1)
    with_c = grpo.loss_stats(logp, logp.detach(), adv, mask, correction=c)
    without = grpo.loss_stats(logp, logp.detach(), adv, mask)
    assert without.is_ratio_min.item() == math.inf and without.is_ratio_max.item() == -math.inf
    total = with_c + without
    for name in (n for n in grpo.LossStats.__slots__ if n.startswith(("is_", "sampler_"))):
        torch.testing.assert_close(getattr(total, name), getattr(with_c, name), msg=name)


# ----------------------------------------------------------------------------- config


def test_loss_config_sampler_correction_options():
    for name in ("none", *CORRECTIONS):
        LossConfig(sampler_correction=name)
    LossConfig(sampler_correction="mis", correction_level="sequence", correction_low=0.5, correction_high=5.0)
    for bad, key in ((dict(sampler_correction="vtrace"), "sampler_correction"),
                     (dict(correction_level="geometric"), "correction_level"),
                     (dict(correction_low=1.5), "correction_low"),
                     (dict(correction_high=0.9), "correction_high"),
                     (dict(sampler_correction="decoupled", correction_level="sequence"), "correction_level")):
        with pytest.raises(ConfigError, match=key):
            LossConfig(**bad)
