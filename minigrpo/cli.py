"""How every minigrpo entry point ends: bad input -> one `error: ...` line and exit code 2; the process
group torn down either way (with a barrier on success, see dist.destroy_distributed)."""

from __future__ import annotations

import sys
from typing import Callable

from minigrpo.checkpoint import CheckpointError
from minigrpo.config import ConfigError
from minigrpo.dist import destroy_distributed
from minigrpo.model import ModelLoadError

# Errors that describe the user's input (config, files, data rows, checkpoints), not a bug: their
# message names the file, row or key, so a traceback adds nothing. ConfigError and the data errors
# of minigrpo.sft and the recipes are ValueErrors.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ValueError, FileNotFoundError, ModelLoadError, CheckpointError)


def run_command(body: Callable[[], object]) -> int:
    """Run an entry point's body; return its exit code."""
    try:
        body()
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    return 0
