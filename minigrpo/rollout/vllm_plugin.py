"""minigrpo's plug-in for `vllm serve`: the server side of the weight push (see vllm_server.py).

vLLM loads `register` in every server process (API server, engine core, workers) through the
`vllm.general_plugins` entry point in pyproject.toml; it adds two backends to vLLM's
`WeightTransferEngineFactory`, chosen with `--weight-transfer-config '{"backend": NAME}'`:

    minigrpo_gloo   CPU: the trainer broadcasts over a gloo group (vLLM's stateless torch group), one
                    packed buffer per `/update_weights` call (vLLM's pack_tensors / unpack_tensor)
    minigrpo_nccl   GPU: vLLM's own NCCL engine (packed, double-buffered broadcast), unchanged

Both refuse, at `/init_weight_transfer_engine`, a server whose model is not the trainer's: the
trainer sends the architecture fields of its config.json (`expected_model`) and the worker compares
them with the config of the model it serves; the error names every field that differs.

Both follow vLLM's lifecycle: `start_weight_update` begins a layerwise reload, each `update_weights`
loads one bucket in checkpoint format (`model.load_weights`), `finish_weight_update` finalises the
reload (on CPU this re-runs vLLM's repacking of the linear layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine, WeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLWeightTransferEngine,
    NCCLWeightTransferInitInfo,
    NCCLWeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor

GLOO, NCCL = "minigrpo_gloo", "minigrpo_nccl"

# config.json fields that fix the shapes and the vocabulary of a decoder; those the trainer's config
# has are compared with the served model's (vLLM's `model_config.hf_config`)
MODEL_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def model_mismatches(expected: dict[str, Any], served: Any) -> list[str]:
    """'field: served X, trainer Y' for each field of `expected` that `served` (an HF config) differs in."""
    return [f"{k}: served {getattr(served, k, None)!r}, trainer {v!r}" for k, v in expected.items()
            if getattr(served, k, None) != v]


def check_served_model(engine: WeightTransferEngine, expected: dict[str, Any]) -> None:
    mismatches = model_mismatches(expected, engine.model_config.hf_config)
    if mismatches:
        raise ValueError(f"this server runs {engine.model_config.model!r}, not the trainer's model ("
                         + "; ".join(mismatches) + ")")


def worker_rank(engine: WeightTransferEngine, rank_offset: int) -> int:
    """This worker's rank in the trainer's group: after the trainer (rank 0) and earlier servers."""
    parallel = engine.parallel_config
    return parallel.data_parallel_index * parallel.world_size + parallel.rank + rank_offset


# ----------------------------------------------------------------------------- gloo (CPU)


@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str  # the trainer's address as the server sees it; the trainer is rank 0
    master_port: int
    rank_offset: int  # ranks before this server's first worker
    world_size: int  # 1 + every worker of every server
    timeout_s: float  # a broadcast waiting longer than this fails (the trainer or a peer is gone)
    expected_model: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlooUpdateInfo(NCCLWeightTransferUpdateInfo):
    """One bucket: names, dtypes and shapes, in the order they are packed into one uint8 buffer."""


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: torch.distributed.ProcessGroup | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        check_served_model(self, init_info.expected_model)
        self.shutdown()  # a trainer that restarts opens a new group
        self.group = stateless_init_torch_distributed_process_group(
            init_info.master_address, init_info.master_port, worker_rank(self, init_info.rank_offset),
            init_info.world_size, backend="gloo", group_name=f"minigrpo_weights_{init_info.master_port}",
            timeout=timedelta(seconds=init_info.timeout_s),
        )

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which raises without an accelerator;
        # a gloo broadcast into CPU memory has completed when it returns
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("minigrpo_gloo: /update_weights before /init_weight_transfer_engine")
        dtypes = [getattr(torch, name) for name in update_info.dtype_names]
        sizes = [torch.Size(shape).numel() * dtype.itemsize for shape, dtype in zip(update_info.shapes, dtypes)]
        packed = torch.empty(sum(sizes), dtype=torch.uint8)
        self.group.broadcast(packed, 0).wait()  # (tensor, root rank)
        self.model.load_weights(unpack_tensor(packed, update_info.names, update_info.shapes, dtypes, sizes))

    def shutdown(self) -> None:
        if self.group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
            self.group = None


# ----------------------------------------------------------------------------- NCCL (GPU)


@dataclass(kw_only=True)
class NCCLInitInfo(NCCLWeightTransferInitInfo):
    expected_model: dict[str, Any] = field(default_factory=dict)


class CheckedNCCLWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's NCCL engine, refusing a trainer whose model differs from the served one."""

    init_info_cls = NCCLInitInfo

    def init_transfer_engine(self, init_info: NCCLInitInfo) -> None:
        check_served_model(self, init_info.expected_model)
        super().init_transfer_engine(init_info)


def register() -> None:
    """The `vllm.general_plugins` entry point: add both backends to vLLM's registry (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name, cls in ((GLOO, "GlooWeightTransferEngine"), (NCCL, "CheckedNCCLWeightTransferEngine")):
        try:
            WeightTransferEngineFactory.register_engine(name, __name__, cls)
        except ValueError:  # already registered in this process
            pass
