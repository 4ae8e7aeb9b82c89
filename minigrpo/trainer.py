"""The GRPO loop. One step:

    prompts -> rollout (+ resampling / filtering) -> rewards -> group advantages -> micro-batches with
    the global token count -> reference log-probs (beta > 0) -> old log-probs (updates > 1) ->
    loss and backward per micro-batch -> optimizer -> weight sync -> log

Recipes hand `GRPOTrainer` prompts (`Prompt`s with token ids, plain text or chat messages), a reward
function `(completions, metadata) -> rewards` (or `(rewards, components)`) and a `GRPORunConfig`;
nothing task-specific lives here. The math is in `grpo.py`, the loop's helpers in `rl/`.

As a library: `train(callbacks=[fn])` calls `fn(step, metrics)` after every step, and `steps()`
yields `(step, metrics)` for a caller that drives the loop itself.
"""

from __future__ import annotations

import math
import random
import warnings
from contextlib import closing
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from minigrpo import grpo
from minigrpo.checkpoint import export_hf, python_rng_from_json, python_rng_to_json
from minigrpo.config import ConfigError, GRPOConfig, LossConfig, ModelConfig, OptimConfig, ParallelConfig
from minigrpo.config import RolloutConfig, RunConfig, section, to_dict
from minigrpo.dist import barrier, init_distributed
from minigrpo.io import DataError
from minigrpo.metrics import PhaseTimer, peak_flops
from minigrpo.model import DTYPES, load_tokenizer, model_context
from minigrpo.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from minigrpo.parallel import iter_full_state_dict, load_sharded, sync_gradients
from minigrpo.rl.groups import Group, GroupSource, RewardFn, RolloutInfo, fill_with_signal, group_records
from minigrpo.rl.groups import resample_groups
from minigrpo.rl.loss import LossTerms, NonFiniteLossError, check_finite, first_bad, micro_batch_loss
from minigrpo.rl.micro_batches import RLMicroBatch, pack_groups
from minigrpo.rl.pipeline import Ready, RolloutPipeline
from minigrpo.rl.prompts import PromptLike, PromptStream, prepare_prompts
from minigrpo.rl.stats import StepStats
from minigrpo.rollout import SamplingParams, engine_dtype, make_engine
from minigrpo.run_dir import RunDir, check_output_dir, fingerprint
from minigrpo.seeding import derive_seed

StepCallback = Callable[[int, dict], None]

# Keys a resumed run may change besides run.* and parallel.*: where and how the rollouts run, not what
# is trained (the prompts themselves are compared by their fingerprint).
MAY_CHANGE_ON_RESUME = (
    "rollout.engine",
    "rollout.gpu_memory_utilization",
    "rollout.kv_cache_memory_gb",
    "rollout.sleep_between_steps",
    "rollout.enforce_eager",
    "rollout.max_batch_rows",
    "rollout.server_urls",
    "rollout.server_timeout_s",
    "data.train_file",
)


@dataclass(slots=True)
class GRPORunConfig:
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    rollout: RolloutConfig = section(RolloutConfig)
    loss: LossConfig = section(LossConfig)
    grpo: GRPOConfig = section(GRPOConfig)
    run: RunConfig = section(RunConfig)


