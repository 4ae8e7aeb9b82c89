"""Triton forward/backward kernels for fused LM-head log-probs and entropy.

Same math as chunked.py (z = h @ W^T / T, online log-sum-exp, recompute in
backward), but each program keeps one (BLOCK_N, BLOCK_V) logits tile in registers,
so global memory only ever holds [N] statistics and the fp32 gradient buffers;
[N, V] is never written anywhere.

Forward (grid over row blocks): loop over vocab tiles, K-loop over H with tl.dot,
keep per row  m = running max,  s = sum exp(z - m),  t = sum exp(z - m) (z - m),
and the target logit z_y.  lse = m + log s, logp = z_y - lse, Ent = log s - t / s.
Vocab columns >= V are set to -inf so they drop out of max/sum.

Backward, with dz_j = g (onehot_j - p_j) - e p_j (log p_j + Ent), all scaled by 1/T:
  _bwd_dh_kernel  (grid over row blocks):   grad_h[rows]  += dz @ W[tile]
  _bwd_dw_kernel  (grid over vocab blocks): grad_W[tile]  += dz^T @ h[rows]
Each program owns its output rows, so no atomics are needed; the logits tile is
recomputed in each kernel (10 NHV flops for fwd+bwd instead of the minimal 8 NHV,
the price of avoiding atomics on [V, H]).

Only long-standing tl APIs are used (load/store/dot/max/sum/exp/log/where), meant
for Triton 3.6 and 3.9 (checked on 3.9: interpreter numerics, sm_90 compile).
Not yet profiled on a GPU. A likely hot spot: each backward program re-reads and
re-writes its fp32 gradient rows once per tile of the other axis, which is memory
traffic of order N*H*V/BLOCK_V (dh) or V*H*N/BLOCK_N (dw).
"""

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
    """fp32 tile -> tensor-core operand dtype, rounding to nearest even.

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


@triton.jit
def _fwd_kernel(H, W, TGT, LOGP, ENT, LSE, N, V, HD,
                s_hn, s_hk, s_wv, s_wk, inv_t,
                WANT_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    z_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _dot_rows(H, offs_n, mask_n, s_hn, s_hk, W, offs_v, mask_v, s_wv, s_wk, HD,
                      BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST) * inv_t        # (BN, BV)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        z_y += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))   # finite: every tile has a valid column
        alpha = tl.exp(m - m_new)
        d = z - m_new[:, None]                     # <= 0, -inf on padded columns
        e = tl.exp(d)                              # 0 on padded columns
        d = tl.where(mask_v[None, :], d, 0.0)      # so e * d is 0, not 0 * -inf
        if WANT_ENT:
            # Rescale t to the new max: sum e^(z-m')(z-m') = alpha (t + (m-m') s).
            # At the start m = -inf and s = 0, where (m-m')*s would be nan.
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * d, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    tl.store(LSE + offs_n, lse, mask=mask_n)
    tl.store(LOGP + offs_n, z_y - lse, mask=mask_n)
    if WANT_ENT:
        tl.store(ENT + offs_n, log_s - t / s, mask=mask_n)


@triton.jit
def _dz_tile(z, lse, ent, gl, ge, tgt, offs_v, mask_v, inv_t, AX: tl.constexpr,
             HAS_ENT: tl.constexpr):
    """dz / T for a logits tile; per-row vectors broadcast along axis AX (0 or 1)."""
    if AX == 1:   # tile is (rows, vocab)
        lse, ent, gl, ge, tgt = lse[:, None], ent[:, None], gl[:, None], ge[:, None], tgt[:, None]
        offs_v, mask_v = offs_v[None, :], mask_v[None, :]
    else:         # tile is (vocab, rows)
        lse, ent, gl, ge, tgt = lse[None, :], ent[None, :], gl[None, :], ge[None, :], tgt[None, :]
        offs_v, mask_v = offs_v[:, None], mask_v[:, None]
    logp = tl.where(mask_v, z - lse, 0.0)          # padded columns: avoid -inf * 0
    p = tl.where(mask_v, tl.exp(logp), 0.0)
    dz = -p * gl
    if HAS_ENT:
        dz -= p * ge * (logp + ent)
    dz += tl.where(offs_v == tgt, gl, 0.0)
    return dz * inv_t


@triton.jit
def _bwd_dh_kernel(H, W, TGT, LSE, ENT, GL, GE, DH, N, V, HD,
                   s_hn, s_hk, s_wv, s_wk, inv_t,
                   HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
    lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
    gl = tl.load(GL + offs_n, mask=mask_n, other=0.0)   # zero on padded/ignored rows
    ge = tl.load(GE + offs_n, mask=mask_n, other=0.0)
    ent = tl.load(ENT + offs_n, mask=mask_n, other=0.0)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _dot_rows(H, offs_n, mask_n, s_hn, s_hk, W, offs_v, mask_v, s_wv, s_wk, HD,
                      BLOCK_N, BLOCK_V, BLOCK_H, PRECISION, UPCAST) * inv_t        # (BN, BV)
        dz = _dz_tile(z, lse, ent, gl, ge, tgt, offs_v, mask_v, inv_t, 1, HAS_ENT)
        dz = _to_operand(dz, W.dtype.element_ty, UPCAST)   # tensor-core input; acc stays fp32
        for k0 in range(0, HD, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            mask_k = offs_k < HD
            w = tl.load(W + offs_v[:, None] * s_wv + offs_k[None, :] * s_wk,
                        mask=mask_v[:, None] & mask_k[None, :], other=0.0)  # (BV, BH)
            ptrs = DH + offs_n[:, None] * HD + offs_k[None, :]
            msk = mask_n[:, None] & mask_k[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _mm(dz, w, acc, PRECISION, UPCAST)           # (BN, BH)
            tl.store(ptrs, acc, mask=msk)


@triton.jit
def _bwd_dw_kernel(H, W, TGT, LSE, ENT, GL, GE, DW, N, V, HD,
                   s_hn, s_hk, s_wv, s_wk, inv_t,
                   HAS_ENT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_H: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(TGT + offs_n, mask=mask_n, other=-1)
        lse = tl.load(LSE + offs_n, mask=mask_n, other=0.0)
        gl = tl.load(GL + offs_n, mask=mask_n, other=0.0)
        ge = tl.load(GE + offs_n, mask=mask_n, other=0.0)
        ent = tl.load(ENT + offs_n, mask=mask_n, other=0.0)
        # Transposed logits tile W[tile] @ h^T, so dz^T comes out without tl.trans.
        zt = _dot_rows(W, offs_v, mask_v, s_wv, s_wk, H, offs_n, mask_n, s_hn, s_hk, HD,
                       BLOCK_V, BLOCK_N, BLOCK_H, PRECISION, UPCAST) * inv_t       # (BV, BN)
        dzt = _dz_tile(zt, lse, ent, gl, ge, tgt, offs_v, mask_v, inv_t, 0, HAS_ENT)
        dzt = _to_operand(dzt, H.dtype.element_ty, UPCAST)
        for k0 in range(0, HD, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            mask_k = offs_k < HD
            h = tl.load(H + offs_n[:, None] * s_hn + offs_k[None, :] * s_hk,
                        mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # (BN, BH)
            ptrs = DW + offs_v[:, None] * HD + offs_k[None, :]
            msk = mask_v[:, None] & mask_k[None, :]
            acc = tl.load(ptrs, mask=msk, other=0.0)
            acc = _mm(dzt, h, acc, PRECISION, UPCAST)          # (BV, BH)
            tl.store(ptrs, acc, mask=msk)


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps). The interpreter runs every program in
# Python, so tiny blocks keep it fast; on GPU, 64x128 tiles feed the tensor cores.
# fp32 operands take twice the shared memory per stage, hence the halved BLOCK_H
# (~100 KB instead of ~200 KB with 3 pipeline stages). Untuned: no GPU was at hand.
GPU_BLOCKS = (64, 128, 64, 8)
GPU_BLOCKS_FP32 = (64, 128, 32, 8)
INTERP_BLOCKS = (16, 32, 16, 1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _blocks(t: torch.Tensor):
    if _interpreted() or not t.is_cuda:
        return INTERP_BLOCKS
    return GPU_BLOCKS_FP32 if t.dtype == torch.float32 else GPU_BLOCKS


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision dot (tf32 would cost ~1e-3 relative logit error).
    # fp16/bf16 ignore the setting (exact products, fp32 accumulation).
    return "ieee"


def _launch_args(hidden, weight):
    return (hidden.shape[0], weight.shape[0], hidden.shape[1],
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))


class TritonLogprobs(torch.autograd.Function):
    """autograd wrapper around the three kernels; saves only [N] statistics."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_ent, ignore_index):
        n_rows = hidden.shape[0]
        inv_t = 1.0 / float(temperature)
        bn, bv, bh, nw = _blocks(hidden)
        dev = hidden.device
        valid = targets != ignore_index
        tgt = torch.where(valid, targets, torch.full_like(targets, -1)).contiguous()
        logp = torch.empty(n_rows, dtype=torch.float32, device=dev)
        lse = torch.empty(n_rows, dtype=torch.float32, device=dev)
        ent = torch.empty(n_rows, dtype=torch.float32, device=dev) if want_ent else lse
        if n_rows > 0:
            _fwd_kernel[(triton.cdiv(n_rows, bn),)](
                hidden, weight, tgt, logp, ent, lse, *_launch_args(hidden, weight), inv_t,
                WANT_ENT=want_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
                PRECISION=_precision(hidden.dtype), UPCAST=_interpreted(), num_warps=nw)
        zero = torch.zeros((), dtype=torch.float32, device=dev)
        logp = torch.where(valid, logp, zero)
        ent = torch.where(valid, ent, zero) if want_ent else None
        ctx.save_for_backward(hidden, weight, tgt, lse, ent, valid)
        ctx.cfg = (inv_t, want_ent)
        return (logp, ent) if want_ent else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, tgt, lse, ent, valid = ctx.saved_tensors
        inv_t, want_ent = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 6
        vf = valid.to(torch.float32)
        g_lp = torch.zeros_like(lse) if g_lp is None else (g_lp.float() * vf).contiguous()
        has_ent = want_ent and g_ent is not None
        g_ent = (g_ent.float() * vf).contiguous() if has_ent else g_lp   # dummy ptr if unused
        ent = ent if has_ent else lse                                    # dummy ptr if unused
        bn, bv, bh, nw = _blocks(hidden)
        n_rows, vocab, hd = hidden.shape[0], weight.shape[0], hidden.shape[1]
        args = _launch_args(hidden, weight)
        meta = dict(HAS_ENT=has_ent, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
                    PRECISION=_precision(hidden.dtype), UPCAST=_interpreted(), num_warps=nw)
        grad_h = grad_w = None
        if need_h:
            dh = torch.zeros(n_rows, hd, dtype=torch.float32, device=hidden.device)
            if n_rows > 0:
                _bwd_dh_kernel[(triton.cdiv(n_rows, bn),)](
                    hidden, weight, tgt, lse, ent, g_lp, g_ent, dh, *args, inv_t, **meta)
            grad_h = dh.to(hidden.dtype)
        if need_w:
            dw = torch.zeros(vocab, hd, dtype=torch.float32, device=weight.device)
            if n_rows > 0:
                _bwd_dw_kernel[(triton.cdiv(vocab, bv),)](
                    hidden, weight, tgt, lse, ent, g_lp, g_ent, dw, *args, inv_t, **meta)
            grad_w = dw.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None


def triton_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                    ignore_index=-100):
    """Triton backend of fused_logprobs; hidden/weight must be fp16, bf16 or fp32."""
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
                               ignore_index)
    return out if return_entropy else (out, None)
