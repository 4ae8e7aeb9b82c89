"""Build a tiny, random-initialised Qwen2-architecture model and tokenizer, saved in HF format.

Nothing can be downloaded at run time, so tests and the CPU demo make their own model:
a byte-level BPE tokenizer trained on the given text (with a ChatML chat template, as Qwen2.5
uses) and a randomly initialised `Qwen2ForCausalLM` sized by a preset. The folder holds
config.json, model.safetensors and tokenizer files, and loads with `AutoModelForCausalLM` /
`AutoTokenizer` (and vLLM) unchanged.

    python -m minigrpo.tiny --out /tmp/tiny --corpus corpus.txt [--preset tiny|small]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format Qwen2.5 instruct models use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True, slots=True)
class TinyPreset:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int


PRESETS = {
    # ~0.1M parameters: unit tests. head_dim 32: the smallest vLLM's CPU attention supports.
    "tiny": TinyPreset(512, 64, 128, 2, 2, 1, 2048),
    # ~28M parameters: rollout and update benchmarks on CPU.
    "small": TinyPreset(8192, 512, 1536, 8, 8, 2, 4096),
    # ~52M parameters: the rollout benchmark's "~50M" model.
    "base": TinyPreset(8192, 512, 1536, 16, 8, 2, 4096),
}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def qwen2_config(p: TinyPreset, tokenizer):
    """The `Qwen2Config` of preset `p`, with the vocabulary and special tokens of `tokenizer`."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=p.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_tiny(out: str | os.PathLike, texts: Iterable[str], preset: str | TinyPreset = "tiny", seed: int = 0) -> Path:
    """Train a tokenizer on `texts`, build a random Qwen2 model, save both to `out` (atomically).

    `preset` names one of PRESETS or gives the sizes itself (the DRG demo's model).
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    texts = list(texts)
    if not any(t.strip() for t in texts):
        raise ValueError("the tokenizer corpus is empty")
    tokenizer = train_tokenizer(texts, p.vocab_size)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(p, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return _save_atomic(Path(out), model, tokenizer)


def _save_atomic(out: Path, model, tokenizer) -> Path:
    """Save model and tokenizer into a temporary sibling folder, then rename it to `out` (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_corpus(path: str) -> list[str]:
    """A text file (one document per line) or a JSONL file (every string value is text)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: corpus file not found: {path}")
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if path.endswith(".jsonl") and line.strip():
                texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
            else:
                texts.append(line)
    return texts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (replaced if present)")
    ap.add_argument("--corpus", required=True, help="text or .jsonl file to train the tokenizer on")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        out = build_tiny(args.out, _read_corpus(args.corpus), args.preset, args.seed)
    except ValueError as e:
        raise SystemExit(f"error: {args.corpus}: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
