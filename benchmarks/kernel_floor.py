"""Fused log-prob kernels at the Qwen2.5-7B LM head: time against the 8NHV floor and naive, and error vs float64.

    python benchmarks/kernel_floor.py                      # CUDA: N=16384 H=3584 V=152064 bf16
    python benchmarks/kernel_floor.py --preset cpu         # CPU: N=40 H=32 V=300, Triton interpreter
    python benchmarks/kernel_floor.py --out kernel.json    # also write every number below as JSON
    options: --shape N,H,V  --dtype bf16|fp16|fp32  --entropy on|off  --reps R (5 on CUDA, 1 on CPU)
             --no-naive (skip the [N, V] baseline)  --no-accuracy (skip the float64 reference)

Measured, on the Triton path (minigrpo.kernels.triton_kernels), median of --reps after a warm-up
call that also autotunes:
  forward      triton_forward: the logits pass and the merge of its vocabulary splits (2NHV)
  d_logits     the Triton kernel writing bf16 dz for every backward split (recomputes z: 2NHV)
  d_weight     cuBLAS grad_W[split] = D^T @ h over all splits (2NHV)
  d_hidden     cuBLAS grad_h += D @ W[split] into the fp32 accumulator, all splits (2NHV)
  backward     triton_backward as autograd calls it (d_logits + both GEMMs, interleaved)
  fwd+bwd      fused_logprobs + torch.autograd.grad, upstream grads on logp (and entropy)
  naive        logits -> log_softmax -> gather (-> entropy) and its autograd backward
floor = FLOPs / (the dtype's matmul rate measured here: torch.mm (N, H) @ (H, min(V, 16384))), with
FLOPs 2NHV per GEMM-sized phase, 6NHV backward, 8NHV forward+backward. Memory (CUDA only): peak allocated above
the inputs during fwd+bwd; "scratch" is that minus the returned gradients. Accuracy: relative
Frobenius error against a float64 autograd reference (computed in row chunks) of logp, entropy,
grad_h and grad_w, for the fused and the naive path.

JSON keys: device, date, command, interpreter, shape {N, H, V}, dtype, entropy, reps,
matmul_tflops, splits, autotuned, and per phase (forward, d_logits, d_weight, d_hidden, backward,
fwd+bwd) floor_ms, fused_ms, x_floor; naive_ms {fwd+bwd}, x_naive, memory_mib {fused,
fused_scratch, naive} (null on CPU), accuracy {fused, naive: {logp, ent, grad_h, grad_w}},
goals {name: bool}, pass. The goals (issue 13) are fwd+bwd within 1.3x
of the floor, scratch under 1 GiB, and every fused error at most 1.1x naive's (+1e-5). Exit status
0 whether or not they are met (read "pass"); on CPU the timing goal is not judged (interpreter).
"""

import argparse
import datetime
import json
import os
import statistics
import sys
import time

