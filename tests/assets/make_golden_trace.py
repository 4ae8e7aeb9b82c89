"""Record the golden trace that tests/test_golden_trace.py holds the trainer to.

    OMP_NUM_THREADS=1 python tests/assets/make_golden_trace.py --out tests/assets/digits_cpu_trace.json

The first steps of the digits example (examples/digits.py) on CPU, in one process, fp32, torch
engine: the tiny model is built exactly as tests/conftest.py's `tiny_model_dir` fixture builds it,
and each variant runs through the public API only (`load_config`, then
`GRPOTrainer(cfg, prompts, reward_fn).train()`, which returns one metrics dict per step). The file
records the command, the commit, the library versions and the date next to the numbers.

Re-record only when a change of behaviour is intended, and say so in the commit; never to make the
test pass after a refactor that was meant to change nothing.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's minigrpo, not whichever one is installed

import torch  # noqa: E402
import transformers  # noqa: E402

from examples.digits import make_prompts, reward_fn  # noqa: E402
from minigrpo.config import load_config  # noqa: E402
from minigrpo.model import load_tokenizer  # noqa: E402
from minigrpo.trainer import GRPORunConfig, GRPOTrainer  # noqa: E402

N_PROMPTS = 16  # 4 steps x 4 prompts: every step draws fresh prompts

# Shared by every variant: 4 steps of 4 prompts x 4 samples, 12 new tokens, fp32 on CPU.
COMMON = [
    "--run.seed=1",
    "--run.steps=4",
    "--grpo.prompts_per_step=4",
    "--rollout.engine=torch",
    "--rollout.samples_per_prompt=4",
    "--rollout.max_new_tokens=12",
    "--rollout.temperature=1.0",
    "--parallel.micro_batch_size=4",
    "--optim.lr=1e-2",
    "--optim.max_grad_norm=1.0",
]

VARIANTS = {
    # Off-policy: the second pass over the batch sees ratios != 1, so clipping and the old
    # log-probs matter; k3 KL against the frozen reference.
    "k3_two_updates": [
        "--loss.beta=0.1",
        "--loss.kl=k3",
        "--grpo.updates_per_batch=2",
        "--loss.eps_low=0.2",
        "--loss.eps_high=0.28",
    ],
    # On-policy (ratio exactly 1), DAPO token mean, Dr. GRPO advantages, k3 KL on a cosine schedule.
    "on_policy_token_mean": [
        "--loss.beta=0.04",
        "--loss.kl=k3",
        "--loss.beta_schedule=cosine",
        "--loss.aggregation=token_mean",
        "--loss.advantage=drgrpo",
    ],
}

# Per-step metrics kept in the trace (names as GRPOTrainer.train() returns them).
TRACE_KEYS = [
    "loss",
    "reward_mean",
    "kl_mean",
    "grad_norm",
    "entropy",
    "sampler_logp_diff",
    "completion_len_mean",
    "ratio_mean",
    "clip_low_frac",
    "clip_high_frac",
]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of the tiny model's tensors and vocabulary: tells "the model changed" from "the trainer changed"."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    tensors = load_file(Path(model_dir) / "model.safetensors")
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    vocab = load_tokenizer(model_dir).get_vocab()
    digest.update(json.dumps(sorted(vocab.items())).encode())
    return digest.hexdigest()


def run_variant(model_dir: str | os.PathLike, output_dir: str | os.PathLike, overrides: list[str]) -> list[dict]:
    """The digits example's first steps under `overrides`, through the public API; the TRACE_KEYS of each step."""
    argv = [f"--model.path={model_dir}", f"--run.output_dir={output_dir}", *overrides]
    cfg = load_config(GRPORunConfig, None, argv)
    tokenizer = load_tokenizer(cfg.model.path, require_chat_template=True)
    history = GRPOTrainer(cfg, make_prompts(tokenizer, N_PROMPTS), reward_fn).train()
    return [{key: step[key] for key in TRACE_KEYS} for step in history]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tokenizer_corpus

    from minigrpo.dist import destroy_distributed
    from minigrpo.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny(Path(tmp) / "tiny", tokenizer_corpus(), preset="tiny", seed=0)  # as conftest.py
        variants = {}
        for name, overrides in VARIANTS.items():
            steps = run_variant(model_dir, Path(tmp) / name, COMMON + overrides)
            variants[name] = {"overrides": COMMON + overrides, "steps": steps}
        fingerprint = model_fingerprint(model_dir)
    destroy_distributed()

    trace = {
        "what": "first steps of examples/digits.py on CPU, 1 process, fp32, torch engine; see make_golden_trace.py",
        "command": " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}", "python", *sys.argv]),
        "commit": git("rev-parse", "HEAD"),
        "tracked_files_clean": git("status", "--porcelain", "--untracked-files=no") == "",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "model_fingerprint": fingerprint,
        "n_prompts": N_PROMPTS,
        "keys": TRACE_KEYS,
        "variants": variants,
    }
    Path(args.out).write_text(json.dumps(trace, indent=1) + "\n")
    summary = ", ".join(f"{name} ({len(v['steps'])} steps)" for name, v in variants.items())
    print(f"wrote {args.out}: {summary}")


if __name__ == "__main__":
    main()
