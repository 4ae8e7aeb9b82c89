"""One training run's output folder, shared by SFT and GRPO: the checks made before anything is
written, the step logs, checkpoints, and resume.

    OUTPUT_DIR/
        config.json           the run's config (rewritten when a resumed run starts)
        metrics.jsonl         one row per logged step (metrics.MetricsLogger; also tensorboard / wandb)
        prompt_records.jsonl  GRPO: rewards and correctness per prompt and step (a curriculum's input)
        completions.jsonl     GRPO with run.log_completions: the sampled text
        checkpoints/          checkpoint.py's layout; `latest` names the newest
        hf/                   the final export (written by the trainer)

The lifecycle is the same in both trainers; every call is made on every rank:

    run = RunDir(cfg.run, to_dict(cfg), fingerprint(rows, path), may_change=(...))  # checks; writes nothing
    ...build the model and optimizer...
    state = run.load(model, optimizer)     # None for a fresh run; else the trainer state of the checkpoint
    if state is not None:
        trainer.load_state_dict(state)
    run.begin(total_steps)                 # rank 0 writes from here on: config.json, the logs cut to the step
    with run.interruptible(lambda: trainer.step + 1):
        ...each step: run.log(step, metrics); run.record(prompt_records, completions)  (GRPO)
                      run.save(step, model, optimizer, trainer.state_dict())

Resume (`run.resume=true`) picks its checkpoint as follows, and never deletes the run's logs or
checkpoints to start over:
- `run.resume_from=step_000004`: that checkpoint, which must verify.
- else the one `checkpoints/latest` names. If it is damaged, the run stops, naming the damaged file
  and the newest checkpoint that does verify (resume from it with --run.resume_from).
- `latest` missing, empty or naming no folder (a save that died between its rename and the pointer
  update, or a hand edit): the newest checkpoint that verifies; each one skipped is named, with why.
- no complete checkpoint at all: the run starts at step 1 and says so.
Then the checkpoint's recorded config and data fingerprint are compared with the new ones: a key
that differs (outside `run.*`, `parallel.*` and the trainer's `may_change`) or other data stop the
run with the differences named, unless `run.allow_resume_changes=true`.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable

from minigrpo import interrupt
from minigrpo.checkpoint import LATEST, CheckpointError, complete_checkpoints, load_checkpoint, read_meta
from minigrpo.checkpoint import save_checkpoint, verify_manifest
from minigrpo.config import ConfigError, RunConfig
from minigrpo.dist import all_gather_object, broadcast_object, rank
from minigrpo.io import DataError, append_jsonl, truncate_jsonl, write_json_atomic
from minigrpo.metrics import MetricsLogger

LOGS = ("metrics.jsonl", "prompt_records.jsonl", "completions.jsonl")  # rows with a "step", cut on resume
MAY_CHANGE = ("run.", "parallel.")  # how a run is driven and split, not what it computes...
MUST_MATCH = ("run.seed",)  # ...except the seed, which fixes the data order and sampling


def fingerprint(items: Iterable[Any], path: str | os.PathLike = "") -> dict:
    """What a run trains on: count and sha256 of JSON-able items (SFT rows, GRPO (prompt id, token ids)
    pairs), and the file they came from. Resume compares count and hash; the path is only reported."""
    digest, count = hashlib.sha256(), 0
    for item in items:
        digest.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
        count += 1
    return {"path": str(path), "count": count, "sha256": digest.hexdigest()}


def check_output_dir(run: RunConfig) -> None:
    """A fresh run (no --resume) refuses a folder that holds an earlier run's checkpoints or logs."""
    out = Path(run.output_dir)
    found = [name for name in ("checkpoints", *LOGS) if (out / name).exists()]
    if not run.resume and found:
        raise ConfigError(f"config key 'run.resume': {out} holds an earlier run ({', '.join(found)}): pass "
                          "--resume (--run.resume=true) to continue that run, or choose another run.output_dir",
                          key="run.resume")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flatten(value, path) if isinstance(value, dict) else {path: value})
    return flat


