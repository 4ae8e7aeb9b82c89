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

    The log-prob is under the distribution sampled from (see rollout/base.py). Sampling uses the
    exponential race: argmax_j p_j / E_j with E_j ~ Exp(1) picks j with probability p_j, and needs
    no cumsum or host sync.
    """
    if temperature == 0:
        logp = logits.log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
    else:
        logp = truncate_logits(logits / temperature, top_k, top_p).log_softmax(dim=-1)
        noise = torch.empty_like(logp).exponential_(generator=generator)  # (B, V)
        tokens = (logp - noise.log()).argmax(dim=-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
