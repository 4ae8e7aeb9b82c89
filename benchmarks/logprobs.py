"""Benchmark fused_logprobs against the naive [N, V] PyTorch path (and Liger / CCE).

Reports, per shape, for forward (no_grad) and forward+backward (random upstream
grads on logp and, with entropy, on the entropy):
  * time: median of --reps runs after one warm-up, implementations interleaved
    rep by rep (a shared machine's load drift then hits all of them alike);
  * peak extra memory: CUDA -> torch.cuda.max_memory_allocated() above what was
    allocated before the call; CPU -> a fresh subprocess per measurement that builds
    the inputs in place, warms the implementation up on a tiny shape, resets the
    kernel's RSS high-water mark (/proc/self/clear_refs), runs one call and reports
    VmHWM minus the RSS just before it: every page the call touched, outputs and
    gradients included, the same for every implementation (tracemalloc cannot see
    torch's allocations);
  * x floor: time / (FLOPs at the matmul rate measured in this run with a plain
    (N, H) @ (H, min(V, 16384)) matmul), FLOPs = 2NHV forward, 8NHV forward+backward.

    python benchmarks/logprobs.py --preset cpu
    python benchmarks/logprobs.py --preset gpu          # Qwen2.5-1.5B and -7B heads
    python benchmarks/logprobs.py --shape 2048,1024,50257 --dtype bf16
    python benchmarks/logprobs.py --preset cpu --baseline /tmp/kbase    # + 'fused@base': that
        checkout's minigrpo/kernels (e.g. `git worktree add /tmp/kbase <commit>`), interleaved
"""

import argparse
import datetime
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _device import describe  # noqa: E402
from minigrpo.kernels import fused_logprobs  # noqa: E402
from minigrpo.kernels.chunked import chunked_logprobs  # noqa: E402

PRESETS = {
    "cpu": [(4096, 512, 32768)],
    "qwen2.5-1.5b": [(8192, 1536, 151936)],
    "qwen2.5-7b": [(8192, 3584, 152064)],
}
PRESETS["gpu"] = PRESETS["qwen2.5-1.5b"] + PRESETS["qwen2.5-7b"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(n, hd, v, dtype, device, seed=0):
    """Inputs built in place (no temporaries) so the CPU RSS baseline is honest."""
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, hd, generator=g, device=device, dtype=dtype).mul_(hd ** -0.5)
    w = torch.randn(v, hd, generator=g, device=device, dtype=dtype)
    t = torch.randint(0, v, (n,), generator=g, device=device)
    gl = torch.randn(n, generator=g, device=device)
    ge = torch.randn(n, generator=g, device=device)
    return h, w, t, gl, ge


def naive(h, w, t, ent):
    lp = torch.log_softmax((h @ w.T).float(), dim=-1)                   # (N, V) x several
    logp = lp.gather(1, t[:, None]).squeeze(1)
    return logp, (-(lp.exp() * lp).sum(-1) if ent else None)


def liger(h, w, t, ent):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    return -LigerFusedLinearCrossEntropyLoss(reduction="none")(w, h, t), None


def cce(h, w, t, ent):
    from cut_cross_entropy import linear_cross_entropy
    return -linear_cross_entropy(h, w, t, reduction="none"), None


def impls(args):
    def fused(h, w, t, ent):
        if args.chunk_n or args.chunk_v:   # explicit tiles for tuning the torch path
            kw = {k: x for k, x in (("chunk_n", args.chunk_n), ("chunk_v", args.chunk_v)) if x}
            return chunked_logprobs(h, w, t, 1.0, ent, **kw)
        return fused_logprobs(h, w, t, 1.0, ent, backend=args.backend)
    table = {"fused": fused, "naive": naive, "liger": liger, "cce": cce}
    if args.baseline:
        base = baseline_kernels(args.baseline)
        table["fused@base"] = lambda h, w, t, ent: base.fused_logprobs(h, w, t, 1.0, ent, backend=args.backend)
    return {k: table[k] for k in args.impls.split(",")}


