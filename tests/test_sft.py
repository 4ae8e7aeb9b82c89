"""SFT: it learns under torchrun with 2 ranks (packed rows), and bad input fails cleanly before writing."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import run  # noqa: E402

from minigrpo.sft import main  # noqa: E402

WORDS = ["chest", "pain", "sepsis", "heart"]
ROWS = [{"prompt": [{"role": "user", "content": f"reverse the word {w}"}], "completion": w[::-1]} for w in WORDS] + [
    {"prompt": f"add the numbers: {a} + {b} =", "completion": f" {a + b}"} for a, b in [(3, 4), (10, 20), (7, 7), (12, 30)]
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_sft_learns_on_two_ranks(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    held_out = _jsonl(tmp_path / "eval.jsonl", ROWS[:2])  # seen rows: the eval loss must fall too
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {{path: '{tiny_model_dir}'}}\n"
        "optim: {lr: 1.0e-2}\n"
        "parallel: {micro_batch_size: 1}\n"
        "run: {steps: 40, save_every: 20}\n"
        f"data: {{train_file: '{train}', eval_file: '{held_out}', batch_size: 8, packing: true, max_seq_len: 64, eval_every: 20}}\n"
    )
    proc = run(["-m", "minigrpo.sft", "--config", str(config), f"--run.output_dir={out}"], nproc=2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert metrics[0]["loss"] > 4.0  # random init: about log(vocab) = 6.2
    assert metrics[-1]["loss"] < 1.0  # memorised 8 rows (measured: 0.31 at step 40)
    assert metrics[-1]["eval_loss"] < min(1.0, metrics[19]["eval_loss"])
    assert "eta" in proc.stdout and "step 40/40" in proc.stdout
    assert (out / "hf" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000020", "step_000040"]

    # Resume the 2-rank run in 1 process: DCP reshards model and optimizer state to the new world size.
    proc = run(["-m", "minigrpo.sft", f"--model.path={tiny_model_dir}", f"--data.train_file={train}", f"--run.output_dir={out}",
                "--run.steps=42", "--optim.lr=1e-2", "--data.batch_size=8", "--data.packing=true", "--data.max_seq_len=64", "--resume"])  # fmt: skip
    assert "saved by 2 ranks, resuming on 1" in proc.stdout
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == list(range(1, 43))
    assert resumed[-1]["loss"] < 1.0  # continued from the trained weights, not from scratch


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def good(tiny_model_dir, tmp_path):
    return {"model": tiny_model_dir, "train": _jsonl(tmp_path / "train.jsonl", ROWS), "out": tmp_path / "out"}


def _main(good: dict, *extra: str, model=None, train=None) -> int:
    return main([f"--model.path={model or good['model']}", f"--data.train_file={train or good['train']}", f"--run.output_dir={good['out']}", *extra])


def _fails(capsys, good, needle: str, *extra, **kw) -> None:
    assert _main(good, *extra, **kw) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err, err
    assert not good["out"].exists()  # nothing half written


def test_missing_model_folder(good, capsys, tmp_path):
    _fails(capsys, good, "model folder not found", model=tmp_path / "nope")


def test_corrupt_model_weights(good, capsys, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(good["model"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    _fails(capsys, good, "model.safetensors: unreadable safetensors file", model=broken)


def test_tokenizer_without_chat_template_for_chat_data(good, capsys, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(good["model"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    _fails(capsys, good, "no chat template", model=plain)


def test_unknown_config_key(good, capsys):
    _fails(capsys, good, "unknown config key 'optim.lrr'", "--optim.lrr=0.1")


def test_row_missing_a_field(good, capsys, tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], {"prompt": "hello"}])
    _fails(capsys, good, f"{bad}:3: missing field 'completion'", train=bad)


def test_row_not_json(good, capsys, tmp_path):
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], "{not json"])
    _fails(capsys, good, f"{bad}:2: not valid JSON", train=bad)


def test_existing_run_without_resume(good, capsys):
    (good["out"] / "checkpoints").mkdir(parents=True)
    assert _main(good) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_bad_input_exits_non_zero_from_the_command_line(good):
    proc = run(["-m", "minigrpo.sft", f"--model.path={good['model']}", f"--data.train_file={good['train']}", "--data.batch_size=0"], check=False)
    assert proc.returncode != 0
    assert "config key 'data.batch_size': must be >= 1" in proc.stderr


def test_report_to_reaches_the_backends_through_the_step_logger(good, monkeypatch):
    from minigrpo.metrics import MetricsLogger

    reported = []
    monkeypatch.setattr("minigrpo.config.REPORT_BACKENDS", {"tensorboard": "json"})  # "installed" for this test
    writer = lambda backend, out: lambda step, row: reported.append((backend, step, row["loss"]))  # noqa: E731
    monkeypatch.setattr(MetricsLogger, "_make_writer", staticmethod(writer))
    assert _main(good, "--run.steps=2", "--run.report_to=tensorboard") == 0
    logged = [json.loads(line) for line in (good["out"] / "metrics.jsonl").read_text().splitlines()]
    assert reported == [("tensorboard", row["step"], row["loss"]) for row in logged] and len(logged) == 2
