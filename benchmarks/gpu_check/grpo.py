"""gpu_check stage `grpo`: short GRPO runs of the digits example on the tiny model, on this machine's device.

    python benchmarks/gpu_check/grpo.py WORK_DIR OUT_JSON

Run A (as tests/test_trainer_dist.py, one process): 10 steps without KL; the mean reward of the last
3 steps must exceed that of the first 3 by 0.3 (a random tiny model starts near 0.02).
Run B: KL against the frozen reference (beta 0.04), 2 updates per batch (old log-probs, clipping),
activation checkpointing; 4 steps saving every 2, then `--resume` to 6: the resumed run must
continue at step 5, log steps 1..6 once each, and export the HF folder. Each run is its own
`python -m examples.digits` process on whatever device init_distributed picks (CUDA when visible).
"""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

COMMON = [
    "--grpo.prompts_per_step=8",
    "--rollout.samples_per_prompt=8",
    "--rollout.max_new_tokens=8",
    "--optim.lr=2e-2",
    "--loss.aggregation=token_mean",
    "--parallel.micro_batch_size=8",
]


def digits(model: Path, out: Path, *overrides: str) -> tuple[float, str]:
    """One `python -m examples.digits` run: (wall seconds, stdout); raises with its output on failure."""
    cmd = [
        sys.executable,
        "-m",
        "examples.digits",
        f"--model.path={model}",
        f"--run.output_dir={out}",
        *COMMON,
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(f"$ {' '.join(cmd[1:])}\n{proc.stdout[-1500:]}", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0, proc.stdout


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    from conftest import tokenizer_corpus  # the tokenizer the tests train, with number tokens

    from minigrpo.tiny import build_tiny

    work, out_json = Path(sys.argv[1]), Path(sys.argv[2])
    model = build_tiny(work / "tiny", tokenizer_corpus(), preset="tiny", seed=0)
    checks, report = {}, {}

    seconds, _ = digits(model, work / "a", "--run.steps=10", "--loss.beta=0")
    rewards = [m["reward_mean"] for m in metrics(work / "a")]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    report["a"] = dict(seconds=seconds, rewards=rewards, first3=first, last3=last)
    checks["a: reward rises by > 0.3"] = last > first + 0.3

    b = work / "b"
    extra = [
        "--loss.beta=0.04",
        "--grpo.updates_per_batch=2",
        "--parallel.activation_checkpointing=true",
        "--run.save_every=2",
    ]
    first_part, _ = digits(model, b, "--run.steps=4", *extra)
    saved = metrics(b)
    second_part, _ = digits(model, b, "--run.steps=6", "--resume", *extra)
    seconds = first_part + second_part
    rows = metrics(b)
    report["b"] = dict(
        seconds=seconds,
        steps=[m["step"] for m in rows],
        kl=[m.get("kl_mean") for m in rows],
        rewards=[m["reward_mean"] for m in rows],
        ratio=[m.get("ratio_mean") for m in rows],
    )
    # a run started over would have rewritten rows 1..4 (from new samples); a resumed one only appends
    checks["b: the second run resumed after step 4"] = len(saved) == 4 and rows[:4] == saved
    checks["b: steps 1..6 logged once"] = report["b"]["steps"] == [1, 2, 3, 4, 5, 6]
    checks["b: KL finite, > 0 after step 1"] = all(k is not None and math.isfinite(k) for k in report["b"]["kl"]) and (
        max(report["b"]["kl"][1:]) > 0
    )
    checks["b: resumed checkpoints step 2, 4 (and the end)"] = {p.name for p in (b / "checkpoints").iterdir()} >= {
        "step_000002",
        "step_000004",
    }
    checks["b: HF export"] = any((b / "hf").glob("*.safetensors"))
    report["checks"] = checks
    out_json.write_text(json.dumps(report, indent=1))
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"a: rewards {' '.join(f'{r:.2f}' for r in rewards)}")
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
