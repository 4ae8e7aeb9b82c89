"""Train a few steps of the sharded engine on a fixed synthetic batch; dump what the tests compare.

    [torchrun --nproc_per_node N] tests/dist/engine_run.py MODEL_DIR OUT_DIR --steps 3 --micro-batch-size 1 [--ac]

Runs `--steps` steps on the same 7 sequences, then one step on a single sequence.

Writes (rank 0): OUT/result.json (per-step loss, grad norm, token counts per rank, streamed names),
OUT/final.safetensors (full weights from iter_full_state_dict), OUT/hf/ (export_hf), and
OUT/probe.safetensors (input ids, targets, and log-probs of them from the trained sharded model, the
sharded frozen reference and the plain initial model).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minigrpo.batch import Sample  # noqa: E402
from minigrpo.checkpoint import export_hf  # noqa: E402
from minigrpo.config import ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from minigrpo.dist import all_reduce_sum, destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import LogprobModel, load_model, load_tokenizer  # noqa: E402
from minigrpo.optim import build_optimizer  # noqa: E402
from minigrpo.parallel import iter_full_state_dict, shard_model, shard_reference  # noqa: E402
from minigrpo.sft import DataConfig, SFTConfig, train_step  # noqa: E402

BATCH = 7  # sequences per step: odd, so two ranks hold 4 and 3 sequences of different lengths


def step_samples(step: int, vocab: int) -> list[Sample]:
    """The same 7 random sequences every step (so the loss must fall), of varied lengths."""
    g = torch.Generator().manual_seed(1000)
    out = []
    for i in range(BATCH):
        p, c = 2 + 3 * i % 9, 1 + 5 * i % 13
        ids = torch.randint(3, vocab, (p + c,), generator=g).tolist()
        out.append(Sample(ids[:p], ids[p:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--micro-batch-size", type=int, default=1)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    args = ap.parse_args()
    info = init_distributed()
    out = Path(args.out_dir)
    cfg = SFTConfig(
        model=ModelConfig(path=args.model_dir),
        optim=OptimConfig(lr=1e-2, max_grad_norm=1.0, weight_decay=0.1),
        parallel=ParallelConfig(micro_batch_size=args.micro_batch_size, activation_checkpointing=args.ac),
        data=DataConfig(train_file="unused"),
    )
    tokenizer = load_tokenizer(args.model_dir)
    model = shard_model(LogprobModel(load_model(args.model_dir)), cfg.parallel, info)
    reference = shard_reference(LogprobModel(load_model(args.model_dir)), cfg.parallel, info)
    optimizer = build_optimizer(model, cfg.optim)
    vocab = model.config.vocab_size
    steps = []
    for step in range(args.steps + 1):
        batch = step_samples(step, vocab)
        if step == args.steps:
            batch = batch[:1]  # a last step with one sequence: rank 1 has none and runs an empty micro-batch
        mine = batch[info.rank :: info.world_size]
        local_tokens = sum(len(s.completion_ids) for s in mine)
        per_rank = [0] * info.world_size
        per_rank[info.rank] = local_tokens
        per_rank = all_reduce_sum(torch.tensor(per_rank)).tolist()
        stats = train_step(model, optimizer, mine, cfg, cfg.optim.lr, tokenizer.pad_token_id, info)
        steps.append({**stats, "tokens_per_rank": per_rank})

    # Probe: log-probs of the trained sharded model, for the export round-trip test.
    g = torch.Generator().manual_seed(7)
    probe_ids = torch.randint(3, vocab, (2, 12), generator=g)
    probe_targets = torch.randint(0, vocab, (2, 12), generator=g)
    probe_ids, probe_targets = probe_ids.to(info.device), probe_targets.to(info.device)
    with torch.no_grad():
        probe_logp, _ = model(probe_ids, probe_targets, torch.ones_like(probe_ids), None)
        ref_logp, _ = reference(probe_ids, probe_targets, torch.ones_like(probe_ids), None)
    # The frozen reference, after the policy trained: still the initial model (plain, unsharded).
    initial = LogprobModel(load_model(args.model_dir, device=info.device)).eval()
    with torch.no_grad():
        initial_logp, _ = initial(probe_ids, probe_targets, torch.ones_like(probe_ids), None)
    ref_trainable = sum(p.requires_grad for p in reference.parameters())

    names, full = [], {}
    for name, tensor in iter_full_state_dict(model):
        names.append(name)
        if info.is_main:
            full[name] = tensor.clone()
    export_hf(model, out / "hf", tokenizer)
    if info.is_main:
        from safetensors.torch import save_file

        full.pop("lm_head.weight", None)  # tied: safetensors refuses duplicates, the test checks the name
        save_file(full, str(out / "final.safetensors"))
        probe = {"input_ids": probe_ids, "targets": probe_targets, "logp": probe_logp, "ref_logp": ref_logp, "initial_logp": initial_logp}
        save_file({k: v.cpu().contiguous() for k, v in probe.items()}, str(out / "probe.safetensors"))
        result = {"world_size": info.world_size, "device": str(info.device), "steps": steps, "names": names, "ref_trainable": ref_trainable}
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    destroy_distributed()  # a barrier first: no rank tears gloo down under a peer's last collective
