"""The GRPO trainer adds nothing hidden to the math: one step re-derived in float64 from the same rollouts.

Runs in one process (a 1-rank process group); the 2-rank learning runs are in test_trainer_dist.py.
"""

import json
import math

import pytest
import torch

from examples.digits import make_prompts, reward_fn
from minigrpo.config import load_config
from minigrpo.model import load_tokenizer
from minigrpo.parallel import full_tensor, hf_name
from minigrpo.trainer import GRPORunConfig, GRPOTrainer, NonFiniteLossError


def make_cfg(model_dir, out, *overrides):
    base = [
        f"--model.path={model_dir}", f"--run.output_dir={out}", "--run.steps=2", "--run.seed=1",
        "--grpo.prompts_per_step=2", "--rollout.samples_per_prompt=4", "--rollout.max_new_tokens=6",
        "--rollout.temperature=0.8", "--parallel.micro_batch_size=3", "--optim.lr=5e-2", "--optim.max_grad_norm=0",
    ]  # fmt: skip
    return load_config(GRPORunConfig, None, base + list(overrides))


class RecordingTrainer(GRPOTrainer):
    """Keeps, per step: the policy weights before it, its groups, and the gradient before clipping."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.weights, self.groups, self.grads = [], [], []

    def train_step(self):
        self.weights.append({hf_name(n): full_tensor(p).detach().clone() for n, p in self.policy.named_parameters()})
        return super().train_step()

    def rollout(self):
        groups, info = super().rollout()
        self.groups.append(groups)
        return groups, info

    def optimizer_step(self, total):
        self.grads.append({hf_name(n): full_tensor(p.grad).clone() for n, p in self.policy.named_parameters() if p.grad is not None})
        return super().optimizer_step(total)


def f64_model(model_dir, weights=None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    if weights is not None:
        m.load_state_dict({k: v.double() for k, v in weights.items()}, strict=False)
        m.tie_weights()
    return m


def completion_logp(model, prompt_ids, completion_ids, T):
    """log softmax(logits / T) of each completion token, from full logits (the naive float64 way)."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    logits = model(ids).logits[0].double() / T  # (L, V)
    logp = torch.log_softmax(logits, dim=-1)
    P, C = len(prompt_ids), len(completion_ids)
    return logp[P - 1 : P + C - 1].gather(1, torch.tensor(completion_ids)[:, None])[:, 0]  # (C,)


def hand_advantages(rewards, kind):
    G = len(rewards)
    mean = sum(rewards) / G
    if all(r == rewards[0] for r in rewards):
        return [0.0] * G
    if kind == "grpo":
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (G - 1))
        return [(r - mean) / (std + 1e-4) for r in rewards]
    if kind == "drgrpo":
        return [r - mean for r in rewards]
    return [r - (sum(rewards) - r) / (G - 1) for r in rewards]  # rloo


def reference_loss(cfg, policy, ref, groups, beta, micro_batch_size):
    """sum over completions/tokens of (-exp(logp - logp.detach()) * A + beta * k), / the normaliser."""
    T = cfg.rollout.temperature
    kl = {
        "k1": lambda lp, rf: lp - rf,
        "k2": lambda lp, rf: 0.5 * (rf - lp) ** 2,
        "k3": lambda lp, rf: torch.exp(rf - lp) - 1 - (rf - lp),
    }[cfg.loss.kl]
    seqs = []  # per completion: (per-token loss tensor)
    for g in groups:
        adv = hand_advantages(g.rewards, cfg.loss.advantage)
        for a, c in zip(adv, g.completions):
            lp = completion_logp(policy, c.prompt_ids, c.token_ids, T)
            per_tok = -torch.exp(lp - lp.detach()) * a
            if beta > 0:
                with torch.no_grad():
                    rf = completion_logp(ref, c.prompt_ids, c.token_ids, T)
                per_tok = per_tok + beta * kl(lp, rf)
            seqs.append(per_tok)
    B, n_tok = len(seqs), sum(len(s) for s in seqs)
    agg = cfg.loss.aggregation
    if agg == "token_mean":
        return sum(s.sum() for s in seqs) / n_tok
    if agg == "seq_mean_token_mean":
        return sum(s.mean() for s in seqs if len(s)) / B
    if agg == "constant":
        return sum(s.sum() for s in seqs) / (B * cfg.rollout.max_new_tokens)
    mbs = [seqs[i : i + micro_batch_size] for i in range(0, B, micro_batch_size)]  # drg_compat
    return sum(sum(s.sum() for s in mb) / sum(len(s) for s in mb) for mb in mbs) / len(mbs)


