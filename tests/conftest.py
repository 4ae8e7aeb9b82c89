"""Shared fixtures: a tiny Qwen2 model and tokenizer built locally once per test session.

GPU-safe: tests written for fp32 on CPU stay on CPU on a CUDA host. Once collection is done, the
session sees `torch.cuda.is_available() == False` (so init_distributed picks gloo and CPU, engines
fp32, fixtures of any scope likewise) and CUDA_VISIBLE_DEVICES="" for its subprocesses. Tests that
need a GPU carry `@pytest.mark.cuda` (plus a skip without one) and get the real GPU back while they
run: `pytest -m cuda` selects them, `-m "not cuda"` the rest.
"""

import csv
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_CUDA_IS_AVAILABLE = torch.cuda.is_available
_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (select with -m cuda); the only tests that see it")


def pytest_collection_modifyitems(session, config, items):
    # After collection, so that skipif(not torch.cuda.is_available()) marks saw the real answer. Ask the
    # driver first: CUDA reads CUDA_VISIBLE_DEVICES once, at its first initialisation.
    _CUDA_IS_AVAILABLE()
    torch.cuda.is_available = lambda: False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def _gpu_only_for_cuda_tests(request, monkeypatch):
    if request.node.get_closest_marker("cuda") is not None:
        monkeypatch.setattr(torch.cuda, "is_available", _CUDA_IS_AVAILABLE)
        if _VISIBLE_DEVICES is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _VISIBLE_DEVICES)


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
