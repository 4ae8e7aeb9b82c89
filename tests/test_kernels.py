"""Tests for minigrpo.kernels.fused_logprobs against a float64 reference.

Every case compares logp, entropy, grad_hidden and grad_weight (with random
upstream grads on BOTH outputs) to logits -> log_softmax -> gather in float64.
The same cases run on the chunked torch path here, on the Triton kernels through
the Triton interpreter in a subprocess (TRITON_INTERPRET must be set before triton
is imported, so it cannot share this process), and on CUDA when a GPU exists.
Chunking (rows/columns per tile, vocabulary columns per Triton forward program and
backward d_logits split) must not change results beyond summation order.

Running this file as a script (`python tests/test_kernels.py`) runs the Triton
cases and prints their results as JSON; the pytest side only asserts on them.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from minigrpo.kernels import fused_logprobs, triton_available  # noqa: E402
from minigrpo.kernels.chunked import chunked_logprobs  # noqa: E402

IGNORE = -100
# Shapes are deliberately not multiples of any block/chunk size (interpreter blocks
# are 16/32/16, the torch cases use chunks of 8 rows x 64 columns).
CASES = {
    "ragged": dict(N=37, H=48, V=300),
    "temperature": dict(N=29, H=40, V=257, T=0.7),
    "hot_temperature": dict(N=19, H=24, V=101, T=1.9),
    "ignored_rows": dict(N=33, H=20, V=130, ignore="some"),
    "all_ignored": dict(N=9, H=20, V=70, ignore="all"),
    "extreme_logits": dict(N=21, H=32, V=150, scale=300.0),
    "logp_only": dict(N=23, H=36, V=200, want_ent=False),
    "noncontig_hidden": dict(N=17, H=24, V=90, noncontig=True, T=1.3),
    "bf16": dict(N=37, H=48, V=300, dtype="bfloat16"),
}
# GPU only: Qwen2.5-7B's hidden size, the float64 reference still small (N x V = 8.6e7).
GPU_CASES = {
    "large_head_bf16": dict(N=1531, H=3584, V=56003, dtype="bfloat16"),
    "large_head_fp32": dict(N=1531, H=3584, V=56003, T=0.9),
}


def reference(h, w, t, temperature, ignore_index=IGNORE):
    """float64 logits -> log_softmax -> gather; entropy = -sum p log p."""
    z = (h.double() @ w.double().T) / temperature                  # (N, V)
    lp = torch.log_softmax(z, dim=-1)
    valid = t != ignore_index
    lp_t = lp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    return torch.where(valid, lp_t, 0.0), torch.where(valid, ent, 0.0)


def naive(h, w, t, temperature, ignore_index=IGNORE):
    """The plain low-precision path (logits in the input dtype, softmax in fp32)."""
    z = ((h @ w.T) / temperature).float()
    lp = torch.log_softmax(z, dim=-1)
    valid = t != ignore_index
    lp_t = lp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    return torch.where(valid, lp_t, 0.0), torch.where(valid, ent, 0.0)


def make_inputs(case, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n, hd, v = case["N"], case["H"], case["V"]
    scale = case.get("scale", 1.0) / math.sqrt(hd)   # logits ~ N(0, scale^2)
    h = torch.randn(n, hd + 5, generator=g)[:, :hd] if case.get("noncontig") else torch.randn(n, hd, generator=g)
    h = h * scale
    w = torch.randn(v, hd, generator=g)
    t = torch.randint(0, v, (n,), generator=g)
    ignore = case.get("ignore", "some")
    if ignore == "all":
        t[:] = IGNORE
    elif ignore == "some":
        t[::5] = IGNORE
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [x.to(device) for x in (h, w, t, gl, ge)]


def _grads(fn, h, w, gl, ge, want_ent):
    h = h.detach().requires_grad_()
    w = w.detach().requires_grad_()
    lp, ent = fn(h, w)
    loss = (lp * gl.to(lp.dtype)).sum()
    if want_ent:
        loss = loss + (ent * ge.to(ent.dtype)).sum()
    gh, gw = torch.autograd.grad(loss, (h, w))
    return lp, ent, gh, gw


def measure(backend, name, device="cpu"):
    """Max abs errors vs float64 and their tolerances: {quantity: [err, tol]}."""
    case = {**CASES, **GPU_CASES}[name]
    temp, want_ent = case.get("T", 1.0), case.get("want_ent", True)
    dtype = getattr(torch, case.get("dtype", "float32"))
    h, w, t, gl, ge = make_inputs(case, device)
    h, w = h.to(dtype), w.to(dtype)
    if backend == "torch":   # small chunks so every case spans several tiles
        def fn(a, b):
            return chunked_logprobs(a, b, t, temp, want_ent, IGNORE, chunk_n=8, chunk_v=64)
    else:
        def fn(a, b):
            return fused_logprobs(a, b, t, temp, want_ent, IGNORE, backend=backend)
    out = _grads(fn, h, w, gl, ge, want_ent)
    ref = _grads(lambda a, b: reference(a, b, t, temp), h.double(), w.double(),
                 gl.double(), ge.double(), want_ent)
    if dtype != torch.float32:
        base = _grads(lambda a, b: naive(a, b, t, temp), h, w, gl, ge, want_ent)
    res = {}
    for i, key in enumerate(("logp", "ent", "grad_h", "grad_w")):
        if out[i] is None:
            assert key == "ent" and not want_ent
            continue
        err = (out[i].double() - ref[i]).abs().max().item()
        mag = ref[i].abs().max().item()
        if case.get("ignore") == "all":
            tol = 0.0                               # must be exactly zero
        elif dtype == torch.float32:
            tol = 2e-5 * max(1.0, mag)              # fp32 noise is ~1e-7..1e-6 relative
        else:
            # No worse than the naive low-precision path. Relative Frobenius error:
            # max-abs of bf16 rounding noise is too jumpy to compare two paths.
            def rel(x):
                return ((x.double() - ref[i]).norm() / ref[i].norm().clamp_min(1e-30)).item()
            err, tol = rel(out[i]), 1.1 * rel(base[i]) + 1e-5
        res[key] = [err, tol]
    res["dtypes_ok"] = [float(out[0].dtype != torch.float32 or out[2].dtype != dtype
                              or out[3].dtype != dtype), 0.0]
    return res


def check(res):
    for key, (err, tol) in res.items():
        assert math.isfinite(err), f"{key}: non-finite error"
        assert err <= tol, f"{key}: error {err:.3e} > tolerance {tol:.3e}"


# Chunking-invariance cases (small: the interpreter runs one Python call per program, and a
# 1-column split means V programs per row block) and split widths: one row/column, an odd
# width, and wider than every dimension.
SPLIT_CASES = {
    "entropy": dict(N=19, H=24, V=70, T=0.8),
    "logp_only": dict(N=19, H=24, V=70, want_ent=False),
    "bf16": dict(N=19, H=24, V=70, dtype="bfloat16"),
}
SPLIT_SIZES = (1, 37, 1000)


def measure_splits(backend, name, device="cpu"):
    """Difference of logp, ent, grad_h, grad_w between the default chunks and each of
    SPLIT_SIZES: {"quantity@size": [diff, tol]}. Only the summation order may change: fp32
    outputs within 32 eps of the largest value (max abs); a 16-bit gradient may flip single
    roundings, so its relative Frobenius difference must stay under one eps."""
    case = SPLIT_CASES[name]
    temp, want_ent = case.get("T", 1.0), case.get("want_ent", True)
    dtype = getattr(torch, case.get("dtype", "float32"))
    h, w, t, gl, ge = make_inputs(case, device)
    h, w = h.to(dtype), w.to(dtype)

    def run(size):
        if backend == "torch":   # rows and vocabulary columns per tile
            def fn(a, b):
                kw = dict(chunk_n=size, chunk_v=size) if size else {}
                return chunked_logprobs(a, b, t, temp, want_ent, IGNORE, **kw)
        else:                    # vocabulary columns per forward program and per backward split
            from minigrpo.kernels.triton_kernels import triton_logprobs

            def fn(a, b):
                return triton_logprobs(a, b, t, temp, want_ent, IGNORE, fwd_cols=size, bwd_cols=size)
        return _grads(fn, h, w, gl, ge, want_ent)
    base = run(None)
    res = {}
    for size in SPLIT_SIZES:
        out = run(size)
        for key, x, ref in zip(("logp", "ent", "grad_h", "grad_w"), out, base):
            if ref is None:
                continue
            diff, ref = x.double() - ref.double(), ref.double()
            eps = torch.finfo(x.dtype).eps
            if x.dtype == torch.float32:
                res[f"{key}@{size}"] = [diff.abs().max().item(), 32 * eps * ref.abs().max().item()]
            else:
                res[f"{key}@{size}"] = [(diff.norm() / ref.norm()).item(), eps]
    return res


# ---------------------------------------------------------------- torch path
@pytest.mark.parametrize("name", list(CASES))
def test_torch_path_matches_float64(name):
    check(measure("torch", name))


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_torch_path_chunking_does_not_change_results(name):
    check(measure_splits("torch", name))


def test_unused_entropy_output_adds_no_gradient():
    """Entropy returned but left out of the loss: the gradient is the logp-only one."""
    h, w, t, gl, _ = make_inputs(CASES["ragged"])
    grads = []
    for want_ent in (True, False):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, _ = chunked_logprobs(a, b, t, 1.0, want_ent, IGNORE, chunk_n=8, chunk_v=64)
        grads.append(torch.autograd.grad((lp * gl).sum(), (a, b)))
    for with_ent, logp_only in zip(*grads):
        torch.testing.assert_close(with_ent, logp_only, rtol=1e-5, atol=1e-6)


def test_tolerance_catches_wrong_temperature():
    """A 1% temperature error must be detected: the tolerances can fail."""
    case = CASES["temperature"]
    h, w, t, gl, ge = make_inputs(case)
    lp, _ = chunked_logprobs(h, w, t, 0.7 * 1.01, True, IGNORE, chunk_n=8, chunk_v=64)
    lp_ref, _ = reference(h, w, t, 0.7)
    assert (lp.double() - lp_ref).abs().max().item() > 1e-4 * max(1.0, lp_ref.abs().max().item())


def test_torch_path_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (7,), generator=g)
    t[2] = IGNORE
    for want_ent in (True, False):
        def fn(a, b):
            lp, ent = chunked_logprobs(a, b, t, 0.8, want_ent, IGNORE, chunk_n=3, chunk_v=4)
            return (lp, ent) if want_ent else lp
        assert torch.autograd.gradcheck(fn, (h, w))


def test_default_chunks_leading_dims_and_auto_backend():
    case = dict(N=12, H=16, V=50, ignore="none")
    h, w, t, _, _ = make_inputs(case)
    lp, ent = fused_logprobs(h.view(3, 4, 16), w, t.view(3, 4), 1.0, True)  # auto -> torch on CPU
    ref_lp, ref_ent = reference(h, w, t, 1.0)
    assert lp.shape == (3, 4) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.reshape(-1).double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.reshape(-1).double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert fused_logprobs(h, w, t)[1] is None
    with pytest.raises(ValueError):
        fused_logprobs(h, w, t, backend="cuda")


# -------------------------------------------- Triton kernels via the interpreter
@pytest.fixture(scope="module")
def interp_results():
    if not triton_available():
        pytest.skip("triton not importable")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_interpreter_matches_float64(interp_results, name):
    res = interp_results[name]
    assert "error" not in res, res.get("error")
    check(res)


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_triton_interpreter_splits_do_not_change_results(interp_results, name):
    """Forward programs and backward d_logits splits of 1 column, 37 columns, wider than V."""
    res = interp_results["splits:" + name]
    assert "error" not in res, res.get("error")
    check(res)


# ------------------------------------------- GPU compile check (no GPU needed)
def test_triton_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler does; lower the real
    kernels (every GPU launch config, bf16 and fp32/tf32x3) to a cubin for sm_90 with the
    wheel's ptxas, specialised as a launch on contiguous, 16-aligned tensors would be (unit
    strides constant, pointers and H-sized ints divisible by 16), and check that every dot
    runs on tensor cores (wgmma), fp32 included."""
    if not triton_available():
        pytest.skip("triton not importable")
    import triton
    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"triton compiler API differs: {exc}")
    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend")
    import minigrpo.kernels.triton_kernels as tk
    ints = {"N", "V", "HD", "n_splits", "cols_per_split", "v_lo", "cols"}
    aligned = {"H", "W", "D", "TGT", "PART", "LSE", "ENT", "GL", "GE", "HD", "V", "s_hn", "s_wv", "s_dn"}
    for width, operand, precision in ((2, "*bf16", "ieee"), (4, "*fp32", "tf32x3")):
        ptr = dict(H=operand, W=operand, D=operand, TGT="*i64")
        for kern, flag, table in ((tk._fwd_kernel, "WANT_ENT", tk.FWD_CONFIGS),
                                  (tk._dlogits_kernel, "HAS_ENT", tk.DLOGITS_CONFIGS)):
            for bn, bv, bh, nw, ns in table[width]:
                consts = {flag: True, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh,
                          "PRECISION": precision, "UPCAST": False, "s_hk": 1, "s_wk": 1}
                if "GROUP_N" in kern.arg_names:
                    consts["GROUP_N"] = tk.GROUP_N

                def kind(a):
                    if a in consts:
                        return "constexpr"
                    if a in ints or a.startswith("s_"):
                        return "i32"
                    return "fp32" if a == "inv_t" else ptr.get(a, "*fp32")
                sig = {a: kind(a) for a in kern.arg_names}
                attrs = {(kern.arg_names.index(a),): [["tt.divisibility", 16]]
                         for a in aligned if a in kern.arg_names}
                compiled = triton.compile(ASTSource(kern, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                                          options=dict(num_warps=nw, num_stages=ns))
                where = (kern.__name__, width, bn, bv, bh)
                assert compiled.asm.get("cubin"), where
                assert "wgmma" in compiled.asm["ptx"], where


# --------------------------------------------------------------- CUDA (GPU only)
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()),
                          reason="needs a CUDA GPU and triton")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_float64(backend, name):
    check(measure(backend, name, device="cuda"))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_cuda_large_head_matches_float64(name):
    """A real hidden size (56 K-steps of 64), a vocabulary that is no multiple of any block,
    several forward programs and backward splits per row block."""
    check(measure("triton", name, device="cuda"))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_cuda_splits_do_not_change_results(name):
    check(measure_splits("triton", name, device="cuda"))