# cpu: tiny, since the interpreter runs each Triton program in Python (~1 min in all)
PRESETS = {"7b": ((16384, 3584, 152064), "bf16"), "cpu": ((40, 32, 300), "bf16")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: 7b with CUDA, else cpu")
    p.add_argument("--shape", help="N,H,V (overrides the preset's shape)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--entropy", default="on", choices=["on", "off"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--reps", type=int)
    p.add_argument("--no-naive", action="store_true")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--out", help="write the results as JSON to this file")
    return p.parse_args()


ARGS = parse_args()
import torch  # noqa: E402

GPU = torch.cuda.is_available() and ARGS.preset != "cpu"
if not GPU:   # the Triton kernels run on CPU only under the interpreter, set before triton loads
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _device import describe  # noqa: E402
from minigrpo.kernels import fused_logprobs  # noqa: E402
from minigrpo.kernels import triton_kernels as tk  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda" if GPU else "cpu"


def sync():
    if GPU:
        torch.cuda.synchronize()


def median_s(fn, reps):
    fn()   # warm-up: compiles and autotunes
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive(h, w, t, temp, want_ent):
    lp = torch.log_softmax(((h @ w.T) / temp).float(), dim=-1)           # (N, V) several times
    logp = lp.gather(1, t[:, None]).squeeze(1)
    return logp, (-(lp.exp() * lp).sum(-1) if want_ent else None)


def fused(h, w, t, temp, want_ent):
    return fused_logprobs(h, w, t, temp, want_ent, backend="triton")


def fwd_bwd(fn, h, w, t, gl, ge, temp, want_ent):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    logp, ent = fn(h, w, t, temp, want_ent)
    loss = (logp * gl).sum() + ((ent * ge).sum() if want_ent else 0.0)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    return logp.detach(), (ent.detach() if want_ent else None), grad_h, grad_w


def reference64(h, w, t, gl, ge, temp, want_ent, rows=1024):
    """float64 autograd of logits -> log_softmax -> gather (-> entropy), one row chunk at a time."""
    w64 = w.double().requires_grad_()
    logp = torch.empty(h.shape[0], dtype=torch.float64, device=h.device)
    ent = torch.empty_like(logp) if want_ent else None
    grad_h = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    grad_w = torch.zeros_like(w64)
    for r0 in range(0, h.shape[0], rows):
        r1 = min(r0 + rows, h.shape[0])
        h64 = h[r0:r1].double().requires_grad_()
        lsm = torch.log_softmax((h64 @ w64.T) / temp, dim=-1)              # (rows, V)
        lp = lsm.gather(1, t[r0:r1, None]).squeeze(1)
        loss = (lp * gl[r0:r1].double()).sum()
        if want_ent:
            e = -(lsm.exp() * lsm).sum(-1)
            loss = loss + (e * ge[r0:r1].double()).sum()
            ent[r0:r1] = e.detach()
        gh, gw = torch.autograd.grad(loss, (h64, w64))
        logp[r0:r1], grad_h[r0:r1] = lp.detach(), gh
        grad_w += gw
    return logp, ent, grad_h, grad_w


def rel_errors(out, ref):
    names = ("logp", "ent", "grad_h", "grad_w")
    return {k: ((x.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
            for k, x, r in zip(names, out, ref) if r is not None}


def peak_mib(run):
    """(peak MiB above what is allocated before, what run() returned)."""
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, out


def main():
    shape, dtype_name = PRESETS[ARGS.preset or ("7b" if GPU else "cpu")]
    if ARGS.shape:
        shape = tuple(int(x) for x in ARGS.shape.split(","))
    dtype_name = ARGS.dtype or dtype_name
    n, hd, v = shape
    dtype, want_ent, temp = DTYPES[dtype_name], ARGS.entropy == "on", ARGS.temperature
    reps = ARGS.reps or (5 if GPU else 1)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    h = torch.randn(n, hd, generator=gen, device=DEVICE, dtype=dtype).mul_(hd ** -0.5)
    w = torch.randn(v, hd, generator=gen, device=DEVICE, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
    gl = torch.randn(n, generator=gen, device=DEVICE)
    ge = torch.randn(n, generator=gen, device=DEVICE)
    res = {"device": describe(DEVICE), "date": str(datetime.date.today()),
           "command": "python " + " ".join(sys.argv), "interpreter": not GPU,
           "shape": {"N": n, "H": hd, "V": v}, "dtype": dtype_name, "entropy": want_ent, "reps": reps}

    rate = matmul_rate(n, hd, min(v, 16384), dtype, reps)
    nhv = n * hd * v
    flops = {"forward": 2, "d_logits": 2, "d_weight": 2, "d_hidden": 2, "backward": 6, "fwd+bwd": 8}
    floor = {k: f * nhv / rate for k, f in flops.items()}
    res["matmul_tflops"] = rate / 1e12

    fused_s, cols, n_splits = time_phases(h, w, t, gl, ge, temp, want_ent, reps)
    res["splits"] = {"forward_cols": tk.forward_split_cols(n, v), "backward_cols": cols,
                     "backward_splits": n_splits}
    res["autotuned"] = {} if not GPU else {
        name: str(getattr(tk._tuned(name, 4 if dtype == torch.float32 else 2), "best_config", None))
        for name in ("fwd", "dlogits")}
    res["floor_ms"] = {k: s * 1e3 for k, s in floor.items()}
    res["fused_ms"] = {k: s * 1e3 for k, s in fused_s.items()}
    res["x_floor"] = {k: fused_s[k] / floor[k] for k in floor}
    res["naive_ms"], res["x_naive"] = {}, None
    if not ARGS.no_naive:
        naive_s = median_s(lambda: fwd_bwd(naive, h, w, t, gl, ge, temp, want_ent), reps)
        res["naive_ms"] = {"fwd+bwd": naive_s * 1e3}
        res["x_naive"] = fused_s["fwd+bwd"] / naive_s
    measure_memory_and_accuracy(res, h, w, t, gl, ge, temp, want_ent)
    goals = {}
    if GPU:
        goals["fwd+bwd <= 1.3x floor"] = res["x_floor"]["fwd+bwd"] <= 1.3
        goals["scratch < 1 GiB"] = res["memory_mib"]["fused_scratch"] < 1024
    acc = res["accuracy"]
    if "naive" in acc:
        goals["error <= naive"] = all(e <= 1.1 * acc["naive"][k] + 1e-5 for k, e in acc["fused"].items())
    res["goals"], res["pass"] = goals, all(goals.values())
    report(res)
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump(res, f, indent=2)


def matmul_rate(n, hd, cols, dtype, reps):
    a = torch.randn(n, hd, device=DEVICE, dtype=dtype)
    b = torch.randn(hd, cols, device=DEVICE, dtype=dtype)
    return 2 * n * hd * cols / median_s(lambda: torch.mm(a, b), reps)


def time_phases(h, w, t, gl, ge, temp, want_ent, reps):
    """Seconds per phase of the fused path (the calls triton_backward makes, one phase at a time),
    and the backward split (columns, count)."""
    n, hd = h.shape
    v = w.shape[0]
    inv_t = 1.0 / temp
    tgt = t.contiguous()
    logp, ent, lse = tk.triton_forward(h, w, tgt, inv_t, want_ent)
    g_ent = ge if want_ent else None
    cols = tk.backward_split_cols(n, v, h.element_size())
    splits = [(v0, min(v0 + cols, v)) for v0 in range(0, v, cols)]
    buf = torch.empty(n * cols, dtype=h.dtype, device=DEVICE)
    grad_w = torch.empty_like(w)
    acc_h = torch.zeros(n, hd, dtype=torch.float32, device=DEVICE)

    def views():
        return ((v0, v1, buf[: n * (v1 - v0)].view(n, v1 - v0)) for v0, v1 in splits)

    def d_logits():
        for v0, _, d in views():
            tk.dlogits(h, w, tgt, lse, ent, gl, g_ent, d, v0, inv_t)

    def d_weight():
        for v0, v1, d in views():
            torch.mm(d.t(), h, out=grad_w[v0:v1])

    def d_hidden():
        acc_h.zero_()
        for v0, v1, d in views():
            tk.addmm_fp32(acc_h, d, w[v0:v1])

    phases = {"forward": lambda: tk.triton_forward(h, w, tgt, inv_t, want_ent), "d_logits": d_logits,
              "d_weight": d_weight, "d_hidden": d_hidden,
              "backward": lambda: tk.triton_backward(h, w, tgt, lse, ent, gl, g_ent, inv_t, True, True),
              "fwd+bwd": lambda: fwd_bwd(fused, h, w, t, gl, ge, temp, want_ent)}
    return {k: median_s(fn, reps) for k, fn in phases.items()}, cols, len(splits)


def measure_memory_and_accuracy(res, h, w, t, gl, ge, temp, want_ent):
    """Peak memory of one fwd+bwd (CUDA) and its errors against float64, fused and naive."""
    ref = None if ARGS.no_accuracy else reference64(h, w, t, gl, ge, temp, want_ent)
    res["memory_mib"] = {"fused": None, "fused_scratch": None, "naive": None}
    res["accuracy"] = {}
    for name, fn in (("fused", fused), ("naive", naive)):
        if name == "naive" and ARGS.no_naive:
            continue
        if GPU:
            mib, out = peak_mib(lambda fn=fn: fwd_bwd(fn, h, w, t, gl, ge, temp, want_ent))
            res["memory_mib"][name] = mib
        else:
            out = fwd_bwd(fn, h, w, t, gl, ge, temp, want_ent)
        if ref is not None:
            res["accuracy"][name] = rel_errors(out, ref)
        del out
    if GPU:
        grads = (h.numel() * h.element_size() + w.numel() * w.element_size()) / 2**20
        res["memory_mib"]["fused_scratch"] = res["memory_mib"]["fused"] - grads


def report(res):
    s = res["shape"]
    print(f"date: {res['date']}  device: {res['device']}" + ("  (Triton interpreter: times mean nothing)"
                                                             if res["interpreter"] else ""))
    print(f"command: {res['command']}")
    print(f"N={s['N']} H={s['H']} V={s['V']} {res['dtype']} entropy={'on' if res['entropy'] else 'off'}  "
          f"matmul {res['matmul_tflops']:.1f} TFLOP/s  splits {res['splits']}  autotuned {res['autotuned']}")
    print("\n| phase | ms | floor ms | x floor |\n|---|---:|---:|---:|")
    for k, ms in res["fused_ms"].items():
        fl = res["floor_ms"].get(k)
        print(f"| {k} | {ms:.2f} | " + (f"{fl:.2f} | {ms / fl:.2f} |" if fl else "| |"))
    if res["naive_ms"]:
        print(f"| naive fwd+bwd | {res['naive_ms']['fwd+bwd']:.2f} | | fused = {res['x_naive']:.2f}x naive |")
    mem = res["memory_mib"]
    if mem["fused"] is not None:
        print(f"\npeak extra MiB: fused {mem['fused']:.0f} (scratch beyond the gradients {mem['fused_scratch']:.0f})"
              + (f", naive {mem['naive']:.0f}" if mem["naive"] is not None else ""))
    for impl, errs in res["accuracy"].items():
        print(f"rel. error vs float64, {impl}: " + ", ".join(f"{k} {e:.2e}" for k, e in errs.items()))
    print("goals: " + (", ".join(f"{k}: {'PASS' if ok else 'FAIL'}" for k, ok in res["goals"].items()) or "none"))


if __name__ == "__main__":
    main()
