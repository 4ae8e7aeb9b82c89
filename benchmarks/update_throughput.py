"""Training-step throughput (tokens/s) and MFU of the minigrpo update vs plain HF in the same run.

    python benchmarks/update_throughput.py --preset small --seq-len 512 --batch 4
    torchrun --nproc_per_node 8 benchmarks/update_throughput.py --preset qwen2.5-1.5b --seq-len 4096 --batch 4
    python benchmarks/update_throughput.py ... --out result.json     # also the numbers as JSON (rank 0)

minigrpo step: FSDP2-sharded `LogprobModel` (fused log-probs, no [N, V] logits), loss on the
completion half of each row, backward, global-norm clip, AdamW. Baseline: the same model unsharded,
HF forward with full logits + cross entropy (`labels=`), backward, clip, AdamW. Random weights
(presets from minigrpo.tiny, or the Qwen2.5-1.5B shape from its real dims; nothing is downloaded),
initialised on the device (a 1.5B model initialised on the host takes minutes of CPU time); the
parameter count comes from a meta-device copy.

MFU = 6 * params * tokens / time / peak, where peak is the dense matmul rate measured in this run
(attention FLOPs are not counted, as in nanoGPT's estimate). On CUDA the H100 bf16 dense peak
(989 TFLOP/s) is printed as a reference too.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigrpo.config import OptimConfig, ParallelConfig  # noqa: E402
from minigrpo.dist import destroy_distributed, init_distributed  # noqa: E402
from minigrpo.model import LogprobModel  # noqa: E402
from minigrpo.optim import build_optimizer, clip_grad_norm_  # noqa: E402
from minigrpo.parallel import shard_model  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0


def qwen2_config(preset: str):
    from transformers import Qwen2Config

    if preset == "qwen2.5-1.5b":  # dims of Qwen/Qwen2.5-1.5B-Instruct's config.json
        dims = dict(
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
        )
    else:
        from minigrpo.tiny import PRESETS

        p = PRESETS[preset]
        dims = dict(
            vocab_size=p.vocab_size,
            hidden_size=p.hidden_size,
            intermediate_size=p.intermediate_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            num_key_value_heads=p.num_kv_heads,
            max_position_embeddings=p.max_positions,
            rope_theta=1e4,
        )
    return Qwen2Config(**dims, tie_word_embeddings=True, use_cache=False)


def build(config, device: torch.device | str = "cpu", seed: int = 0):
    """A random-initialised model, built (and initialised) directly on `device`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen2ForCausalLM(config)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Dense matmul rate of this device in this dtype (FLOP/s), the MFU denominator."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_batch(vocab: int, batch: int, seq_len: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(device)  # (B, T)
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    completion[:, seq_len // 2 :] = True  # the second half of each row is the scored completion
    return input_ids, completion


def step_times(steps: dict, repeats: int, warmup: int, device: torch.device, interleave: bool) -> dict[str, float]:
    """Median seconds per step of each named step function.

    interleave: alternate the functions step by step, so that load drifting on a shared machine
    hits both alike (both models live in memory at once); else run them one after the other.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = [[name] * repeats for name in steps] if not interleave else [list(steps)] * repeats
    for name in steps:
        for _ in range(warmup):
            steps[name]()
    for block in order:
        for name in block:
            sync(device)
            t = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def make_minigrpo_step(config, input_ids: torch.Tensor, targets: torch.Tensor, ac: bool, info):
    """FSDP2-sharded LogprobModel: fused log-probs (no (B, T, V) logits), clip, AdamW."""
    policy = shard_model(LogprobModel(build(config, info.device)), ParallelConfig(activation_checkpointing=ac), info)
    optimizer = build_optimizer(policy, OptimConfig(lr=1e-5))
    mask = (targets != -100).float()  # (B, T)
    n_scored = int(mask.sum())

    def step() -> None:
        logp, _ = policy(input_ids, targets)  # (B, T) fp32
        (-(logp * mask).sum() / n_scored).backward()
        clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_baseline_step(
    config,
    input_ids: torch.Tensor,
    completion: torch.Tensor,
    ac: bool,
    device: torch.device,
    compute_dtype: torch.dtype,
):
    """Plain HF model: full (B, T, V) logits + cross entropy via `labels=`, clip, AdamW (autocast on CUDA)."""
    base = build(config, device)
    if ac:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-5, foreach=device.type == "cuda")
    labels = torch.where(completion, input_ids, -100)  # HF shifts labels itself

    def step() -> None:
        with torch.autocast(device.type, dtype=compute_dtype, enabled=device.type == "cuda"):
            loss = base(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "qwen2.5-1.5b"])
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--ac", action="store_true", help="activation checkpointing (both paths)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="alternate the two paths step by step (default: on CPU)",
    )
    ap.add_argument("--out", help="write the results as JSON to this file (rank 0)")
    args = ap.parse_args()

    info = init_distributed()
    device = info.device
    cuda = device.type == "cuda"
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    config = qwen2_config(args.preset)
    input_ids, completion = random_batch(config.vocab_size, args.batch, args.seq_len, device)
    from minigrpo.model import shift_targets

    targets = shift_targets(input_ids, completion)  # (B, T)
    n_scored = int((targets != -100).sum())  # per rank
    tokens = args.batch * args.seq_len * info.world_size  # per step, all ranks

    params = sum(p.numel() for p in build(config, "meta").parameters())  # tied embedding counted once
    peak = measure_matmul_flops(device, compute_dtype, 4096 if cuda else 1024, 50 if cuda else 5)
    interleave = not cuda if args.interleave is None else args.interleave
    if info.is_main:
        name = (
            torch.cuda.get_device_name(device)
            if cuda
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        )
        print(f"device: {name} x{info.world_size} ({info.backend}); torch {torch.__version__}; compute {compute_dtype}")
        shape = f"vocab {config.vocab_size}, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
        print(f"model: {args.preset} Qwen2 shape, {params / 1e6:.1f}M params, {shape}")
        scored = f"({n_scored} scored), activation checkpointing {args.ac}"
        print(f"batch: {args.batch} x {args.seq_len} tokens per rank {scored}")
        order = "interleaved" if interleave else "one path after the other"
        print(f"timing: median of {args.steps} steps after {args.warmup} warm-up, {order}")
        print(
            f"measured dense matmul peak: {peak / 1e12:.3f} TFLOP/s"
            + (f" (H100 bf16 dense spec: {H100_BF16_DENSE_TFLOPS:.0f})" if cuda else "")
        )

    ours, base = "minigrpo (FSDP2 + fused logprobs)", "HF baseline (full logits + CE)"
    with_baseline = not args.no_baseline and info.world_size == 1  # the baseline is unsharded
    makers = {
        ours: lambda: make_minigrpo_step(config, input_ids, targets, args.ac, info),
        base: lambda: make_baseline_step(config, input_ids, completion, args.ac, device, compute_dtype),
    }
    results, mem = {}, {}
    if interleave and with_baseline:
        results = step_times(
            {label: make() for label, make in makers.items()}, args.steps, args.warmup, device, interleave=True
        )
    else:
        # One model at a time: on a GPU both (with AdamW state) may not fit together.
        for label in [ours] + ([base] if with_baseline else []):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            step = makers[label]()
            results.update(step_times({label: step}, args.steps, args.warmup, device, interleave=False))
            mem[label] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            del step
    if info.is_main:
        rows = []
        for label, sec in results.items():
            tps = tokens / sec
            mfu = 6 * params * tokens / sec / (peak * info.world_size)
            extra = f", peak mem {mem[label]:.2f} GiB" if mem.get(label) is not None else ""
            print(f"{label:34s} {sec * 1e3:9.1f} ms/step  {tps:10.1f} tokens/s  MFU {100 * mfu:5.1f}%{extra}")
            rows.append(dict(path=label, ms_per_step=sec * 1e3, tokens_per_s=tps, mfu=mfu, peak_mem_gib=mem.get(label)))
        speedup = results[base] / results[ours] if len(results) == 2 else None
        if speedup is not None:
            print(f"speed-up of minigrpo over the baseline: x{speedup:.2f}")
        if args.out:
            import json

            report = dict(
                device=str(device),
                world_size=info.world_size,
                torch=torch.__version__,
                preset=args.preset,
                params=params,
                batch=args.batch,
                seq_len=args.seq_len,
                activation_checkpointing=args.ac,
                compute_dtype=str(compute_dtype),
                measured_peak_flops=peak,
                steps=args.steps,
                results=rows,
                speedup_over_baseline=speedup,
            )
            Path(args.out).write_text(json.dumps(report, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main()
