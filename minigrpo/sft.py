"""Supervised fine-tuning on prompt/completion pairs, on the same engine as GRPO.

    torchrun --nproc_per_node N -m minigrpo.sft --config sft.yaml --run.output_dir=out [--resume]

Data: JSONL rows {"prompt": str | [{"role", "content"}, ...], "completion": str}. A string prompt
is tokenized as is; a message list goes through the tokenizer's chat template (with the assistant
generation prompt). The completion is followed by EOS. The loss is on completion tokens only:

    loss = sum over the step's completion tokens of -log p(token) / (completion tokens in the step)

where both sums run over every micro-batch of every rank (batch.global_token_count), so the
result does not depend on the number of ranks or the micro-batch size.

Every bad input (config, model folder, tokenizer, data rows) is found before anything is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from minigrpo.batch import Sample, equalize_micro_batches, global_token_count, make_micro_batches
from minigrpo.checkpoint import CheckpointError, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from minigrpo.config import ModelConfig, OptimConfig, ParallelConfig, RunConfig, check, load_config, section, split_cli, to_dict
from minigrpo.dist import DistInfo, all_reduce_sum, init_distributed
from minigrpo.model import DTYPES, LogprobModel, load_model, load_tokenizer
from minigrpo.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from minigrpo.parallel import shard_model

CRASH_ENV = "MINIGRPO_CRASH_AFTER_STEP"  # fault injection for the kill-and-resume test
DEFAULTS = {"run": {"steps": 0}}  # SFT runs data.epochs by default, not RunConfig's 10 steps


class DataError(ValueError):
    """A bad data file or row; the message names the file and line."""


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
    keep_last: int = 0  # complete checkpoints kept; 0 = all (run.keep_last, when set, wins)
    export_dtype: Literal["", "float32", "bfloat16", "float16"] = ""  # "" = model.dtype

    def __post_init__(self) -> None:
        check(self.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")


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


# ----------------------------------------------------------------------------- data


def read_rows(path: str) -> list[dict]:
    """JSONL rows with `prompt` (str or message list) and `completion` (str); errors name file:line."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object")
            for key in ("prompt", "completion"):
                if key not in row:
                    raise DataError(f"{where}: missing field '{key}'")
            if not isinstance(row["completion"], str):
                raise DataError(f"{where}: 'completion' must be a string")
            prompt = row["prompt"]
            chat = isinstance(prompt, list)
            is_message = lambda m: isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)  # noqa: E731
            ok = isinstance(prompt, str) or (chat and all(is_message(m) for m in prompt))
            if not ok:
                raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} messages")
            rows.append({"prompt": prompt, "completion": row["completion"], "where": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def tokenize_rows(rows: list[dict], tokenizer, max_seq_len: int) -> list[Sample]:
    """Samples for `rows`; the completion is cut to fit `max_seq_len` (its EOS is then lost too)."""
    samples, truncated = [], 0
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if not prompt_ids or len(prompt_ids) >= max_seq_len:
            raise DataError(f"{row['where']}: the prompt has {len(prompt_ids)} tokens; it must have 1 to {max_seq_len - 1} (data.max_seq_len)")
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
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
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


def train_step(model, optimizer, samples: list[Sample], cfg: SFTConfig, lr: float, pad_id: int, info: DistInfo) -> dict:
    """One optimizer step over this rank's `samples`. Returns global loss, grad norm and token counts."""
    mbs = micro_batches(samples, cfg, pad_id, info)
    num_tokens = global_token_count(mbs)  # before any micro-batch runs: the step's normaliser
    loss_sum = torch.zeros((), device=info.device)
    for mb in mbs:
        loss = completion_nll_sum(model, mb) / max(num_tokens, 1)
        loss.backward()
        loss_sum += loss.detach()
    norm = clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    input_tokens = sum(mb.input_tokens for mb in mbs)
    totals = all_reduce_sum(torch.stack([loss_sum.double(), torch.tensor(float(input_tokens), dtype=torch.float64, device=info.device)]))
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


def prepare(cfg: SFTConfig) -> Prepared:
    """Every check that can fail on bad input, before anything is written or any rank syncs."""
    rows = read_rows(cfg.data.train_file)
    eval_rows = read_rows(cfg.data.eval_file) if cfg.data.eval_file else []
    needs_chat = any(isinstance(r["prompt"], list) for r in rows + eval_rows)
    tokenizer = load_tokenizer(cfg.model.path, require_chat_template=needs_chat)
    out = Path(cfg.run.output_dir)
    if not cfg.run.resume and (out / "checkpoints").exists():
        raise CheckpointError(f"{out}/checkpoints exists: pass --resume to continue that run, or choose another run.output_dir")
    return Prepared(tokenizer, tokenize_rows(rows, tokenizer, cfg.data.max_seq_len), tokenize_rows(eval_rows, tokenizer, cfg.data.max_seq_len))


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")


class StepLog:
    """Console line with ETA + metrics.jsonl, rank 0 only."""

    def __init__(self, path: Path, enabled: bool, start_step: int, total: int):
        self.enabled, self.total, self.start_step = enabled, total, start_step
        self.t0 = time.perf_counter()
        self.path = path
        if enabled and path.exists():
            # Steps logged after the checkpoint we resume from are about to be redone: drop them.
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= start_step]
            path.write_text("".join(line + "\n" for line in kept))

    def __call__(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = step - self.start_step
        eta = elapsed / max(done, 1) * (self.total - step)
        record = {"step": step, **record, "elapsed_s": round(elapsed, 3)}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        shown = {k: v for k, v in record.items() if k not in ("step", "elapsed_s")}
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()]
        print(" | ".join(parts) + f" | eta {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)


def train(cfg: SFTConfig, data: Prepared) -> dict:
    info = init_distributed()
    out = Path(cfg.run.output_dir)
    ckpt_root = out / "checkpoints"
    torch.manual_seed(cfg.run.seed)
    lm = load_model(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation, cfg.model.trust_remote_code)
    model = shard_model(LogprobModel(lm), cfg.parallel, info)
    optimizer = build_optimizer(model, cfg.optim)
    steps = total_steps(cfg, len(data.train))
    pad_id = data.tokenizer.pad_token_id

    start = 0
    last = latest_checkpoint(ckpt_root) if cfg.run.resume else None
    if last is not None:
        start = load_checkpoint(last, model, optimizer)["step"]
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        origin = f"resumed from {last}" if last else "from scratch"
        print(f"sft: {len(data.train)} rows, {steps} steps, world {info.world_size} ({info.backend}), {origin}", flush=True)
    log = StepLog(out / "metrics.jsonl", info.is_main, start, steps)

    result: dict = {}
    for step in range(start, steps):
        rows = step_indices(step, len(data.train), cfg.data, cfg.run.seed)
        mine = [data.train[i] for i in rows[info.rank :: info.world_size]]  # ranks may hold different token counts
        lr = lr_at(step, steps, cfg.optim)
        t = time.perf_counter()
        stats = train_step(model, optimizer, mine, cfg, lr, pad_id, info)
        stats["tokens_per_s"] = stats["input_tokens"] / (time.perf_counter() - t)
        record = {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"], "tokens": stats["tokens"], "tokens_per_s": stats["tokens_per_s"]}
        done = step + 1
        if data.eval and ((cfg.data.eval_every and done % cfg.data.eval_every == 0) or done == steps):
            record["eval_loss"] = evaluate(model, data.eval, cfg, pad_id, info)
        if done % cfg.run.log_every == 0 or done == steps:
            log(done, record)
        if (cfg.run.save_every and done % cfg.run.save_every == 0) or done == steps:
            per_epoch = max(1, len(data.train) // cfg.data.batch_size)
            state = {"data_cursor": {"epoch": done // per_epoch, "batch_in_epoch": done % per_epoch, "rows": len(data.train)}}
            save_checkpoint(ckpt_root, done, model, optimizer, state, to_dict(cfg), cfg.run.keep_last or cfg.checkpoint.keep_last)
        if os.environ.get(CRASH_ENV) == str(done):
            os._exit(3)  # a hard crash: no cleanup, no final save
        result = record

    export_dtype = DTYPES[cfg.checkpoint.export_dtype or cfg.model.dtype]
    export_hf(model, out / "hf", data.tokenizer, dtype=export_dtype)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print("config sections and defaults:", json.dumps(to_dict(SFTConfig(model=ModelConfig(path="PATH"), data=DataConfig(train_file="FILE"))), indent=2))
        return 0
    from minigrpo.cli import run_command

    def body() -> None:
        cfg = load_config(SFTConfig, *split_cli(argv), defaults=DEFAULTS)
        train(cfg, prepare(cfg))  # prepare() checks every input before anything is written

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
