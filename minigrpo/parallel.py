"""FSDP2 sharding of a `LogprobModel`, the frozen reference, and full-state-dict streaming.

    dist_info = init_distributed()
    policy = load_sharded(cfg.model, cfg.parallel, dist_info)                              # trainable
    ref = load_sharded(cfg.model, cfg.parallel, dist_info, frozen=True)                    # frozen
    for name, tensor in iter_full_state_dict(policy): ...                                  # HF names

`load_sharded` builds the model on the meta device, shards it, and fills the shards from the one
full copy that rank 0 reads from disk (each rank receives only its shard). `shard_model` /
`shard_reference` shard a model that is already built in full (tests, benchmarks, small models).

Layout: `fully_shard` on every decoder layer (`lm.model.layers[i]`), then on the wrapper as the
root, so the root's forward unshards embeddings, final norm and the (tied) output weight that the
fused log-prob kernel reads directly (they are not used through their modules' forwards).

One rank: with `parallel.fsdp=auto` a one-rank fp32 run is not sharded at all. FSDP2 there would only
copy: each forward and backward gathers every layer's parameters into a second buffer, and each
reduction concatenates, divides by 1 and copies every layer's gradients (measured on the 28M model of
benchmarks/grpo_step.py: 1.35 s of a 17 s step, 8 %). The model is then a plain module on the device, and
everything below (the state dict stream, clipping, checkpoints) takes plain tensors as it takes DTensors.
With bf16 mixed precision on CUDA the one rank keeps FSDP2: its policy is what casts the compute to bf16.

Gradient reduction: FSDP2 averages gradients over ranks by default. Our losses are already
normalised by the *global* token count (see batch.py), so the ranks' gradients must be summed, not
averaged: the divide factor is set to 1 and comms are forced to plain SUM (gloo has no AVG or
PREMUL_SUM; on NCCL plain SUM is also the zero-copy path).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from minigrpo.config import ModelConfig, ParallelConfig
from minigrpo.dist import DistInfo, all_ok, comm_device
from minigrpo.model import LogprobModel, ModelLoadError, check_model_dir, load_model

WRAPPER_PREFIX = "lm."  # LogprobModel keeps the HF model as `.lm`


def build_mesh(info: DistInfo) -> DeviceMesh:
    """A 1-D data-parallel mesh over all ranks (FSDP shards parameters along it)."""
    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def mixed_precision_policy(cfg: ParallelConfig, info: DistInfo) -> MixedPrecisionPolicy:
    """bf16 compute with fp32 master weights and fp32 gradient reduction on CUDA; fp32 on CPU.

    CPU runs stay fp32 so that they can be compared with single-process runs to float32 tolerance.
    """
    if cfg.mixed_precision and info.device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF decoder wrapped in `LogprobModel` (`.lm.model.layers`)."""
    lm = getattr(model, "lm", model)
    body = getattr(lm, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None:
        raise TypeError(f"{type(lm).__name__}: expected decoder layers at .model.layers")
    return list(layers)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    Uses HF's own per-layer checkpointing (non-reentrant), which keeps parameter names unchanged
    (a torch `checkpoint_wrapper` would insert `_checkpoint_wrapped_module.` into every name).
    The layer's FSDP pre-forward hook runs inside the checkpointed call, so the recompute unshards
    the layer again, as it must.
    """
    lm = getattr(model, "lm", model)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False


def uses_fsdp(cfg: ParallelConfig, info: DistInfo) -> bool:
    """Whether models are sharded with FSDP2: always on more ranks; on one rank only when asked, or when its
    mixed-precision policy has a cast to do (see the module docstring)."""
    return info.world_size > 1 or cfg.fsdp == "always" or mixed_precision_policy(cfg, info).param_dtype is not None


def _shard(model: nn.Module, cfg: ParallelConfig, info: DistInfo, mesh: DeviceMesh | None) -> nn.Module:
    if not uses_fsdp(cfg, info):
        return model.to(info.device)
    # No model.to(device) first: fully_shard moves each module's states to the mesh's device itself,
    # one layer at a time, so no full copy of the model lands on the GPU (meta tensors stay meta).
    mesh = mesh or build_mesh(info)
    mp = mixed_precision_policy(cfg, info)
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer's parameters are needed again at the start of backward: keep them gathered.
        reshard = cfg.reshard_after_forward and i < len(layers) - 1
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    assert isinstance(model, FSDPModule)
    for module in [*layers, model]:
        module.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is globally normalised
        module.set_force_sum_reduction_for_comms(True)
    return model


def sync_gradients(model: nn.Module, info: DistInfo, now: bool) -> None:
    """Whether the next backward reduce-scatters gradients; on one sharded rank (bf16 on CUDA, or
    `parallel.fsdp=always`) only the last micro-batch's does.

    FSDP2 reduce-scatters after every backward. On one rank that is a cat, a copy and a divide of every
    layer's flat gradient per micro-batch (seen in a profile of benchmarks/grpo_step.py) for nothing: the
    unsharded gradients it accumulates instead, in the reduce dtype, are the sharded ones' size, and
    the sums are the same. On more ranks every micro-batch still reduces, so no rank holds a full
    gradient."""
    if info.world_size == 1 and isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(now)


def _as_trainable(model: nn.Module, cfg: ParallelConfig, activation_checkpointing: bool | None) -> None:
    model.float()  # master weights in fp32 even if the checkpoint was bf16; compute dtype is the MP policy's
    if cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing:
        enable_activation_checkpointing(model)


def _as_frozen(model: nn.Module, cfg: ParallelConfig, info: DistInfo) -> None:
    model.requires_grad_(False)
    if cfg.mixed_precision and info.device.type == "cuda":
        model.to(torch.bfloat16)


def shard_model(
    model: nn.Module,
    cfg: ParallelConfig,
    info: DistInfo,
    mesh: DeviceMesh | None = None,
    activation_checkpointing: bool | None = None,
) -> nn.Module:
    """Shard a trainable `LogprobModel` in place (fp32 master weights) and put it in train mode.

    `activation_checkpointing` overrides `cfg.activation_checkpointing`.
    """
    _as_trainable(model, cfg, activation_checkpointing)
    model = _shard(model, cfg, info, mesh)
    model.train()
    return model


def shard_reference(model: nn.Module, cfg: ParallelConfig, info: DistInfo, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard a frozen reference `LogprobModel`: no grads, eval mode, no optimizer state.

    Call its forward under `torch.no_grad()`. On CUDA with mixed precision the sharded copy is kept
    in bf16 (it is never updated, so fp32 master weights buy nothing and cost twice the memory).
    """
    _as_frozen(model, cfg, info)
    model = _shard(model, cfg, info, mesh)
    model.eval()
    return model


def load_sharded(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    info: DistInfo,
    frozen: bool = False,
    mesh: DeviceMesh | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> nn.Module:
    """The sharded `LogprobModel` of `model_cfg.path`: trainable (as `shard_model`) or `frozen` (as
    `shard_reference`, its parameters in `frozen_dtype` when given), without a full copy of the model on
    any rank but rank 0's host.

    Every rank builds the model on the meta device and shards it there; the shards are then
    allocated on the rank's device and filled from rank 0, which alone reads the checkpoint (fp32 on
    its host; 30 GB for 7B, where every rank loading it would take 8 x 30 GB). A collective.
    """
    full, error = None, None
    if info.rank == 0:
        try:
            lm = load_model(model_cfg.path, "float32", model_cfg.attn_implementation, model_cfg.trust_remote_code)
            full = LogprobModel(lm)
        except ModelLoadError as e:
            error = str(e)
    error = all_ok(error is None, error or "")  # every rank raises rank 0's error, none waits in a collective
    if error:
        raise ModelLoadError(error)
    sharded = uses_fsdp(parallel_cfg, info)
    model = LogprobModel(_meta_model(model_cfg)) if sharded else full  # one plain rank: the loaded model itself
    if frozen:
        _as_frozen(model, parallel_cfg, info)
        if frozen_dtype is not None:  # e.g. a bf16 reference on CPU; buffers (rotary frequencies) stay fp32
            for param in model.parameters():
                param.data = param.data.to(frozen_dtype)
    else:
        _as_trainable(model, parallel_cfg, None)
    model = _shard(model, parallel_cfg, info, mesh)
    if sharded:
        model.to_empty(device=info.device)  # this rank's shards and the (unsharded) buffers, values undefined
        _fill_from_rank0(model, full, info)
    del full
    return model.eval() if frozen else model.train()


def _meta_model(model_cfg: ModelConfig) -> nn.Module:
    """The folder's model with every parameter and buffer on the meta device (no memory, no init), in
    fp32, eval mode and with the folder's generation config, as `load_model` gives it."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = check_model_dir(model_cfg.path)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(
            config,
            dtype=torch.float32,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    if (path / "generation_config.json").is_file():
        lm.generation_config = GenerationConfig.from_pretrained(str(path))
    return lm.eval()


@torch.no_grad()
def _fill_from_rank0(model: nn.Module, source: nn.Module | None, info: DistInfo) -> None:
    """Copy rank 0's plain `source` (None elsewhere) into the sharded `model`, one tensor at a time.

    Parameters are scattered (rank 0 sends each rank its Shard(0) rows only); buffers, which FSDP
    leaves whole (rotary inverse frequencies, not in the state dict), are broadcast. Every rank walks
    the same names in the same order; tied weights appear once in named_parameters().
    """
    device = comm_device()
    named = {**dict(source.named_parameters()), **dict(source.named_buffers())} if source is not None else {}
    for name, target in [*model.named_parameters(), *model.named_buffers()]:
        if info.rank == 0:
            full = named[name].detach().to(device=device, dtype=target.dtype)
        else:
            full = torch.empty(target.shape, dtype=target.dtype, device=device)  # filled by the collective
        if isinstance(target, DTensor):
            shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=0)
            target.to_local().copy_(shard.to_local())
        else:
            if info.world_size > 1:
                dist.broadcast(full, src=0)
            target.copy_(full)


def hf_name(name: str) -> str:
    """`lm.model.layers.0.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`."""
    return name[len(WRAPPER_PREFIX) :] if name.startswith(WRAPPER_PREFIX) else name


def _tied_output_name(model: nn.Module) -> str | None:
    """`lm_head.weight` when the output embedding is tied to the input embedding, else None."""
    lm = getattr(model, "lm", model)
    out = lm.get_output_embeddings()
    if out is None or out.weight is not lm.get_input_embeddings().weight:
        return None
    for name, module in lm.named_modules():
        if module is out:
            return f"{name}.weight"
    return None


@torch.no_grad()
def iter_full_state_dict(
    model: nn.Module, dtype: torch.dtype | None = None, include_tied: bool = True
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) one parameter at a time, gathered on every rank.

    A collective: every rank must consume the whole iterator in the same order. Only one full
    tensor exists at a time per rank (the previous one is released once the consumer drops it).
    Tied output embeddings are yielded under `lm_head.weight` too when `include_tied` (a vLLM weight
    load wants it); HF exports pass include_tied=False, as `save_pretrained` does.
    """
    tied = _tied_output_name(model)
    seen: set[str] = set()
    # state_dict() is references to the local shards (no copy); persistent buffers included.
    for name, tensor in model.state_dict().items():
        name = hf_name(name)
        if name in seen:
            continue
        seen.add(name)
        if name == tied and not include_tied:
            continue
        yield name, _gathered(tensor, dtype)
    if tied is not None and include_tied and tied not in seen:
        # nn.Module.state_dict() already lists both names of a tied weight; this is a safety net
        # for models whose state_dict drops the duplicate.
        yield tied, _gathered(getattr(model, "lm", model).get_output_embeddings().weight, dtype)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor shard gathered (a collective), a plain tensor (one unsharded rank) as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _gathered(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The full tensor in `dtype`, cast before the all-gather: a cast of a DTensor is elementwise and keeps
    its Shard(0), so bf16 from fp32 masters moves half the bytes, and no full fp32 copy is made."""
    if dtype is not None:
        tensor = tensor.to(dtype)
    return full_tensor(tensor)
