"""Config loading: types, YAML + overrides, errors that name the key."""

from dataclasses import dataclass

import pytest

from minigrpo.config import ConfigError, LossConfig, OptimConfig, RolloutConfig, load_config, section


@dataclass(slots=True)
class Cfg:
    optim: OptimConfig = section(OptimConfig)
    loss: LossConfig = section(LossConfig)
    rollout: RolloutConfig = section(RolloutConfig)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 3.0e-6\n  schedule: cosine\nloss:\n  beta: 0.0\n")
    cfg = load_config(Cfg, p, ["--loss.beta=0.04", "--rollout.samples_per_prompt=8", "--loss.dual_clip=3"])
    assert cfg.optim.lr == 3e-6 and cfg.optim.schedule == "cosine"
    assert cfg.loss.beta == 0.04 and cfg.loss.dual_clip == 3.0
    assert cfg.rollout.samples_per_prompt == 8 and isinstance(cfg.rollout.samples_per_prompt, int)


@pytest.mark.parametrize(
    "overrides,named",
    [
        (["--optim.lrr=1e-5"], "optim.lrr"),
        (["--nosuch.lr=1"], "nosuch"),
        (["--loss.kl=k9"], "loss.kl"),
        (["--optim.lr=fast"], "optim.lr"),
        (["--optim.lr=-1"], "optim.lr"),
        (["--rollout.samples_per_prompt=2.5"], "rollout.samples_per_prompt"),
        (["--loss.dual_clip=0.5"], "loss.dual_clip"),
        (["optim.lr=1"], "optim.lr=1"),
        (["--optim.lr"], "optim.lr"),
    ],
)
def test_errors_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(Cfg, None, overrides)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("loss:\n  betta: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p)
    assert "loss.betta" in str(e.value) and "bad.yaml" in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    p = tmp_path / "x.yaml"
    p.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(Cfg, p)
