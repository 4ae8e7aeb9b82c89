"""The trainer's side of the weight push into `vllm serve` processes (their side: vllm_plugin.py).

    pusher = WeightPusher(clients, backend, expected_model, dtype)   # the handshake, on the sending rank
    pusher.push(named_tensors, version)                              # one round
    pusher.close()

A round, on every server at once:
    /pause?mode=keep        queued and running requests wait (nothing is aborted)
    /start_weight_update    vLLM begins a layerwise reload
    per bucket              /update_weights {names, dtypes, shapes} while the trainer broadcasts the bytes
    /finish_weight_update   the reload is finalised; the server labels what it samples from now on `version`
    /reset_prefix_cache     no request reuses KV computed with the old weights
    /resume

Transport, one group: the trainer is rank 0, then every worker of every server (a server's ranks start at
its `rank_offset`). `minigrpo_gloo` (CPU): vLLM's stateless gloo group, one packed uint8 buffer per bucket
(vLLM's pack_tensors). `minigrpo_nccl` (GPU): vLLM's NCCL communicator and packed, double-buffered
broadcast (packed_nccl_broadcast_producer), the worker side vLLM's NCCL engine. Tensors go in the server's
dtype (bf16 for a bf16 server), at most one bucket of full tensors in memory at a time.

Why not vLLM's NCCLTrainerWeightTransferEngine: its send_weights() replays a WeightSource whose metadata()
must list every tensor before the first one is sent, while the trainer's weights arrive as one pass of a
collective FSDP gather (parallel.iter_full_state_dict). Buckets cut as the stream arrives need no such
list, and vLLM's workers take any number of /update_weights calls between start and finish.
"""

from __future__ import annotations

import socket
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

import torch
from vllm.distributed.weight_transfer.packed_tensor import DEFAULT_PACKED_BUFFER_SIZE_BYTES, pack_tensors

from minigrpo.rollout.server_http import ServerClient, ServerError
from minigrpo.rollout.vllm_plugin import GLOO, NCCL
NCCL_BUFFERS = 2  # vLLM's default: pack the next chunk while the previous one is on the wire


