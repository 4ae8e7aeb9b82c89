"""Process-group setup and rank helpers: one code path for torchrun and for a plain `python` run.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR set) we join the job's group.
Without torchrun we still create a real single-rank group (backed by an in-memory HashStore), so
FSDP2, DCP and every collective run exactly the same code with world size 1; nothing branches on
"distributed or not" further down.

Backend: nccl when CUDA is available (one GPU per local rank), gloo on CPU.

A torchrun worker watches its launcher: when the launcher dies (kill -9), the worker stops
(interrupt.exit_with_parent) instead of training on as an orphan.
"""

from __future__ import annotations

import datetime
import os
import sys
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0, use_cuda: bool | None = None) -> DistInfo:
    """Join (or create) the default process group and pick this rank's device. Idempotent."""
    if under_torchrun():
        from minigrpo.interrupt import exit_with_parent

        exit_with_parent()
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            # device_id binds NCCL eagerly to this GPU (avoids a lazy init guessing the device).
            kwargs = {"device_id": device} if use_cuda else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def under_torchrun() -> bool:
    """True in a worker started by torchrun (torch.distributed.run sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


_TEARDOWN: list[weakref.WeakMethod] = []


def on_teardown(method) -> None:
    """Call the bound `method` in destroy_distributed, before the process group goes.

    For objects holding sub-groups of it (an in-process vLLM engine), which must shut down while the
    group still exists. Held weakly: an object dropped earlier is simply skipped.
    """
    _TEARDOWN.append(weakref.WeakMethod(method))


def destroy_distributed(clean: bool | None = None) -> None:
    """Tear the process group down (call it from a `finally:` at the end of an entry point).

    On a normal exit (`clean`) every rank first meets at a barrier, so no rank destroys its gloo group
    while a peer's last collective is still in flight; gloo threads still holding async work at
    interpreter exit abort the process ("terminate called without an active exception", seen in CI).
    After an error or an interrupt the barrier is skipped: a failed peer may never reach it.
    `clean=None`: clean unless an exception is propagating.
    """
    clean = sys.exc_info()[0] is None if clean is None else clean
    if dist.is_initialized() and clean and dist.get_world_size() > 1:
        dist.barrier()
    while _TEARDOWN:
        method = _TEARDOWN.pop()()
        if method is not None:
            method()
    if dist.is_initialized():  # vLLM's shutdown may already have destroyed it
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under nccl, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor | float | int) -> torch.Tensor:
    """Sum over ranks. Returns a new tensor on `comm_device()` (float64 for Python numbers)."""
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    t = t.to(comm_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every rank (small objects only: error messages, paths, flags)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's Python object, in rank order (small objects: hashes, counts, messages)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ok(ok: bool, message: str = "") -> str | None:
    """Collective check: every rank learns the first rank's failure message, or None if all passed.

    Lets every rank raise the same error together instead of one rank dying and the rest hanging
    in the next collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None if ok else message
    msgs: list = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, None if ok else message)
    return next((m for m in msgs if m is not None), None)
