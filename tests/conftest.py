"""Shared fixtures: a tiny Qwen2 model and tokenizer built locally once per test session."""

import csv
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: DRG titles, chat/answer tags, digits, plain words."""
    texts = []
    with open(ROOT / "recipes/drg/data/DRG_34.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            texts.append(row["Description"])
    texts += [
        "<think>\nThe principal diagnosis drives the base DRG.\n</think>\n<answer>\nSEPSIS\n</answer>",
        "You are a helpful AI Assistant that provides well-reasoned and detailed responses.",
        "The patient was admitted with chest pain and discharged home in stable condition.",
        " ".join(str(i) for i in range(200)),
        "add the numbers: 3 + 4 = 7. count the letters. reverse the word. answer yes or no.",
    ]
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-initialised ~0.1M-parameter Qwen2 model + BPE tokenizer in HF format."""
    from minigrpo.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny", tokenizer_corpus(), preset="tiny", seed=0)


@pytest.fixture(autouse=True)
def _single_thread_env(monkeypatch):
    # Subprocesses (torchrun) inherit this; 2-core CI machines are oversubscribed otherwise.
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
