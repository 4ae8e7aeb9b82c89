"""Token sampling from last-position logits: temperature, top-k, top-p, greedy. No host syncs.

All functions take fp32 logits (B, V) and return tensors on the same device, so a decode loop can
run many steps without waiting for the device.
"""

from __future__ import annotations

import torch


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k set and outside the top-p nucleus.

    logits: (B, V), already divided by the temperature. Top-k is applied first, then top-p on the
    renormalised top-k distribution (the order vLLM and HF use). The most likely token is always kept.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # mass strictly before each token: a token is kept while that mass is < top_p
        before = probs.cumsum(dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,  # (B, V) fp32, raw (untempered)
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens (B,) int64, log p(token) (B,) fp32).

    The log-prob is under the distribution sampled from (see rollout/base.py). Sampling inverts the
    CDF with one uniform draw per row (drawing a Gumbel/exponential per vocabulary entry instead
    costs B * V random numbers, ~10% of a CPU decode step), and needs no host sync.
    """
    if temperature == 0:
        logp = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = truncate_logits(logits / temperature, top_k, top_p).log_softmax(dim=-1)
        cdf = logp.exp().cumsum(dim=-1)  # (B, V); masked tokens add 0 and can never be picked
        u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)) * cdf[
            :, -1:
        ]  # (B, 1) in (0, total]
        tokens = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