@pytest.mark.parametrize(
    "aggregation,kl,advantage,schedule",
    [
        ("token_mean", "k3", "grpo", "constant"),
        ("seq_mean_token_mean", "k3", "grpo", "cosine"),
        ("constant", "k3", "drgrpo", "constant"),
        ("drg_compat", "k3", "grpo", "constant"),
        ("token_mean", "k1", "rloo", "constant"),
        ("token_mean", "k2", "grpo", "constant"),
    ],
)
def test_step_equals_float64_recomputation(tiny_model_dir, tmp_path, aggregation, kl, advantage, schedule):
    cfg = make_cfg(tiny_model_dir, tmp_path, f"--loss.aggregation={aggregation}", f"--loss.kl={kl}", f"--loss.advantage={advantage}", f"--loss.beta_schedule={schedule}", "--loss.beta=0.5")
    tr = RecordingTrainer(cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn)
    history = tr.train()
    step = 1  # the second step: the policy has moved away from the reference, so the KL term has a gradient
    policy = f64_model(tiny_model_dir, tr.weights[step])
    ref = f64_model(tiny_model_dir)
    beta = 0.5 if schedule == "constant" else 0.5 * 0.5 * (1 + math.cos(math.pi * step / 2))
    loss = reference_loss(cfg, policy, ref, tr.groups[step], beta, cfg.parallel.micro_batch_size)
    assert history[step]["beta"] == pytest.approx(beta)
    assert history[step]["loss"] == pytest.approx(loss.item(), rel=1e-4, abs=1e-6)
    loss.backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())
    assert scale > 0
    for name, g in grads.items():
        torch.testing.assert_close(tr.grads[step][name].double(), g, rtol=1e-3, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}")


def test_more_updates_per_batch_make_ratio_and_clipping_act(tiny_model_dir, tmp_path):
    on = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path / "a", "--loss.beta=0"), make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn).train()
    assert all(h["ratio_min"] == 1.0 and h["ratio_max"] == 1.0 and h["clip_low_frac"] == 0 and h["clip_high_frac"] == 0 for h in on)
    cfg = make_cfg(tiny_model_dir, tmp_path / "b", "--loss.beta=0", "--grpo.updates_per_batch=4", "--loss.eps_low=0.01", "--loss.eps_high=0.01")
    off = GRPOTrainer(cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn).train()
    assert any(h["ratio_min"] < 1.0 or h["ratio_max"] > 1.0 for h in off)
    assert any(h["clip_low_frac"] + h["clip_high_frac"] > 0 for h in off)


def test_kill_and_resume_reproduces_metrics(tiny_model_dir, tmp_path):
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 8)
    args = ["--run.steps=4", "--run.save_every=2", "--loss.beta=0.1"]
    full = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path / "full", *args), prompts, reward_fn).train()

    class Crash(GRPOTrainer):
        def train_step(self):
            if self.step == 3:
                raise KeyboardInterrupt("killed")
            return super().train_step()

    with pytest.raises(KeyboardInterrupt):
        Crash(make_cfg(tiny_model_dir, tmp_path / "cut", *args), prompts, reward_fn).train()
    resumed = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path / "cut", *args, "--run.resume=true"), prompts, reward_fn).train()
    assert len(resumed) == 2  # steps 3 and 4
    for key in ("reward_mean", "loss", "kl_mean", "entropy", "grad_norm", "completion_len_mean"):
        assert [h[key] for h in resumed] == [h[key] for h in full[2:]], key
    # the killed run had logged step 3 after its last checkpoint (step 2): the log holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    records = [json.loads(line)["step"] for line in (tmp_path / "cut" / "prompt_records.jsonl").read_text().splitlines()]
    assert records == [1, 1, 2, 2, 3, 3, 4, 4]


