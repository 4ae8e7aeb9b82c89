"""Triton kernels for fused LM-head log-probs and entropy, and the backward built on them.

Same math as chunked.py (z = h @ W^T / T, online log-sum-exp, logits recomputed in backward).
Global memory never holds [N, V]: the forward keeps [N] statistics, the backward one vocabulary
split of d_logits at a time.

Forward, `_fwd_kernel`: one program per (row block, vocabulary split). It loops over the split's
columns in BLOCK_V tiles (K-loop over H with tl.dot) and keeps per row
    m = running max,  s = sum exp(z - m),  t = sum exp(z - m) (z - m),  z_y = target logit.
The host merges the splits' partials ([S, N] each): lse = m + log s, logp = z_y - lse,
Ent = log s - t / s. Splits give a small batch enough programs, and with the split index varying
fastest, the programs of one row block run side by side and share its hidden rows in L2.

Backward, with dz_j = g (onehot_j - p_j) - e p_j (log p_j + Ent), all scaled by 1/T. For each
vocabulary split [v0, v1) (verl's split of d_logits along the vocabulary):
    `_dlogits_kernel`   D = dz[:, v0:v1], recomputing z; stored in the input dtype (bf16 for bf16)
    cuBLAS              grad_W[v0:v1]  = D^T @ h         written once (fp32 accumulation inside)
    cuBLAS              grad_h        += D @ W[v0:v1]    into an fp32 [N, H] accumulator
That is 8NHV FLOPs for forward + backward, the minimum without storing logits, and 4NHV of it in
cuBLAS. Splitting the vocabulary rather than the rows is what lets grad_W skip an fp32 [V, H]
accumulator (2.2 GB at Qwen2.5-7B); the [N, H] one for grad_h is 0.23 GB at N = 16384.
Extra memory: D (at most SPLIT_BYTES, and at most 1/8 of the whole [N, V] d_logits), the fp32
grad_h accumulator, and for 16-bit inputs one [4096, H] fp32 GEMM output.

HBM traffic at N 16384, H 3584, V 152064, bf16, 10 splits of 15360 columns (arithmetic, not
measured): the grouped program order keeps 8 row blocks' hidden rows (7 MB) and the current weight
tiles in L2, so the d_logits kernel reads W once per group (16 x 1.1 GB = 18 GB), h about once per
split (1.2 GB) and writes D once (5 GB); the GEMMs read D twice (10 GB), h and W a few times
(~5-15 GB), write grad_W (1.1 GB), and move the fp32 accumulator and its 4096-row product once per
split (~9 GB). About 50-60 GB against 6NHV = 5.4e13 FLOPs: ~1000 FLOP per byte, 5x above an
H200's balance point (~790 TFLOP/s / 4.3 TB/s = 183), so the backward is bound by tensor-core
throughput. (The per-tile read-modify-write of fp32 rows this replaces moved ~1.7 TB.)

fp32 inputs use tf32x3 dots (three tf32 tensor-core products, about fp32 accuracy); the cuBLAS
GEMMs follow torch's own fp32 matmul precision setting.
Only long-standing tl APIs are used (load/store/dot/max/sum/exp/log/where), meant for
Triton 3.6 and 3.9 (checked on 3.9: interpreter numerics, sm_90 compile).
"""

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _mm(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST only under the interpreter, whose tl.dot multiplies the
    raw uint16 bits of bf16; fp32 products of bf16 values are exact, so upcasting
    reproduces what the tensor cores compute."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _to_operand(x, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile -> 16-bit dtype, rounding to nearest even.

    The interpreter's fp32->bf16 cast truncates (GPUs round), which would make
    interpreter numerics worse than real ones; round the bits by hand there.
    """
    if UPCAST and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536   # RTNE to the top 16 bits
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _dot_rows(A, offs_a, mask_a, sa_r, sa_k, B, offs_b, mask_b, sb_r, sb_k, K,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """A[offs_a, :] @ B[offs_b, :]^T over K in BLOCK_K steps, fp32 accumulator."""
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + offs_a[:, None] * sa_r + offs_k[None, :] * sa_k,
                    mask=mask_a[:, None] & mask_k[None, :], other=0.0)     # (A, K)
        # B loaded already transposed via strides, so no tl.trans is needed.
        b = tl.load(B + offs_k[:, None] * sb_k + offs_b[None, :] * sb_r,
                    mask=mask_k[:, None] & mask_b[None, :], other=0.0)     # (K, B)
        acc = _mm(a, b, acc, PRECISION, UPCAST)
    return acc


@triton.jit(do_not_specialize=["N", "cols_per_split"])
def _fwd_kernel(H, W, TGT, PART, N, V, HD, n_splits, cols_per_split,
                s_hn, s_hk, s_wv, s_wk, inv_t,
                WANT_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """PART[k, split, rows] for k = (m, s, t, z_y) over one split's columns."""
    pid = tl.program_id(0)
    split = pid % n_splits
    offs_n = (pid // n_splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
    v_lo = split * cols_per_split
    v_hi = tl.minimum(v_lo + cols_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_hi
        z = _dot_rows(H, offs_n, mask_n, s_hn, s_hk, W, offs_v, mask_v, s_wv, s_wk, HD,
                      BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST) * inv_t        # (BN, BV)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        # Masked columns may be the next split's: they must not match the target.
        hit = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]
        z_y += tl.sum(tl.where(hit, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))   # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]                     # <= 0, -inf on masked columns
        e = tl.exp(d)                              # 0 on masked columns
        d = tl.where(mask_v[None, :], d, 0.0)      # so e * d is 0, not 0 * -inf
        if WANT_ENT:
            # Rescale t to the new max: sum e^(z-m')(z-m') = alpha (t + (m-m') s).
            # At the start m = -inf and s = 0, where (m-m')*s would be nan.
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    out = PART + split * N + offs_n
    tl.store(out, m, mask=mask_n)
    tl.store(out + n_splits * N, s, mask=mask_n)
    if WANT_ENT:
        tl.store(out + 2 * n_splits * N, t, mask=mask_n)
    tl.store(out + 3 * n_splits * N, z_y, mask=mask_n)


@triton.jit(do_not_specialize=["N", "v_lo", "cols"])
def _dlogits_kernel(H, W, TGT, LSE, ENT, GL, GE, D, N, HD, v_lo, cols,
                    s_hn, s_hk, s_wv, s_wk, s_dn, inv_t,
                    HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """D[rows, j] = dz[rows, v_lo + j] / T for j < cols, one (BLOCK_N, BLOCK_V) tile per program."""
    # Grouped order (the Triton matmul tutorial's): GROUP_N row blocks sweep the split's
    # columns together, so both their hidden rows and the current weight rows hit in L2.
    pid = tl.program_id(0)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * tl.cdiv(cols, BLOCK_V)
    first = (pid // per_group) * GROUP_N
    rows_in_group = tl.minimum(blocks_n - first, GROUP_N)
    offs_n = (first + (pid % per_group) % rows_in_group) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = ((pid % per_group) // rows_in_group) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_j = offs_j < cols
    offs_v = v_lo + offs_j
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)[:, None]
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)[:, None]
    gl = tl.load(GL + offs_n, mask=mask_n, other=0.0)[:, None]   # zero on padded/ignored rows
    z = _dot_rows(H, offs_n, mask_n, s_hn, s_hk, W, offs_v, mask_j, s_wv, s_wk, HD,
                  BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST) * inv_t            # (BN, BV)
    logp = tl.where(mask_j[None, :], z - lse, 0.0)     # masked columns: avoid -inf * 0
    p = tl.where(mask_j[None, :], tl.exp(logp), 0.0)
    dz = -p * gl
    if HAS_ENT:
        ge = tl.load(GE + offs_n, mask=mask_n, other=0.0)[:, None]
        ent = tl.load(ENT + offs_n, mask=mask_n, other=0.0)[:, None]
        dz -= p * ge * (logp + ent)
    dz += tl.where(offs_v[None, :] == tgt, gl, 0.0)
    dz = _to_operand(dz * inv_t, D.dtype.element_ty, UPCAST)
    tl.store(D + offs_n[:, None] * s_dn + offs_j[None, :], dz,
             mask=mask_n[:, None] & mask_j[None, :])


# Launch configs (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages), autotuned on the first call
# per (H, entropy flag, dtypes). Not yet timed on a GPU; all compile for sm_90 to wgmma with
# cp.async pipelining, and within 255 registers without spills except the 128 x 256 tiles with
# entropy (~0.5 KB of spills; the autotuner decides). fp32 operands take twice the shared
# memory per stage, hence the halved BLOCK_H. The interpreter runs every program in Python, so
# tiny blocks keep it fast there.
FWD_CONFIGS = {2: ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)),
               4: ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3))}
