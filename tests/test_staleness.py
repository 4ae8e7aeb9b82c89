"""One-step-off-policy training (rollout.max_staleness = 1) with the colocated torch engine.

The batch of step t + 1 is generated in a background thread while step t trains, from the weights one
version behind; the decoupled-PPO correction is on by default there (loss.sampler_correction=auto).
"""

import json

import pytest

from examples.digits import make_prompts, reward_fn
from minigrpo.config import load_config
from minigrpo.model import load_tokenizer
from minigrpo.trainer import GRPORunConfig, GRPOTrainer


def _cfg(model_dir, out, *extra):
    return load_config(GRPORunConfig, None, [
        f"--model.path={model_dir}", f"--run.output_dir={out}", "--run.seed=3", "--grpo.prompts_per_step=4",
        "--rollout.samples_per_prompt=4", "--rollout.max_new_tokens=8", "--parallel.micro_batch_size=8",
        "--optim.lr=2e-2", "--loss.beta=0", *extra,
    ])


def test_stale_batches_are_one_version_behind_and_corrected(tiny_model_dir, tmp_path):
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 32)
    history = GRPOTrainer(_cfg(tiny_model_dir, tmp_path, "--run.steps=6", "--rollout.max_staleness=1"),
                          prompts, reward_fn).train()
    assert [h["staleness"] for h in history] == [0, 1, 1, 1, 1, 1]
    # step 1 is on-policy: the correction is the identity there (pi_old = sampler up to float noise)
    assert history[0]["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # later batches come from the previous weights: pi_old / sampler moves away from 1 and is corrected
    assert any(abs(h["is_ratio_mean"] - 1.0) > 1e-3 for h in history[1:])
    assert all(h["sampler_logp_diff"] > 1e-4 for h in history[1:])
    assert all(h["generation_overlap"] >= 0 and h["time_generation_wait"] >= 0 for h in history)


def test_synchronous_runs_leave_the_loss_uncorrected(tiny_model_dir, tmp_path):
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 16)
    history = GRPOTrainer(_cfg(tiny_model_dir, tmp_path, "--run.steps=2"), prompts, reward_fn).train()
    assert [h["staleness"] for h in history] == [0, 0]
    assert all(h["is_masked_frac"] == 0 and h["is_truncated_frac"] == 0 for h in history)
    assert all(h["sampler_ratio_outside_frac"] == 0 for h in history)  # fp32 engine = trainer


def test_stale_run_learns_and_resumes(tiny_model_dir, tmp_path):
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 64)
    args = ["--run.steps=12", "--run.save_every=4", "--rollout.max_staleness=1"]

    class Crash(GRPOTrainer):
        def train_step(self):
            if self.step == 6:
                raise KeyboardInterrupt("killed")
            return super().train_step()

    with pytest.raises(KeyboardInterrupt):
        Crash(_cfg(tiny_model_dir, tmp_path, *args), prompts, reward_fn).train()
    resumed = GRPOTrainer(_cfg(tiny_model_dir, tmp_path, *args, "--run.resume=true"), prompts, reward_fn).train()
    assert len(resumed) == 8  # steps 5..12 after the step-4 checkpoint
    assert resumed[0]["staleness"] == 0  # the prefetched batch died with the run: drawn again, on-policy
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    rewards = [r["reward_mean"] for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3, rewards
