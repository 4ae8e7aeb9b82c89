"""pytest plugin: pretend this machine has a CUDA GPU (`torch.cuda.is_available()` is True from import on).

    PYTHONPATH=tests/plugins pytest -p pretend_cuda -m "not cuda" ...

Used by test_gpu_paths.py to show, on a CPU machine, what a CUDA host does to the suite: with the
GPU tests deselected, every other test still runs on CPU (see conftest.py).
"""

import torch

torch.cuda.is_available = lambda: True