DLOGITS_CONFIGS = {2: ((128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)),
                   4: ((128, 128, 32, 8, 3), (64, 128, 32, 4, 3))}
INTERP_BLOCKS = (16, 32, 16)
GROUP_N = 8
SPLIT_BYTES = 512 * 2**20    # the backward's d_logits buffer, at most
ROWS_PER_GEMM = 4096         # rows per fp32-output GEMM into the grad_h accumulator
FWD_TARGET_ROWS = 128 * 1024  # forward splits so that row blocks x splits >= ~1024 programs


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _precision(dtype: torch.dtype) -> str:
    # fp32: tf32x3 runs on tensor cores at about fp32 accuracy; "ieee" would lower to FMA
    # units (~1/15 of the rate). fp16/bf16 ignore the setting (exact products, fp32 accumulation).
    return "tf32x3" if dtype == torch.float32 else "ieee"


@functools.lru_cache(maxsize=None)
def _tuned(name: str, width: int):
    kernel, table, flag = {"fwd": (_fwd_kernel, FWD_CONFIGS, "WANT_ENT"),
                           "dlogits": (_dlogits_kernel, DLOGITS_CONFIGS, "HAS_ENT")}[name]
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh), num_warps=nw, num_stages=ns)
               for bn, bv, bh, nw, ns in table[width]]
    return triton.autotune(configs, key=["HD", flag])(kernel)   # the key adds the tensors' dtypes


