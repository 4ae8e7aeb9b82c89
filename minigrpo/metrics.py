"""Step logs (OUTPUT_DIR/metrics.jsonl + one console line with ETA), device peak FLOPs for MFU.

One logger for SFT and GRPO (RunDir makes it). Only rank 0 writes. TensorBoard / wandb receive the
same rows when `run.report_to` asks for them; RunConfig has already checked that they are installed.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager

import torch

from minigrpo.config import ConfigError
from minigrpo.io import append_jsonl

# Dense bf16 peak, per GPU, from the vendors' datasheets.
KNOWN_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float:
    """The device's peak matmul rate: datasheet bf16 for known GPUs, else measured (fp32 matmul)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAK_FLOPS.items():
            if key in name:
                return value
    n = 512
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    reps, t0 = 8, time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class MetricsLogger:
    """`log(step, metrics)`: one JSON line per step and a short console line with progress and ETA.

    `console_keys`: the metrics shown on the console line (GRPO's by default); every metric goes to
    metrics.jsonl and to the `report_to` backends."""

    CONSOLE_KEYS = ("reward_mean", "accuracy", "kl_mean", "entropy", "completion_len_mean", "grad_norm", "lr",
                    "step_time")

    def __init__(self, output_dir: str, total_steps: int, enabled: bool = True, report_to: str = "",
                 start_step: int = 0, console_keys: tuple[str, ...] | None = None):
        self.enabled, self.total, self.start_step = enabled, total_steps, start_step
        self.console_keys = console_keys or self.CONSOLE_KEYS
        self.t0 = time.perf_counter()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.writers = []
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        for backend in filter(None, (s.strip() for s in report_to.split(","))):
            self.writers.append(self._make_writer(backend, output_dir))

    @staticmethod
    def _make_writer(backend: str, output_dir: str):
        if backend == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("config key 'run.report_to': tensorboard is not installed",
                                  key="run.report_to") from None
            w = SummaryWriter(os.path.join(output_dir, "tb"))
            return lambda step, m: [w.add_scalar(k, v, step) for k, v in m.items() if isinstance(v, (int, float))]
        if backend == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("config key 'run.report_to': wandb is not installed",
                                  key="run.report_to") from None
            run = wandb.init(dir=output_dir)
            return lambda step, m: run.log(m, step=step)
        raise ConfigError(f"config key 'run.report_to': unknown backend {backend!r} (tensorboard, wandb)",
                          key="run.report_to")

    def log(self, step: int, metrics: dict, console_keys: tuple[str, ...] | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}}
        append_jsonl(self.path, [row])
        for w in self.writers:
            w(step, row)
        done = step - self.start_step
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        keys = console_keys or self.console_keys
        parts = " ".join(f"{k}={_fmt(row[k])}" for k in keys if k in row and row[k] is not None)
        print(f"step {step}/{self.total} {parts} eta={_eta(eta)}", flush=True)


class PhaseTimer:
    """`with timer("generate"): ...` records the phase's wall seconds in `timer.seconds`; `total()` is
    the wall time since the timer was made."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start
