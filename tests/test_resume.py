"""GRPO resume through the public API (`GRPOTrainer(cfg, prompts, reward_fn).train()`): which checkpoint a
resumed run continues from, what it refuses, and that a refusal leaves the run folder byte-identical."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from examples.digits import make_prompts, reward_fn
from minigrpo.checkpoint import CheckpointError
from minigrpo.config import ConfigError, load_config
from minigrpo.interrupt import Interrupted
from minigrpo.io import DataError
from minigrpo.model import load_tokenizer
from minigrpo.trainer import GRPORunConfig, GRPOTrainer


def folder_hashes(folder: Path) -> dict:
    """{relative path: sha256} of every file: equal dicts mean a byte-identical folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def make_cfg(model_dir, out, *overrides):
    base = [
        f"--model.path={model_dir}", f"--run.output_dir={out}", "--run.steps=4", "--run.save_every=2", "--run.seed=1",
        "--grpo.prompts_per_step=2", "--rollout.samples_per_prompt=4", "--rollout.max_new_tokens=6",
        "--parallel.micro_batch_size=4", "--optim.lr=5e-2", "--loss.beta=0",
    ]
    return load_config(GRPORunConfig, None, base + list(overrides))


def train(model_dir, out, *overrides, prompts=8, **kwargs):
    prompt_list = make_prompts(load_tokenizer(model_dir), prompts)
    return GRPOTrainer(make_cfg(model_dir, out, *overrides), prompt_list, reward_fn).train(**kwargs)


def steps_logged(out: Path, name: str = "metrics.jsonl") -> list[int]:
    return [json.loads(line)["step"] for line in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    """A finished 4-step run: checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    train(tiny_model_dir, out)
    return out


@pytest.fixture()
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_missing_pointer_resumes_from_the_newest_checkpoint_that_verifies(tiny_model_dir, run_copy, capsys):
    (run_copy / "checkpoints" / "latest").unlink()
    history = train(tiny_model_dir, run_copy, "--run.resume=true", "--run.steps=6")
    assert len(history) == 2  # steps 5 and 6: continued from step 4, not restarted at step 1
    assert "resuming from step_000004" in capsys.readouterr().out
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6]
    assert steps_logged(run_copy, "prompt_records.jsonl") == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]


def test_damaged_latest_stops_naming_the_checkpoint_that_verifies(tiny_model_dir, run_copy):
    shard = next((run_copy / "checkpoints" / "step_000004" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = folder_hashes(run_copy)
    with pytest.raises(CheckpointError, match=r"truncated or corrupted.*--run\.resume_from=step_000002"):
        train(tiny_model_dir, run_copy, "--run.resume=true", "--run.steps=6")
    assert folder_hashes(run_copy) == before  # not even config.json was rewritten
    history = train(tiny_model_dir, run_copy, "--run.resume=true", "--run.resume_from=step_000002")
    assert len(history) == 2 and steps_logged(run_copy) == [1, 2, 3, 4]


def test_other_prompts_are_refused(tiny_model_dir, run_copy):
    before = folder_hashes(run_copy)
    with pytest.raises(DataError, match=r"data differs: .*8 items.* 6 from"):
        train(tiny_model_dir, run_copy, "--run.resume=true", "--run.steps=6", prompts=6)
    assert folder_hashes(run_copy) == before


def test_changed_config_key_is_refused_by_name(tiny_model_dir, run_copy):
    before = folder_hashes(run_copy)
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.05 -> 0\.01") as e:
        train(tiny_model_dir, run_copy, "--run.resume=true", "--run.steps=6", "--optim.lr=1e-2")
    assert "run.steps" not in str(e.value)  # extending a run is not a change of what it computes
    assert folder_hashes(run_copy) == before
    history = train(tiny_model_dir, run_copy, "--run.resume=true", "--run.steps=5", "--optim.lr=1e-2",
                    "--run.allow_resume_changes=true")
    assert len(history) == 1


def test_fresh_run_refuses_a_folder_with_an_earlier_runs_logs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # a run killed before its first checkpoint
    before = folder_hashes(out)
    with pytest.raises(ConfigError, match="pass --resume"):
        train(tiny_model_dir, out)
    assert folder_hashes(out) == before


def test_interrupt_names_the_step_and_the_last_checkpoint(tiny_model_dir, tmp_path):
    calls = {"n": 0}

    def reward_then_ctrl_c(texts, meta):  # Ctrl-C lands while step 3 is scoring its completions
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return reward_fn(texts, meta)

    cfg = make_cfg(tiny_model_dir, tmp_path / "run")
    trainer = GRPOTrainer(cfg, make_prompts(load_tokenizer(tiny_model_dir), 8), reward_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt) as e:  # not pytest.raises(Interrupted): a bare one would end the session
        trainer.train()
    assert isinstance(e.value, Interrupted), repr(e.value)
    assert str(e.value).startswith("interrupted (SIGINT) at step 3; the last checkpoint is step 2 ")
    assert str(e.value).endswith("resume with the same command and --run.resume=true")
