"""Load an HF causal LM from a local folder and get per-token log-probs from it without [N, V] logits.

The model knows nothing of FSDP or RL. `LogprobModel` wraps the HF model so that its forward returns
log-probs (and entropy) of given target tokens: the decoder body gives hidden states, and
`minigrpo.kernels.fused_logprobs` combines them with the output embedding weight. Wrapping matters
for FSDP2: the wrapper is the root module, so its forward unshards the embedding, final norm and
(tied) output weight that the fused kernel reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from minigrpo import attention
from minigrpo.io import InputError
from minigrpo.kernels import fused_logprobs

IGNORE_INDEX = -100

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them at least
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(InputError):
    """A model folder that is missing, incomplete or corrupt; the message names the file."""


def check_model_dir(path: str | os.PathLike) -> Path:
    """Fail early, naming the file, if `path` is not a loadable HF model folder."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{cfg}: missing (not an HF model folder)")
    try:
        json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg}: not valid JSON ({e})") from None
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{path}: no *.safetensors weights (pickled .bin weights are not loaded)")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for truncated headers
            raise ModelLoadError(f"{w}: unreadable safetensors file ({e})") from None
    return path


def model_context(path: str | os.PathLike) -> int | None:
    """The model's context length (`max_position_embeddings` of its config.json), if it states one."""
    cfg = json.loads((check_model_dir(path) / "config.json").read_text())
    value = cfg.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def load_tokenizer(path: str | os.PathLike, require_chat_template: bool = False):
    from transformers import AutoTokenizer

    path = check_model_dir(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer (one token) from the config alone
        raise ModelLoadError(f"{path}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: tokenizer could not be loaded ({e})") from None
    if len(tok) <= 1:
        raise ModelLoadError(f"{path}: the tokenizer files hold an empty vocabulary ({len(tok)} token)")
    if require_chat_template and not getattr(tok, "chat_template", None):
        raise ModelLoadError(f"{path}: the tokenizer has no chat template, and this run needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    path: str | os.PathLike,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """An HF `AutoModelForCausalLM` from a local folder (safetensors only, no hub)."""
    from transformers import AutoModelForCausalLM

    path = check_model_dir(path)
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise ModelLoadError("attn_implementation=flash_attention_2 but flash-attn is not installed") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
        )
    except Exception as e:
        raise ModelLoadError(f"{path}: model could not be loaded ({type(e).__name__}: {e})") from None
    return model.to(device)


def shift_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """targets[b, t] = input_ids[b, t + 1] where loss_mask[b, t + 1], else IGNORE_INDEX.

    Position t's hidden state predicts token t + 1, so the score of token t + 1 lives at t.
    """
    targets = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    targets[:, :-1] = torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], IGNORE_INDEX)
    return targets


class LogprobModel(nn.Module):
    """An HF causal LM whose forward returns log-probs of `targets` (and entropy), not logits.

    An sdpa model is pointed at `attention.shared_prompt_attention` (plain sdpa for every mask but
    the shared-prompt one, which it computes pair by needed pair)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.scores_needed_pairs = attention.install(lm)

    @property
    def config(self):
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        targets: torch.Tensor,  # (B, T), IGNORE_INDEX where not scored; or (N,) with score_index
        attention_mask: torch.Tensor | attention.SharedPromptMask | None = None,  # (B, T) 1 = real token
        position_ids: torch.Tensor | None = None,  # (B, T) for packed rows
        temperature: float = 1.0,
        return_entropy: bool = False,
        score_index: torch.Tensor | None = None,  # (N,) rows of the flattened (B * T) hidden states to score
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs (and entropy) of the scored tokens. The LM head runs only on scored rows.

        Without `score_index`: targets (B, T) -> (B, T) outputs, 0 where not scored (the rows are
        found on the host: one sync). With it: targets (N,) -> (N,) outputs for those rows."""
        if isinstance(attention_mask, attention.SharedPromptMask):
            # sdpa: a prepared mask mapping, so HF builds no mask of its own and hands ours to the attention
            # function; other attention implementations get the dense (R, 1, T, T) mask
            shared = attention_mask
            attention_mask = {"full_attention": shared} if self.scores_needed_pairs else shared.dense()
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and \
                self.lm.config._attn_implementation == "eager":
            # eager attention adds the mask to the scores: a bool "may attend" mask becomes 0 / -large
            attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
                ~attention_mask, torch.finfo(torch.float32).min
            )
        out = self.lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        B, T = input_ids.shape
        flat_targets = targets.reshape(-1)
        rows = score_index
        if rows is None:
            scored = targets != IGNORE_INDEX  # (B, T)
            rows = scored.reshape(-1).nonzero().squeeze(1)  # (N,): row-major, the order masked_scatter fills in
            flat_targets = flat_targets[rows]
        logp, entropy = fused_logprobs(hidden.reshape(B * T, -1)[rows], weight, flat_targets, temperature=temperature,
                                       return_entropy=return_entropy, ignore_index=IGNORE_INDEX)
        # Fresh tensors, not views: FSDP2 warns that an in-place op on a returned view would drop its
        # pre-backward hook; the copy is N (or B * T) floats, nothing next to the activations.
        if score_index is not None:
            return logp.clone(), (entropy.clone() if entropy is not None else None)
        scatter = lambda v: v.new_zeros(B, T).masked_scatter(scored, v)  # noqa: E731
        return scatter(logp), (scatter(entropy) if entropy is not None else None)