def test_nan_loss_is_caught_and_last_checkpoint_survives(tiny_model_dir, tmp_path):
    from minigrpo.checkpoint import latest_checkpoint, verify_manifest

    calls = {"n": 0}

    def flaky_reward(texts, meta):
        calls["n"] += 1
        rewards, comps = reward_fn(texts, meta)
        if calls["n"] > 2:  # steps 1 and 2 fine, step 3 poisoned
            rewards = [float("nan")] + rewards[1:]
        return rewards, comps

    cfg = make_cfg(tiny_model_dir, tmp_path, "--run.steps=4", "--run.save_every=2")
    with pytest.raises(NonFiniteLossError, match="step 2"):  # zero-based step index 2 = the third step
        GRPOTrainer(cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), flaky_reward).train()
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last is not None and last.name.endswith("2")
    verify_manifest(last)  # intact
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_metrics_log_and_prompt_records(tiny_model_dir, tmp_path):
    GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, "--loss.beta=0.1"), make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn).train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "accuracy", "zero_variance_frac", "completion_len_mean", "completion_len_min", "completion_len_max",
                "truncated_frac", "kl_mean", "entropy", "clip_low_frac", "clip_high_frac", "ratio_mean", "grad_norm", "lr", "beta",
                "sampler_logp_diff", "time_generate", "time_reference", "time_update", "time_sync", "generated_tokens_per_s", "trained_tokens_per_s", "mfu"):  # fmt: skip
        assert key in rows[0], key
    assert rows[0]["sampler_logp_diff"] < 1e-4  # torch engine and trainer agree on fp32 weights
    records = [json.loads(line) for line in (tmp_path / "prompt_records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 1, 2, 2] and all(len(r["rewards"]) == len(r["correct"]) == 4 for r in records)
    assert (tmp_path / "hf" / "config.json").is_file()
    assert not (tmp_path / "completions.jsonl").exists()  # completions may hold patient text: only when asked


def test_completions_logged_only_when_asked(tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir, tmp_path, "--run.steps=1", "--run.log_completions=true", "--loss.beta=0")
    GRPOTrainer(cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn).train()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["reward"] == reward_fn([r["completion"]], [{}])[0][0] for r in rows)


def test_steps_zero_is_one_epoch_and_existing_run_needs_resume(tiny_model_dir, tmp_path):
    from minigrpo.config import ConfigError

    prompts = make_prompts(load_tokenizer(tiny_model_dir), 6)  # 6 prompts, 2 per step -> 3 steps
    history = GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, "--run.steps=0", "--loss.beta=0"), prompts, reward_fn).train()
    assert len(history) == 3
    with pytest.raises(ConfigError, match="resume"):  # a fresh run must not write into a finished one
        GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, "--loss.beta=0"), prompts, reward_fn)


def test_prompts_per_step_must_split_over_ranks(tiny_model_dir, tmp_path, monkeypatch):
    from minigrpo import dist as dist_mod
    from minigrpo.config import ConfigError

    info = dist_mod.init_distributed()
    monkeypatch.setattr("minigrpo.trainer.init_distributed", lambda: dist_mod.DistInfo(0, 2, 0, info.device, info.backend))
    with pytest.raises(ConfigError, match="grpo.prompts_per_step"):
        GRPOTrainer(make_cfg(tiny_model_dir, tmp_path, "--grpo.prompts_per_step=3"), make_prompts(load_tokenizer(tiny_model_dir), 8), reward_fn)