class GRPOTrainer:
    def __init__(self, cfg: GRPORunConfig, prompts: Sequence[PromptLike], reward_fn: RewardFn):
        self.cfg, self.reward_fn = cfg, reward_fn
        self.dist = init_distributed()
        check_output_dir(cfg.run)  # before any model loads: a fresh run into an earlier one's folder
        self.tokenizer = load_tokenizer(cfg.model.path)
        self.prompts, self.over_long = self._prepare_prompts(prompts)
        # Checks (resume: checkpoint choice, same config and prompts); writes nothing until begin().
        data = fingerprint([p.id, p.ids] for p in self.prompts)
        self.run_dir = RunDir(cfg.run, to_dict(cfg), data, may_change=MAY_CHANGE_ON_RESUME)
        # run.steps = 0: one pass over the prompts left after the filters (the paper's one epoch).
        self.total_steps = cfg.run.steps or max(1, len(self.prompts) // cfg.grpo.prompts_per_step)
        shuffle = cfg.grpo.shuffle and cfg.grpo.curriculum != "easy_to_hard"  # easy-to-hard keeps its order
        self.stream = PromptStream(len(self.prompts), cfg.run.seed, self.dist.rank, self.dist.world_size, shuffle)
        self.rng = random.Random(derive_seed(cfg.run.seed, rank=self.dist.rank))  # resampling temperatures

        # Policy (trainable, sharded) and reference (frozen, sharded; only when a KL term is used).
        torch.manual_seed(cfg.run.seed)
        model = cfg.model
        self.policy = load_sharded(model, cfg.parallel, self.dist)
        self.n_params = sum(p.numel() for p in self.policy.parameters())  # DTensor numel is the global one
        self.ref = None
        if cfg.loss.beta > 0:
            ref_dtype = None if model.reference_dtype == "auto" else DTYPES[model.reference_dtype]
            self.ref = load_sharded(model, cfg.parallel, self.dist, frozen=True, frozen_dtype=ref_dtype)
        self.optimizer = build_optimizer(self.policy, cfg.optim)
        self.beta_schedule = grpo.BETA_SCHEDULES[cfg.loss.beta_schedule]
        self.aggregation = grpo.AGGREGATIONS[cfg.loss.aggregation]
        self.terms = LossTerms.from_config(cfg.loss, cfg.rollout.max_staleness)
        self.shared_prompt = cfg.grpo.shared_prompt and model.attn_implementation in ("sdpa", "eager")
        if cfg.grpo.shared_prompt and not self.shared_prompt:
            warnings.warn(
                f"grpo.shared_prompt needs sdpa or eager attention (a 4D mask), not "
                f"{model.attn_implementation}: each completion carries its own prompt",
                stacklevel=2,
            )

        # The engine is created after the process group on every rank (vLLM needs that order) and may
        # reseed the global RNG: nothing below depends on the global RNG.
        rng_state = torch.get_rng_state()
        seed = derive_seed(cfg.run.seed, rank=self.dist.rank)
        self.engine = make_engine(cfg.rollout, model.path, self.dist.device, seed, model.attn_implementation)
        torch.set_rng_state(rng_state)
        samples = cfg.rollout.samples_per_prompt
        self.source = GroupSource(
            self.engine, self._decode, reward_fn, self._sampling(), samples, base_seed=cfg.run.seed, rank=self.dist.rank
        )
        self.pipeline = RolloutPipeline(self._generate, cfg.rollout.max_staleness)
        self._state_before_prefetch: dict = {}
        self.step = self.optimizer_steps = 0
        self.peak = peak_flops(self.dist.device)

    def _prepare_prompts(self, items: Sequence[PromptLike]) -> tuple[list, int]:
        """Prompts as token ids, cut to the length limit, filtered by the curriculum; (prompts, # over-long)."""
        cfg = self.cfg
        if cfg.grpo.prompts_per_step % self.dist.world_size:
            raise ConfigError(
                f"config key 'grpo.prompts_per_step': {cfg.grpo.prompts_per_step} does not split "
                f"over {self.dist.world_size} ranks"
            )
        context = model_context(cfg.model.path)
        prompts, over_long = prepare_prompts(items, self.tokenizer, cfg.grpo, context, cfg.rollout.max_new_tokens)
        if len(prompts) < self.dist.world_size:
            raise DataError(f"{len(prompts)} prompts left after filtering; need at least one per rank")
        return prompts, over_long

    def _sampling(self) -> SamplingParams:
        rollout = self.cfg.rollout
        stop = tuple(t for t in [self.tokenizer.eos_token_id] if t is not None)
        return SamplingParams(rollout.temperature, rollout.top_p, rollout.top_k, rollout.max_new_tokens, stop)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _forward(self, model: torch.nn.Module, mb: RLMicroBatch, return_entropy: bool = False):
        """(log-probs, entropy or None) of the micro-batch's scored tokens under `model`, (S, C)."""
        rows = mb.rows
        logp, entropy = model(
            rows.input_ids,
            rows.targets,
            rows.attention_mask,
            rows.position_ids,
            temperature=self.cfg.rollout.temperature,
            return_entropy=return_entropy,
            score_index=rows.score_index,
        )
        return rows.scatter(logp), (rows.scatter(entropy) if entropy is not None else None)

    # ----------------------------------------------------------------------------- phases

    def rollout(self) -> tuple[list[Group], RolloutInfo]:
        """Generate and score this rank's groups; dynamic resampling or DAPO filtering if configured."""
        run = self.cfg.grpo
        per_rank = run.prompts_per_step // self.dist.world_size
        groups = self.source.generate(self._draw(per_rank))
        info = RolloutInfo(groups_generated=len(groups), resampled=run.dynamic_resampling != "off")
        if info.resampled:
            groups = resample_groups(
                self.source,
                groups,
                run.dynamic_resampling,
                attempts=run.resample_attempts,
                temperatures=run.resample_temperatures,
                min_std=run.resample_min_std,
                positive_threshold=run.resample_positive_threshold,
                rng=self.rng,
            )
        if run.filter_zero_variance:
            groups, info.groups_dropped = fill_with_signal(
                self.source, groups, self._draw, per_rank, run.filter_max_rounds
            )
        return groups, info

    def next_batch(self) -> Ready:
        """This step's batch (prefetched during the last step, or generated now); then the next one starts."""
        ready = self.pipeline.take(self.step, self.engine.version)
        self._prefetch()
        return ready

    def _generate(self, step: int) -> tuple[list[Group], RolloutInfo]:
        """The rollout of `step` (the pipeline calls it, in a background thread when prefetching)."""
        self.source.start_step(step)
        return self.rollout()

    def _prefetch(self) -> None:
        """With rollout.max_staleness >= 1: start generating the next step's batch now, from the current
        weights, remembering the loop state from before its draw (what a checkpoint of this step holds)."""
        if self.cfg.rollout.max_staleness and self.step + 1 < self.total_steps:
            self._state_before_prefetch = self._loop_state()
            self.pipeline.prefetch(self.step + 1, self.engine.version)

    def _draw(self, k: int) -> list:
        return [self.prompts[i] for i in self.stream.take(k)]

    def advantages(self, groups: list[Group]) -> torch.Tensor:
        """One advantage per completion, (len(groups), G), from each group's own rewards."""
        if not groups:
            return torch.zeros(0, self.cfg.rollout.samples_per_prompt, dtype=torch.float64)
        rewards = torch.tensor([group.rewards for group in groups], dtype=torch.float64)  # (P_local, G)
        return grpo.ADVANTAGES[self.cfg.loss.advantage](rewards)

    def micro_batches(self, groups: list[Group], adv: torch.Tensor) -> tuple[list[RLMicroBatch], grpo.StepCounts]:
        """This rank's micro-batches on its device, and the step's global counts (one collective)."""
        rollout = self.cfg.rollout
        mbs, counts = pack_groups(
            groups,
            adv,
            self.cfg.parallel.micro_batch_size,
            self.tokenizer.pad_token_id,
            rollout.max_new_tokens,
            shared_prompt=self.shared_prompt,
        )
        return [mb.to(self.dist.device) for mb in mbs], counts

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, mbs: list[RLMicroBatch]) -> list[torch.Tensor]:
        """Log-probs of the sampled tokens under `model` (reference or old policy), 0 where not scored."""
        return [self._forward(model, mb)[0].float() * mb.mask for mb in mbs]

    def attach_logprobs(self, mbs: list[RLMicroBatch], reference: bool, old: bool) -> None:
        """The frozen reference's log-probs (for the KL term) and the policy's before the update (when the
        batch is reused), as the micro-batches' ref_logp / old_logp."""
        for mb, logp in zip(mbs, self.logprobs(self.ref, mbs) if reference else []):
            mb.ref_logp = logp
        for mb, logp in zip(mbs, self.logprobs(self.policy, mbs) if old else []):
            mb.old_logp = logp

    def update(self, mbs: list[RLMicroBatch], counts: grpo.StepCounts, beta: float, stats: StepStats) -> float:
        """updates_per_batch passes of loss, backward and optimizer step over the batch; the last lr."""
        updates = self.cfg.grpo.updates_per_batch
        for _ in range(updates):
            self.loss_and_backward(mbs, self.aggregation(counts), beta, stats)
            stats.grad_norm, lr = self.optimizer_step(self.total_steps * updates)
        return lr

    def loss_and_backward(
        self, mbs: list[RLMicroBatch], aggregate: grpo.Aggregate, beta: float, stats: StepStats
    ) -> None:
        """Forward + backward every micro-batch; gradients accumulate, already globally normalised.

        No host sync inside the loop: finiteness is a flag on device, checked once at the end."""
        bad = torch.full((), -1, dtype=torch.long, device=self.dist.device)
        for i, mb in enumerate(mbs):
            logp, entropy = self._forward(self.policy, mb, return_entropy=True)
            loss, diagnostics = micro_batch_loss(logp, mb, aggregate, beta, self.terms)
            bad = first_bad(bad, i, loss)
            sync_gradients(self.policy, self.dist, now=i == len(mbs) - 1)
            loss.backward()
            stats.add(loss, diagnostics, entropy, logp, mb)
        check_finite(bad, self.step, self.dist.rank, self.dist.world_size)

    def optimizer_step(self, total_updates: int) -> tuple[float, float]:
        lr = lr_at(self.optimizer_steps, total_updates, self.cfg.optim)
        set_lr(self.optimizer, lr)
        norm = float(clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm))  # the same on every rank
        if not math.isfinite(norm):
            raise NonFiniteLossError(f"step {self.step}: non-finite gradient norm")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return norm, lr

    def sync_weights(self) -> None:
        """Stream the new full weights into the engine, one tensor at a time, cast to the engine's dtype
        before the gather (half the traffic in bf16)."""
        if self.cfg.rollout.max_staleness and self.dist.world_size > 1:
            # every rank's batch in flight is generated before any push pauses a shared server: a rank
            # still waiting for its paused requests would never join the push's all-gathers
            barrier()
        dtype = DTYPES[engine_dtype(self.cfg.rollout, self.dist.device)]
        self.engine.load_weights(iter_full_state_dict(self.policy, dtype=None if dtype == torch.float32 else dtype))

    # ----------------------------------------------------------------------------- the step

    def train_step(self) -> dict:
        cfg, timer = self.cfg, PhaseTimer()
        beta = self.beta_schedule(cfg.loss.beta, self.step, self.total_steps)
        use_kl = self.ref is not None and beta > 0
        # ---- rollout and reward: G scored completions per prompt (prefetched during the last step, or now)
        ready = self.next_batch()
        groups, info = ready.batch
        asleep = self.pipeline.pending is None  # an engine with nothing to generate sleeps while the step trains
        if asleep:
            self.engine.sleep()
        # ---- advantage: one per completion, from its group; micro-batches and the step's global counts
        mbs, counts = self.micro_batches(groups, self.advantages(groups))
        # ---- reference and old log-probs (only when a KL term is used / the batch is reused)
        with timer("reference"):
            self.attach_logprobs(mbs, reference=use_kl, old=False)
        with timer("old"):
            self.attach_logprobs(mbs, reference=False, old=cfg.grpo.updates_per_batch > 1)
        # ---- loss and backward, optimizer: updates_per_batch passes over the batch
        stats = StepStats(self.dist.device, has_kl=use_kl)
        with timer("update"):
            lr = self.update(mbs, counts, beta if use_kl else 0.0, stats)
        # ---- weight sync: once the batch in flight is generated, the new weights into the engine
        with timer("sync"):
            timer.seconds["wait_for_generation"] = self.pipeline.wait()
            self.sync_weights()
        if asleep:
            self.engine.wake_up()
        # ---- log
        self.record_groups(groups)
        return self.step_metrics(stats.reduce(groups, counts, info, self.over_long), timer, lr, beta, ready)

    def step_metrics(self, metrics: dict, timer: PhaseTimer, lr: float, beta: float, ready: Ready) -> dict:
        """The reduced statistics plus timings (wall seconds per phase and for the whole step) and rates.

        time_generate is the batch's generation time; with prefetching, time_generation_wait is the part
        the step waited for and generation_overlap the part that ran while the previous step trained."""
        times = timer.seconds
        times["generate"] = ready.seconds
        prefetched = self.cfg.rollout.max_staleness > 0
        metrics.update({f"time_{k}": v for k, v in times.items()}, lr=lr, beta=beta, step_time=timer.total())
        groups, _ = ready.batch  # staleness: versions behind, from the oldest weights a completion came from
        oldest = min((c.weight_version for g in groups for c in g.completions), default=ready.current)
        metrics.update(
            staleness=ready.current - oldest,
            time_generation_wait=ready.waited if prefetched else ready.seconds,
            generation_overlap=ready.seconds - ready.waited if prefetched else 0.0,
        )
        trained = metrics.pop("trained_tokens_total")
        metrics["generated_tokens_per_s"] = metrics["completion_tokens_total"] / max(times["generate"], 1e-9)
        metrics["trained_tokens_per_s"] = trained / max(times["update"], 1e-9)
        metrics["mfu"] = 6 * self.n_params * metrics["trained_tokens_per_s"] / (self.peak * self.dist.world_size)
        return metrics

    def record_groups(self, groups: list[Group]) -> None:
        """Per-prompt records for curriculum filtering; completions only when `run.log_completions`."""
        self.run_dir.record(*group_records(groups, self.step + 1, self.cfg.run.log_completions))

    # ----------------------------------------------------------------------------- run, save, resume

    def _loop_state(self) -> dict:
        return {"stream": self.stream.state_dict(), "rng": python_rng_to_json(self.rng.getstate())}

    def state_dict(self) -> dict:
        """The loop's own state (a collective: every rank's prompt stream and RNG), saved in checkpoints.
        With a batch prefetched, the state from before its draw: a resumed run draws that batch again."""
        mine = self._state_before_prefetch if self.pipeline.pending is not None else self._loop_state()
        gathered = [None] * self.dist.world_size
        torch.distributed.all_gather_object(gathered, mine)
        return {"step": self.step, "optimizer_steps": self.optimizer_steps, "streams": gathered}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.optimizer_steps = int(state["step"]), int(state["optimizer_steps"])
        mine = state["streams"][self.dist.rank]
        self.stream.load_state_dict(mine["stream"])
        self.rng.setstate(python_rng_from_json(mine["rng"]))

    def save(self) -> None:
        self.run_dir.save(self.step, self.policy, self.optimizer, self.state_dict())

    def _start(self) -> None:
        """Restore the checkpoint RunDir chose (if resuming), then let it write: config.json, logs cut."""
        state = self.run_dir.load(self.policy, self.optimizer)
        if state is not None:
            self.load_state_dict(state)
            self.sync_weights()  # the engine still holds the initial weights
        self.run_dir.begin(self.total_steps)
        if self.dist.is_main:
            print(
                f"grpo: {len(self.prompts)} prompts, {self.total_steps} steps, world {self.dist.world_size} "
                f"({self.dist.backend}), {self.run_dir.origin}",
                flush=True,
            )

    def steps(self) -> Iterator[tuple[int, dict]]:
        """Run the remaining steps, yielding (step, metrics) after each; checkpoints as `run.save_every`
        says (-1: none), and the final checkpoint and HF export when the run is complete."""
        run = self.cfg.run
        self._start()
        with self.run_dir.interruptible(lambda: self.step + 1), closing(self.pipeline):
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.step += 1
                if self.step % run.log_every == 0 or self.step == self.total_steps:
                    self.run_dir.log(self.step, metrics)
                if run.save_every > 0 and self.step % run.save_every == 0 and self.step < self.total_steps:
                    self.save()
                yield self.step, metrics
            if run.save_every >= 0:
                self.save()
            export_hf(self.policy, self.run_dir.out / "hf", self.tokenizer)

    def train(self, callbacks: Sequence[StepCallback] = ()) -> list[dict]:
        """Run to the end; `callbacks` are called as `fn(step, metrics)` after every step. Returns the
        metrics of the steps this call ran."""
        history = []
        with self.run_dir.interruptible(lambda: self.step + 1):  # a Ctrl-C in a callback is one line too
            for step, metrics in self.steps():
                history.append(metrics)
                for callback in callbacks:
                    callback(step, metrics)
        return history
