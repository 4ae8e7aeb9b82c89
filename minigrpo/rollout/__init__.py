"""Rollout engines behind one interface (see base.py): the built-in TorchEngine and VLLMEngine.

`VLLMEngine` is imported lazily, so minigrpo works without vllm installed.
"""

from minigrpo.rollout.base import Completion, RolloutEngine, SamplingParams, check_request
from minigrpo.rollout.torch_engine import TorchEngine

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "TorchEngine", "VLLMEngine", "check_request"]


def __getattr__(name: str):
    if name == "VLLMEngine":
        from minigrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'minigrpo.rollout' has no attribute {name!r}")
