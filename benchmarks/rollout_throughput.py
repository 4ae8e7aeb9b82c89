"""Rollout throughput: TorchEngine and VLLMEngine against HF `generate` on the same model and batch.

    python benchmarks/rollout_throughput.py                      # base preset (~52M), 16 prompts x 8 x 128, T=1
    python benchmarks/rollout_throughput.py --model /path/to/hf --dtypes bfloat16 --engines vllm,hf
    python benchmarks/rollout_throughput.py --preset qwen2.5-1.5b --engines hf,torch --dtypes bfloat16 --out r.json

Presets from minigrpo.tiny get a trained tiny tokenizer; `qwen2.5-1.5b` is the real model's shape with
random weights (initialised on the GPU when there is one) and no tokenizer: the benchmark feeds token
ids only.

Each dtype runs in its own subprocess (an in-process vLLM pins torch's thread count and global
state; one vLLM per process). Within it, every engine warms up once, then the engines' timed full
batches are interleaved round-robin `--repeats` times and the median is reported, so background
load hits all engines alike. Set OMP_NUM_THREADS to give every engine the same thread count
(vLLM drops to 1 thread when it is unset). Generated tokens/s counts completion tokens
only; no stop tokens are used, so every engine generates the same number of tokens. Weight sync is
the time to push the full state dict into the engine (load_weights), as the trainer does each step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def corpus(seed: int = 0) -> list[str]:
    """Seeded pseudo-words: enough distinct byte pairs for the BPE to fill the preset's 8192 tokens."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(6000)]
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)]


def device_line() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    return [torch.randint(10, vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]


# ----------------------------------------------------------------------------- one dtype (subprocess)


def build_runners(args, device: str) -> dict:
    """engine name -> (generate(prompts, n, sampling) -> generated token count, weight sync() -> seconds or None)."""
    from minigrpo.model import load_model

    runners = {}
    state = load_model(args.model, dtype="float32").state_dict()  # what a trainer sends (fp32 masters)
    for name in args.engines.split(","):
        if name == "hf":
            lm = load_model(args.model, dtype=args.dtype, device=device).eval()
            lm.generation_config.eos_token_id = None  # no early stops: every row generates max_new tokens

            def hf_generate(prompts, n, sp, lm=lm):
                ids = torch.tensor(prompts, device=device)
                with torch.inference_mode():
                    out = lm.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        do_sample=sp.temperature > 0,
                        temperature=sp.temperature or None,
                        top_k=0,
                        top_p=1.0,
                        max_new_tokens=sp.max_new_tokens,
                        num_return_sequences=n,
                        pad_token_id=0,
                    )
                return (out.shape[1] - ids.shape[1]) * out.shape[0]

            runners[name] = (hf_generate, None)
            continue
        if name == "torch":
            from minigrpo.rollout import TorchEngine

            engine = TorchEngine(args.model, dtype=args.dtype, device=device)
        elif name == "vllm":
            from minigrpo.rollout.vllm_engine import VLLMEngine

            extra = {} if args.vllm_compile else {"enforce_eager": True}
            engine = VLLMEngine(args.model, dtype=args.dtype, kv_cache_memory_gb=args.kv_cache_gb, **extra)
        else:
            raise SystemExit(f"unknown engine {name!r}; choose from hf, torch, vllm")

        def generate(prompts, n, sp, engine=engine):
            return sum(len(c.token_ids) for row in engine.generate(prompts, n, sp) for c in row)

        def sync(engine=engine):
            t0 = time.perf_counter()
            engine.load_weights(state.items())
            return time.perf_counter() - t0

        runners[name] = (generate, sync)
    return runners


def run_dtype(args) -> list[dict]:
    """All engines for one dtype in this process, timed batches interleaved round-robin (fair under load)."""
    from minigrpo.rollout import SamplingParams

    device = "cuda" if torch.cuda.is_available() else "cpu"
    runners = build_runners(args, device)
    sampling = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new, seed=args.seed)
    prompts = make_prompts(args, _vocab_size(args.model))
    for generate, _ in runners.values():  # warm-up
        generate(prompts[:2], 2, SamplingParams(temperature=args.temperature, max_new_tokens=8, seed=0))
    times = {name: [] for name in runners}
    tokens = {}
    for _ in range(args.repeats):
        for name, (generate, _) in runners.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[name] = generate(prompts, args.n, sampling)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name, (_, sync) in runners.items():
        t = statistics.median(times[name])
        sync_s = statistics.median(sync() for _ in range(3)) if sync else None
        rows.append(
            dict(engine=name, dtype=args.dtype, tokens=tokens[name], seconds=t, tok_s=tokens[name] / t, sync_s=sync_s)
        )
    return rows


