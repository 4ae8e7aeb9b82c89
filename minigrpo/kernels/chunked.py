"""Chunked PyTorch log-prob / entropy of an LM head, never materialising [N, V].

Math (per row n, with z = (h_n @ W^T) / T, the logits over the vocabulary):
    lse   = log sum_j exp(z_j)
    logp  = z_y - lse                      (y = target token)
    p_j   = exp(z_j - lse)
    Ent   = -sum_j p_j log p_j = lse - sum_j p_j z_j

Gradients w.r.t. the logits, given per-row upstream grads g (for logp) and e (for Ent):
    d logp / d z_j = onehot_j(y) - p_j
    d Ent  / d z_j = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + Ent)
so  dz_j = g (onehot_j - p_j) - e p_j (log p_j + Ent)
and grad_h = dz @ W / T,  grad_W = dz^T @ h / T.
Backward has the Triton path's structure (triton_kernels.py): per tile, d_logits first, then the
two GEMMs.

Memory argument: the naive path keeps several [N, V] fp32 tensors alive (logits,
log_softmax output saved for backward, probabilities for the entropy, and their
grads). For N = 8k tokens and V = 152k that is ~5 GB each. Here we loop over
(chunk_n x chunk_v) tiles, keep only two tile-sized fp32 scratch buffers plus O(N)
running statistics (online log-sum-exp), and recompute the logits tile in backward
instead of saving it. Peak extra memory is O(chunk_n * chunk_v + N) plus the fp32
gradient accumulators, which have the size of the inputs themselves.

Accumulation is fp32 for every input dtype except float64, which stays float64 so
that torch.autograd.gradcheck is meaningful.
"""

import torch

