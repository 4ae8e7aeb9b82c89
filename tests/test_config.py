"""Config loading: types, YAML + overrides, errors that name the key."""

import dataclasses
import importlib
import re
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


# ----------------------------------------------------------------------------- defaults, duplicates, non-finite

ENTRY_POINT_CONFIGS = [  # (module, class, overrides its __post_init__ requires)
    ("minigrpo.sft", "SFTConfig", ["--model.path=M", "--data.train_file=F"]),
    ("minigrpo.trainer", "GRPORunConfig", []),
    ("recipes.drg.sft", "DrgSFTConfig", []),
    ("recipes.drg.train", "DrgTrainConfig", []),
    ("recipes.drg.demo", "DemoConfig", []),
]


def _sections(cls, default, prefix=""):
    """(dotted path, default instance) of every section below `cls` whose default the parent gives."""
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            path = f"{prefix}{f.name}"
            yield path, value
            yield from _sections(type(value), value, path + ".")


def _scalar_key(section):
    """A key of `section` whose default can be written on the command line as it is."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and value):
            return f.name, str(value).lower() if isinstance(value, bool) else str(value)
    return None


@pytest.mark.parametrize("module,name,required", ENTRY_POINT_CONFIGS, ids=[c[1] for c in ENTRY_POINT_CONFIGS])
def test_a_partial_section_keeps_the_parents_defaults(module, name, required):
    """Giving one key of a section must not reset its other keys to the section class's defaults."""
    cls = getattr(importlib.import_module(module), name)
    reference = load_config(cls, None, required)
    for path, default in _sections(cls, reference):
        key = _scalar_key(default)
        if key is None:
            continue
        cfg = load_config(cls, None, [*required, f"--{path}.{key[0]}={key[1]}"])
        got = cfg
        for part in path.split("."):
            got = getattr(got, part)
        assert got == default, path


@pytest.mark.parametrize("module,name", [("minigrpo.sft", "SFTConfig"), ("recipes.drg.sft", "DrgSFTConfig")])
def test_sft_log_every_keeps_one_epoch(module, name):
    cls = getattr(importlib.import_module(module), name)
    cfg = load_config(cls, None, ["--run.log_every=5", "--model.path=M", "--data.train_file=F"])
    assert cfg.run.steps == 0 and cfg.run.log_every == 5  # 0 = one pass over the data, not RunConfig's 10


def test_demo_nested_section_keeps_its_default(tmp_path):
    from recipes.drg.demo import DemoConfig

    default = DemoConfig()
    cfg = load_config(DemoConfig, None, ["--sft.run.log_every=3"])
    assert cfg.sft.run == dataclasses.replace(default.sft.run, log_every=3)
    assert type(cfg.sft) is type(default.sft)


def test_duplicate_yaml_key_names_file_line_and_key(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("optim:\n  lr: 1.0e-5\n  schedule: cosine\n  lr: 3.0e-5\nloss:\n  beta: 0.1\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:4: duplicate key 'optim\.lr' \(first given at line 2\)"):
        load_config(Cfg, p)
    p.write_text("optim: {lr: 1.0e-5}\nloss: {beta: 0.1}\noptim: {schedule: cosine}\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:3: duplicate key 'optim'"):
        load_config(Cfg, p)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e999"])
@pytest.mark.parametrize("key", ["optim.lr", "loss.eps_high", "rollout.top_p", "optim.min_lr_ratio"])
def test_every_float_key_rejects_non_finite_values(key, value):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}': must be a finite number")):
        load_config(Cfg, None, [f"--{key}={value}"])


def test_non_finite_in_yaml_and_in_lists(tmp_path):
    from minigrpo.config import GRPOConfig

    @dataclass(slots=True)
    class WithList:
        grpo: GRPOConfig = section(GRPOConfig)

    with pytest.raises(ConfigError, match=r"grpo\.resample_temperatures\[1\]': must be a finite number"):
        load_config(WithList, None, ["--grpo.resample_temperatures=[0.7,inf]"])
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config key 'optim\.lr': must be a finite number"):
        load_config(Cfg, p)


def test_error_from_an_override_does_not_blame_the_yaml_file(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("optim:\n  lr: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, p, ["--optim.lrr=3"])
    assert "optim.lrr" in str(e.value) and "ok.yaml" not in str(e.value)


def test_report_to_backend_must_be_known_and_installed(monkeypatch):
    from minigrpo.config import RunConfig

    @dataclass(slots=True)
    class Run:
        run: RunConfig = section(RunConfig)

    with pytest.raises(ConfigError, match=r"run\.report_to': unknown backend 'mlflow'"):
        load_config(Run, None, ["--run.report_to=mlflow"])
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # neither package installed
    with pytest.raises(ConfigError, match=r"run\.report_to': wandb is not installed \(pip install wandb\)"):
        load_config(Run, None, ["--run.report_to=wandb"])
    with pytest.raises(ConfigError, match=r"run\.resume_from': needs --run\.resume=true"):
        load_config(Run, None, ["--run.resume_from=step_000004"])
