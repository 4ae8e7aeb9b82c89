"""Checkpoints: atomic saves, damage detection, round trips, and kill-and-resume reproducing a run."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import run  # noqa: E402

from minigrpo import checkpoint as ckpt  # noqa: E402
from minigrpo.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint, verify_manifest  # noqa: E402


def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # creates optimizer state worth saving
    return model, optimizer


def test_round_trip_restores_model_optimizer_rng(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 5, model, optimizer, state={"cursor": 40}, config={"a": 1})
    expected_draw = torch.rand(3)
    other, other_opt = _model_and_optimizer(1)
    meta = load_checkpoint(path, other, other_opt)
    assert meta["step"] == 5 and meta["state"] == {"cursor": 40} and meta["config"] == {"a": 1}
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    sa, sb = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the save left it


def test_crash_mid_save_leaves_previous_checkpoint_latest(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer(0)
    save_checkpoint(tmp_path, 1, model, optimizer)

    def crash(folder):
        raise KeyboardInterrupt("killed while writing the manifest")

    monkeypatch.setattr(ckpt, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, optimizer)
    assert (tmp_path / "step_000002.tmp").is_dir()  # the half-written save is only a .tmp folder
    assert not (tmp_path / "step_000002").exists()
    assert latest_checkpoint(tmp_path).name == "step_000001"
    verify_manifest(latest_checkpoint(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest"])
def test_damaged_checkpoint_is_detected(tmp_path, damage):
    model, optimizer = _model_and_optimizer(0)
    path = save_checkpoint(tmp_path, 3, model, optimizer)
    shard = max((p for p in (path / "model_optim").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif damage == "flip":
        shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
        match = "sha256 mismatch"
    elif damage == "delete":
        shard.unlink()
        match = "missing"
    else:
        (path / "manifest.json").unlink()
        match = "incomplete checkpoint"
    other, other_opt = _model_and_optimizer(1)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, other, other_opt)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))  # nothing was loaded


# ----------------------------------------------------------------------------- kill and resume


def _write_data(folder: Path) -> tuple[Path, Path]:
    train, held_out = folder / "train.jsonl", folder / "eval.jsonl"
    rows = [{"prompt": f"add the numbers: {i} + {i + 1} =", "completion": f" {2 * i + 1}"} for i in range(24)]
    rows += [{"prompt": [{"role": "user", "content": f"count the letters in {w}"}], "completion": str(len(w))} for w in ("chest", "pain", "sepsis", "heart")]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows[24:]))
    return train, held_out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    train, held_out = _write_data(tmp_path)
    args = ["-m", "minigrpo.sft", f"--model.path={tiny_model_dir}", f"--data.train_file={train}", f"--data.eval_file={held_out}",
            "--run.steps=6", "--run.save_every=2", "--data.batch_size=5", "--parallel.micro_batch_size=2",
            "--optim.lr=3e-3", "--optim.schedule=cosine", "--optim.warmup_ratio=0.2", "--optim.weight_decay=0.1", "--data.eval_every=2"]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    run([*args, f"--run.output_dir={full}"])
    crashed = run(["tests/dist/crash_after.py", "3", *args, f"--run.output_dir={killed}"], check=False)
    assert crashed.returncode == 3
    assert [m["step"] for m in _metrics(killed)] == [1, 2, 3]
    assert latest_checkpoint(killed / "checkpoints").name == "step_000002"  # step 3 was lost with the crash
    assert not (killed / "hf").exists()

    run([*args, f"--run.output_dir={killed}", "--resume"])
    a, b = _metrics(full), _metrics(killed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]  # the lost step 3 was redone, not logged twice
    for x, y in zip(a, b, strict=True):
        # Bitwise on CPU: same data cursor, LR, optimizer state and RNG after the restore.
        assert (x["loss"], x["grad_norm"], x["lr"], x.get("eval_loss")) == (y["loss"], y["grad_norm"], y["lr"], y.get("eval_loss"))
    assert a[-1]["loss"] < a[0]["loss"]
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "hf/model.safetensors")), load_file(str(killed / "hf/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # A checkpoint truncated on disk: resuming fails with a clear error and a non-zero exit.
    damaged = tmp_path / "damaged"
    shutil.copytree(killed, damaged)
    last = latest_checkpoint(damaged / "checkpoints")
    shard = next((last / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    proc = run([*args, "--run.steps=8", f"--run.output_dir={damaged}", "--resume"], check=False)
    assert proc.returncode != 0
    assert "truncated or corrupted checkpoint" in proc.stderr
