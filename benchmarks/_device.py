"""One-line description of the device a benchmark ran on."""

import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(device: str) -> str:
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        return (f"{torch.cuda.get_device_name(idx)} ({props.total_memory / 2**30:.0f} GiB), "
                f"torch {torch.__version__}, cuda {torch.version.cuda}")
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}")


if __name__ == "__main__":
    print(describe("cuda" if torch.cuda.is_available() else "cpu"))
