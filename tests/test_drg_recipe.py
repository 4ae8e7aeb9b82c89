"""The DRG recipe's entry points: configs, bad-input errors, evaluation, and a miniature pipeline."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes/drg/configs").glob("*.yaml"))


def config_class(path: Path):
    from recipes.drg.demo import DemoConfig
    from recipes.drg.sft import DrgSFTConfig
    from recipes.drg.train import DrgTrainConfig

    if path.name == "demo.yaml":
        return DemoConfig
    if path.name == "study.yaml":
        from recipes.drg.study import StudyConfig

        return StudyConfig
    if path.name.startswith("sft"):
        return DrgSFTConfig
    return DrgTrainConfig


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> Path:
    from minigrpo.io import write_jsonl_atomic
    from recipes.drg.prep.synthetic import generate

    path = tmp_path_factory.mktemp("drg") / "cases.jsonl"
    write_jsonl_atomic(path, generate(6, seed=1, difficulty="easy", num_drgs=3))
    return path


# ----------------------------------------------------------------------------- configs


def test_configs_present():
    names = {p.stem for p in CONFIGS}
    ablations = {"dapo_loss", "drgrpo_loss", "drgrpo_advantage", "no_kl", "kl_cosine", "strict", "balanced", "dynamic_resampling",
                 "dynamic_resampling_positive", "cot_first_penalty", "remove_easy", "remove_hard", "remove_both", "easy_to_hard"}  # fmt: skip
    assert {"sft_7b", "grpo_vanilla_dense", "best_config", "best_config_remove_hard", "demo"} <= names
    assert {f"ablation_{a}" for a in ablations} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    load_config(config_class(path), path)  # a typo or a bad value raises ConfigError


def test_paper_settings_in_configs():
    from recipes.drg.train import DrgTrainConfig

    v = load_config(DrgTrainConfig, ROOT / "recipes/drg/configs/grpo_vanilla_dense.yaml")
    assert (v.rollout.samples_per_prompt, v.grpo.prompts_per_step, v.rollout.temperature, v.rollout.max_new_tokens) == (8, 64, 1.0, 4096)
    assert (v.optim.lr, v.optim.schedule, v.grpo.updates_per_batch, v.loss.kl, v.loss.beta, v.data.reward) == (3e-6, "constant", 1, "k3", 0.04, "dense")
    assert v.optim.warmup_ratio > 0 and v.run.steps == 0  # warm-up; one epoch
    b = load_config(DrgTrainConfig, ROOT / "recipes/drg/configs/best_config_remove_hard.yaml")
    assert (b.loss.aggregation, b.data.reward, b.loss.beta_schedule, b.grpo.curriculum) == ("token_mean", "strict", "cosine", "remove_hard")
    # each ablation differs from the vanilla run in its own section only
    s = load_config(DrgTrainConfig, ROOT / "recipes/drg/configs/ablation_no_kl.yaml")
    assert s.loss.beta == 0 and s.data.reward == "dense"


def test_config_typo_is_an_error(tmp_path):
    from recipes.drg.train import DrgTrainConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "recipes/drg/configs/ablation_strict.yaml").read_text().replace("reward: strict", "rewrd: strict"))
    with pytest.raises(ConfigError, match="rewrd"):
        load_config(DrgTrainConfig, bad)
    with pytest.raises(ConfigError, match="data.reward"):
        load_config(DrgTrainConfig, None, ["--data.reward=sparse"])


# ----------------------------------------------------------------------------- bad input


def test_unknown_reward_exits_nonzero(tmp_path, cases_file, tiny_model_dir):
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "recipes/drg/train.py", "--model.path", str(tiny_model_dir), "--data.train_file", str(cases_file), "--data.reward=sparse", f"--run.output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "data.reward" in r.stderr and "sparse" in r.stderr
    assert not out.exists()


def test_missing_data_file_and_row_without_solution(tmp_path, cases_file, tiny_model_dir, capsys):
    from recipes.drg import train

    out = tmp_path / "run"
    args = ["--model.path", str(tiny_model_dir), f"--run.output_dir={out}"]
    assert train.main(args + ["--data.train_file", str(tmp_path / "nope.jsonl")]) != 0
    assert "nope.jsonl" in capsys.readouterr().err

    rows = [json.loads(line) for line in cases_file.read_text().splitlines()]
    del rows[1]["solution"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train.main(args + ["--data.train_file", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "solution" in err
    assert not out.exists()


def test_sft_row_without_cot(tmp_path, cases_file, tiny_model_dir, capsys):
    from recipes.drg import sft

    rows = [json.loads(line) for line in cases_file.read_text().splitlines()]
    rows[2].pop("cot")
    bad = tmp_path / "nocot.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    assert sft.main(["--model.path", str(tiny_model_dir), "--cases.train_file", str(bad), f"--run.output_dir={out}"]) != 0
    err = capsys.readouterr().err
    assert "nocot.jsonl" in err and "row 3" in err and "cot" in err
    assert not out.exists()
    # the answer-only fallback builds rows for every case, plus the 28 knowledge rows
    built = sft.build_rows(sft.CasesConfig(train_file=str(bad), missing_cot="answer_only"))
    assert len(built) == len(rows) + 28
    assert built[2]["completion"].endswith(f"<answer>\n{rows[2]['solution']}\n</answer>")
    assert built[0]["prompt"][0]["role"] == "system" and built[0]["completion"] == rows[0]["cot"]


def folder_hash(root: Path) -> str:
    """One hash over every file's relative path and bytes (and every folder's name)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_entry(script: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"recipes/drg/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("script", "flag", "keys"), [
    ("train.py", "--help", ["data:", "train_file:", "reward: \"dense\"", "samples_per_prompt: 8", "one of strict|dense"]),
    ("train.py", "-h", ["data:", "train_file:", "loss:"]),
    ("sft.py", "--help", ["cases:", "missing_cot:", "knowledge: true", "max_seq_len:"]),
    ("evaluate.py", "--help", ["eval:", "model:", "data:", "out:", "k: 8", "top_p: 0.95"]),
    ("demo.py", "--help", ["demo:", "output_dir: \"outputs/drg-demo\"", "sft:", "grpo:", "eval:"]),
    ("plot.py", "--help", ["plot:", "metrics:", "window: 5"]),
])  # fmt: skip
def test_every_entry_point_prints_help(script, flag, keys):
    """`--help` / `-h`: usage, then the config tree with defaults, one line per key; exit 0."""
    r = run_entry(script, flag)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() or f"recipes/drg/{script}" in r.stdout
    assert "--section.key=value" in r.stdout
    for key in keys:
        assert key in r.stdout, (key, r.stdout)