@pytest.mark.cuda
@cuda
def test_cuda_auto_dispatches_to_triton(monkeypatch):
    import minigrpo.kernels.triton_kernels as tk
    calls = []
    orig = tk.triton_logprobs
    monkeypatch.setattr(tk, "triton_logprobs", lambda *a, **k: calls.append(1) or orig(*a, **k))
    h, w, t, _, _ = make_inputs(CASES["ragged"], device="cuda")
    fused_logprobs(h, w, t)
    assert calls


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend,frac", [("triton", 8), ("torch", 4)])
def test_cuda_peak_memory_is_far_below_n_by_v(backend, frac):
    n, hd, v = 4096, 128, 32768      # N*V fp32 logits alone would be 512 MiB
    h, w, t, gl, ge = make_inputs(dict(N=n, H=hd, V=v), device="cuda")
    h, w = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    # Warm-up: a shape's first call autotunes, and Triton's benchmark allocates a 256 MB
    # L2-flush buffer once; the kernels' own memory is what is measured.
    lp, ent = fused_logprobs(h, w, t, 1.0, True, IGNORE, backend=backend)
    torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = fused_logprobs(h, w, t, 1.0, True, IGNORE, backend=backend)
    torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w))
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < n * v * 4 / frac


def _interp_main():
    """Subprocess entry: run every case on the Triton backend, print JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    out = {}
    for name in CASES:
        try:
            out[name] = measure("triton", name)
        except Exception as exc:  # report per case instead of failing all of them
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for name in SPLIT_CASES:
        try:
            out["splits:" + name] = measure_splits("triton", name)
        except Exception as exc:
            out["splits:" + name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))


if __name__ == "__main__":
    _interp_main()
