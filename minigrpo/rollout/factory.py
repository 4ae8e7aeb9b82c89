"""`make_engine`: the rollout engine a `RolloutConfig` names, loaded from a model folder on a device.

The one place engine settings meet the config, used by the trainer and by evaluation alike.
"""

from __future__ import annotations

import os

import torch

from minigrpo.config import RolloutConfig
from minigrpo.rollout.base import RolloutEngine
from minigrpo.rollout.torch_engine import TorchEngine


def engine_dtype(rollout: RolloutConfig, device: torch.device) -> str:
    """`rollout.dtype`, with auto = bfloat16 on CUDA and float32 elsewhere (exact against the fp32 trainer)."""
    if rollout.dtype != "auto":
        return rollout.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def make_engine(
    rollout: RolloutConfig,
    model_path: str | os.PathLike,
    device: torch.device,
    seed: int,
    attn_implementation: str = "sdpa",
) -> RolloutEngine:
    """The engine of `rollout.engine`, computing in `engine_dtype(rollout, device)`."""
    dtype = engine_dtype(rollout, device)
    if rollout.engine == "torch":
        return TorchEngine(
            model_path,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            max_batch_rows=rollout.max_batch_rows or None,
        )
    if rollout.engine == "vllm_server":  # the servers' own dtype applies (python -m minigrpo.rollout.serve)
        from minigrpo.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(rollout.server_urls, model_path, timeout_s=rollout.server_timeout_s)
    from minigrpo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        model_path,
        dtype=dtype,
        seed=seed,
        kv_cache_memory_gb=rollout.kv_cache_memory_gb,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        enable_sleep_mode=rollout.sleep_between_steps,
        sleep_level=2,  # the trainer pushes every weight after each sleep (the engine checks it does)
        enforce_eager=rollout.enforce_eager,
    )
