"""The built-in rollout engine: batched prefill + KV-cache decode on a transformers causal LM.

No dependencies beyond torch/transformers; it is the default engine and the reference the vLLM
engine is tested against. One generate() call:

    prefill   the P distinct prompts once, left-padded to Lmax, into a static KV cache (P rows)
    expand    repeat each prompt's cache rows n times -> B = P * n rows
    decode    one token per row per step: logits -> sample_tokens -> append; stop-token bookkeeping
              on the device, a host sync only every `check_every` steps (to stop early and to drop
              finished rows from the batch when fewer than half are still running)

Row b's prompt occupies cache slots [Lmax - L_b, Lmax) (left padding, masked out); its t-th new
token sits in slot Lmax + t and has position id L_b + t, so positions match an unpadded forward.

Attention: the engine builds its own boolean masks and, while generating, switches the model to
`_kv_attention` (registered with transformers' AttentionInterface). HF's sdpa path on CPU repeats
the GQA key/value heads of the whole static cache and runs a flash kernel that is slow for one
query token; here a decode step reads only the filled cache slots, once, with grouped matmuls.
Models with sliding-window layers are not supported (Qwen2.5 has none by default).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch
from torch import nn

from minigrpo.attention import sdpa
from minigrpo.rollout.base import Completion, SamplingParams, check_request
from minigrpo.rollout.sampling import sample_tokens


class TorchEngine:
    """Rollout engine owning an HF causal LM (built from a folder, or the module given)."""

    def __init__(
        self,
        model: str | os.PathLike | nn.Module,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        max_context: int | None = None,
        check_every: int = 8,
        max_batch_rows: int | None = None,
    ):
        """`max_batch_rows` bounds the decode batch (prompts x n) per pass, and so the KV-cache memory
        (layers x 2 x rows x kv_heads x (prompt + new tokens) x head_dim); None = one pass. A pass holds
        at least one prompt's n rows."""
        if isinstance(model, nn.Module):
            self.lm = model  # used as is, not copied: load_weights writes into it
        else:
            from minigrpo.model import load_model

            self.lm = load_model(model, dtype=dtype, attn_implementation=attn_implementation, device=device)
        self.lm.eval().requires_grad_(False)
        self.device = next(self.lm.parameters()).device
        cfg = self.lm.config
        layer_types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
        if layer_types != {"full_attention"}:
            raise NotImplementedError(
                f"TorchEngine supports full-attention decoders only; this model has layers {sorted(layer_types)}"
            )
        self._max_context = int(max_context or cfg.max_position_embeddings)
        self.vocab_size = self.lm.get_output_embeddings().weight.shape[0]
        eos = (
            getattr(self.lm.generation_config, "eos_token_id", None) if hasattr(self.lm, "generation_config") else None
        )
        self.eos_token_ids: tuple[int, ...] = tuple(
            eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        )
        self.pad_token_id = int(getattr(cfg, "pad_token_id", None) or 0)
        self.check_every = max(1, int(check_every))
        self.max_batch_rows = max_batch_rows
        self.version = 0

    # ------------------------------------------------------------------ interface

    def max_context(self) -> int:
        return self._max_context

    def sleep(self) -> None:
        """Nothing to free: the torch engine keeps no memory between generate() calls."""

    def wake_up(self) -> None:
        pass

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the model in place (tied lm_head/embedding share storage)."""
        targets = self.lm.state_dict(keep_vars=True)
        unknown = []
        for name, tensor in named_tensors:
            dst = targets.get(name)
            if dst is None:
                unknown.append(name)
                continue
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"load_weights: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(dst.shape)}"
                )
            dst.detach().copy_(tensor)
        if unknown:
            raise ValueError(f"load_weights: {len(unknown)} names are not in the model, e.g. {unknown[:3]}")
        self.version += 1

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        budgets = check_request(prompts, n, sampling, self._max_context, self.vocab_size)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling.seed if sampling.seed is not None else int(torch.Generator().seed()))
        per_pass = len(prompts) if self.max_batch_rows is None else max(1, self.max_batch_rows // n)
        out = []
        with _attention(self.lm.config, KV_ATTENTION):
            for start in range(0, len(prompts), per_pass):
                chunk = prompts[start : start + per_pass]
                result = self._generate(chunk, n, sampling, budgets[start : start + per_pass], gen)
                out += self._completions(chunk, n, *result)
        return out

    def _completions(self, prompts, n, tokens, logps, lengths, stopped) -> list[list[Completion]]:
        tokens, logps, lengths, stopped = tokens.tolist(), logps.tolist(), lengths.tolist(), stopped.tolist()
        out = []
        for i, prompt in enumerate(prompts):
            row = []
            for b in range(i * n, (i + 1) * n):
                k = lengths[b]
                row.append(
                    Completion(
                        list(prompt), tokens[b][:k], logps[b][:k], "stop" if stopped[b] else "length", self.version
                    )
                )
            out.append(row)
        return out

    # ------------------------------------------------------------------ the decode loop

    def _generate(self, prompts, n, sampling, budgets, gen):
        """Returns tokens (B, M), logprobs (B, M), lengths (B,), stopped (B,) with B = P * n, M = max budget."""
        P, dev = len(prompts), self.device
        lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
        Lmax, M = max(len(p) for p in prompts), max(budgets)
        S = Lmax + M  # cache slots

        ids = torch.full((P, Lmax), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, Lmax - len(p) :] = torch.tensor(p)
        ids = ids.to(dev)
        slot = torch.arange(S, device=dev)
        mask = slot[None, :] >= Lmax - lens[:, None]  # (P, S) bool: True from each prompt's first token on
        pos = (slot[None, :Lmax] - (Lmax - lens[:, None])).clamp(min=0)  # (P, Lmax)

        # prefill mask (P, 1, Lmax, Lmax): causal, real keys only; pad queries see themselves (no empty
        # softmax rows; their outputs are never used). None when no prompt is padded: plain causal attention.
        prefill_mask = None
        if any(len(p) < Lmax for p in prompts):
            causal = torch.ones(Lmax, Lmax, dtype=torch.bool, device=dev).tril()
            prefill_mask = (causal[None] & mask[:, None, :Lmax]) | torch.eye(Lmax, dtype=torch.bool, device=dev)
            prefill_mask = prefill_mask[:, None]
        cache = _static_cache(self.lm.config, S)
        hidden = self._forward(ids, prefill_mask, pos, cache)  # (P, H) last position

        # expand P -> B = P * n rows: cache, mask, positions, and the first sampled token's logits
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        _index_cache(cache, lambda t: rep(t))
        hidden, mask, lens = rep(hidden), rep(mask), rep(lens)
        B = P * n
        budget = rep(torch.tensor(budgets, device=dev))  # (B,)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=dev)

        out_tokens = torch.full((B, M), self.pad_token_id, dtype=torch.long, device=dev)
        out_logps = torch.zeros((B, M), dtype=torch.float32, device=dev)
        lengths = torch.zeros(B, dtype=torch.long, device=dev)  # tokens produced so far (frozen once done)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)  # live batch row -> output row (rows shrink when compacted)
        done = torch.zeros(B, dtype=torch.bool, device=dev)  # per live row

        for t in range(M):
            logits = self._logits(hidden)  # (b, V) fp32
            tok, logp = sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, gen)
            live = ~done
            out_tokens[rows, t] = torch.where(live, tok, out_tokens[rows, t])
            out_logps[rows, t] = torch.where(live, logp, out_logps[rows, t])
            lengths[rows] += live.long()
            hit = live & torch.isin(tok, stop_ids)
            stopped[rows] |= hit
            done = done | hit | (lengths[rows] >= budget[rows])
            if t + 1 == M:
                break
            if (t + 1) % self.check_every == 0:
                n_live = int((~done).sum())  # the only host sync in the loop
                if n_live == 0:
                    break
                if n_live <= done.numel() // 2:  # drop finished rows: decode cost is per row
                    keep = (~done).nonzero().squeeze(-1)
                    _index_cache(cache, lambda c: c.index_select(0, keep))
                    rows, mask, lens, tok, done = rows[keep], mask[keep], lens[keep], tok[keep], done[keep]
            step_pos = (lens + t)[:, None]  # (b, 1): position of the token just sampled
            step_mask = mask[:, None, None, : Lmax + t + 1]  # (b, 1, 1, filled slots incl. this token)
            hidden = self._forward(tok[:, None], step_mask, step_pos, cache)
        return out_tokens.cpu(), out_logps.cpu(), lengths.cpu(), stopped.cpu()

    def _forward(self, ids, mask4d, pos, cache) -> torch.Tensor:
        # a dict of prepared masks makes HF skip its own mask construction
        masks = {"full_attention": mask4d}
        out = self.lm.model(
            input_ids=ids, attention_mask=masks, position_ids=pos, past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state[:, -1]  # (b, H): only the last position is ever sampled from

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden).float()  # (b, V)


def _static_cache(config, max_len: int):
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_len)


def _index_cache(cache, fn) -> None:
    """Apply a batch-dim op (repeat / select rows) to every layer's preallocated keys and values."""
    for layer in cache.layers:
        layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        layer.batch_size = layer.keys.shape[0]