DEFAULT_CHUNK_N = 1024
DEFAULT_CHUNK_V = 4096


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation, except float64 inputs keep float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile(buf: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A contiguous (rows, cols) view into the flat scratch buffer: slicing a 2-D
    # buffer would give a strided view, which mm(out=...) cannot write into.
    return buf[: rows * cols].view(rows, cols)


def _target_cols(tgt: torch.Tensor, v0: int, cols: int):
    """Column of each row's target inside tile [v0, v0+cols), and a mask of hits."""
    hit = (tgt >= v0) & (tgt < v0 + cols)
    col = (tgt - v0).clamp_(0, cols - 1)
    return col, hit


def _rows_lse_ent(h, weight, t_r, inv_t, z_buf, e_buf, cv):
    """(lse, Ent, z_y) for one row chunk: online max / sum / entropy accumulators."""
    rows, acc, dev = h.shape[0], h.dtype, h.device
    vocab = weight.shape[0]
    m = torch.full((rows,), float("-inf"), dtype=acc, device=dev)
    s = torch.zeros(rows, dtype=acc, device=dev)   # sum exp(z - m)
    t = torch.zeros(rows, dtype=acc, device=dev)   # sum exp(z - m) (z - m)
    z_y = torch.zeros(rows, dtype=acc, device=dev)
    for v0 in range(0, vocab, cv):
        cols = min(v0 + cv, vocab) - v0
        z = _tile(z_buf, rows, cols)                               # (cn, cv)
        e = _tile(e_buf, rows, cols)                               # (cn, cv)
        # beta=0: z's stale contents are ignored; 1/T rides on the GEMM's alpha.
        torch.addmm(z, h, weight[v0:v0 + cols].to(acc).t(), beta=0, alpha=inv_t, out=z)
        col, hit = _target_cols(t_r, v0, cols)
        z_y += torch.where(hit, z.gather(1, col[:, None]).squeeze(1), 0.0)
        m_new = torch.maximum(m, z.amax(dim=1))                    # (cn,)
        # Rescale old sums to the new max; m starts at -inf with s = t = 0,
        # where (m - m_new) * s would be -inf * 0 = nan, hence the where.
        alpha = torch.exp(m - m_new)
        shift = torch.where(s > 0, (m - m_new) * s, 0.0)
        z.sub_(m_new[:, None])                                     # d = z - m_new <= 0
        torch.exp(z, out=e)
        s = s * alpha + e.sum(dim=1)
        # t is relative to the running max, so Ent = log s - t / s has no
        # cancellation between two ~|z| sized terms (logits of 1e3 stay exact).
        t = alpha * (t + shift) + e.mul_(z).sum(dim=1)
        m = m_new
    log_s = torch.log(s)
    return m + log_s, log_s - t / s, z_y


def _rows_lse(h, weight, t_r, inv_t, z_buf, e_buf, cv):
    """(lse, None, z_y) for one row chunk when no entropy is wanted.

    One fused ATen log_softmax per tile (each row stays in cache) replaces the
    max / subtract / exp / sum passes over the tile; tiles merge with logaddexp.
    """
    rows, acc = h.shape[0], h.dtype
    vocab = weight.shape[0]
    lse = None
    z_y = torch.zeros(rows, dtype=acc, device=h.device)
    for v0 in range(0, vocab, cv):
        cols = min(v0 + cv, vocab) - v0
        z = _tile(z_buf, rows, cols)                               # (cn, cv)
        lq = _tile(e_buf, rows, cols)                              # (cn, cv)
        torch.addmm(z, h, weight[v0:v0 + cols].to(acc).t(), beta=0, alpha=inv_t, out=z)
        col, hit = _target_cols(t_r, v0, cols)
        z_y += torch.where(hit, z.gather(1, col[:, None]).squeeze(1), 0.0)
        torch.log_softmax(z, 1, out=lq)                            # z - lse_tile
        # Read lse_tile off the row's max, where log q ~ 0 costs no precision.
        lq_max, arg = lq.max(dim=1)
        lse_t = z.gather(1, arg[:, None]).squeeze(1) - lq_max      # (cn,)
        lse = lse_t if lse is None else torch.logaddexp(lse, lse_t)
    return lse, None, z_y


def chunked_forward(hidden, weight, targets, inv_t, want_ent, ignore_index,
                    chunk_n=DEFAULT_CHUNK_N, chunk_v=DEFAULT_CHUNK_V):
    """Returns (logp, ent or None, lse), all [N] in the accumulation dtype."""
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    acc = acc_dtype(hidden.dtype)
    dev = hidden.device
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, torch.zeros_like(targets))
    cn, cv = max(1, min(chunk_n, n_rows)), min(chunk_v, vocab)
    z_buf = torch.empty(cn * cv, dtype=acc, device=dev)
    e_buf = torch.empty(cn * cv, dtype=acc, device=dev)
    lse = torch.empty(n_rows, dtype=acc, device=dev)
    logp = torch.empty(n_rows, dtype=acc, device=dev)
    ent = torch.empty(n_rows, dtype=acc, device=dev) if want_ent else None
    rows_fn = _rows_lse_ent if want_ent else _rows_lse
    for n0 in range(0, n_rows, cn):
        n1 = min(n0 + cn, n_rows)
        h = hidden[n0:n1].to(acc)                                  # (cn, H)
        lse_c, ent_c, z_y = rows_fn(h, weight, tgt[n0:n1], inv_t, z_buf, e_buf, cv)
        lse[n0:n1] = lse_c
        logp[n0:n1] = z_y - lse_c
        if want_ent:
            ent[n0:n1] = ent_c
    zero = torch.zeros((), dtype=acc, device=dev)
    logp = torch.where(valid, logp, zero)
    if want_ent:
        ent = torch.where(valid, ent, zero)
    return logp, ent, lse


