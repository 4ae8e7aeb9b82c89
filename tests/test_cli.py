"""The entry points' behaviour, through the real command (`python -m minigrpo.sft`, torchrun):
bad input is one line and exit 2 and leaves the output folder byte-identical; resume never loses a run;
Ctrl-C / SIGTERM is one line; torchrun workers do not outlive their launcher."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from launch import ROOT, free_port, run  # noqa: E402

from minigrpo.checkpoint import verify_manifest  # noqa: E402

ROWS = [{"prompt": f"add the numbers: {a} + {b} =", "completion": f" {a + b}"} for a, b in
        [(3, 4), (10, 20), (7, 7), (12, 30), (1, 2), (5, 6), (8, 9), (11, 12)]]


def folder_hashes(folder: Path) -> dict:
    """{relative path: sha256} of every file: equal dicts mean a byte-identical folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_args(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "minigrpo.sft", f"--model.path={model}", f"--data.train_file={train}", f"--run.output_dir={out}",
            "--data.batch_size=2", "--optim.lr=1e-3", *extra]


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory):
    """A finished SFT run: 8 rows, batch 2 -> one epoch of 4 steps; checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("cli")
    train = _jsonl(root / "train.jsonl", ROWS)
    out = root / "run"
    # --run.log_every alone must keep SFT's default of one epoch (steps=0), not RunConfig's 10 steps
    proc = run(sft_args(tiny_model_dir, train, out, "--run.save_every=2", "--run.log_every=2"))
    assert "step 4/4" in proc.stdout
    return {"model": tiny_model_dir, "train": train, "out": out}


@pytest.fixture()
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished["out"], out)
    return {**finished, "out": out}


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def fails_cleanly(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, a single `error: ...` line naming what is wrong, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert needle in err, err
    return err


def test_one_epoch_by_default_even_with_a_partial_run_section(finished):
    assert steps_logged(finished["out"]) == [2, 4]
    names = sorted(p.name for p in (finished["out"] / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004"]


def test_bad_config_is_one_line_and_writes_nothing(copy, tmp_path):
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    nope = tmp_path / "no-model"  # the report_to error must come before any model (or tokenizer) loads
    cases = [
        (["--optim.lr=inf"], ["config key 'optim.lr'", "finite"]),
        (["--config", str(dup)], [f"{dup}:3", "duplicate key 'optim.lr'"]),
        ([f"--model.path={nope}", "--run.report_to=tensorboard"], ["run.report_to", "tensorboard is not installed"]),
        (["--run.report_to=mlflow"], ["run.report_to", "unknown backend 'mlflow'"]),
    ]
    before = folder_hashes(copy["out"])
    for extra, needles in cases:
        proc = run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", *extra), check=False)
        fails_cleanly(proc, *needles)
        assert folder_hashes(copy["out"]) == before, extra


def test_resume_refuses_other_data_or_config_and_changes_nothing(copy, tmp_path):
    five = _jsonl(tmp_path / "five.jsonl", ROWS[:5])
    before = folder_hashes(copy["out"])
    proc = run(sft_args(copy["model"], five, copy["out"], "--resume", "--run.steps=6"), check=False)
    fails_cleanly(proc, "data differs", "8 items", "5 from", "--run.allow_resume_changes=true")
    proc = run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", "--optim.lr=0.5", "--data.batch_size=4"),
               check=False)
    fails_cleanly(proc, "optim.lr: 0.001 -> 0.5", "data.batch_size: 2 -> 4")
    assert folder_hashes(copy["out"]) == before
    # run.* (steps, log_every, ...) may change on resume: the run goes on from step 4
    run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", "--run.steps=6", "--run.log_every=2"))
    assert steps_logged(copy["out"]) == [2, 4, 6]


def test_resume_with_a_damaged_latest_stops_and_names_the_good_one(copy):
    shard = next((copy["out"] / "checkpoints" / "step_000004" / "model_optim").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = folder_hashes(copy["out"])
    proc = run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", "--run.steps=6"), check=False)
    fails_cleanly(proc, "truncated or corrupted checkpoint", "--run.resume_from=step_000002")
    assert folder_hashes(copy["out"]) == before
    proc = run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", "--run.resume_from=step_000002",
                        "--run.steps=6", "--run.log_every=2"))
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    assert steps_logged(copy["out"]) == [2, 4, 6]


def test_resume_with_the_pointer_missing_continues_from_the_newest_checkpoint(copy):
    (copy["out"] / "checkpoints" / "latest").unlink()
    proc = run(sft_args(copy["model"], copy["train"], copy["out"], "--resume", "--run.steps=6", "--run.log_every=2"))
    assert "latest is missing: resuming from step_000004" in proc.stdout
    assert steps_logged(copy["out"]) == [2, 4, 6]  # not restarted at step 1: the logs are kept
    names = sorted(p.name for p in (copy["out"] / "checkpoints").iterdir())
    assert names == ["latest", "step_000002", "step_000004", "step_000006"]


def test_input_errors_are_one_line_but_bugs_keep_their_traceback(capsys):
    from minigrpo.cli import run_command
    from minigrpo.io import DataError

    def bad_row():
        raise DataError("rows.jsonl:3: missing field 'completion'")

    assert run_command(bad_row) == 2
    assert capsys.readouterr().err == "error: rows.jsonl:3: missing field 'completion'\n"

    def bug():
        raise ValueError("rewards must be [P, G]")  # a ValueError deep in training is a bug, not bad input

    with pytest.raises(ValueError, match=r"rewards must be \[P, G\]"):
        run_command(bug)


# ----------------------------------------------------------------------------- signals


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def _start(cmd: list[str], stderr_file: Path) -> subprocess.Popen:
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (a background job ignores it)
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=stderr_file.open("w"), text=True,
                            preexec_fn=restore_sigint)


def _wait_for_line(proc: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if re.search(pattern, line):
            return seen
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r}; got:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_stop_with_one_line(tiny_model_dir, tmp_path, signum):
    train, out = _jsonl(tmp_path / "train.jsonl", ROWS), tmp_path / "run"
    errors = tmp_path / "stderr.txt"
    proc = _start([sys.executable, *sft_args(tiny_model_dir, train, out, "--run.steps=100000", "--run.save_every=3")],
                  errors)
    _wait_for_line(proc, r"^step 4/")
    proc.send_signal(signum)
    proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signum
    err = errors.read_text()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    name = signal.Signals(signum).name  # the last line (earlier ones are the model loader's progress bars)
    match = re.fullmatch(rf"interrupted \({name}\) at step (\d+); the last checkpoint is step (\d+) \(.*\): "
                         r"resume with the same command and --run.resume=true", err.strip().splitlines()[-1])
    assert match, err
    step, last = int(match[1]), int(match[2])
    assert step >= 5 and last == 3 * ((step - 1) // 3)  # the step in progress; checkpoints every 3 steps
    assert (out / "checkpoints" / "latest").read_text() == f"step_{last:06d}"
    verify_manifest(out / "checkpoints" / f"step_{last:06d}")


# ----------------------------------------------------------------------------- torchrun


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *args]


def test_torchrun_config_error_is_printed_once_and_exits_2(tiny_model_dir, tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", ROWS)
    proc = subprocess.run(_torchrun(sft_args(tiny_model_dir, train, tmp_path / "run", "--optim.lr=nan")), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("error: config key 'optim.lr': must be a finite number") == 1, output[-4000:]
    # torchrun's summary: the first rank to fail exits 2 (the root cause), and so does every rank that gets to
    # check its config; one still starting up when the launcher SIGTERMs the rest is listed as SIGTERM
    codes = re.findall(r"^\s+exitcode\s+:\s+(-?\d+)", output, re.M)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, output[-4000:]
    assert re.search(r"Root Cause.*?exitcode\s+:\s+2\b", output, re.S), output[-4000:]
    # no worker traceback: the one left is the launcher's own ChildFailedError summary, which workers cannot silence
    assert output.count("Traceback") == 1 and "ChildFailedError" in output and "ConfigError" not in output
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_workers_stop_when_their_launcher_is_killed(tiny_model_dir, tmp_path):
    train, out = _jsonl(tmp_path / "train.jsonl", ROWS), tmp_path / "run"
    errors = tmp_path / "stderr.txt"
    launcher = _start(_torchrun(sft_args(tiny_model_dir, train, out, "--run.steps=100000", "--run.save_every=2")),
                      errors)
    _wait_for_line(launcher, r"^step 3/")
    workers = _children(launcher.pid)
    assert len(workers) == 2
    launcher.kill()  # kill -9 of the launcher alone: the workers live in sessions of their own
    launcher.wait()
    deadline = time.monotonic() + 45
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [w for w in workers if _alive(w)]
    for w in alive:
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their launcher"
    assert "stopped (the torchrun launcher" in errors.read_text()
    last = (out / "checkpoints" / "latest").read_text()
    verify_manifest(out / "checkpoints" / last)  # the last checkpoint is intact


def test_sigterm_to_torchrun_stops_every_worker_with_one_line(tiny_model_dir, tmp_path):
    train, out = _jsonl(tmp_path / "train.jsonl", ROWS), tmp_path / "run"
    errors = tmp_path / "stderr.txt"
    launcher = _start(_torchrun(sft_args(tiny_model_dir, train, out, "--run.steps=100000", "--run.save_every=2")),
                      errors)
    _wait_for_line(launcher, r"^step 3/")
    workers = _children(launcher.pid)
    launcher.terminate()  # torchrun passes SIGTERM on to its workers
    launcher.stdout.read()
    launcher.wait(timeout=90)
    assert not [w for w in workers if _alive(w)]
    err = errors.read_text()
    lines = re.findall(r"^interrupted \(SIGTERM\) at step \d+; the last checkpoint is step \d+", err, re.M)
    assert len(lines) == 1, err  # rank 0's; rank 1 stops quietly
    # no worker traceback (what follows the line is the launcher's own SignalException report)
    assert "KeyboardInterrupt" not in err and "Interrupted" not in err, err
    verify_manifest(out / "checkpoints" / (out / "checkpoints" / "latest").read_text())
