"""The GRPO loop. One step:

    prompts -> rollout (+ resampling / filtering) -> rewards -> group advantages -> micro-batches with
    the global token count -> reference log-probs (beta > 0) -> old log-probs (updates > 1) ->
    loss and backward per micro-batch -> optimizer -> weight sync -> log

Recipes hand `GRPOTrainer` a list of `Prompt`s, a reward function
`(completions, metadata) -> (rewards, components)` and a `GRPORunConfig`; nothing task-specific
lives here. The math is in `grpo.py`; this file only decides which normaliser each aggregation uses.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from minigrpo import grpo
from minigrpo.batch import Sample, equalize_micro_batches, global_token_count, make_micro_batches
from minigrpo.checkpoint import export_hf, latest_checkpoint, load_checkpoint, python_rng_from_json, python_rng_to_json, save_checkpoint
from minigrpo.config import ConfigError, GRPOConfig, LossConfig, ModelConfig, OptimConfig, ParallelConfig, RolloutConfig, RunConfig, section, to_dict
from minigrpo.dist import all_ok, all_reduce_sum, init_distributed
from minigrpo.rl.groups import Group, GroupSource, RewardFn, fill_with_signal, resample_groups
from minigrpo.io import append_jsonl, truncate_jsonl
from minigrpo.metrics import MetricsLogger, peak_flops
from minigrpo.model import LogprobModel, load_model, load_tokenizer
from minigrpo.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from minigrpo.parallel import iter_full_state_dict, shard_model, shard_reference
from minigrpo.rl.prompts import Prompt, PromptStream, apply_curriculum, limit_prompt_length, load_prompt_records
from minigrpo.rollout import SamplingParams, make_engine
from minigrpo.rl.stats import StepStats

ADVANTAGES = {"grpo": grpo.grpo_advantages, "drgrpo": grpo.drgrpo_advantages, "rloo": grpo.rloo_advantages}


@dataclass(slots=True)
class GRPORunConfig:
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    loss: LossConfig = section(LossConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    run: RunConfig = section(RunConfig)


class NonFiniteLossError(RuntimeError):
    pass


def make_aggregate(name: str, n_tokens: int, n_sequences: int, n_micro_batches: int, max_completion_tokens: int):
    """The aggregation of `name`, with its step-global normaliser bound (see docs/MATH.md)."""
    if name == "token_mean":  # DAPO: every completion token of the step weighs the same
        return lambda x, m: grpo.token_sum_over(x, m, max(n_tokens, 1))
    if name == "seq_mean_token_mean":  # GRPO: every completion weighs the same
        return lambda x, m: grpo.seq_mean_token_mean(x, m, max(n_sequences, 1))
    if name == "constant":  # Dr. GRPO: B * L_max
        return lambda x, m: grpo.token_sum_over(x, m, max(n_sequences, 1) * max_completion_tokens)
    if name == "drg_compat":  # DRG-Sapphire/TRL: token-mean per micro-batch, averaged over micro-batches and ranks
        return lambda x, m: grpo.token_sum_over(x, m, m.sum().clamp(min=1) * max(n_micro_batches, 1))
    raise ValueError(f"unknown loss aggregation {name!r}")


class GRPOTrainer:
    def __init__(self, cfg: GRPORunConfig, prompts: list[Prompt], reward_fn: RewardFn):
        self.cfg, self.reward_fn = cfg, reward_fn
        self.dist = init_distributed()
        self.out = Path(cfg.run.output_dir)
        if not cfg.run.resume and (self.out / "checkpoints").exists():
            raise ConfigError(f"{self.out}/checkpoints exists: pass --run.resume=true to continue that run, or choose another run.output_dir")
        self.tokenizer = load_tokenizer(cfg.model.path)
        prompts, self.over_long = limit_prompt_length(prompts, cfg.grpo.max_prompt_tokens, cfg.grpo.over_long_prompts)
        if cfg.grpo.curriculum != "none":
            prompts = apply_curriculum(prompts, load_prompt_records(cfg.grpo.curriculum_records), cfg.grpo.curriculum)
        if cfg.grpo.prompts_per_step % self.dist.world_size:
            raise ConfigError(f"config key 'grpo.prompts_per_step': {cfg.grpo.prompts_per_step} does not split over {self.dist.world_size} ranks")
        if len(prompts) < self.dist.world_size:
            raise ValueError(f"{len(prompts)} prompts left after filtering; need at least one per rank")
        self.prompts = prompts
        # run.steps = 0: one pass over the prompts left after the filters above (the paper's one epoch).
        self.total_steps = cfg.run.steps or max(1, len(prompts) // cfg.grpo.prompts_per_step)
        self.stream = PromptStream(len(prompts), cfg.run.seed, self.dist.rank, self.dist.world_size, shuffle=cfg.grpo.curriculum != "easy_to_hard")
        self.rng = random.Random(cfg.run.seed * 7 + self.dist.rank)

        # Policy (trainable, sharded) and reference (frozen, sharded; only when a KL term is used).
        torch.manual_seed(cfg.run.seed)
        policy_lm = load_model(cfg.model.path, "float32", cfg.model.attn_implementation, cfg.model.trust_remote_code)
        self.n_params = sum(p.numel() for p in policy_lm.parameters())
        self.policy = shard_model(LogprobModel(policy_lm), cfg.parallel, self.dist)
        self.ref = None
        if cfg.loss.beta > 0:
            ref_lm = load_model(cfg.model.path, "float32", cfg.model.attn_implementation, cfg.model.trust_remote_code)
            self.ref = shard_reference(LogprobModel(ref_lm), cfg.parallel, self.dist)
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        self.beta_schedule = grpo.BETA_SCHEDULES[cfg.loss.beta_schedule]
        self.kl = grpo.KL_ESTIMATORS[cfg.loss.kl]

        # The engine is created after the process group on every rank (vLLM needs that order) and may
        # reseed the global RNG: nothing below depends on the global RNG.
        rng_state = torch.get_rng_state()
        self.engine = make_engine(cfg.rollout, cfg.model.path, self.dist.device, cfg.run.seed + self.dist.rank, cfg.model.attn_implementation)
        torch.set_rng_state(rng_state)
        stop = tuple(t for t in [self.tokenizer.eos_token_id] if t is not None)
        sampling = SamplingParams(cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.rollout.max_new_tokens, stop, seed=cfg.run.seed)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self.source = GroupSource(self.engine, decode, reward_fn, sampling, cfg.rollout.samples_per_prompt)
        self.step = self.optimizer_steps = 0
        self.peak = peak_flops(self.dist.device)
        self.logger = MetricsLogger(str(self.out), self.total_steps, self.dist.is_main, cfg.run.report_to)

    # ----------------------------------------------------------------------------- phases

    def rollout(self) -> tuple[list[Group], dict]:
        """Generate this rank's groups; apply dynamic resampling or DAPO filtering if configured."""
        g = self.cfg.grpo
        per_rank = g.prompts_per_step // self.dist.world_size
        draw = lambda k: [self.prompts[i] for i in self.stream.take(k)]  # noqa: E731
        self.source.sampling = replace(self.source.sampling, seed=self.cfg.run.seed + 1_000_003 * self.step + 7919 * self.dist.rank)
        groups = self.source.generate(draw(per_rank))
        info = {"groups_generated": len(groups)}
        if g.dynamic_resampling != "off":
            groups = resample_groups(self.source, groups, g.dynamic_resampling, g.resample_attempts, g.resample_temperatures, g.resample_min_std, g.resample_positive_threshold, self.rng)
            info["resampled"] = True  # step_stats reports attempts and final std over the groups trained on
        if g.filter_zero_variance:
            groups, dropped = fill_with_signal(self.source, groups, draw, per_rank, g.filter_max_rounds)
            info["groups_dropped"] = dropped
        return groups, info

    def advantages(self, groups: list[Group]) -> torch.Tensor:
        """One advantage per completion, (len(groups), G), from each group's own rewards."""
        if not groups:
            return torch.zeros(0, self.cfg.rollout.samples_per_prompt, dtype=torch.float64)
        rewards = torch.tensor([grp.rewards for grp in groups], dtype=torch.float64)  # (P_local, G)
        return ADVANTAGES[self.cfg.loss.advantage](rewards)

    def micro_batches(self, groups: list[Group], adv: torch.Tensor):
        samples = [
            Sample(c.prompt_ids, c.token_ids, {"sampler_logp": c.logprobs}, {"adv": float(adv[i, j])})
            for i, grp in enumerate(groups)
            for j, c in enumerate(grp.completions)
        ]
        mbs = make_micro_batches(samples, self.cfg.parallel.micro_batch_size, self.tokenizer.pad_token_id)
        n_micro = int(all_reduce_sum(len(mbs)).item())
        mbs = equalize_micro_batches(mbs, self.tokenizer.pad_token_id)
        return [mb.to(self.dist.device) for mb in mbs], len(samples), n_micro

    @torch.no_grad()
    def logprobs(self, model, mbs, field: str) -> None:
        """Attach `field` = log-probs of the sampled tokens under `model` (reference or old policy)."""
        for mb in mbs:
            logp, _ = model(mb.input_ids, mb.targets, mb.attention_mask, mb.position_ids, temperature=self.cfg.rollout.temperature)
            mb.token_fields[field] = logp.float() * mb.loss_mask

    def loss_and_backward(self, mbs, aggregate, beta: float, stats: StepStats) -> None:
        """Forward + backward every micro-batch; gradients accumulate, already globally normalised."""
        L = self.cfg.loss
        for mb in mbs:
            logp, entropy = self.policy(mb.input_ids, mb.targets, mb.attention_mask, mb.position_ids, temperature=self.cfg.rollout.temperature, return_entropy=True)
            old = mb.token_fields.get("old_logp", logp.detach())  # strictly on-policy: ratio 1
            loss, s = grpo.grpo_loss(
                logp, old, mb.token_fields["adv"], mb.loss_mask, aggregate,
                eps_low=L.eps_low, eps_high=L.eps_high, dual_clip=L.dual_clip,
                ref_logp=mb.token_fields.get("ref_logp"), beta=beta, kl=self.kl, max_log_ratio=L.max_log_ratio,
            )  # fmt: skip
            problem = all_ok(bool(torch.isfinite(loss)), f"step {self.step}: non-finite loss {loss.item()} (check rewards and log-probs)")
            if problem:
                raise NonFiniteLossError(problem)
            loss.backward()
            stats.add_loss(loss.detach(), s, entropy.detach(), logp.detach(), mb)

    def optimizer_step(self, total_updates: int) -> tuple[float, float]:
        lr = lr_at(self.optimizer_steps, total_updates, self.cfg.optim)
        set_lr(self.optimizer, lr)
        norm = clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm)
        problem = all_ok(bool(torch.isfinite(norm)), f"step {self.step}: non-finite gradient norm")
        if problem:
            raise NonFiniteLossError(problem)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return float(norm), lr

    def sync_weights(self) -> None:
        """Stream the new full weights into the engine (one tensor at a time), then give it its KV cache back."""
        dtype = torch.bfloat16 if self.dist.device.type == "cuda" else None  # the engine's dtype there: half the traffic
        self.engine.load_weights(iter_full_state_dict(self.policy, dtype=dtype))
        self.engine.wake_up()

    # ----------------------------------------------------------------------------- the step

    def train_step(self) -> dict:
        cfg, t = self.cfg, {}
        total_steps = self.total_steps
        beta = self.beta_schedule(cfg.loss.beta, self.step, total_steps)

        t0 = time.perf_counter()
        groups, info = self.rollout()  # ------------------------------------------ rollout + reward
        self.engine.sleep()
        t["generate"] = time.perf_counter() - t0

        adv = self.advantages(groups)  # ----------------------------------------- advantage
        mbs, n_seq_local, n_micro = self.micro_batches(groups, adv)
        n_tokens = global_token_count(mbs)
        n_seqs = int(all_reduce_sum(n_seq_local).item())
        aggregate = make_aggregate(cfg.loss.aggregation, n_tokens, n_seqs, n_micro, cfg.rollout.max_new_tokens)

        t0 = time.perf_counter()  # ----------------------------------------------- reference / old log-probs
        if self.ref is not None and beta > 0:
            self.logprobs(self.ref, mbs, "ref_logp")
        t["reference"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.grpo.updates_per_batch > 1:
            self.logprobs(self.policy, mbs, "old_logp")
        t["old"] = time.perf_counter() - t0

        stats = StepStats()  # ---------------------------------------------------- loss, backward, optimizer
        t0 = time.perf_counter()
        for _ in range(cfg.grpo.updates_per_batch):
            self.loss_and_backward(mbs, aggregate, beta if self.ref is not None else 0.0, stats)
            grad_norm, lr = self.optimizer_step(total_steps * cfg.grpo.updates_per_batch)
            stats.grad_norms.append(grad_norm)
        t["update"] = time.perf_counter() - t0

        t0 = time.perf_counter()  # ----------------------------------------------- weight sync
        self.sync_weights()
        t["sync"] = time.perf_counter() - t0

        self.record_groups(groups)  # ---------------------------------------------- log
        metrics = stats.reduce(groups, n_tokens, info, self.over_long)
        metrics.update({f"time_{k}": v for k, v in t.items()}, lr=lr, beta=beta, step_time=sum(t.values()))
        trained = metrics.pop("trained_tokens_total")
        metrics["generated_tokens_per_s"] = metrics["completion_tokens_total"] / max(t["generate"], 1e-9)
        metrics["trained_tokens_per_s"] = trained / max(t["update"], 1e-9)
        metrics["mfu"] = 6 * self.n_params * metrics["trained_tokens_per_s"] / (self.peak * self.dist.world_size)
        return metrics

    def record_groups(self, groups: list[Group]) -> None:
        """Per-prompt record (rewards and correctness of each group) for curriculum filtering, and the
        completions themselves only when `run.log_completions` (on real data they hold patient text)."""
        step = self.step + 1  # numbered as in metrics.jsonl
        records = [{"step": step, "prompt_id": g.prompt.id, "rewards": g.rewards, "correct": g.components.get("correct", [float(r > 0) for r in g.rewards])} for g in groups]
        completions = []
        if self.cfg.run.log_completions:
            completions = [
                {"step": step, "prompt_id": g.prompt.id, "completion": text, "reward": r, "finish_reason": c.finish_reason}
                for g in groups
                for text, r, c in zip(g.texts, g.rewards, g.completions)
            ]
        gathered = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, (records, completions))
        if self.dist.is_main:
            append_jsonl(self.out / "prompt_records.jsonl", [row for part, _ in gathered for row in part])
            if self.cfg.run.log_completions:
                append_jsonl(self.out / "completions.jsonl", [row for _, part in gathered for row in part])

    # ----------------------------------------------------------------------------- run, save, resume

    def save(self) -> None:
        state = {"step": self.step, "optimizer_steps": self.optimizer_steps, "streams": self._gather_streams()}
        save_checkpoint(self.out / "checkpoints", self.step, self.policy, self.optimizer, state, to_dict(self.cfg), keep_last=self.cfg.run.keep_last)

    def _gather_streams(self) -> list:
        gathered = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, {"stream": self.stream.state_dict(), "rng": self.rng.getstate()})
        return [{"stream": g["stream"], "rng": python_rng_to_json(g["rng"])} for g in gathered]

    def resume(self) -> bool:
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            return False
        meta = load_checkpoint(path, self.policy, self.optimizer)
        state = meta["state"]
        self.step, self.optimizer_steps = int(state["step"]), int(state["optimizer_steps"])
        mine = state["streams"][self.dist.rank]
        self.stream.load_state_dict(mine["stream"])
        self.rng.setstate(python_rng_from_json(mine["rng"]))
        self.sync_weights()  # the engine still holds the initial weights
        if self.dist.is_main:  # rows logged after the checkpoint by the interrupted run are redone
            for name in ("metrics.jsonl", "prompt_records.jsonl", "completions.jsonl"):
                truncate_jsonl(self.out / name, self.step)
        return True

    def train(self) -> list[dict]:
        cfg = self.cfg
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
        if cfg.run.resume and self.resume():
            if self.dist.is_main:
                print(f"resumed from step {self.step}", flush=True)
        elif self.dist.is_main:  # a fresh run: no rows of an earlier, checkpoint-less attempt
            for name in ("metrics.jsonl", "prompt_records.jsonl", "completions.jsonl"):
                truncate_jsonl(self.out / name, 0)
        self.logger.start_step = self.step
        history = []
        while self.step < self.total_steps:
            metrics = self.train_step()
            self.step += 1
            history.append(metrics)
            if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                self.logger.log(self.step, metrics)
            if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < self.total_steps:
                self.save()
        self.save()
        export_hf(self.policy, self.out / "hf", self.tokenizer)
        return history