class RunDir:
    """See the module docstring. Construction is collective (checkpoints are verified by all ranks
    together) and writes nothing; `begin()` is the first call that writes."""

    def __init__(self, run: RunConfig, config: dict, data: dict, may_change: Iterable[str] = ()):
        self.run, self.data = run, data
        self.config = json.loads(json.dumps(config))  # as it will read back from meta.json
        self.out = Path(run.output_dir)
        self.checkpoints = self.out / "checkpoints"
        self.may_change = (*MAY_CHANGE, *may_change)
        self.is_main = rank() == 0
        self.notes: list[str] = []
        self.logger: MetricsLogger | None = None
        self.total_steps = 0  # known at begin()
        check_output_dir(run)
        self.resume_path = self._choose_checkpoint() if run.resume else None
        self.start_step = 0
        if self.resume_path is not None:
            meta = broadcast_object(read_meta(self.resume_path) if self.is_main else None)
            self.start_step = int(meta["step"])
            self._compare(meta)
            newer = [p.name for p in complete_checkpoints(self.checkpoints) if int(p.name[5:]) > self.start_step]
            if newer:
                self.notes.append(f"resuming from step {self.start_step}: the newer {', '.join(reversed(newer))} "
                                  "will be replaced as the run reaches them")
        self.last_saved = self.start_step if self.resume_path is not None else None
        if self.is_main:
            for note in self.notes:
                print(f"resume: {note}", flush=True)

    # ----------------------------------------------------------------------------- checks

    def _choose_checkpoint(self) -> Path | None:
        root, resume_from = self.checkpoints, self.run.resume_from
        listed = None
        if self.is_main:
            pointer = root / LATEST
            named = pointer.read_text().strip() if pointer.is_file() else None
            listed = ([p.name for p in complete_checkpoints(root)], named)
        names, named = broadcast_object(listed)  # every rank verifies the same folders in the same order
        if resume_from:
            path = Path(resume_from) if os.path.isabs(resume_from) else root / resume_from
            if not path.is_dir():
                raise ConfigError(f"config key 'run.resume_from': no checkpoint folder {path}", key="run.resume_from")
            verify_manifest(path)
            return path
        if not names:
            earlier = [name for name in LOGS if (self.out / name).exists()]
            if earlier:
                self.notes.append(f"no complete checkpoint in {root}: starting at step 1; the rows of the "
                                  f"earlier attempt in {', '.join(earlier)} are redone")
            return None
        if named in names:
            try:
                verify_manifest(root / named)
                return root / named
            except CheckpointError as damaged:
                good = self._newest_verified([n for n in names if n != named], [])
                hint = (f"; {good.name} verifies: resume from it with --run.resume_from={good.name}" if good
                        else "; no other checkpoint verifies")
                raise CheckpointError(f"{damaged}{hint}") from None
        why = "is missing" if named is None else ("is empty" if not named else f"names {named}, which does not exist")
        skipped: list[str] = []
        path = self._newest_verified(names, skipped)
        if path is None:
            raise CheckpointError(f"{root / LATEST} {why}, and no checkpoint in {root} verifies: {'; '.join(skipped)}")
        self.notes.append(f"{root / LATEST} {why}: resuming from {path.name}, the newest checkpoint that verifies"
                          + "".join(f"; skipped {s}" for s in skipped))
        return path

    def _newest_verified(self, names: list[str], skipped: list[str]) -> Path | None:
        for name in names:  # newest first
            try:
                verify_manifest(self.checkpoints / name)
                return self.checkpoints / name
            except CheckpointError as e:
                skipped.append(f"{name} ({e})")
        return None

    def _compare(self, meta: dict) -> None:
        """Refuse to continue with other config values or other data than the checkpoint was made with."""
        name, allow = self.resume_path.name, self.run.allow_resume_changes
        old, new = _flatten(meta.get("config", {})), _flatten(self.config)
        differ = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
                  if old[k] != new[k] and not self._may_change(k)]
        if differ and not allow:
            raise ConfigError(f"resume: config keys differ from checkpoint {name}: {', '.join(differ)}; resume with "
                              "the same values, or pass --run.allow_resume_changes=true to continue with the new ones")
        if differ:
            self.notes.append(f"continuing {name} with changed config keys: {', '.join(differ)}")
        was = meta.get("data")
        if was is None:
            self.notes.append(f"{name} has no data fingerprint (saved by an older minigrpo): the data is not compared")
        elif (was["count"], was["sha256"]) != (self.data["count"], self.data["sha256"]):
            what = (f"checkpoint {name} was trained on {was['count']} items from {was['path'] or '(in memory)'} "
                    f"(sha256 {was['sha256'][:12]}), this run has {self.data['count']} from "
                    f"{self.data['path'] or '(in memory)'} (sha256 {self.data['sha256'][:12]})")
            if not allow:
                raise DataError(f"resume: the data differs: {what}; pass --run.allow_resume_changes=true to "
                                "continue on the new data")
            self.notes.append(f"continuing on other data: {what}")

    def _may_change(self, key: str) -> bool:
        return key not in MUST_MATCH and any(key == m or key.startswith(m) for m in self.may_change)

    # ----------------------------------------------------------------------------- the run

    def load(self, model, optimizer) -> dict | None:
        """Collective. Restore model, optimizer and RNG from the chosen checkpoint (already verified);
        return the trainer state saved with it, or None for a fresh run."""
        if self.resume_path is None:
            return None
        return load_checkpoint(self.resume_path, model, optimizer, verify=False)["state"]

    @property
    def origin(self) -> str:
        return f"resumed from {self.resume_path} (step {self.start_step})" if self.resume_path else "from scratch"

    def begin(self, total_steps: int, console_keys: tuple[str, ...] | None = None) -> None:
        """Every check has passed: rank 0 writes config.json and cuts the logs to the resumed step (the
        rows of steps after it are about to be redone); the step logger starts."""
        self.total_steps = total_steps
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", self.config)
            if self.run.resume:
                for name in LOGS:
                    truncate_jsonl(self.out / name, self.start_step)
        self.logger = MetricsLogger(str(self.out), total_steps, self.is_main, self.run.report_to, self.start_step,
                                    console_keys)

    def log(self, step: int, metrics: dict) -> None:
        self.logger.log(step, metrics)

    def record(self, prompt_records: list[dict], completions: list[dict] = ()) -> None:
        """Collective. Append every rank's rows (in rank order) to prompt_records.jsonl, and the
        completions to completions.jsonl when run.log_completions (they can hold patient text)."""
        parts = all_gather_object((prompt_records, list(completions) if self.run.log_completions else []))
        if self.is_main:
            append_jsonl(self.out / "prompt_records.jsonl", [row for rows, _ in parts for row in rows])
            if self.run.log_completions:
                append_jsonl(self.out / "completions.jsonl", [row for _, rows in parts for row in rows])

    def save(self, step: int, model, optimizer, state: dict) -> Path:
        """Collective. A checkpoint of `step` with the trainer `state`, config and data fingerprint; the
        newest run.keep_last are kept. Ctrl-C during the save takes effect once it is complete."""
        with interrupt.deferred():
            path = save_checkpoint(self.checkpoints, step, model, optimizer, state, self.config, self.run.keep_last,
                                   data=self.data)
        self.last_saved = step
        return path

    @contextmanager
    def interruptible(self, current_step: Callable[[], int]):
        """Turn Ctrl-C / SIGTERM inside the block into one `Interrupted` line: the step, the last
        checkpoint and how to resume. An error that follows a signal (a peer rank that has already
        gone) counts as the interrupt too."""
        try:
            yield
        except BaseException as e:
            signum = e.signum if isinstance(e, interrupt.Interrupted) else interrupt.received_signal()
            if signum is None and not isinstance(e, KeyboardInterrupt):
                raise
            stop = e if isinstance(e, interrupt.Interrupted) else interrupt.Interrupted(signum or 2)
            step = min(current_step(), self.total_steps) if self.total_steps else current_step()
            raise interrupt.Interrupted(stop.signum, stop.cause, f"{stop.cause} at step {step}; "
                                        + self._resume_hint()) from None

    def _resume_hint(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was saved yet: rerun with --run.resume=true to start again at step 1"
        return (f"the last checkpoint is step {self.last_saved} ({self.checkpoints}): resume with the same "
                "command and --run.resume=true")
