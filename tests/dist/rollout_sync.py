"""An FSDP2 optimizer step on 2 CPU ranks, then its weights streamed into each rank's vLLM engine.

    torchrun --nproc_per_node 2 tests/dist/rollout_sync.py MODEL_DIR OUT_JSON

Every rank: join the process group, start its in-process vLLM engine (after the group exists, all
ranks together), shard the policy, take one AdamW step, sample with the engine before and after
`load_weights(iter_full_state_dict(policy))`, and score both samples with the sharded policy.
Rank 0 writes the max |sampler - trainer| log-prob differences (over both ranks) to OUT_JSON.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minigrpo.config import ParallelConfig  # noqa: E402
from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import IGNORE_INDEX, LogprobModel, load_model  # noqa: E402
from minigrpo.parallel import iter_full_state_dict, shard_model  # noqa: E402
from minigrpo.rollout import SamplingParams  # noqa: E402
from minigrpo.rollout.vllm_engine import VLLMEngine  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 37], [300, 301, 302, 303, 304]]


def pad_batch(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, completion) pairs -> right-padded ids, targets (completion tokens only), mask; (B, T)."""
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    targets = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, (p, c) in enumerate(rows):
        seq = p + c
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        targets[b, len(p) - 1 : len(seq) - 1] = torch.tensor(c)  # position t scores token t + 1
    return ids, targets, mask


def trainer_vs_sampler(policy, completions, temperature: float) -> float:
    """Max |sampler - trainer| log-prob over all tokens; one forward (a collective) per call."""
    flat = [c for row in completions for c in row]
    ids, targets, mask = pad_batch([(c.prompt_ids, c.token_ids) for c in flat])
    with torch.no_grad():
        logp, _ = policy(ids, targets, attention_mask=mask, temperature=temperature)  # (B, T)
    worst = 0.0
    for b, c in enumerate(flat):
        got = logp[b][targets[b] != IGNORE_INDEX]
        worst = max(worst, (got - torch.tensor(c.logprobs)).abs().max().item())
    return worst


def main() -> None:
    model_dir, out_json = sys.argv[1], sys.argv[2]
    info = init_distributed()
    engine = VLLMEngine(model_dir, kv_cache_memory_gb=0.125, enforce_eager=True, seed=info.rank)
    policy = shard_model(LogprobModel(load_model(model_dir)), ParallelConfig(), info)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-2)

    # one step: raise the log-likelihood of a fixed sequence (a stand-in for the GRPO loss)
    seq = torch.arange(3, 40)[None]  # (1, 37)
    targets = torch.full_like(seq, IGNORE_INDEX)
    targets[:, :-1] = seq[:, 1:]
    logp, _ = policy(seq, targets)
    (-logp.sum()).backward()
    opt.step()
    opt.zero_grad()

    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=100 + info.rank)
    stale = trainer_vs_sampler(policy, engine.generate(PROMPTS, 2, sp), 1.0)  # engine still on the old weights
    names = []

    def tracked():
        for name, tensor in iter_full_state_dict(policy):
            names.append(name)
            yield name, tensor

    engine.load_weights(tracked())
    synced_out = engine.generate(PROMPTS, 2, sp)
    synced = trainer_vs_sampler(policy, synced_out, 1.0)

    result = torch.tensor([stale, synced])
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    if info.rank == 0:
        Path(out_json).write_text(json.dumps(dict(
            stale=result[0].item(), synced=result[1].item(), version=engine.version,
            weight_versions=sorted({c.weight_version for row in synced_out for c in row}),
            names=names, world_size=info.world_size,
        )))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
    destroy_distributed()  # a barrier first: no rank tears gloo down under a peer's last collective
