"""Supervised fine-tuning on prompt/completion pairs, on the same engine as GRPO.

    torchrun --nproc_per_node N -m minigrpo.sft --config sft.yaml --run.output_dir=out [--resume]

Data: JSONL rows {"prompt": str | [{"role", "content"}, ...], "completion": str}. A string prompt
is tokenized as is; a message list goes through the tokenizer's chat template (with the assistant
generation prompt). The completion is followed by EOS. The loss is on completion tokens only:

    loss = sum over the step's completion tokens of -log p(token) / (completion tokens in the step)

where both sums run over every micro-batch of every rank (batch.global_token_count), so the
result does not depend on the number of ranks or the micro-batch size.

Every bad input (config, model folder, tokenizer, data rows, the run folder) is found before
anything is written. The output folder is a run_dir.RunDir: metrics.jsonl (+ run.report_to),
checkpoints/ (resume with --resume), hf/.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from minigrpo.batch import Sample, equalize_micro_batches, global_token_count, make_micro_batches
from minigrpo.checkpoint import export_hf
from minigrpo.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig, check, load_config, section
from minigrpo.config import split_cli, to_dict
from minigrpo.dist import DistInfo, all_reduce_sum, init_distributed
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, iter_jsonl
from minigrpo.model import DTYPES, load_tokenizer
from minigrpo.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from minigrpo.parallel import load_sharded, sync_gradients
from minigrpo.run_dir import RunDir, check_output_dir, fingerprint
from minigrpo.seeding import derive_seed

CONSOLE_KEYS = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")
# Keys a resumed SFT run may change besides run.* and parallel.* (see run_dir): they do not touch training,
# or, for data.train_file, the rows it holds are compared instead (a moved file is the same data).
MAY_CHANGE_ON_RESUME = ("data.train_file", "data.eval_file", "data.eval_every", "checkpoint.export_dtype")


@dataclass(slots=True)
class DataConfig:
    train_file: str = ""
    eval_file: str = ""  # held-out rows for the eval loss; "" = none
    max_seq_len: int = 1024  # longer rows lose the end of their completion
    batch_size: int = 8  # sequences per optimizer step, over all ranks
    epochs: int = 1  # used when run.steps == 0
    shuffle: bool = True
    packing: bool = False  # pack rows into max_seq_len-token rows (see batch.py for why it is exact)
    eval_every: int = 0  # steps; 0 = only at the end

    def __post_init__(self) -> None:
        check(self.max_seq_len >= 2, "data.max_seq_len", "must be >= 2")
        check(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        check(self.epochs >= 1, "data.epochs", "must be >= 1")
        check(self.eval_every >= 0, "data.eval_every", "must be >= 0")


@dataclass(slots=True)
class CheckpointConfig:
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # dtype of hf/


@dataclass(slots=True)
class SFTConfig:
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    parallel: ParallelConfig = section(ParallelConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=0))  # 0: data.epochs passes over the data
    data: DataConfig = section(DataConfig)
    checkpoint: CheckpointConfig = section(CheckpointConfig)

    def __post_init__(self) -> None:
        check(bool(self.model.path), "model.path", "is required")
        check(bool(self.data.train_file), "data.train_file", "is required")
        check(not self.run.log_completions, "run.log_completions", "SFT samples no completions to log")


# ----------------------------------------------------------------------------- data


def _is_message(m) -> bool:
    return isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)


def check_row(row: dict, where: str) -> dict:
    """A row as the trainer keeps it, or a DataError naming `where` (file:line or row number)."""
    for key in ("prompt", "completion"):
        if key not in row:
            raise DataError(f"{where}: missing field '{key}'")
    if not isinstance(row["completion"], str):
        raise DataError(f"{where}: 'completion' must be a string")
    prompt = row["prompt"]
    if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(_is_message(m) for m in prompt))):
        raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
    return {"prompt": prompt, "completion": row["completion"], "where": where}


def read_rows(path: str) -> list[dict]:
    """JSONL rows with `prompt` (str or message list) and `completion` (str); errors name file:line."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    rows = [check_row(row, where) for where, row in iter_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int) -> list[Sample]:
    """Samples for `rows`; the completion is cut to fit `max_seq_len` (its EOS is then lost too)."""
    samples, truncated = [], 0
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if not prompt_ids or len(prompt_ids) >= max_seq_len:
            raise DataError(f"{row['where']}: the prompt has {len(prompt_ids)} tokens; it must have 1 to "
                            f"{max_seq_len - 1} (data.max_seq_len)")
        cut = len(prompt_ids) + len(completion_ids) > max_seq_len
        truncated += cut
        samples.append(Sample(list(prompt_ids), completion_ids[: max_seq_len - len(prompt_ids)]))
    if truncated and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {truncated} of {len(rows)} rows cut to data.max_seq_len={max_seq_len} tokens", flush=True)
    return samples