def baseline_kernels(tree):
    """minigrpo.kernels of another checkout, imported under its own name (its relative imports follow)."""
    pkg = os.path.join(os.path.abspath(tree), "minigrpo", "kernels")
    spec = importlib.util.spec_from_file_location("baseline_kernels", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["baseline_kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def availability(name, device):
    """None if runnable, else the reason it is skipped."""
    if name in ("fused", "naive", "fused@base"):
        return None
    mod = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[name]
    try:
        __import__(mod)
    except Exception:
        return "not installed"
    return None if device.startswith("cuda") else "needs CUDA"


def step(fn, h, w, t, gl, ge, ent, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(h, w, t, ent)
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    logp, e = fn(h, w, t, ent)
    loss = (logp * gl).sum() + ((e * ge).sum() if e is not None else 0.0)
    return torch.autograd.grad(loss, (h, w))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(run, reps, device):
    return timeit_interleaved({"x": run}, reps, device)["x"]


def timeit_interleaved(runs, reps, device):
    """Median seconds per run; the runs alternate rep by rep so that load drift on
    a shared machine hits every implementation alike, and the order rotates each rep
    (the run right after the [N, V] naive one was measured up to ~8% slower on a
    loaded 2-core VM)."""
    for run in runs.values():
        run()
    ts = {k: [] for k in runs}
    names = list(runs)
    for rep in range(reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            run = runs[k]
            sync(device)
            t0 = time.perf_counter()
            run()
            sync(device)
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}


def proc_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Reset the kernel's RSS high-water mark (VmHWM); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra(args, shape, name, mode, ent):
    """Peak memory above the inputs, in bytes (see module docstring)."""
    if args.device.startswith("cuda"):
        h, w, t, gl, ge = make_inputs(*shape, DTYPES[args.dtype], args.device)
        fn = impls(args)[name]
        step(fn, h, w, t, gl, ge, ent, mode)   # warm-up (autotune, workspace)
        sync(args.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, h, w, t, gl, ge, ent, mode)
        sync(args.device)
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{name},{mode},{int(ent)}",
           "--shape", ",".join(map(str, shape))] + child_flags(args)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def child_flags(args):
    flags = ["--dtype", args.dtype, "--device", args.device, "--backend", args.backend,
             "--impls", args.impls]
    if args.baseline:
        flags += ["--baseline", args.baseline]
    for k in ("chunk_n", "chunk_v"):
        if getattr(args, k):
            flags += ["--" + k.replace("_", "-"), str(getattr(args, k))]
    return flags


def child(args):
    name, mode, ent = args.child.split(",")
    shape = tuple(map(int, args.shape[0].split(",")))
    fn = impls(args)[name]
    tiny = make_inputs(64, shape[1], 512, DTYPES[args.dtype], "cpu", seed=1)
    step(fn, *tiny, bool(int(ent)), mode)      # load kernels / thread pools first
    del tiny
    h, w, t, gl, ge = make_inputs(*shape, DTYPES[args.dtype], "cpu")
    base = proc_status_kib("VmRSS")
    # Without the reset, ru_maxrss could still hold a higher mark from import time;
    # then the figure over-states this call (never under-states it).
    reset = reset_peak_rss()
    out = step(fn, h, w, t, gl, ge, bool(int(ent)), mode)
    peak = proc_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    print((peak - base) * 1024)


def matmul_rate(shape, dtype, device, reps):
    n, hd, v = shape
    vc = min(v, 16384)
    a = torch.randn(n, hd, dtype=dtype, device=device)
    b = torch.randn(hd, vc, dtype=dtype, device=device)
    return 2 * n * hd * vc / timeit(lambda: torch.mm(a, b), reps, device)


def run_shape(args, shape, ent_modes):
    n, hd, v = shape
    dtype = DTYPES[args.dtype]
    rate = matmul_rate(shape, dtype, args.device, args.reps)
    print(f"\n### N={n} H={hd} V={v} {args.dtype}  (matmul rate {rate / 1e9:.1f} GFLOP/s)\n")
    print("| impl | entropy | mode | time ms | x naive | peak extra MiB | x naive | floor ms | x floor |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    h, w, t, gl, ge = make_inputs(n, hd, v, dtype, args.device)
    fns = impls(args)
    rows = {}
    for ent in ent_modes:
        for mode in ("fwd", "fwd+bwd"):
            floor = (2 if mode == "fwd" else 8) * n * hd * v / rate
            skip = {name: availability(name, args.device) or (
                "logp only" if ent and name in ("liger", "cce") else None) for name in fns}
            runs = {name: (lambda fn=fn: step(fn, h, w, t, gl, ge, ent, mode))
                    for name, fn in fns.items() if not skip[name]}
            secs = timeit_interleaved(runs, args.reps, args.device)
            for name in fns:
                if skip[name]:
                    print(f"| {name} | {'on' if ent else 'off'} | {mode} | skipped: {skip[name]} |||||")
                    continue
                sec = secs[name]
                mem = peak_extra(args, shape, name, mode, ent)
                rows[(name, ent, mode)] = (sec, mem)
                base = rows.get(("naive", ent, mode))
                rt = f"{sec / base[0]:.2f}" if base else "-"
                rm = f"{mem / base[1]:.3f}" if base and base[1] > 0 else "-"
                print(f"| {name} | {'on' if ent else 'off'} | {mode} | {sec * 1e3:.0f} | {rt} | "
                      f"{mem / 2**20:.0f} | {rm} | {floor * 1e3:.0f} | {sec / floor:.2f} |", flush=True)
    return rows


def verdict(rows):
    """The issue's CPU done-when: fused fwd+bwd memory <= 1/8 and time <= 1.5x naive."""
    for (name, ent, mode), (sec, mem) in rows.items():
        if name != "fused" or mode != "fwd+bwd" or ("naive", ent, mode) not in rows:
            continue
        nsec, nmem = rows[("naive", ent, mode)]
        ok_m, ok_t = mem <= nmem / 8, sec <= 1.5 * nsec
        print(f"- entropy {'on' if ent else 'off'}: memory {mem / nmem:.3f}x naive (<= 0.125: "
              f"{'PASS' if ok_m else 'FAIL'}), time {sec / nsec:.2f}x naive (<= 1.5: "
              f"{'PASS' if ok_t else 'FAIL'})")
    for (name, ent, mode), (sec, mem) in rows.items():
        if name == "fused" and ("fused@base", ent, mode) in rows:
            bsec, bmem = rows[("fused@base", ent, mode)]
            print(f"- entropy {'on' if ent else 'off'}, {mode}: fused / fused@base time {sec / bsec:.3f}, "
                  f"memory {mem / max(bmem, 1):.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--shape", action="append", help="N,H,V (repeatable; overrides --preset)")
    p.add_argument("--dtype", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--impls", default="fused,naive,liger,cce")
    p.add_argument("--entropy", default="both", choices=["on", "off", "both"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--chunk-n", type=int, default=0)
    p.add_argument("--chunk-v", type=int, default=0)
    p.add_argument("--baseline", help="another checkout: adds 'fused@base', its kernels, to the impls")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    if args.child:
        return child(args)
    if args.baseline and "fused@base" not in args.impls.split(","):
        args.impls += ",fused@base"
    if "naive" in args.impls.split(","):   # ratios are against naive: run it first
        args.impls = ",".join(["naive"] + [x for x in args.impls.split(",") if x != "naive"])
    shapes = ([tuple(map(int, s.split(","))) for s in args.shape] if args.shape
              else PRESETS[args.preset or ("gpu" if gpu else "cpu")])
    ent_modes = {"on": [True], "off": [False], "both": [True, False]}[args.entropy]
    print(f"date: {datetime.date.today()}  device: {describe(args.device)}")
    print("command: python " + " ".join(sys.argv))
    print("memory: " + ("torch.cuda.max_memory_allocated() above the pre-call allocation" if gpu else
                        "fresh subprocess per cell, peak RSS (VmHWM, reset via /proc/self/clear_refs) "
                        "during one call minus RSS before it (inputs excluded; outputs and grads "
                        "included for every impl)"))
    for shape in shapes:
        rows = run_shape(args, shape, ent_modes)
        verdict(rows)


if __name__ == "__main__":
    main()
