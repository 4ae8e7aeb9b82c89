"""Fused LM-head log-probs and entropy that never materialise the [N, V] logits.

    logp, ent = fused_logprobs(hidden, weight, targets, temperature=1.0,
                               return_entropy=False, ignore_index=-100, backend="auto")

hidden [N, H] (any float dtype), weight [V, H], targets [N] int64.
logits z = (hidden @ weight.T) / temperature, accumulated in fp32 (fp64 for fp64 input).
logp [N] = log_softmax(z)[target]; ent [N] = -sum_j p_j log p_j (or None).
Rows with target == ignore_index give logp = ent = 0 and zero gradient.
Outputs are float32 (float64 for float64 inputs); gradients come back in the
input dtypes. Differentiable in hidden and weight through both outputs.

backend: "auto" -> Triton on CUDA tensors (fp16/bf16/fp32) when triton imports,
else the chunked torch path (any device); "torch" / "triton" force one.
"""

import functools

import torch

from .chunked import chunked_logprobs

__all__ = ["fused_logprobs", "triton_available"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on a CPU-only box
        return False
    return True


def _pick_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend == "auto":
        low = hidden.dtype in (torch.float16, torch.bfloat16, torch.float32)  # not fp64
        return "triton" if hidden.is_cuda and low and triton_available() else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


def fused_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                   ignore_index=-100, backend="auto"):
    """Per-token log p(target) and (optionally) entropy of softmax(hidden @ weight.T / T).

    Leading dims of hidden/targets beyond [N] are flattened and restored.
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} must be [V, {hidden.shape[-1]}]")
    lead = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1)
    if _pick_backend(backend, hidden) == "triton":
        from .triton_kernels import triton_logprobs  # lazy: triton import is slow
        logp, ent = triton_logprobs(h2, weight, t1, temperature, return_entropy, ignore_index)
    else:
        logp, ent = chunked_logprobs(h2, weight, t1, temperature, return_entropy, ignore_index)
    logp = logp.reshape(lead)
    return logp, (ent.reshape(lead) if ent is not None else None)
