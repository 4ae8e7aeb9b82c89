"""gpu_check stage `env`: the machine, the versions and the commit, as text (stdout) and JSON.

python benchmarks/gpu_check/env.py OUT_JSON
"""

import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as e:  # a broken install is worth reporting, not fatal here
        return None if isinstance(e, ImportError) else f"import failed: {type(e).__name__}: {e}"


def run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def main() -> None:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": run(["git", "rev-parse", "--short", "HEAD"]),
        "dirty_files": len(run(["git", "status", "--porcelain", "--untracked-files=no"]).splitlines()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        **{name: version(name) for name in ("triton", "transformers", "safetensors", "vllm", "flash_attn")},
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
        print(run(["nvidia-smi"]))
    for key, value in info.items():
        print(f"{key}: {value}")
    Path(sys.argv[1]).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
