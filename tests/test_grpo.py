"""The GRPO math against hand-worked values, float64 re-computations and invariants."""

import math
import random

import pytest
import torch

from minigrpo import grpo



@pytest.fixture(autouse=True)
def _float64_default():
    """The math is checked in float64; restore the default so other test modules are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


# ----------------------------------------------------------------------------- advantages


def test_grpo_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5; unbiased std = sqrt(4 * 0.25 / 3) = 0.57735...
    expected = torch.tensor([[1, -1, -1, 1]]) * 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(grpo.grpo_advantages(r, eps=0.0), expected)
    # eps sits in the denominator next to the std
    torch.testing.assert_close(grpo.grpo_advantages(r, eps=0.1), torch.tensor([[1, -1, -1, 1]]) * 0.5 / (math.sqrt(1 / 3) + 0.1))


def test_drgrpo_and_rloo_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 0.0, -1.0, 3.0]])
    torch.testing.assert_close(grpo.drgrpo_advantages(r), torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, -2.0, 2.0]]))
    # RLOO, row 0: 1 - (0+0+1)/3 = 2/3, 0 - 2/3; row 1: 2 - 2/3, 0 - 4/3, -1 - 5/3, 3 - 1/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [2 - 2 / 3, -4 / 3, -1 - 5 / 3, 3 - 1 / 3]])
    torch.testing.assert_close(grpo.rloo_advantages(r), expected)


@pytest.mark.parametrize("fn", [grpo.grpo_advantages, grpo.drgrpo_advantages, grpo.rloo_advantages])
def test_constant_reward_group_has_zero_advantage(fn):
    r = torch.tensor([[0.7, 0.7, 0.7], [-2.0, -2.0, -2.0], [1.0, 0.0, 2.0]])
    adv = fn(r)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    assert adv[2].abs().sum() > 0


def test_advantages_need_two_samples_per_group():
    with pytest.raises(ValueError, match="G >= 2"):
        grpo.grpo_advantages(torch.ones(3, 1))


def test_token_advantages_broadcast_and_zero_padding():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(grpo.token_advantages(adv, mask), torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # log r = log(0.25 / 0.5) = -log 2
    torch.testing.assert_close(grpo.kl_k1(logp, ref), torch.tensor([math.log(2)]))
    torch.testing.assert_close(grpo.kl_k2(logp, ref), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(grpo.kl_k3(logp, ref), torch.tensor([0.5 - 1 + math.log(2)]))


def test_k3_nonnegative_and_zero_when_policies_match():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(1000, generator=g) * 5
    ref = -torch.rand(1000, generator=g) * 5
    assert (grpo.kl_k3(logp, ref) >= 0).all()
    assert (grpo.kl_k2(logp, ref) >= 0).all()
    assert (grpo.kl_k1(logp, ref) < 0).any()  # k1 is not a per-sample bound
    assert torch.equal(grpo.kl_k3(logp, logp), torch.zeros(1000))


def test_kl_gradients_as_documented():
    """d k / d logp: k1 -> 1, k2 -> (logp - ref), k3 -> 1 - exp(ref - logp)."""
    logp = torch.tensor([-1.0, -2.0, -0.3], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.3])
    for fn, expected in [
        (grpo.kl_k1, torch.ones(3)),
        (grpo.kl_k2, logp.detach() - ref),
        (grpo.kl_k3, 1 - torch.exp(ref - logp.detach())),
    ]:
        (g,) = torch.autograd.grad(fn(logp, ref).sum(), logp)
        torch.testing.assert_close(g, expected)


# ----------------------------------------------------------------------------- aggregation


def test_aggregations_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert grpo.token_sum_over(x, m, m.sum()).item() == pytest.approx(10 / 4)  # DAPO token-mean
    assert grpo.seq_mean_token_mean(x, m, 2).item() == pytest.approx((2 + 4) / 2)  # GRPO
    assert grpo.token_sum_over(x, m, 2 * 3).item() == pytest.approx(10 / 6)  # Dr. GRPO, B * L_max


def _random_batch(seed, B=9, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()  # (B, T), one empty row possible
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    ref = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    adv = grpo.token_advantages(torch.randn(B, generator=g), mask)
    return logp, old, ref, adv, mask


def _loss_over_split(aggregate_factory, sizes, seed=0, **kw):
    logp, old, ref, adv, mask = _random_batch(seed)
    total, start = 0.0, 0
    for size in sizes:
        sl = slice(start, start + size)
        loss = grpo.grpo_loss(logp[sl], old[sl], adv[sl], mask[sl], aggregate_factory(mask), ref_logp=ref[sl], beta=0.04, dual_clip=3.0, **kw)
        total = total + loss
        start += size
    (grad,) = torch.autograd.grad(total, logp)
    return total.detach(), grad


@pytest.mark.parametrize(
    "name,factory",
    [
        ("token_mean", lambda full: (lambda x, m: grpo.token_sum_over(x, m, full.sum()))),
        ("seq_mean_token_mean", lambda full: (lambda x, m: grpo.seq_mean_token_mean(x, m, full.shape[0]))),
        ("constant", lambda full: (lambda x, m: grpo.token_sum_over(x, m, full.shape[0] * full.shape[1]))),
    ],
)
def test_loss_invariant_to_micro_batch_split(name, factory):
    whole, g_whole = _loss_over_split(factory, [9])
    for sizes in ([1] * 9, [4, 5], [2, 3, 4], [7, 2]):
        part, g_part = _loss_over_split(factory, sizes)
        torch.testing.assert_close(part, whole, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g_part, g_whole, rtol=1e-12, atol=1e-12)


def test_local_normaliser_depends_on_split():
    """The DRG-Sapphire local normaliser is not split-invariant: shows the invariance test can fail."""
    local = lambda full: (lambda x, m: grpo.token_sum_over(x, m, m.sum().clamp(min=1)))  # noqa: E731
    whole, _ = _loss_over_split(local, [9])
    part, _ = _loss_over_split(local, [2, 7])
    assert abs(part - whole) > 1e-3


# ----------------------------------------------------------------------------- gradients and clipping


def test_on_policy_gradient_is_minus_advantage_over_normaliser():
    logp, _, _, adv, mask = _random_batch(1)
    N = 17.0
    loss = grpo.grpo_loss(logp, logp.detach(), adv, mask, lambda x, m: grpo.token_sum_over(x, m, N))
    stats = grpo.loss_stats(logp, logp.detach(), adv, mask)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -adv * mask / N)
    assert stats.clip_low_count == 0 and stats.clip_high_count == 0
    assert stats.ratio_min == 1 and stats.ratio_max == 1
    # seq-mean-token-mean: -A / (|o_i| * B)
    B = logp.shape[0]
    loss = grpo.grpo_loss(logp, logp.detach(), adv, mask, lambda x, m: grpo.seq_mean_token_mean(x, m, B))
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, -adv * mask / (mask.sum(1, keepdim=True).clamp(min=1) * B))


def test_clipped_tokens_have_zero_gradient_exactly_in_ppo_regions():
    eps_low, eps_high, c = 0.2, 0.28, 3.0
    # 1.25 and 0.75 sit between the two bounds: they tell eps_low from eps_high
    ratios = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5, 4.0, 4.0, 1.25, 0.75])
    advs = torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0])
    # expected clipped: A>0 & r>1.28 -> idx 3, 9; A<0 & r<0.8 -> idx 4, 11; dual A<0 & r>3 -> idx 8
    n = len(ratios)
    old = torch.zeros(n)
    logp = torch.log(ratios).clone().requires_grad_(True)
    mask = torch.ones(n)
    loss = grpo.grpo_loss(
        logp[None], old[None], advs[None], mask[None], lambda x, m: grpo.token_sum_over(x, m, 10.0), eps_low=eps_low, eps_high=eps_high, dual_clip=c
    )
    stats = grpo.loss_stats(logp[None], old[None], advs[None], mask[None], eps_low=eps_low, eps_high=eps_high, dual_clip=c)
    (g,) = torch.autograd.grad(loss, logp)
    clipped = torch.zeros(n, dtype=torch.bool)
    clipped[[3, 9, 4, 11, 8]] = True
    assert torch.equal(g[clipped], torch.zeros(5))
    torch.testing.assert_close(g[~clipped], (-advs * ratios / 10.0)[~clipped])
    assert stats.clip_high_count == 2 and stats.clip_low_count == 2 and stats.clip_dual_count == 1
    # dual-clipped token's loss is the constant -c * A
    per_token, _ = grpo.clipped_surrogate(ratios, advs, eps_low, eps_high, c)
    assert per_token[8].item() == pytest.approx(c)
    # without dual clip the same token is unclipped and its gradient is -A * r
    per_token_nodual, regions = grpo.clipped_surrogate(ratios, advs, eps_low, eps_high)
    assert per_token_nodual[8].item() == pytest.approx(4.0) and "clip_dual" not in regions


# ----------------------------------------------------------------------------- composed loss vs float64 loop


def _reference_loss_loop(logp, old, ref, adv, mask, eps_low, eps_high, c, beta, kl, normaliser):
    """A plain per-token Python loop of the same objective."""
    total = 0.0
    for i in range(len(logp)):
        for t in range(len(logp[0])):
            if mask[i][t] == 0:
                continue
            r = math.exp(logp[i][t] - old[i][t])
            a = adv[i][t]
            lt = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            if c > 0 and a < 0:
                lt = min(lt, -c * a)
            lr = ref[i][t] - logp[i][t]
            k = {"k1": -lr, "k2": 0.5 * lr * lr, "k3": math.exp(lr) - 1 - lr}[kl]
            total += lt + beta * k
    return total / normaliser


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
def test_grpo_loss_equals_float64_loop(kl):
    logp, old, ref, adv, mask = _random_batch(3)
    N = mask.sum().item()
    loss = grpo.grpo_loss(
        logp, old, adv, mask, lambda x, m: grpo.token_sum_over(x, m, N), eps_low=0.2, eps_high=0.28, dual_clip=3.0, ref_logp=ref, beta=0.1, kl=grpo.KL_ESTIMATORS[kl]
    )
    stats = grpo.loss_stats(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0, ref_logp=ref, kl=grpo.KL_ESTIMATORS[kl])
    ref_val = _reference_loss_loop(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 3.0, 0.1, kl, N)
    assert loss.item() == pytest.approx(ref_val, rel=1e-12)
    assert stats.tokens == N


def test_drg_compat_equals_reference_code_formula():
    logp, _, ref, adv, mask = _random_batch(4)
    beta = 0.04
    loss = grpo.grpo_loss(logp, logp.detach(), adv, mask, lambda x, m: grpo.token_sum_over(x, m, m.sum()), ref_logp=ref, beta=beta, kl=grpo.kl_k3)
    literal = (grpo.drg_sapphire_per_token_loss(logp, adv, ref, beta) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, literal)
    (g1,) = torch.autograd.grad(loss, logp, retain_graph=True)
    (g2,) = torch.autograd.grad(literal, logp)
    torch.testing.assert_close(g1, g2)


def test_beta_needs_reference():
    logp, old, _, adv, mask = _random_batch(5)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, old, adv, mask, lambda x, m: x.sum(), beta=0.1)


# ----------------------------------------------------------------------------- beta schedules


def test_cosine_beta_endpoints_and_midpoint():
    assert grpo.cosine_beta(0.04, 0, 100) == pytest.approx(0.04)
    assert grpo.cosine_beta(0.04, 50, 100) == pytest.approx(0.02)
    assert grpo.cosine_beta(0.04, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert grpo.cosine_beta(0.04, 150, 100) == pytest.approx(0.0, abs=1e-15)  # stays at 0 past the end
    values = [grpo.cosine_beta(0.04, s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay
    assert grpo.constant_beta(0.04, random.randint(0, 99), 100) == 0.04