def _vocab_size(model_dir) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).vocab_size


def random_model_dir(preset: str, out: Path) -> Path:
    """A folder with the preset's Qwen2 shape and random bf16 weights (config + safetensors, no tokenizer)."""
    from transformers import Qwen2ForCausalLM
    from update_throughput import qwen2_config

    config = qwen2_config(preset)
    config.use_cache, config.eos_token_id, config.pad_token_id = True, None, 0
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------- driver


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: build --preset in a temp dir)")
    ap.add_argument(
        "--preset",
        default="base",
        choices=["tiny", "small", "base", "qwen2.5-1.5b"],
        help="model built when no --model is given (base: ~52M params)",
    )
    ap.add_argument("--out", help="also write the header and table rows as JSON to this file")
    ap.add_argument("--engines", default="hf,torch,vllm")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="vLLM CPU KV-cache size")
    ap.add_argument("--vllm-compile", action="store_true", help="let vLLM compile the model (default: eager)")
    ap.add_argument("--dtype", help=argparse.SUPPRESS)  # set in the per-dtype subprocess
    args = ap.parse_args(argv)

    if args.dtype:  # subprocess: one dtype, JSON rows on the last stdout line
        print(json.dumps(run_dtype(args)))
        return

    tmp = None
    if args.model is None:
        from minigrpo.tiny import build_tiny

        tmp = tempfile.TemporaryDirectory(prefix="rollout_bench_")
        if args.preset == "qwen2.5-1.5b":
            args.model = str(random_model_dir(args.preset, Path(tmp.name) / args.preset))
        else:
            args.model = str(build_tiny(Path(tmp.name) / args.preset, corpus(), preset=args.preset, seed=0))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.model)
    params = _count_params(args.model)
    print(f"device: {device_line()}")
    shape = f"vocab {cfg.vocab_size}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}"
    print(f"model: {args.model} ({params / 1e6:.1f}M params, {shape})")
    lengths = f"prompt {args.prompt_len} tokens, {args.max_new} new tokens, T={args.temperature}"
    print(f"batch: {args.prompts} prompts x {args.n} samples, {lengths}")
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", flush=True)
    rows, failed = [], []
    for dtype in args.dtypes.split(","):
        cmd = [sys.executable, __file__, "--dtype", dtype, "--model", args.model] + _passthrough(args)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{dtype}: FAILED\n{proc.stderr[-3000:]}")
            failed.append(dtype)
            continue
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  done {dtype}: "
            + ", ".join(f"{r['engine']} {r['tok_s']:.0f} tok/s" for r in rows if r["dtype"] == dtype),
            flush=True,
        )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    _table(rows)
    if args.out:
        shape = dict(vocab=cfg.vocab_size, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size)
        batch = dict(prompts=args.prompts, n=args.n, prompt_len=args.prompt_len, max_new=args.max_new)
        header = dict(device=device_line(), preset=args.preset, params=params, **shape, **batch)
        Path(args.out).write_text(json.dumps(dict(header, rows=rows), indent=1))
    if tmp:
        tmp.cleanup()
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


def _count_params(model_dir) -> int:
    """Parameters stored in the folder's safetensors (a tied output weight is stored, and counted, once)."""
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            total += sum(torch.Size(st.get_slice(k).get_shape()).numel() for k in st.keys())
    return total


def _passthrough(args) -> list[str]:
    out = []
    for key in ("engines", "prompts", "n", "prompt_len", "max_new", "temperature", "repeats", "seed", "kv_cache_gb"):
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return out + (["--vllm-compile"] if args.vllm_compile else [])


def _table(rows) -> None:
    base = {r["dtype"]: r["tok_s"] for r in rows if r["engine"] == "hf"}
    best_hf = max(base.values()) if base else None
    print(
        "\n| engine | dtype | generated tokens | s / batch | tokens/s | vs HF same dtype | vs best HF | weight sync s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = f"{r['tok_s'] / base[r['dtype']]:.2f}x" if r["dtype"] in base else "-"
        best = f"{r['tok_s'] / best_hf:.2f}x" if best_hf else "-"
        sync = f"{r['sync_s']:.3f}" if r["sync_s"] is not None else "-"
        cells = [r["engine"], r["dtype"], r["tokens"], f"{r['seconds']:.2f}", f"{r['tok_s']:.0f}", same, best, sync]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