def chunked_backward(hidden, weight, targets, lse, ent, g_lp, g_ent, inv_t,
                     need_h, need_w, chunk_n=DEFAULT_CHUNK_N, chunk_v=DEFAULT_CHUNK_V):
    """Recompute logits per tile and accumulate grad_h, grad_W in fp32.

    g_lp, g_ent: [N] upstream grads (already zeroed on ignored rows), g_ent may be None.
    Returns (grad_h or None, grad_W or None) in the accumulation dtype.
    """
    n_rows, hdim = hidden.shape
    vocab = weight.shape[0]
    acc = lse.dtype
    dev = hidden.device
    cn, cv = max(1, min(chunk_n, n_rows)), min(chunk_v, vocab)
    z_buf = torch.empty(cn * cv, dtype=acc, device=dev)
    p_buf = torch.empty(cn * cv, dtype=acc, device=dev)
    grad_h = torch.zeros(n_rows, hdim, dtype=acc, device=dev) if need_h else None
    grad_w = torch.zeros(vocab, hdim, dtype=acc, device=dev) if need_w else None
    for n0 in range(0, n_rows, cn):
        n1 = min(n0 + cn, n_rows)
        rows = n1 - n0
        h = hidden[n0:n1].to(acc)                                  # (cn, H)
        neg_lse = -lse[n0:n1, None]                                # (cn, 1)
        gl = g_lp[n0:n1, None]                                     # (cn, 1)
        if g_ent is not None:
            ge = g_ent[n0:n1, None]                                # (cn, 1)
            c = gl + ge * ent[n0:n1, None]                         # (cn, 1)
        t_r = targets[n0:n1]
        for v0 in range(0, vocab, cv):
            v1 = min(v0 + cv, vocab)
            cols = v1 - v0
            w = weight[v0:v1].to(acc)                              # (cv, H)
            z = _tile(z_buf, rows, cols)
            p = _tile(p_buf, rows, cols)
            # log p = z/T - lse straight out of the GEMM (bias broadcast, beta=1).
            torch.addmm(neg_lse, h, w.t(), alpha=inv_t, out=z)
            torch.exp(z, out=p)                                    # p
            # Build ndz = -dz in place (the sign goes into the GEMM alpha below):
            #   ndz = p (g + e (log p + Ent)) - g onehot = p (e log p + c) - g onehot
            if g_ent is not None:
                ndz = z.mul_(ge).add_(c).mul_(p)
            else:
                ndz = p.mul_(gl)
            col, hit = _target_cols(t_r, v0, cols)
            ndz.scatter_add_(1, col[:, None], torch.where(hit[:, None], -gl, 0.0))
            # alpha = -1/T: the sign of ndz and the chain rule's 1/T in one place.
            if need_h:
                grad_h[n0:n1].addmm_(ndz, w, alpha=-inv_t)
            if need_w:
                grad_w[v0:v1].addmm_(ndz.t(), h, alpha=-inv_t)
    return grad_h, grad_w


class ChunkedLogprobs(torch.autograd.Function):
    """autograd wrapper: forward keeps only [N] stats, backward recomputes tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_ent, ignore_index,
                chunk_n, chunk_v):
        inv_t = 1.0 / float(temperature)
        logp, ent, lse = chunked_forward(hidden, weight, targets, inv_t, want_ent,
                                         ignore_index, chunk_n, chunk_v)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.cfg = (inv_t, want_ent, ignore_index, chunk_n, chunk_v)
        ctx.set_materialize_grads(False)   # an unused entropy arrives as None: no entropy passes
        return (logp, ent) if want_ent else logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_t, want_ent, ignore_index, chunk_n, chunk_v = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return (None,) * 8
        valid = (targets != ignore_index).to(lse.dtype)
        tgt = torch.where(targets != ignore_index, targets, torch.zeros_like(targets))
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.to(lse.dtype) * valid
        if want_ent and g_ent is not None:
            g_ent = g_ent.to(lse.dtype) * valid
        else:
            g_ent = None
        grad_h, grad_w = chunked_backward(hidden, weight, tgt, lse, ent, g_lp, g_ent,
                                          inv_t, need_h, need_w, chunk_n, chunk_v)
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                     ignore_index=-100, chunk_n=DEFAULT_CHUNK_N, chunk_v=DEFAULT_CHUNK_V):
    """Torch backend of fused_logprobs with explicit tile sizes (for tests/tuning)."""
    out = ChunkedLogprobs.apply(hidden, weight, targets, temperature, return_entropy,
                                ignore_index, chunk_n, chunk_v)
    return out if return_entropy else (out, None)