# ----------------------------------------------------------------------------- attention

KV_ATTENTION = "minigrpo_kv"


def _kv_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention over the filled part of a static cache, GQA without repeating key/value heads.

    query (B, H, q, d); key/value (B, Hkv, S_max, d): the whole preallocated cache;
    attention_mask (B, 1, q, S) bool, True = attend, S = slots filled so far, or None for an unpadded
    prefill (S = q, causal). Returns (B, q, H, d).
    """
    B, H, q, d = query.shape
    S = q if attention_mask is None else attention_mask.shape[-1]
    key, value = key[:, :, :S], value[:, :, :S]
    if q > 1:  # prefill: one big fused kernel is best
        out = sdpa(query, key, value, attention_mask, scaling, repeat_kv=query.is_cuda)
        return out.transpose(1, 2).contiguous(), None
    Hkv = key.shape[1]
    qg = query.reshape(B, Hkv, H // Hkv, d)  # (B, Hkv, groups, d): heads sharing a KV head, side by side
    scores = torch.matmul(qg, key.transpose(-1, -2)) * scaling  # (B, Hkv, groups, S)
    if attention_mask is not None:  # None: a one-token, unpadded prefill
        scores = scores.masked_fill(~attention_mask, float("-inf"))  # mask (B, 1, 1, S) broadcasts
    probs = scores.float().softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, Hkv, groups, d)
    return out.reshape(B, 1, H, d), None


@contextlib.contextmanager
def _attention(config, name: str):
    """Run the model with attention implementation `name`, then restore the caller's choice."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, _kv_attention)
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
