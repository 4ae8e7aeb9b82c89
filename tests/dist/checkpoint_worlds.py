"""A checkpoint saved on one world size restores exactly on another: plain tensors (one unsharded rank) and
FSDP2 shards (more ranks) both ways.

    [torchrun --nproc_per_node N] tests/dist/checkpoint_worlds.py MODEL_DIR ROOT save|load

save: one AdamW step of the policy as `load_sharded` gives it on this world size (a plain module on one
rank, FSDP2 shards on more), a checkpoint of it under ROOT, and the full weights and optimizer moments
(gathered) in ROOT/expected.safetensors. load: a new policy and optimizer on this world size, the checkpoint
restored into them; rank 0 writes ROOT/loaded.json: the names that differ from expected (bitwise), if any.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minigrpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from minigrpo.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.optim import build_optimizer  # noqa: E402
from minigrpo.parallel import full_tensor, load_sharded  # noqa: E402


def full_state(model, optimizer) -> dict[str, torch.Tensor]:
    """Weights and AdamW moments by parameter name, whole on every rank (a collective)."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = full_tensor(param.detach()).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{key}"] = full_tensor(optimizer.state[param][key]).clone()
    return out


def main() -> None:
    model_dir, root, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    info = init_distributed()
    model = load_sharded(ModelConfig(path=model_dir), ParallelConfig(), info)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    if mode == "save":
        torch.manual_seed(0)  # the same batch on every rank
        ids = torch.randint(0, 100, (2, 12))
        logp, _ = model(ids[:, :-1], ids[:, 1:])
        logp.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        save_checkpoint(root, 1, model, optimizer)
        expected = full_state(model, optimizer)
        if info.rank == 0:
            from safetensors.torch import save_file

            save_file(expected, str(root / "expected.safetensors"))
    else:
        from safetensors.torch import load_file

        load_checkpoint(latest_checkpoint(root), model, optimizer)
        expected = load_file(str(root / "expected.safetensors"))
        loaded = full_state(model, optimizer)
        if info.rank == 0:
            differ = sorted(n for n in expected if n not in loaded or not torch.equal(expected[n], loaded[n]))
            result = {"names": len(expected), "differ": differ, "sharded": type(model).__name__}
            (root / "loaded.json").write_text(json.dumps(result))
    destroy_distributed()  # a barrier first: no rank tears gloo down under a peer's last collective


if __name__ == "__main__":
    main()
