"""Run an entry point that dies hard (os._exit(3): no cleanup, no final save) once it has logged step N.

    python tests/dist/crash_after.py N -m minigrpo.sft ARGS...      (or: ... N path/to/script.py ARGS...)

The fault is injected here, by wrapping MetricsLogger.log, so the training loop carries no test hook.
Every rank calls log() (only rank 0 writes), so under torchrun every rank dies at the same step.
"""

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minigrpo import metrics

crash_step, target, *rest = sys.argv[1:]
logged = metrics.MetricsLogger.log


def log_then_crash(self, step, *args, **kwargs):
    logged(self, step, *args, **kwargs)
    if step == int(crash_step):
        sys.stdout.flush()
        os._exit(3)


metrics.MetricsLogger.log = log_then_crash
if target == "-m":
    module, *rest = rest
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
else:
    sys.argv = [target, *rest]
    runpy.run_path(target, run_name="__main__")