def in_background(fn: Callable[[], Any]) -> Future:
    """Run `fn` on a daemon thread (a call blocked on a dead peer must not keep the process alive)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def wait_all(futures: list[Future], timeout_s: float, what: str, urls: list[str]) -> list[Any]:
    """Results in order; the first failure is raised at once; a call not done within the bound is an error
    naming the server it went to (`urls[i]` for `futures[i]`; a future past the list is the trainer's own)."""
    done, pending = wait(futures, timeout=timeout_s, return_when=FIRST_EXCEPTION)
    for future in futures:
        if future in done and future.exception() is not None:
            raise future.exception()
    if pending:
        late = [urls[i] if i < len(urls) else "the trainer's end" for i, f in enumerate(futures) if f in pending]
        raise ServerError(", ".join(late), f"{what}: not done within {timeout_s:g} s (2 x rollout.server_timeout_s)")
    return [f.result() for f in futures]


def address_towards(url: str) -> str:
    """This host's address on the route to `url` (what the servers connect back to); no packet is sent."""
    parsed = urlparse(url)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((parsed.hostname, parsed.port or 80))
        return s.getsockname()[0]


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, device: torch.device,
            limit_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Cut the stream into lists of (name, contiguous tensor in `dtype` on `device`); a list is closed as
    soon as it holds more than `limit_bytes` (vLLM's packing rule), so one tensor larger than that goes alone."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        tensor = tensor.detach().to(device=device, dtype=dtype).contiguous()
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size > limit_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


class WeightPusher:
    def __init__(
        self,
        clients: list[ServerClient],
        backend: str,
        world_sizes: list[int],  # workers per server (TP x PP x DP)
        expected_model: dict[str, Any],  # config.json fields the servers' models must match (vllm_plugin.py)
        dtype: torch.dtype,  # the servers' weight dtype
        timeout_s: float,
        bucket_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    ):
        if backend not in (GLOO, NCCL):
            raise ValueError(f"weight-transfer backend {backend!r}: minigrpo pushes with {GLOO} or {NCCL}")
        self.clients, self.backend, self.dtype, self.timeout_s = clients, backend, dtype, timeout_s
        self.bucket_bytes = bucket_bytes
        self.device = torch.device("cpu") if backend == GLOO else torch.device("cuda", torch.cuda.current_device())
        host = address_towards(clients[0].url)
        # gloo: our end of the group listens on a socket bound here. Under torchrun (TORCHELASTIC_USE_AGENT_STORE)
        # a store opened by address alone would only connect as a client, and nobody would listen.
        self.listener = socket.create_server((host, 0)) if backend == GLOO else None
        port = self.listener.getsockname()[1] if self.listener is not None else free_port(host)
        world = 1 + sum(world_sizes)
        offsets = [1 + sum(world_sizes[:k]) for k in range(len(clients))]
        common = dict(master_address=host, master_port=port, world_size=world, expected_model=expected_model)
        if backend == GLOO:
            payloads = [dict(common, rank_offset=offset, timeout_s=timeout_s) for offset in offsets]
        else:
            payloads = [dict(common, rank_offset=offset, packed=True, packed_buffer_size_bytes=bucket_bytes,
                             packed_num_buffers=NCCL_BUFFERS) for offset in offsets]
        # Every server blocks in its /init_weight_transfer_engine until the whole group has met, so the
        # trainer's end opens alongside them; a server that refuses (another model) fails at once.
        calls = [in_background(lambda c=c, p=p: c.init_weight_transfer_engine(p)) for c, p in zip(clients, payloads)]
        calls.append(in_background(lambda: self._open_group(host, port, world)))
        urls = [c.url for c in clients]
        self.group = wait_all(calls, 2 * timeout_s, "opening the weight-transfer group", urls)[-1]

    def _open_group(self, host: str, port: int, world: int):
        if self.backend == GLOO:
            from vllm.distributed.utils import stateless_init_torch_distributed_process_group

            return stateless_init_torch_distributed_process_group(
                host, port, 0, world, backend="gloo", group_name=f"minigrpo_weights_{port}",
                timeout=timedelta(seconds=self.timeout_s), listen_socket=self.listener)
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        torch.cuda.set_device(self.device)  # a fresh thread starts on device 0; NCCL takes the current one
        return trainer_init(dict(master_address=host, master_port=port, world_size=world))

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> list[str]:
        """One round; returns the names sent. Every server is paused for its duration."""
        self._each(lambda c: c.post("pause", params={"mode": "keep"}))
        self._each(lambda c: c.start_weight_update())
        names: list[str] = []
        for bucket in buckets(named_tensors, self.dtype, self.device, self.bucket_bytes):
            names += [name for name, _ in bucket]
            info = dict(names=[n for n, _ in bucket], dtype_names=[str(t.dtype).split(".")[-1] for _, t in bucket],
                        shapes=[list(t.shape) for _, t in bucket])
            receiving = [in_background(lambda c=c, i=info: c.update_weights(i)) for c in self.clients]
            sending = in_background(lambda b=bucket: self._broadcast(b))
            wait_all([*receiving, sending], 2 * self.timeout_s, f"weight push, bucket of {len(bucket)} tensors",
                     [c.url for c in self.clients])
        self._each(lambda c: c.finish_weight_update(str(version)))
        self._each(lambda c: c.post("reset_prefix_cache", params={"reset_running_requests": "true"}))
        self._each(lambda c: c.post("resume"))
        return names

    def _broadcast(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        if self.backend == GLOO:
            chunk = pack_tensors(iter(bucket), lambda item: item[1], buffer_size_bytes=1 << 62)  # one buffer
            self.group.broadcast(chunk.packed_tensor, 0).wait()
            return
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        torch.cuda.set_device(self.device)  # this runs on a fresh thread (see _open_group)
        packed_nccl_broadcast_producer(iter(bucket), self.group, src=0, post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=self.bucket_bytes, num_buffers=NCCL_BUFFERS)

    def _each(self, call: Callable[[ServerClient], Any]) -> None:
        calls = [in_background(lambda c=c: call(c)) for c in self.clients]
        wait_all(calls, 2 * self.timeout_s, "weight push", [c.url for c in self.clients])

    def close(self) -> None:
        """Release the servers' end of the group (best effort: a dead server is past caring) and ours."""
        if self.group is None:
            return
        for client in self.clients:
            try:
                client.post("shutdown_weight_transfer_engine")
            except ServerError:
                pass
        if self.backend == GLOO:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            stateless_destroy_torch_distributed_process_group(self.group)
        else:
            self.group.destroy()
        self.group = None
