"""gpu_check stage `vllm`: the colocated vLLM engine through two trainer steps, as the trainer drives it.

    python benchmarks/gpu_check/vllm_sync.py WORK_DIR OUT_JSON

One process: the policy is sharded with load_sharded, the engine comes from make_engine (on a GPU:
sleep mode, level 2, since every weight is pushed). Each step: sample, sleep, one AdamW step on a
fixed sequence, push the weights (bf16 on CUDA), wake up, sample again. After each push the
sampler's log-probs must match the trainer's on the same tokens; before it (stale weights) they
must not, or the check could not fail. On CUDA it also records the memory the sleep gave back.
"""

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from minigrpo.config import ModelConfig, ParallelConfig, RolloutConfig  # noqa: E402
from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import IGNORE_INDEX  # noqa: E402
from minigrpo.parallel import iter_full_state_dict, load_sharded  # noqa: E402
from minigrpo.rollout import SamplingParams, make_engine  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 37], [300, 301, 302, 303, 304]]
# fp32 on CPU (the vLLM contract tolerance); bf16 sampler against the bf16-compute trainer on CUDA
TOLERANCE = {"cpu": 2e-4, "cuda": 0.1}


def trainer_logprobs_diff(policy, completions, device) -> float:
    """Max |sampler - trainer| log-prob over every sampled token (one padded forward)."""
    flat = [c for row in completions for c in row]
    T = max(len(c.prompt_ids) + len(c.token_ids) for c in flat)
    ids = torch.zeros(len(flat), T, dtype=torch.long)
    targets, mask = torch.full_like(ids, IGNORE_INDEX), torch.zeros_like(ids)
    for b, c in enumerate(flat):
        seq = c.prompt_ids + c.token_ids
        ids[b, : len(seq)], mask[b, : len(seq)] = torch.tensor(seq), 1
        targets[b, len(c.prompt_ids) - 1 : len(seq) - 1] = torch.tensor(c.token_ids)
    with torch.no_grad():
        logp, _ = policy(ids.to(device), targets.to(device), attention_mask=mask.to(device))
    logp = logp.float().cpu()
    return max(
        (logp[b][targets[b] != IGNORE_INDEX] - torch.tensor(c.logprobs)).abs().max().item() for b, c in enumerate(flat)
    )


def free_gib() -> float | None:
    return torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else None


def main() -> None:
    from conftest import tokenizer_corpus

    from minigrpo.tiny import build_tiny

    work, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    model_dir = build_tiny(work / "tiny", tokenizer_corpus(), preset="tiny", seed=0)  # head_dim 32: vLLM's minimum
    info = init_distributed()
    t0 = time.perf_counter()
    rollout = RolloutConfig(engine="vllm", gpu_memory_utilization=0.3, kv_cache_memory_gb=0.25, enforce_eager=True)
    engine = make_engine(rollout, model_dir, info.device, seed=0)
    start_s = time.perf_counter() - t0
    policy = load_sharded(ModelConfig(path=str(model_dir)), ParallelConfig(), info)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=2e-2)
    push_dtype = torch.bfloat16 if info.device.type == "cuda" else None
    seq = torch.arange(3, 40, device=info.device)[None]  # (1, 37): a stand-in for the GRPO loss
    targets = torch.full_like(seq, IGNORE_INDEX)
    targets[:, :-1] = seq[:, 1:]
    steps = []
    for step in range(2):
        sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=100 + step)
        old = engine.generate(PROMPTS, 2, sampling)  # from the weights of the previous push
        before_sleep = free_gib()
        engine.sleep()
        asleep = free_gib()
        logp, _ = policy(seq, targets)
        (-logp.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        stale = trainer_logprobs_diff(policy, old, info.device)  # the trainer has moved on: must differ
        t1 = time.perf_counter()
        engine.load_weights(iter_full_state_dict(policy, dtype=push_dtype))
        engine.wake_up()
        sync_s = time.perf_counter() - t1
        synced = trainer_logprobs_diff(policy, engine.generate(PROMPTS, 2, sampling), info.device)
        freed = None if before_sleep is None else asleep - before_sleep
        steps.append(dict(stale=stale, synced=synced, sync_s=sync_s, sleep_freed_gib=freed, version=engine.version))
        print(f"step {step + 1}: stale {stale:.3f}, synced {synced:.2e}, sync {sync_s:.2f} s, sleep freed {freed} GiB")
    tol = TOLERANCE[info.device.type]
    checks = {
        "sampler matches trainer after every push": all(s["synced"] < tol for s in steps),
        "the check can fail: stale samples differ": all(s["stale"] > 0.05 for s in steps),
        "sleep gives memory back (GPU)": all(s["sleep_freed_gib"] is None or s["sleep_freed_gib"] > 0 for s in steps),
        "two pushes counted": engine.version == 2,
    }
    report = dict(device=str(info.device), sleep_mode=engine.sleep_mode, sleep_level=engine.sleep_level)
    report.update(weights_api=engine.weights_api, engine_start_s=start_s, tolerance=tol, steps=steps, checks=checks)
    out_json.write_text(json.dumps(report, indent=1))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    destroy_distributed()
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