def test_empty_cases_file_is_named_empty(tmp_path, tiny_model_dir, capsys):
    from recipes.drg import evaluate, sft, train

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = tmp_path / "run"
    model = f"--model.path={tiny_model_dir}"
    assert train.main([model, f"--data.train_file={empty}", f"--run.output_dir={out}"]) == 2
    assert sft.main([model, f"--cases.train_file={empty}", f"--run.output_dir={out}"]) == 2
    assert evaluate.main([f"--eval.model={tiny_model_dir}", f"--eval.data={empty}", f"--eval.out={out}/e.json"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all("empty.jsonl" in e and "empty" in e.split("empty.jsonl")[-1] for e in errors), errors
    assert not any("max_prompt_tokens" in e or "sft_rows" in e for e in errors)
    assert not out.exists()


def test_sft_refusing_an_existing_run_leaves_it_byte_identical(tmp_path, cases_file, tiny_model_dir):
    """A run refused by the output folder's checks (fresh run over a run, resume on other cases) writes nothing."""
    from recipes.drg import sft

    out, cases = tmp_path / "sft", tmp_path / "cases.jsonl"
    lines = cases_file.read_text().splitlines(keepends=True)
    cases.write_text("".join(lines))
    base = [f"--model.path={tiny_model_dir}", f"--run.output_dir={out}", f"--cases.train_file={cases}",
            "--cases.knowledge=false", "--run.steps=1", "--data.batch_size=2", "--data.max_seq_len=2048"]
    assert sft.main([*base, "--cases.max_cases=2"]) == 0
    assert (out / "checkpoints").is_dir() and (out / sft.ROWS_FILE).is_file()
    before = folder_hash(out)
    r = run_entry("sft.py", *base, "--cases.max_cases=1")
    assert r.returncode == 2 and "checkpoints" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert folder_hash(out) == before
    # a resume on cases that changed is refused too: the run's sft_rows.jsonl is not replaced by the new rows
    cases.write_text("".join(lines[2:4]))
    r = run_entry("sft.py", *base, "--cases.max_cases=2", "--resume")
    assert r.returncode == 2 and "data differs" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert folder_hash(out) == before


def test_sft_long_prompt_names_the_case_and_writes_nothing(tmp_path, cases_file, tiny_model_dir, capsys):
    from recipes.drg import sft

    out = tmp_path / "sft"
    args = [f"--model.path={tiny_model_dir}", f"--run.output_dir={out}", f"--cases.train_file={cases_file}",
            "--data.max_seq_len=64"]
    assert sft.main(args) == 2
    err = capsys.readouterr().err
    assert f"{cases_file}: row 1 (" in err and "data.max_seq_len" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_cli_writes_json_and_table(tmp_path, cases_file, tiny_model_dir, capsys):
    from recipes.drg import evaluate

    out = tmp_path / "eval.json"
    args = [f"--eval.model={tiny_model_dir}", f"--eval.data={cases_file}", "--eval.k=2", "--eval.max_new_tokens=8",
            "--eval.max_cases=3", f"--eval.out={out}"]
    assert evaluate.main(args) == 0
    result = json.loads(out.read_text())
    for level in ("drg", "base", "severity"):
        for metric in ("pass@1", "pass@k", "maj@k"):
            assert 0.0 <= result[f"{level}/{metric}"] <= 1.0
    assert result["cases"] == 3 and result["k"] == 2 and result["settings"]["temperature"] == 0.6
    table = capsys.readouterr().out
    assert "| DRG | Pass@1 |" in table and "| CC/MCC | Maj@2 |" in table


def test_format_table_values():
    from recipes.drg.evaluate import format_table

    metrics = {f"{lv}/{m}": 0.5 for lv in ("drg", "base", "severity") for m in ("pass@1", "pass@k", "maj@k")}
    text = format_table({"A": {**metrics, "k": 8.0, "format_rate": 1.0}, "B": {**metrics, "drg/pass@1": 0.25, "k": 8.0}})
    assert "| DRG | Pass@1 | 50.0 | 25.0 |" in text and "| base DRG | Pass@8 | 50.0 | 50.0 |" in text


# ----------------------------------------------------------------------------- pipeline


def test_demo_refuses_a_foreign_output_dir(tmp_path):
    from recipes.drg.demo import prepare_output_dir

    (tmp_path / "keep.txt").write_text("not a demo")
    assert "not a previous demo output" in prepare_output_dir(tmp_path)
    assert (tmp_path / "keep.txt").exists()


def test_miniature_pipeline(tmp_path):
    """SFT a few steps -> eval -> GRPO 2 steps -> eval -> summary, in one process with tiny settings."""
    from recipes.drg import demo

    out = tmp_path / "demo"
    cfg = demo.load_demo_config([
        f"--demo.output_dir={out}", "--demo.sft_cases=12", "--demo.grpo_cases=4", "--demo.test_cases=2", "--demo.num_drgs=3", "--demo.principals=", "--sft.cases.knowledge=true",
        "--model.vocab_size=600", "--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_layers=1", "--model.num_heads=2", "--model.num_kv_heads=1",
        "--sft.run.steps=2", "--sft.data.batch_size=4", "--sft.data.max_seq_len=1000", "--grpo.grpo.max_prompt_tokens=1000",
        "--grpo.run.steps=2", "--grpo.grpo.prompts_per_step=2", "--grpo.rollout.samples_per_prompt=2", "--grpo.rollout.max_new_tokens=12",
        "--eval.k=2", "--eval.max_new_tokens=12",
    ])  # fmt: skip
    summary = demo.run(cfg)
    for path in ("sft/metrics.jsonl", "sft/hf/config.json", "grpo/metrics.jsonl", "grpo/hf/config.json", "grpo/prompt_records.jsonl", "summary.json", "summary.md", "grpo_curves.png"):
        assert (out / path).is_file(), path
    assert (out / "grpo_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "grpo/metrics.jsonl").read_text().splitlines()) == 2
    saved = json.loads((out / "summary.json").read_text())
    assert saved["grpo"]["steps"] == 2 == len(summary["grpo"]["reward_mean_per_step"])
    assert set(saved["eval"]) == {"SFT", "SFT+GRPO"} and "drg/pass@1" in saved["eval"]["SFT"]
    assert "| DRG | Pass@1 |" in (out / "summary.md").read_text()
    # a re-run replaces the previous demo output
    assert demo.prepare_output_dir(out) is None and not (out / "summary.json").exists()


def test_recipe_sft_config_keeps_minigrpo_sft_defaults():
    """DrgSFTConfig extends SFTConfig: run.steps defaults to 0 (data.epochs passes), not RunConfig's 10."""
    from recipes.drg.sft import DrgSFTConfig

    from minigrpo.sft import SFTConfig

    cfg = DrgSFTConfig()
    assert isinstance(cfg, SFTConfig) and cfg.run.steps == 0 and cfg.data.epochs >= 1
