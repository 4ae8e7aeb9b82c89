"""The torch engine's KV caches and its attention: a prompt cache read once per group in every decode step.

`TorchEngine.generate` prefills P prompts into one `KVCache` (P rows) and decodes B = P * n rows into another
(B rows). While it generates, the model's attention is `_kv_attention` (registered with transformers'
AttentionInterface by `attention_as`): SDPA for the prefill, `decode_attention` for a decode step, which
reads each prompt's keys and values once for its n samples (see rollout/torch_engine.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from minigrpo.attention import sdpa


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class KVCache:
    """Per layer, keys and values (rows, kv_heads, slots, head_dim), preallocated and written in place.

    The model calls `update(key, value, layer)` from every attention layer (transformers' cache protocol):
    the new tokens go to slots [at, at + q), and the filled slots [0, at + q) come back. The engine sets
    `at` before each forward; `select_rows` keeps the rows still decoding."""

    def __init__(self, shape: tuple[int, int, int], rows: int, slots: int, dtype, device):
        layers, kv_heads, head_dim = shape
        size = (rows, kv_heads, slots, head_dim)
        self.keys = [torch.empty(size, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty(size, dtype=dtype, device=device) for _ in range(layers)]
        self.at = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        end = self.at + key.shape[2]
        self.keys[layer_idx][:, :, self.at : end] = key
        self.values[layer_idx][:, :, self.at : end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.at

    def select_rows(self, index: torch.Tensor) -> None:
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


@dataclass
class PromptKV:
    """What a decode step's attention needs besides its own rows' cache: the prompt cache (P rows), which of
    its slots are real (P, Lmax) bool or None when no prompt is padded, the samples per prompt n, and the
    output row (in [0, P * n)) of each live row once finished rows are dropped (None before: row b is b)."""

    cache: KVCache
    keys_real: torch.Tensor | None
    n: int
    rows: torch.Tensor | None = None


# ----------------------------------------------------------------------------- attention

KV_ATTENTION = "minigrpo_kv"


def _kv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, prompts_of=None, **kwargs):
    """The engine's attention: a prefill over the prompt cache, or a decode step over prompt and completion.

    query (b, H, q, d); key/value (b, Hkv, S, d): the filled slots of the cache being written. Prefill
    (prompts_of None): attention_mask (b, 1, q, S) bool, True = attend, or None for unpadded prompts
    (causal). Decode (q = 1): see `decode_attention`. Returns (b, q, H, d).
    """
    if prompts_of is None:
        out = sdpa(query, key, value, attention_mask, scaling, repeat_kv=query.is_cuda)
        return out.transpose(1, 2).contiguous(), None
    layer = module.layer_idx
    cache = prompts_of.cache
    out = decode_attention(query, key, value, cache.keys[layer], cache.values[layer], prompts_of, scaling)
    return out, None


def decode_attention(query, key, value, prompt_keys, prompt_values, prompts_of: PromptKV, scaling: float):
    """One decode step. query (b, H, 1, d); key/value (b, Hkv, t, d): each row's completion so far;
    prompt_keys/values (P, Hkv, L, d). Row b (output row r = prompts_of.rows[b], or b) belongs to prompt
    r // n and attends to that prompt's real slots and to its own t completion slots: one softmax over both.
    Returns (b, 1, H, d).

    The prompt part runs per prompt: the n rows of a prompt and the H / Hkv heads that share a KV head are
    one (n * H / Hkv)-row block against that prompt's keys, so a prompt's keys and values are read once per
    step, not n times."""
    b, H, _, d = query.shape
    P, Hkv, L, _ = prompt_keys.shape
    n, g, rows = prompts_of.n, H // Hkv, prompts_of.rows
    qg = query.reshape(b, Hkv, g, d)  # heads sharing a KV head side by side

    def to_prompts(x):  # (b, Hkv, g, k) per live row -> (P, Hkv, n * g, k) per prompt (dropped rows: zeros)
        if rows is not None:
            x = x.new_zeros((P * n, *x.shape[1:])).index_copy_(0, rows, x)
        return x.view(P, n, Hkv, g, -1).transpose(1, 2).reshape(P, Hkv, n * g, -1)

    def to_rows(x):  # the inverse: (P, Hkv, n * g, k) -> (b, Hkv, g, k)
        x = x.view(P, Hkv, n, g, -1).transpose(1, 2).reshape(P * n, Hkv, g, -1)
        return x if rows is None else x.index_select(0, rows)

    prompt_scores = torch.matmul(to_prompts(qg), prompt_keys.transpose(-1, -2)) * scaling  # (P, Hkv, n * g, L)
    if prompts_of.keys_real is not None:
        prompt_scores = prompt_scores.masked_fill(~prompts_of.keys_real[:, None, None, :], float("-inf"))
    own_scores = torch.matmul(qg, key.transpose(-1, -2)) * scaling  # (b, Hkv, g, t)
    scores = torch.cat([to_rows(prompt_scores), own_scores], dim=-1)  # (b, Hkv, g, L + t)
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    prompt_probs, own_probs = probs.split([L, key.shape[2]], dim=-1)
    out = to_rows(torch.matmul(to_prompts(prompt_probs), prompt_values)) + torch.matmul(own_probs, value)
    return out.reshape(b, 1, H, d)


@contextlib.contextmanager
def attention_as(config, name: str):
    """Run the model with attention implementation `name`, then restore the caller's choice."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _kv_attention)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
