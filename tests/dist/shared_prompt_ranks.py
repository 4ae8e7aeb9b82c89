"""2 gloo ranks, FSDP2 + activation checkpointing, float64: the shared-prompt layout gives the per-completion
layout's loss and parameter gradients, for every aggregation, with groups split over micro-batches.

    torchrun --nproc_per_node 2 tests/dist/shared_prompt_ranks.py MODEL_DIR OUT_JSON
Rank 0 writes {aggregation: {"loss": [shared, per completion], "max_grad_diff", "max_grad"}}.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from float64 import patches  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from minigrpo import grpo  # noqa: E402
from minigrpo.config import ParallelConfig  # noqa: E402
from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import LogprobModel  # noqa: E402
from minigrpo.parallel import _shard, enable_activation_checkpointing  # noqa: E402
from minigrpo.rl.groups import Group  # noqa: E402
from minigrpo.rl.micro_batches import pack_groups  # noqa: E402
from minigrpo.rl.prompts import Prompt  # noqa: E402
from minigrpo.rollout import Completion  # noqa: E402

PAD = 0


def groups_of_rank(vocab: int, rank: int) -> list[Group]:
    """Rank 0: prompts of 1 and 6 tokens, groups of 3 and 4; rank 1: a 9-token prompt, a group of 2.
    Completions of 0, 1 and up to 7 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    spec = [[(1, [0, 1, 4]), (6, [7, 2, 1, 3])], [(9, [5, 0])]]
    groups = []
    for owner, part in enumerate(spec):
        for i, (p, lengths) in enumerate(part):
            prompt = ids(p)
            completions = [Completion(prompt, ids(n), [-0.5] * n, "stop", 0) for n in lengths]
            rewards = [float(k % 2) for k in range(len(lengths))]
            group = Group(Prompt(f"p{owner}{i}", prompt), completions, [""] * len(lengths), rewards, {}, 1.0)
            if owner == rank:
                groups.append(group)
    return groups


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    for obj, name, value in patches():
        setattr(obj, name, value)
    info = init_distributed()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="sdpa")
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = LogprobModel(lm)
    assert model.scores_needed_pairs
    enable_activation_checkpointing(model)
    model = _shard(model, ParallelConfig(), info, None)
    groups = groups_of_rank(lm.config.vocab_size, info.rank)
    adv = torch.tensor([[0.3, -1.2, 0.9, 0.4], [1.1, -0.7, 0.2, -0.6]][: len(groups)], dtype=torch.float64)
    results = {}
    for aggregation in grpo.AGGREGATIONS:
        runs = []
        for shared in (True, False):
            model.zero_grad(set_to_none=True)
            mbs, counts = pack_groups(groups, adv, 2, PAD, max_completion_tokens=7, shared_prompt=shared)
            aggregate = grpo.AGGREGATIONS[aggregation](counts)
            total = torch.zeros((), dtype=torch.float64)
            for mb in mbs:
                rows = mb.rows
                logp, _ = model(rows.input_ids, rows.targets, rows.attention_mask, rows.position_ids,
                                temperature=0.9, score_index=rows.score_index)
                logp = rows.scatter(logp)
                mask = mb.mask.double()
                loss = grpo.grpo_loss(logp, logp.detach() + 0.05 * mask, mb.adv.double(), mask, aggregate,
                                      ref_logp=logp.detach() - 0.1 * mask, beta=0.04, eps_low=0.2, eps_high=0.28)
                loss.backward()
                total += loss.detach()
            dist.all_reduce(total)
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
            runs.append((total.item(), grads))
        (shared_loss, shared_grads), (alone_loss, alone_grads) = runs
        assert shared_grads.keys() == alone_grads.keys() and shared_grads
        results[aggregation] = {
            "loss": [shared_loss, alone_loss],
            "max_grad_diff": max((shared_grads[n] - alone_grads[n]).abs().max().item() for n in alone_grads),
            "max_grad": max(g.abs().max().item() for g in alone_grads.values()),
        }
    if info.is_main:
        out.write_text(json.dumps(results))
    destroy_distributed()


if __name__ == "__main__":
    main()
