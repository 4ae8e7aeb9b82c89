"""Qwen2 at float64 precision: HF computes RMSNorm and eager attention's softmax in float32 whatever the
input dtype; these replacements drop the two casts, so two computations can be compared to 1e-12."""

import torch


def rms_norm(self, hidden):  # Qwen2RMSNorm.forward without the float32 round trip
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


_softmax = torch.nn.functional.softmax


def softmax_keeping_float64(x, dim=None, dtype=None, **kw):
    return _softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kw)


def patches() -> list[tuple[object, str, object]]:
    """(object, attribute, replacement) for monkeypatch.setattr or plain setattr."""
    from transformers.models.qwen2 import modeling_qwen2

    return [(modeling_qwen2.Qwen2RMSNorm, "forward", rms_norm),
            (torch.nn.functional, "softmax", softmax_keeping_float64)]
