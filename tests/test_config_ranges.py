"""Bad values of the GRPO sections are errors at start, naming the key, through the real entry point.

`python -m examples.digits` is a GRPO entry point like `recipes/drg/train.py`: a bad value must exit 2
with one `error:` line naming the key, before any model loads, and write nothing.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.config import ConfigError, load_config
from minigrpo.trainer import GRPORunConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override,key",
    [
        ("--loss.eps_low=1.5", "loss.eps_low"),  # 1 - eps_low must stay > 0
        ("--loss.eps_low=1", "loss.eps_low"),
        ("--loss.eps_high=-0.1", "loss.eps_high"),
        ("--loss.dual_clip=0.5", "loss.dual_clip"),
        ("--rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),  # G = 1: no group to compare
        ("--rollout.top_p=0", "rollout.top_p"),
        ("--rollout.top_p=1.5", "rollout.top_p"),
        ("--loss.aggregation=mean", "loss.aggregation"),  # checked against grpo.AGGREGATIONS
        ("--loss.advantage=ppo", "loss.advantage"),
        ("--loss.beta_schedule=linear", "loss.beta_schedule"),
        ("--run.save_every=-2", "run.save_every"),
    ],
)
def test_bad_value_names_its_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(GRPORunConfig, None, [override])


def test_limits_themselves_are_accepted():
    cfg = load_config(GRPORunConfig, None, ["--loss.eps_low=0.999", "--rollout.samples_per_prompt=2",
                                            "--rollout.top_p=1", "--run.save_every=-1"])
    assert cfg.loss.eps_low == 0.999 and cfg.rollout.samples_per_prompt == 2 and cfg.run.save_every == -1


def test_entry_point_rejects_before_loading_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "examples.digits", "--model.path=/nonexistent", f"--run.output_dir={out}",
         "--rollout.samples_per_prompt=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "rollout.samples_per_prompt" in lines[-1]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_entry_point_help_lists_the_keys():
    proc = subprocess.run([sys.executable, "-m", "examples.digits", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for key in ("samples_per_prompt", "aggregation", "shared_prompt", "save_every"):
        assert key in proc.stdout


def test_prompt_over_the_context_is_found_at_start_and_named(tiny_model_dir, tmp_path):
    from examples.digits import make_prompts, reward_fn
    from minigrpo.model import load_tokenizer, model_context
    from minigrpo.rl.prompts import Prompt
    from minigrpo.trainer import GRPOTrainer

    context = model_context(tiny_model_dir)
    prompts = make_prompts(load_tokenizer(tiny_model_dir), 4) + [Prompt("case-too-long", [5] * (context - 3))]
    cfg = load_config(GRPORunConfig, None, [f"--model.path={tiny_model_dir}", f"--run.output_dir={tmp_path}",
                                            "--grpo.prompts_per_step=2", "--rollout.max_new_tokens=8",
                                            f"--grpo.max_prompt_tokens={10 * context}",
                                            "--grpo.over_long_prompts=reject", "--loss.beta=0"])
    with pytest.warns(UserWarning, match=r"model.s context.*rejected: case-too-long"):
        trainer = GRPOTrainer(cfg, prompts, reward_fn)
    assert trainer.over_long == 1 and all(p.id != "case-too-long" for p in trainer.prompts)
    assert not (tmp_path / "checkpoints").exists()
