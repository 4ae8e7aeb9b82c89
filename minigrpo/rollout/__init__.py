"""Rollout engines behind one interface (see base.py): the built-in TorchEngine and VLLMEngine;
`make_engine` (factory.py) builds the one a `RolloutConfig` names.

`VLLMEngine` is imported lazily, so minigrpo works without vllm installed.
"""

from minigrpo.rollout.base import Completion, RolloutEngine, SamplingParams, check_request
from minigrpo.rollout.torch_engine import TorchEngine
from minigrpo.rollout.factory import engine_dtype, make_engine

__all__ = [
    "Completion",
    "RolloutEngine",
    "SamplingParams",
    "TorchEngine",
    "VLLMEngine",
    "check_request",
    "engine_dtype",
    "make_engine",
]


def __getattr__(name: str):
    if name == "VLLMEngine":
        from minigrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module 'minigrpo.rollout' has no attribute {name!r}")
