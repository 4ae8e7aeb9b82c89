"""`load_sharded` (meta init, rank 0's weights scattered) against a plain load sharded with `shard_model`.

    [torchrun --nproc_per_node N] tests/dist/load_sharded.py MODEL_DIR OUT_JSON [--push-dtype bfloat16]

Every rank builds both, trainable and frozen, and compares its local shards, the buffers, the full
gathered weights and one forward/backward (bitwise on CPU; to 1e-3 on CUDA, where bf16 kernels may
pick other reduction orders); it also counts its own calls of `load_model` inside load_sharded (only
rank 0 may read the checkpoint) and the dtypes the weight push all-gathers. Rank 0 writes the
all-ranks result to OUT_JSON.
"""

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import minigrpo.parallel as parallel  # noqa: E402
from minigrpo.config import ModelConfig, ParallelConfig  # noqa: E402
from minigrpo.dist import all_gather_object, destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import LogprobModel  # noqa: E402


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def compare(a, b, device: torch.device) -> dict:
    """Local shards, buffers, gathered weights, forward log-probs and gradients of two sharded models."""
    close = torch.equal if device.type == "cpu" else functools.partial(torch.allclose, rtol=1e-3, atol=1e-5)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out = {
        "names": list(pa) == list(pb) and [n for n, _ in a.named_buffers()] == [n for n, _ in b.named_buffers()],
        "shards": all(torch.equal(local(pa[n]), local(pb[n])) for n in pa),
        "buffers": all(torch.equal(x, y) for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers())),
        "dtypes": all(pa[n].dtype == pb[n].dtype for n in pa),
        "requires_grad": all(pa[n].requires_grad == pb[n].requires_grad for n in pa),
        "training": a.training == b.training,
        "tied": a.lm.lm_head.weight is a.lm.model.embed_tokens.weight,
    }
    full_a, full_b = dict(parallel.iter_full_state_dict(a)), dict(parallel.iter_full_state_dict(b))
    out["full"] = full_a.keys() == full_b.keys() and all(torch.equal(full_a[k], full_b[k]) for k in full_a)
    g = torch.Generator().manual_seed(3)
    ids, targets = torch.randint(3, 500, (2, 11), generator=g), torch.randint(0, 500, (2, 11), generator=g)
    ids, targets = ids.to(device), targets.to(device)
    with torch.set_grad_enabled(a.training):
        logp_a, _ = a(ids, targets)
        logp_b, _ = b(ids, targets)
    out["logp"] = close(logp_a, logp_b)
    if a.training:
        (-logp_a.sum()).backward()
        (-logp_b.sum()).backward()
        out["grads"] = all(close(local(pa[n].grad), local(pb[n].grad)) for n in pa)
    return out


def pushed_dtypes(model, dtype: torch.dtype) -> list[str]:
    """The dtypes that iter_full_state_dict(model, dtype) all-gathers in."""
    seen = set()
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda self, **kw: seen.add(str(self.dtype)) or full_tensor(self, **kw)
    try:
        for _ in parallel.iter_full_state_dict(model, dtype=dtype):
            pass
    finally:
        DTensor.full_tensor = full_tensor
    return sorted(seen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_json")
    ap.add_argument("--push-dtype", default="bfloat16")
    args = ap.parse_args()
    model_dir, out_json = args.model_dir, args.out_json
    info = init_distributed()
    reads = []
    plain_load = parallel.load_model
    parallel.load_model = lambda *a, **k: reads.append(1) or plain_load(*a, **k)
    cfg = ParallelConfig()
    result = {}
    for frozen in (False, True):
        sharded = parallel.load_sharded(ModelConfig(path=model_dir), cfg, info, frozen=frozen)
        shard = parallel.shard_reference if frozen else parallel.shard_model
        reference = shard(LogprobModel(plain_load(model_dir)), cfg, info)
        result["frozen" if frozen else "trainable"] = compare(sharded, reference, info.device)
        if not frozen:
            result["pushed_dtypes"] = pushed_dtypes(sharded, getattr(torch, args.push_dtype))
    result["checkpoint_reads"] = len(reads)
    result["device"] = str(info.device)
    result["local_rows"] = local(dict(sharded.named_parameters())["lm.model.embed_tokens.weight"]).shape[0]
    everyone = all_gather_object(result)
    if info.is_main:
        Path(out_json).write_text(json.dumps({"world_size": info.world_size, "ranks": everyone}))


if __name__ == "__main__":
    main()
    destroy_distributed()  # a barrier first: no rank tears gloo down under a peer's last collective
