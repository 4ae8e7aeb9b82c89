"""The built-in rollout engine: batched prefill + KV-cache decode on a transformers causal LM.

No dependencies beyond torch/transformers; it is the default engine and the reference the vLLM
engine is tested against. One generate() call:

    prefill   the P distinct prompts once, left-padded to Lmax, into a prompt cache (P rows, Lmax slots)
    decode    one token per row per step for B = P * n rows: logits -> sample_tokens -> append to a
              completion cache (B rows, M slots); stop-token bookkeeping on the device, a host sync only
              every `check_every` steps (to stop early and to drop finished rows from the batch when
              fewer than half are still running)

Row b = p * n + j is prompt p's j-th sample. Prompt p occupies prompt-cache slots [Lmax - L_p, Lmax)
(left padding, masked out); row b's t-th new token sits in completion slot t and has position id L_p + t,
so positions match an unpadded forward.

Attention: the engine builds its own masks and, while generating, switches the model to the attention of
rollout/kv_cache.py (registered with transformers' AttentionInterface). The prefill is one SDPA call. A decode
step attends over two caches: the n samples of a prompt read that prompt's keys and values once, as one
(n x heads per KV head)-row block of a batched matmul, instead of once per sample from a cache copied n times;
then each row reads its own completion so far. GQA key/value heads are never repeated. Models with sliding-window
layers are not supported (Qwen2.5 has none by default).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

from minigrpo.rollout.base import Completion, SamplingParams, check_request
from minigrpo.rollout.kv_cache import KV_ATTENTION, KVCache, PromptKV, attention_as, kv_shape
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
        (layers x 2 x kv_heads x head_dim x (prompts x prompt tokens + rows x new tokens)); None = one pass.
        A pass holds at least one prompt's n rows."""
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
        with attention_as(self.lm.config, KV_ATTENTION):
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

        ids = torch.full((P, Lmax), self.pad_token_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, Lmax - len(p) :] = torch.tensor(p)
        ids = ids.to(dev)
        slot = torch.arange(Lmax, device=dev)
        keys_real = slot[None, :] >= Lmax - lens[:, None]  # (P, Lmax) bool: True from each prompt's first token on
        pos = (slot[None, :] - (Lmax - lens[:, None])).clamp(min=0)  # (P, Lmax)

        # prefill mask (P, 1, Lmax, Lmax): causal, real keys only; pad queries see themselves (no empty
        # softmax rows; their outputs are never used). None when no prompt is padded: plain causal attention.
        prefill_mask, padded = None, any(len(p) < Lmax for p in prompts)
        if padded:
            causal = torch.ones(Lmax, Lmax, dtype=torch.bool, device=dev).tril()
            prefill_mask = (causal[None] & keys_real[:, None]) | torch.eye(Lmax, dtype=torch.bool, device=dev)
            prefill_mask = prefill_mask[:, None]
        shape = kv_shape(self.lm.config)
        prompt_cache = KVCache(shape, P, Lmax, self.lm.dtype, dev)
        hidden = self._forward(ids, prefill_mask, pos, prompt_cache)  # (P, H) last position

        # B = P * n rows from here on: the first sampled token's logits, lengths, budgets
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        hidden, lens = rep(hidden), rep(lens)
        B = P * n
        budget = rep(torch.tensor(budgets, device=dev))  # (B,)
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=dev)
        cache = KVCache(shape, B, M, self.lm.dtype, dev)
        prompts_of = PromptKV(prompt_cache, keys_real if padded else None, n)

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
                    cache.select_rows(keep)
                    rows, lens, tok, done = rows[keep], lens[keep], tok[keep], done[keep]
                    prompts_of.rows = rows
            step_pos = (lens + t)[:, None]  # (b, 1): position of the token just sampled
            cache.at = t  # its completion slot
            hidden = self._forward(tok[:, None], None, step_pos, cache, prompts_of)
        return out_tokens.cpu(), out_logps.cpu(), lengths.cpu(), stopped.cpu()

    def _forward(self, ids, mask4d, pos, cache, prompts_of: PromptKV | None = None) -> torch.Tensor:
        # a dict of prepared masks makes HF skip its own mask construction; `prompts_of` reaches the attention
        # function through the model's keyword arguments
        masks = {"full_attention": mask4d}
        out = self.lm.model(
            input_ids=ids, attention_mask=masks, position_ids=pos, past_key_values=cache, use_cache=True,
            prompts_of=prompts_of,
        )
        return out.last_hidden_state[:, -1]  # (b, H): only the last position is ever sampled from

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.get_output_embeddings()(hidden).float()  # (b, V)