def _launch(name, kernel, grid, args, consts, dtype):
    """kernel[grid(BLOCK_N, BLOCK_V)](*args): fixed tiny blocks in the interpreter, else autotuned."""
    if _interpreted():
        bn, bv, bh = INTERP_BLOCKS
        kernel[grid(bn, bv)](*args, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, **consts, num_warps=1)
    else:
        width = 4 if dtype == torch.float32 else 2
        _tuned(name, width)[lambda meta: grid(meta["BLOCK_N"], meta["BLOCK_V"])](*args, **consts)


def forward_split_cols(n_rows: int, vocab: int) -> int:
    """Vocabulary columns per forward program: enough programs for small batches, whole tiles."""
    granule, min_cols = (INTERP_BLOCKS[1], 64) if _interpreted() else (256, 2048)
    want = max(8, triton.cdiv(FWD_TARGET_ROWS, max(n_rows, 1)))
    n_splits = max(1, min(want, triton.cdiv(vocab, min_cols)))
    return triton.cdiv(triton.cdiv(vocab, n_splits), granule) * granule


def backward_split_cols(n_rows: int, vocab: int, elt: int) -> int:
    """Vocabulary columns per backward split: D = [N, cols] within SPLIT_BYTES and 1/8 of [N, V]."""
    granule = INTERP_BLOCKS[1] if _interpreted() else 256
    cap = min(SPLIT_BYTES, n_rows * vocab * elt // 8)
    cols = max(granule, cap // max(1, n_rows * elt) // granule * granule)
    n_splits = triton.cdiv(vocab, cols)
    return min(vocab, triton.cdiv(triton.cdiv(vocab, n_splits), granule) * granule)   # balanced


def triton_forward(hidden, weight, tgt, inv_t, want_ent, split_cols=None):
    """(logp, ent or None, lse), fp32 [N]; tgt is -1 on ignored rows."""
    n_rows, hd = hidden.shape
    vocab = weight.shape[0]
    cols = split_cols or forward_split_cols(n_rows, vocab)
    n_splits = triton.cdiv(vocab, cols)
    part = torch.empty(4, n_splits, n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows > 0:
        args = (hidden, weight, tgt, part, n_rows, vocab, hd, n_splits, cols,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_t)
        consts = dict(WANT_ENT=want_ent, PRECISION=_precision(hidden.dtype), UPCAST=_interpreted())
        _launch("fwd", _fwd_kernel, lambda bn, bv: (triton.cdiv(n_rows, bn) * n_splits,), args, consts,
                hidden.dtype)
    m_i, s_i, t_i, zy_i = part.unbind(0)                          # (S, N) each
    m = m_i.amax(0)
    scale = torch.exp(m_i - m)                                    # e^(m_i - m)
    s = (s_i * scale).sum(0)
    log_s = torch.log(s)
    lse = m + log_s
    logp = zy_i.sum(0) - lse
    ent = None
    if want_ent:
        # sum_j e^(z_j - m)(z_j - m) = sum_i e^(m_i - m) (t_i + (m_i - m) s_i)
        ent = log_s - (scale * (t_i + (m_i - m) * s_i)).sum(0) / s
    return logp, ent, lse


def dlogits(hidden, weight, tgt, lse, ent, g_lp, g_ent, out, v_lo, inv_t):
    """out[:, j] = dz[:, v_lo + j] / T for j < out.shape[1]; g_ent None = no entropy term."""
    n_rows, cols = out.shape
    has_ent = g_ent is not None
    args = (hidden, weight, tgt, lse, ent if has_ent else lse, g_lp, g_ent if has_ent else g_lp, out,
            n_rows, hidden.shape[1], v_lo, cols, hidden.stride(0), hidden.stride(1),
            weight.stride(0), weight.stride(1), out.stride(0), inv_t)
    consts = dict(HAS_ENT=has_ent, GROUP_N=GROUP_N, PRECISION=_precision(hidden.dtype), UPCAST=_interpreted())
    _launch("dlogits", _dlogits_kernel, lambda bn, bv: (triton.cdiv(n_rows, bn) * triton.cdiv(cols, bv),),
            args, consts, hidden.dtype)


def addmm_fp32(acc, a, b):
    """acc += a @ b, accumulated in fp32 also for 16-bit a and b."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif not a.is_cuda:                  # the interpreter on CPU: exact upcasts, fp32 GEMM
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    else:
        # cuBLAS writes the fp32 product (mm's out_dtype, torch >= 2.8); addmm into an fp32
        # accumulator from 16-bit operands needs torch >= 2.12, hence a bounded temporary.
        for r0 in range(0, a.shape[0], ROWS_PER_GEMM):
            acc[r0:r0 + ROWS_PER_GEMM].add_(torch.mm(a[r0:r0 + ROWS_PER_GEMM], b, out_dtype=acc.dtype))


def triton_backward(hidden, weight, tgt, lse, ent, g_lp, g_ent, inv_t, need_h, need_w, split_cols=None):
    """(grad_h or None, grad_W or None) in the input dtypes; g_lp, g_ent zero on ignored rows."""
    n_rows, hd = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    cols = split_cols or backward_split_cols(n_rows, vocab, hidden.element_size())
    buf = torch.empty(n_rows * min(cols, vocab), dtype=hidden.dtype, device=dev)
    acc_h = torch.zeros(n_rows, hd, dtype=torch.float32, device=dev) if need_h else None
    grad_w = torch.empty(vocab, hd, dtype=weight.dtype, device=dev) if need_w else None
    if need_w and n_rows == 0:
        grad_w.zero_()
    for v0 in range(0, vocab if n_rows > 0 else 0, cols):
        v1 = min(v0 + cols, vocab)
        d = buf[: n_rows * (v1 - v0)].view(n_rows, v1 - v0)   # contiguous, for the GEMMs
        dlogits(hidden, weight, tgt, lse, ent, g_lp, g_ent, d, v0, inv_t)
        if need_w:
            torch.mm(d.t(), hidden, out=grad_w[v0:v1])
        if need_h:
            addmm_fp32(acc_h, d, weight[v0:v1])
    del buf
    return (acc_h.to(hidden.dtype) if need_h else None), grad_w


class TritonLogprobs(torch.autograd.Function):
    """autograd wrapper: forward saves only [N] statistics, backward recomputes the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_ent, ignore_index, fwd_cols, bwd_cols):
        inv_t = 1.0 / float(temperature)
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.full_like(targets, -1)).contiguous()
        logp, ent, lse = triton_forward(hidden, weight, tgt, inv_t, want_ent, fwd_cols)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logp = torch.where(valid, logp, zero)
        ent = torch.where(valid, ent, zero) if want_ent else None
        ctx.save_for_backward(hidden, weight, tgt, lse, ent, valid)
        ctx.cfg = (inv_t, want_ent, bwd_cols)
        ctx.set_materialize_grads(False)   # an unused entropy arrives as None: no entropy term
        return (logp, ent) if want_ent else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, tgt, lse, ent, valid = ctx.saved_tensors
        inv_t, want_ent, bwd_cols = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 8
        vf = valid.to(torch.float32)
        g_lp = torch.zeros_like(lse) if g_lp is None else (g_lp.float() * vf).contiguous()
        g_ent = (g_ent.float() * vf).contiguous() if want_ent and g_ent is not None else None
        grad_h, grad_w = triton_backward(hidden, weight, tgt, lse, ent, g_lp, g_ent, inv_t,
                                         need_h, need_w, bwd_cols)
        return grad_h, grad_w, None, None, None, None, None, None


def triton_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                    ignore_index=-100, fwd_cols=None, bwd_cols=None):
    """Triton backend of fused_logprobs; hidden/weight must be fp16, bf16 or fp32.

    fwd_cols / bwd_cols: vocabulary columns per forward program / backward split (tests, tuning);
    None picks them from the shape.
    """
    if hidden.dtype != weight.dtype:
        # tl.dot wants equal operand dtypes; promote the lower-precision operand.
        common = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(common), weight.to(common)
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend supports fp16/bf16/fp32, got {hidden.dtype}")
    if not hidden.is_cuda and not _interpreted():
        raise ValueError("triton backend needs CUDA tensors (or TRITON_INTERPRET=1); "
                         "use backend='torch' on CPU")
    if max(hidden.numel(), weight.numel()) >= 2**31:
        raise ValueError("triton backend uses int32 offsets: needs N*H and V*H < 2**31")
    out = TritonLogprobs.apply(hidden, weight, targets, temperature, return_entropy,
                               ignore_index, fwd_cols, bwd_cols)
    return out if return_entropy else (out, None)
