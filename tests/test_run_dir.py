"""RunDir: which checkpoint a resumed run continues from, what it refuses, and that a refusal writes nothing."""

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from minigrpo import interrupt
from minigrpo.checkpoint import CheckpointError
from minigrpo.config import ConfigError, RunConfig
from minigrpo.io import DataError
from minigrpo.run_dir import RunDir, fingerprint

CONFIG = {"optim": {"lr": 0.01}, "run": {"seed": 0, "steps": 6}, "parallel": {"micro_batch_size": 2}}
DATA = fingerprint([["a", 1], ["b", 2]], "train.jsonl")


def folder_hashes(folder: Path) -> dict:
    """{relative path: sha256} of every file: equal dicts mean a byte-identical folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 2)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def run_cfg(out: Path, **kw) -> RunConfig:
    return RunConfig(output_dir=str(out), **kw)


@pytest.fixture()
def finished(tmp_path) -> Path:
    """A 6-step run: checkpoints at 2, 4, 6, a metrics row and a prompt record per step."""
    out = tmp_path / "run"
    run = RunDir(run_cfg(out), CONFIG, DATA)
    model, optimizer = model_and_optimizer()
    run.begin(6)
    for step in range(1, 7):
        run.log(step, {"loss": 1.0 / step})
        run.record([{"step": step, "prompt_id": "a"}])
        if step % 2 == 0:
            run.save(step, model, optimizer, {"step": step})
    return out


def damage(checkpoint: Path) -> None:
    shard = next((checkpoint / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])


def steps_logged(out: Path, name: str = "metrics.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (out / name).read_text().splitlines()]


def test_fresh_run_refuses_a_folder_with_an_earlier_run(finished, tmp_path):
    with pytest.raises(ConfigError, match="pass --resume"):
        RunDir(run_cfg(finished), CONFIG, DATA)
    # a crash before the first checkpoint leaves only logs: still an earlier run, never overwritten
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="metrics.jsonl"):
        RunDir(run_cfg(partial), CONFIG, DATA)


def test_resume_continues_from_latest_and_cuts_the_logs_only_at_begin(finished):
    (finished / "metrics.jsonl").write_text((finished / "metrics.jsonl").read_text() + '{"step": 7, "loss"')
    before = folder_hashes(finished)
    run = RunDir(run_cfg(finished, resume=True), CONFIG, DATA)
    assert run.resume_path.name == "step_000006" and run.start_step == 6
    model, optimizer = model_and_optimizer(seed=1)
    assert run.load(model, optimizer) == {"step": 6}
    assert folder_hashes(finished) == before  # nothing written before begin()
    run.begin(8)
    assert steps_logged(finished) == [1, 2, 3, 4, 5, 6]  # the cut-off row of the killed step 7 is gone


def test_missing_pointer_resumes_from_the_newest_checkpoint_that_verifies(finished, capsys):
    (finished / "checkpoints" / "latest").unlink()
    damage(finished / "checkpoints" / "step_000006")
    run = RunDir(run_cfg(finished, resume=True), CONFIG, DATA)
    assert run.resume_path.name == "step_000004" and run.start_step == 4
    out = capsys.readouterr().out
    assert "latest is missing" in out and "resuming from step_000004" in out
    assert "skipped step_000006" in out and "truncated or corrupted" in out
    run.begin(6)
    assert steps_logged(finished) == [1, 2, 3, 4]  # steps 5 and 6 are redone, the others kept
    assert steps_logged(finished, "prompt_records.jsonl") == [1, 2, 3, 4]


@pytest.mark.parametrize("pointer", ["", "step_000099"])
def test_empty_or_dangling_pointer_falls_back_too(finished, pointer, capsys):
    (finished / "checkpoints" / "latest").write_text(pointer)
    run = RunDir(run_cfg(finished, resume=True), CONFIG, DATA)
    assert run.resume_path.name == "step_000006"
    assert ("is empty" if not pointer else "which does not exist") in capsys.readouterr().out


def test_damaged_latest_stops_and_names_the_checkpoint_that_verifies(finished):
    damage(finished / "checkpoints" / "step_000006")
    before = folder_hashes(finished)
    hint = r"truncated or corrupted.*step_000004 verifies.*--run.resume_from=step_000004"
    with pytest.raises(CheckpointError, match=hint):
        RunDir(run_cfg(finished, resume=True), CONFIG, DATA)
    assert folder_hashes(finished) == before
    run = RunDir(run_cfg(finished, resume=True, resume_from="step_000004"), CONFIG, DATA)
    assert run.start_step == 4
    assert "the newer step_000006 will be replaced as the run reaches them" in " ".join(run.notes)  # said, not silent


def test_no_checkpoint_verifies(finished):
    (finished / "checkpoints" / "latest").unlink()
    for name in ("step_000002", "step_000004", "step_000006"):
        damage(finished / "checkpoints" / name)
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies: step_000006 .*step_000004 .*step_000002"):
        RunDir(run_cfg(finished, resume=True), CONFIG, DATA)


def test_resume_without_a_checkpoint_says_it_starts_at_step_one(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002.tmp").mkdir(parents=True)  # a first save that never finished
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    run = RunDir(run_cfg(out, resume=True), CONFIG, DATA)
    assert run.resume_path is None and run.start_step == 0
    assert "starting at step 1" in capsys.readouterr().out


def test_changed_config_key_is_refused_by_name(finished):
    before = folder_hashes(finished)
    changed = {**CONFIG, "optim": {"lr": 0.5}, "run": {"seed": 0, "steps": 8}, "parallel": {"micro_batch_size": 1}}
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.01 -> 0\.5") as e:
        RunDir(run_cfg(finished, resume=True), changed, DATA)
    assert "run.steps" not in str(e.value) and "parallel" not in str(e.value)  # how the run is driven may change
    with pytest.raises(ConfigError, match=r"run\.seed"):
        RunDir(run_cfg(finished, resume=True), {**CONFIG, "run": {"seed": 1, "steps": 6}}, DATA)
    assert folder_hashes(finished) == before
    run = RunDir(run_cfg(finished, resume=True, allow_resume_changes=True), changed, DATA)
    assert any("optim.lr" in note for note in run.notes)
    # a trainer may list keys of its own that do not change what it computes
    RunDir(run_cfg(finished, resume=True), {**CONFIG, "optim": {"lr": 0.5}}, DATA, may_change=("optim.lr",))


def test_other_data_is_refused(finished):
    before = folder_hashes(finished)
    other = fingerprint([["a", 1]], "five.jsonl")
    with pytest.raises(DataError, match=r"data differs: .*2 items from train\.jsonl.*1 from five\.jsonl"):
        RunDir(run_cfg(finished, resume=True), CONFIG, other)
    assert folder_hashes(finished) == before
    RunDir(run_cfg(finished, resume=True, allow_resume_changes=True), CONFIG, other)
    moved = fingerprint([["a", 1], ["b", 2]], "elsewhere/train.jsonl")  # same rows from another path: the same data
    RunDir(run_cfg(finished, resume=True), CONFIG, moved)


def test_keep_last_and_completions_only_when_asked(tmp_path):
    out = tmp_path / "run"
    run = RunDir(run_cfg(out, keep_last=2), CONFIG, DATA)
    model, optimizer = model_and_optimizer()
    run.begin(3)
    for step in (1, 2, 3):
        run.record([{"step": step}], [{"step": step, "completion": "text"}])
        run.save(step, model, optimizer, {"step": step})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000002", "step_000003"]
    assert not (out / "completions.jsonl").exists()  # run.log_completions is off
    assert json.loads((out / "config.json").read_text()) == CONFIG


def test_interrupt_names_the_step_and_the_last_checkpoint(finished):
    run = RunDir(run_cfg(finished, resume=True), CONFIG, DATA)
    run.begin(10)
    with pytest.raises(interrupt.Interrupted) as e, run.interruptible(lambda: 7):
        raise interrupt.Interrupted(signal.SIGTERM)
    assert str(e.value).startswith("interrupted (SIGTERM) at step 7; the last checkpoint is step 6")
    assert "--run.resume=true" in str(e.value) and e.value.exit_code == 143
    fresh = RunDir(run_cfg(finished.parent / "new"), CONFIG, DATA)
    fresh.begin(10)
    no_checkpoint = "at step 1; no checkpoint was saved yet"
    with pytest.raises(KeyboardInterrupt, match=no_checkpoint), fresh.interruptible(lambda: 1):
        raise KeyboardInterrupt  # a plain Ctrl-C (no handlers installed) reads the same


def test_interrupt_during_a_save_waits_for_the_save(tmp_path, monkeypatch):
    """A signal that lands inside save() takes effect after the checkpoint is complete."""
    import minigrpo.run_dir as run_dir_module

    previous = interrupt.handle_signals()
    try:
        out = tmp_path / "run"
        run = RunDir(run_cfg(out), CONFIG, DATA)
        run.begin(2)
        model, optimizer = model_and_optimizer()
        real_save = run_dir_module.save_checkpoint

        def save_with_signal(*args, **kwargs):
            signal.raise_signal(signal.SIGINT)  # the handler defers it: we are inside the save
            return real_save(*args, **kwargs)

        monkeypatch.setattr(run_dir_module, "save_checkpoint", save_with_signal)
        with pytest.raises(interrupt.Interrupted):
            run.save(1, model, optimizer, {"step": 1})
        assert (out / "checkpoints" / "latest").read_text() == "step_000001"
        shutil.rmtree(out)
    finally:
        interrupt.restore(previous)
