"""The tiny-model builder's output loads with transformers and runs."""

import json
import subprocess
import sys

import torch


def test_tiny_model_loads_and_runs(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == "qwen2"
    assert (tiny_model_dir / "model.safetensors").is_file()
    ids = tok.apply_chat_template([{"role": "user", "content": "3 + 4"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert tok.decode(tok("SEPSIS WITH MCC")["input_ids"]) == "SEPSIS WITH MCC"  # byte-level round trip
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_tiny_cli_errors_on_missing_corpus(tmp_path):
    r = subprocess.run([sys.executable, "-m", "minigrpo.tiny", "--out", str(tmp_path / "m"), "--corpus", str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert r.returncode != 0 and "none.txt" in r.stderr
    assert not (tmp_path / "m").exists()


def test_tiny_sizes_by_name_or_by_value_build_the_same_model(tmp_path, tiny_model_dir):
    """build_tiny takes a preset's name or a TinyPreset (the DRG demo's own sizes): same sizes, same bytes."""
    from conftest import tokenizer_corpus

    from minigrpo.tiny import PRESETS, TinyPreset, build_tiny

    sizes = TinyPreset(**{name: getattr(PRESETS["tiny"], name) for name in TinyPreset.__dataclass_fields__})
    out = build_tiny(tmp_path / "by_value", tokenizer_corpus(), preset=sizes, seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
