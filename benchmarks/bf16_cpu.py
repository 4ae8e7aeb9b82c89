"""bf16 on the CPU for the frozen passes: speed and accuracy of the reference forward and of the sampler.

    python benchmarks/bf16_cpu.py [--preset small] [--rows 16] [--prompt-len 192] [--new 64] [--out r.json]

Two of a GRPO step's passes never train: the reference forward (log-probs under the frozen initial
policy, `model.reference_dtype`) and generation (`rollout.dtype`). On a CPU with AVX512-BF16 / AMX
they can run in bf16. This prints, against fp32 measured in the same run (interleaved, medians):
- the reference forward (LogprobModel: decoder + fused log-prob head) on rows x (prompt + new)
  tokens: seconds, the speed-up, and |logp_bf16 - logp_fp32| per scored token (mean, p99, max);
- the torch engine's generation: tokens/s, and the gap between its sampled-token log-probs and the
  fp32 trainer's on the same tokens (what `sampler_logp_diff` logs), for an fp32 and a bf16 engine.
fp32 stays the default: on CPU it makes the engine's and the reference's log-probs exact against the
trainer (sampler_logp_diff ~1e-7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._device import describe  # noqa: E402
from minigrpo.model import IGNORE_INDEX, LogprobModel, load_model  # noqa: E402
from minigrpo.rollout import SamplingParams, TorchEngine  # noqa: E402
from minigrpo.tiny import build_tiny  # noqa: E402


def corpus() -> list[str]:
    words = "patient admitted with chest pain heart failure sepsis pneumonia discharged home stable".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i}" for i in range(200)]


def reference_pass(model: LogprobModel, ids: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, float]:
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, prompt_len - 1 : -1] = ids[:, prompt_len:]  # score the "completion" part
    t0 = time.perf_counter()
    with torch.no_grad():
        logp, _ = model(ids, targets)
    return logp[targets != IGNORE_INDEX].float(), time.perf_counter() - t0


def gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs()
    return {"mean": d.mean().item(), "p99": d.quantile(0.99).item(), "max": d.max().item()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="minigrpo.tiny preset (tiny, small, base)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=192)
    ap.add_argument("--new", type=int, default=64, help="scored / generated tokens per row")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model_dir = build_tiny(Path(tempfile.mkdtemp()) / "m", corpus(), preset=args.preset, seed=0)
    models = {dt: LogprobModel(load_model(model_dir, dt)).eval() for dt in ("float32", "bfloat16")}
    vocab = models["float32"].config.vocab_size
    ids = torch.randint(3, vocab, (args.rows, args.prompt_len + args.new))
    params = sum(p.numel() for p in models["float32"].parameters())
    print(describe("cpu"))
    print(f"model: {args.preset} preset, {params / 1e6:.1f}M parameters; reference pass {args.rows} rows x "
          f"{args.prompt_len + args.new} tokens ({args.rows * args.new} scored); generation {args.rows} rows "
          f"x {args.new} new tokens")

    times = {dt: [] for dt in models}
    for _ in range(args.repeats):  # interleaved, so load drift hits both alike
        for dt, model in models.items():
            logp, seconds = reference_pass(model, ids, args.prompt_len)
            times[dt].append(seconds)
            if dt == "float32":
                fp32 = logp
            else:
                bf16 = logp
    ref = {dt: statistics.median(t) for dt, t in times.items()}
    ref_gap = gap(bf16, fp32)
    print(f"reference forward: fp32 {ref['float32']:.3f} s, bf16 {ref['bfloat16']:.3f} s "
          f"({ref['float32'] / ref['bfloat16']:.2f}x); |logp bf16 - fp32| per token: mean {ref_gap['mean']:.2e}, "
          f"p99 {ref_gap['p99']:.2e}, max {ref_gap['max']:.2e}")

    engines = {dt: TorchEngine(model_dir, dtype=dt) for dt in ("float32", "bfloat16")}
    prompts = ids[:, : args.prompt_len].tolist()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=args.new, seed=1)
    rates, gaps = {dt: [] for dt in engines}, {}
    for _ in range(max(2, args.repeats // 2)):
        for dt, engine in engines.items():
            t0 = time.perf_counter()
            out = engine.generate(prompts, 1, sampling)
            seconds = time.perf_counter() - t0
            rates[dt].append(sum(len(g[0].token_ids) for g in out) / seconds)
            gaps[dt] = _sampler_gap(models["float32"], out)
    rate = {dt: statistics.median(r) for dt, r in rates.items()}
    for dt in engines:
        g = gaps[dt]
        print(f"torch engine {dt}: {rate[dt]:.0f} tok/s ({rate[dt] / rate['float32']:.2f}x fp32); |sampler logp - "
              f"fp32 trainer| per token: mean {g['mean']:.2e}, p99 {g['p99']:.2e}, max {g['max']:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": describe("cpu"), "args": vars(args), "params": params,
                                              "reference_seconds": ref, "reference_gap": ref_gap,
                                              "engine_tokens_per_s": rate, "engine_gap": gaps}, indent=2))


def _sampler_gap(trainer: LogprobModel, groups) -> dict:
    """The fp32 trainer's log-probs of the sampled tokens against the engine's, over every row."""
    engine_lp, trainer_lp = [], []
    for group in groups:
        c = group[0]
        if not c.token_ids:
            continue
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        targets = torch.full_like(ids, IGNORE_INDEX)
        targets[0, len(c.prompt_ids) - 1 : -1] = torch.tensor(c.token_ids)
        with torch.no_grad():
            logp, _ = trainer(ids, targets)
        trainer_lp.append(logp[targets != IGNORE_INDEX])
        engine_lp.append(torch.tensor(c.logprobs))
    return gap(torch.cat(engine_lp), torch.cat(trainer_lp))


if __name__ == "__main__":
    main()
