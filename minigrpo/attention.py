"""Attention that scores only the query-key pairs a shared-prompt row needs.

A shared-prompt row (rl/layout.py) is [prompt, c_1, ..., c_G]: the prompt attends causally to itself,
each completion to the prompt and to its own causal prefix. A dense (T, T) mask over the row is right
but makes SDPA score all T^2 pairs, where P^2 / 2 + sum_i L_i (P + L_i / 2) are needed: on the DRG
demo's rows (P ~380, 8 completions of ~240) 5.3M pairs per layer where 1.1M would do. Here the row is
cut into two SDPA calls per layer:

    prompt       the first P_max positions of every row, causal (the kernels skip the upper triangle);
    completions  one batch entry per completion: its L_max queries over the keys [its row's prompt
                 (P_max); its own tokens (L_max)], a (S, 1, L_max, P_max + L_max) bool mask (the prompt's
                 padding out, its own tokens causal),

and one gather puts the outputs back in row order. Keys and values of the prompt are gathered once per
completion, so their gradient is the sum over the G completions: the per-completion computation
exactly (tests/test_shared_prompt.py checks it to float64 precision).

HF models pick their attention function by name (`config._attn_implementation`). `install` registers
`shared_prompt_attention` as "minigrpo_sdpa" and points an sdpa model at it; for any attention mask
other than a `SharedPromptMask` it is HF's own sdpa, unchanged. The model reads the mask as a prepared
mask mapping ({"full_attention": mask}), so HF builds no (T, T) mask of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

NAME = "minigrpo_sdpa"


@dataclass(slots=True)
class SharedPromptMask:
    """Where each row's prompt and completions are, as the gathers of `shared_prompt_attention` read it.

    Flat indices are into (R * T), the row-major positions of the micro-batch's rows; S here counts
    the completions with at least one token."""

    prompts: list[int]  # P_r, the prompt length of each row
    spans: list[tuple[int, int, int]]  # (row, start, length) of each completion with a token
    row_len: int  # T
    queries: Tensor  # (S * L_max,) flat position of each completion's token k (padding: its row's first)
    keys: Tensor  # (S * (P_max + L_max),) flat positions of [its row's first P_max; its queries]
    allowed: Tensor  # (S, 1, L_max, P_max + L_max) bool: True = the query may attend to the key
    source: Tensor  # (R * T,) each position's row in cat([prompt out (R * P_max), completion out (S * L_max)])

    @property
    def prompt_len(self) -> int:  # P_max
        return max(self.prompts)

    @property
    def completion_len(self) -> int:  # L_max (>= 1)
        return max([n for _, _, n in self.spans], default=1)

    def to(self, device: torch.device, non_blocking: bool = False) -> SharedPromptMask:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return SharedPromptMask(self.prompts, self.spans, self.row_len, move(self.queries), move(self.keys),
                                move(self.allowed), move(self.source))

    def dense(self) -> Tensor:
        """The same mask over whole rows, (R, 1, T, T) bool (for eager attention and other models).
        Padding attends to itself: a query with no key would give NaN in softmax."""
        T = self.row_len
        dense = torch.eye(T, dtype=torch.bool, device=self.source.device).repeat(len(self.prompts), 1, 1)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.source.device).tril()
        for r, P in enumerate(self.prompts):
            dense[r, :P, :P] = causal[:P, :P]
        for r, start, n in self.spans:
            dense[r, start : start + n, : self.prompts[r]] = True  # the prompt
            dense[r, start : start + n, start : start + n] = causal[:n, :n]  # its own causal prefix
        return dense[:, None]

    @classmethod
    def build(cls, prompts: list[int], spans: list[tuple[int, int, int]], T: int) -> SharedPromptMask:
        """prompts[r] = P_r; spans = (row, start, length) of every completion; T = the row length."""
        R, P = len(prompts), max(prompts)
        spans = [span for span in spans if span[2] > 0]
        L = max([n for _, _, n in spans], default=1)
        source = [r * P + min(t, P - 1) for r in range(R) for t in range(T)]  # prompt (or padding: any row)
        queries, keys, prompt_valid = [], [], []
        for s, (r, start, n) in enumerate(spans):
            own = [r * T + start + k if k < n else r * T for k in range(L)]
            queries += own
            keys += [r * T + j for j in range(P)] + own
            prompt_valid.append([j < prompts[r] for j in range(P)])
            source[r * T + start : r * T + start + n] = range(R * P + s * L, R * P + s * L + n)
        S = len(spans)
        prompt_part = torch.tensor(prompt_valid, dtype=torch.bool).reshape(S, 1, 1, P).expand(S, 1, L, P)
        own_part = torch.ones(L, L, dtype=torch.bool).tril().expand(S, 1, L, L)
        as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        allowed = torch.cat([prompt_part, own_part], dim=-1)
        return cls(list(prompts), spans, T, as_long(queries), as_long(keys), allowed, as_long(source))


def sdpa(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None,
         repeat_kv: bool) -> Tensor:
    """SDPA with GQA: query (B, H, Lq, d), key/value (B, Hkv, Lk, d), mask (B, 1, Lq, Lk) bool or None
    (causal). Returns (B, H, Lq, d).

    Which SDPA kernel runs matters on CUDA: a prompt batch of 8 x 8k tokens costs the math kernel
    (B, H, L, L) fp32 scores, tens of GB per layer. No mask takes `is_causal`, which the flash kernel
    accepts with GQA. With a mask flash is out, and whether the memory-efficient kernel accepts
    `enable_gqa` depends on the torch version; transformers' `use_gqa_in_sdpa` refuses masked GQA on
    CUDA for this reason. So there (`repeat_kv`) the KV heads are repeated to H first: (B, H, L, d)
    extra per layer, against (B, H, L, L) for the math kernel. CPU keeps `enable_gqa` with the mask
    (its fused kernel takes both).
    """
    H, Hkv = query.shape[1], key.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=H != Hkv)
    if repeat_kv and H != Hkv:
        key, value = key.repeat_interleave(H // Hkv, dim=1), value.repeat_interleave(H // Hkv, dim=1)  # (B, H, L, d)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=H != Hkv)


def _token_major(x: Tensor) -> Tensor:
    """(R, H, T, d) -> (R * T, H, d)."""
    R, H, T, d = x.shape
    return x.transpose(1, 2).reshape(R * T, H, d)


def _gathered(flat: Tensor, index: Tensor, length: int) -> Tensor:
    """Rows `index` of (R * T, H, d), as (S, H, length, d)."""
    return flat.index_select(0, index).view(-1, length, *flat.shape[1:]).transpose(1, 2)


def shared_prompt_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            sliding_window=None, **kwargs):
    """HF attention-interface function: query (R, H, T, d), key/value (R, Hkv, T, d) -> (R, T, H, d)."""
    if not isinstance(attention_mask, SharedPromptMask):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    if dropout or sliding_window is not None:
        raise ValueError("shared-prompt attention has no attention dropout or sliding window")
    m = attention_mask
    R, H, T, d = query.shape
    P, L = m.prompt_len, m.completion_len
    repeat = query.is_cuda
    prompt_out = sdpa(query[:, :, :P], key[:, :, :P], value[:, :, :P], None, scaling, repeat)  # (R, H, P, d)
    outs = [_token_major(prompt_out)]
    if m.queries.numel():
        keys = _token_major(key), _token_major(value)
        completion_out = sdpa(_gathered(_token_major(query), m.queries, L), _gathered(keys[0], m.keys, P + L),
                              _gathered(keys[1], m.keys, P + L), m.allowed, scaling, repeat)  # (S, H, L, d)
        outs.append(_token_major(completion_out))
    return torch.cat(outs).index_select(0, m.source).view(R, T, H, d), None


def install(lm) -> bool:
    """Point an sdpa HF model at `shared_prompt_attention`; False (and nothing changed) for other ones."""
    if getattr(lm.config, "_attn_implementation", None) != "sdpa" or getattr(lm.config, "use_sliding_window", False):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, shared_prompt_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # masks other than ours: built as for sdpa
    lm.config._attn_implementation = NAME
    return True
