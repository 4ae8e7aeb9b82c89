"""Rollout engines behind one interface (see base.py): the built-in TorchEngine, VLLMEngine (colocated)
and VLLMServerEngine (running `vllm serve` processes); `make_engine` (factory.py) builds the one a
`RolloutConfig` names.

`VLLMEngine` and `VLLMServerEngine` are imported lazily, so minigrpo works without vllm installed.
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
    "VLLMServerEngine",
    "check_request",
    "engine_dtype",
    "make_engine",
]


def __getattr__(name: str):
    if name == "VLLMEngine":
        from minigrpo.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    if name == "VLLMServerEngine":
        from minigrpo.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine
    raise AttributeError(f"module 'minigrpo.rollout' has no attribute {name!r}")