def step_indices(step: int, num_rows: int, cfg: DataConfig, seed: int) -> list[int]:
    """Rows of optimizer step `step` (all ranks). A pure function of the step: the data cursor."""
    per_epoch = max(1, num_rows // cfg.batch_size)  # the last partial batch of an epoch is dropped
    epoch, k = divmod(step, per_epoch)
    if cfg.shuffle:
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(derive_seed(seed, step=epoch)))
        order = order.tolist()
    else:
        order = list(range(num_rows))
    return order[k * cfg.batch_size : (k + 1) * cfg.batch_size]


def total_steps(cfg: SFTConfig, num_rows: int) -> int:
    return cfg.run.steps if cfg.run.steps > 0 else cfg.data.epochs * max(1, num_rows // cfg.data.batch_size)


# ----------------------------------------------------------------------------- step


def completion_nll_sum(model: torch.nn.Module, mb) -> torch.Tensor:
    """Sum of -log p over the micro-batch's scored (completion) tokens; fp32 scalar."""
    logp, _ = model(mb.input_ids, mb.targets, mb.attention_mask, mb.position_ids)  # (B, T) fp32
    return -(logp * mb.loss_mask).sum()


def micro_batches(samples: list[Sample], cfg: SFTConfig, pad_id: int, info: DistInfo):
    pack_len = cfg.data.max_seq_len if cfg.data.packing else 0
    local = make_micro_batches(samples, cfg.parallel.micro_batch_size, pad_id, pack_len=pack_len)
    return [mb.to(info.device) for mb in equalize_micro_batches(local, pad_id)]


def train_step(model, optimizer, samples: list[Sample], cfg: SFTConfig, lr: float, pad_id: int,
               info: DistInfo) -> dict:
    """One optimizer step over this rank's `samples`. Returns global loss, grad norm and token counts."""
    mbs = micro_batches(samples, cfg, pad_id, info)
    num_tokens = global_token_count(mbs)  # before any micro-batch runs: the step's normaliser
    loss_sum = torch.zeros((), device=info.device)
    for i, mb in enumerate(mbs):
        loss = completion_nll_sum(model, mb) / max(num_tokens, 1)
        sync_gradients(model, info, now=i == len(mbs) - 1)
        loss.backward()
        loss_sum += loss.detach()
    norm = clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    input_tokens = torch.tensor(float(sum(mb.input_tokens for mb in mbs)), dtype=torch.float64, device=info.device)
    totals = all_reduce_sum(torch.stack([loss_sum.double(), input_tokens]))
    return {"loss": float(totals[0]), "grad_norm": float(norm), "tokens": num_tokens, "input_tokens": int(totals[1])}


@torch.no_grad()
def evaluate(model, samples: list[Sample], cfg: SFTConfig, pad_id: int, info: DistInfo) -> float:
    mine = samples[info.rank :: info.world_size]
    mbs = micro_batches(mine, cfg, pad_id, info)
    total = torch.zeros((), dtype=torch.float64, device=info.device)
    for mb in mbs:
        total += completion_nll_sum(model, mb).double()
    total = all_reduce_sum(total)
    return float(total) / max(global_token_count(mbs), 1)


# ----------------------------------------------------------------------------- run


@dataclass(slots=True)
class Prepared:
    tokenizer: object
    train: list[Sample]
    eval: list[Sample]
    data: dict  # run_dir.fingerprint of the training rows: a resumed run must train on the same ones


def prepare(cfg: SFTConfig, rows: list[dict] | None = None) -> Prepared:
    """Every check that can fail on bad input, before anything is written or any rank syncs.

    `rows` (dicts with prompt and completion) are used instead of reading data.train_file."""
    check_output_dir(cfg.run)
    if rows is None:
        rows = read_rows(cfg.data.train_file)
    else:
        rows = [check_row(row, f"row {i}") for i, row in enumerate(rows, 1)]
    eval_rows = read_rows(cfg.data.eval_file) if cfg.data.eval_file else []
    needs_chat = any(isinstance(r["prompt"], list) for r in rows + eval_rows)
    tokenizer = load_tokenizer(cfg.model.path, require_chat_template=needs_chat)
    data = fingerprint(((r["prompt"], r["completion"]) for r in rows), cfg.data.train_file)
    max_len = cfg.data.max_seq_len
    train, held_out = tokenize_rows(rows, tokenizer, max_len), tokenize_rows(eval_rows, tokenizer, max_len)
    return Prepared(tokenizer, train, held_out, data)


class SFTTrainer:
    """Construction checks the run folder (RunDir: fresh or resumable, same config and data), loads the
    model and restores the checkpoint; `train()` runs the remaining steps and exports hf/.

    `state_dict()` is the loop's own state: the step and the data cursor. The cursor is a pure function
    of the step and run.seed (`step_indices`), so restoring the step restores it; the process RNGs of
    every rank are saved beside it by checkpoint.py (rng/rank_*.json). SFT has no RNG of its own."""

    def __init__(self, cfg: SFTConfig, data: Prepared):
        self.cfg, self.data = cfg, data
        self.dist = init_distributed()
        self.total_steps = total_steps(cfg, len(data.train))
        self.run = RunDir(cfg.run, to_dict(cfg), data.data, may_change=MAY_CHANGE_ON_RESUME)
        torch.manual_seed(cfg.run.seed)
        # fp32 master weights, built on the meta device and filled from rank 0's read of the checkpoint;
        # on CUDA, parallel.mixed_precision computes in bf16
        self.model = load_sharded(cfg.model, cfg.parallel, self.dist)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        state = self.run.load(self.model, self.optimizer)
        if state is not None:
            self.load_state_dict(state)

    def state_dict(self) -> dict:
        per_epoch = max(1, len(self.data.train) // self.cfg.data.batch_size)
        epoch, batch = divmod(self.step, per_epoch)
        cursor = {"epoch": epoch, "batch_in_epoch": batch, "rows": len(self.data.train)}
        return {"step": self.step, "data_cursor": cursor}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def train_step(self) -> dict:
        """Optimizer step `self.step + 1`: its rows (this rank's share), the update, and its record."""
        cfg, info = self.cfg, self.dist
        rows = step_indices(self.step, len(self.data.train), cfg.data, cfg.run.seed)
        mine = [self.data.train[i] for i in rows[info.rank :: info.world_size]]  # token counts may differ by rank
        lr = lr_at(self.step, self.total_steps, cfg.optim)
        t0 = time.perf_counter()
        stats = train_step(self.model, self.optimizer, mine, cfg, lr, self.data.tokenizer.pad_token_id, info)
        tokens_per_s = stats["input_tokens"] / (time.perf_counter() - t0)
        return {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"], "tokens": stats["tokens"],
                "tokens_per_s": tokens_per_s}

    def train(self) -> dict:
        """Run to the end; returns the last step's record."""
        cfg, run, steps = self.cfg, self.run, self.total_steps
        run.begin(steps, CONSOLE_KEYS)
        if self.dist.is_main:
            print(f"sft: {len(self.data.train)} rows, {steps} steps, world {self.dist.world_size} "
                  f"({self.dist.backend}), {run.origin}", flush=True)
        result: dict = {}
        pad_id = self.data.tokenizer.pad_token_id
        with run.interruptible(lambda: min(self.step + 1, steps)):
            while self.step < steps:
                record = self.train_step()
                self.step += 1
                done = self.step
                if self.data.eval and ((cfg.data.eval_every and done % cfg.data.eval_every == 0) or done == steps):
                    record["eval_loss"] = evaluate(self.model, self.data.eval, cfg, pad_id, self.dist)
                if done % cfg.run.log_every == 0 or done == steps:
                    run.log(done, record)
                every = cfg.run.save_every
                if (every > 0 and done % every == 0) or (done == steps and every >= 0):
                    run.save(done, self.model, self.optimizer, self.state_dict())
                result = record
            export_dtype = DTYPES[cfg.checkpoint.export_dtype]
            export_hf(self.model, run.out / "hf", self.data.tokenizer, dtype=export_dtype)
        return result


def train(cfg: SFTConfig, data: Prepared) -> dict:
    """SFT of `cfg` on prepared `data` (see SFTTrainer); the last step's record."""
    return SFTTrainer(cfg, data).train()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, SFTConfig)
    from minigrpo.cli import run_command

    def body() -> None:
        cfg = load_config(SFTConfig, *split_cli(argv))
        train(cfg, prepare(cfg))  # prepare() checks every input before anything is written

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
