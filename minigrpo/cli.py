"""How every minigrpo entry point ends.

- Bad input (`io.InputError`: config keys, data files, model folders, checkpoints) -> one
  `error: ...` line and exit code 2. Any other exception is a bug: it keeps its traceback.
- Ctrl-C / SIGTERM / the torchrun launcher dying -> one line (`interrupted at step N; the last
  checkpoint is step K; resume with ...`) and exit code 128 + the signal number.
- Under torchrun every rank exits with the same code (at once, see below), but only local rank 0
  prints the line, so a config error shows once per node (torchrun's own failure summary follows
  it; that part is the launcher's and cannot be switched off from the workers).
- The process group is torn down either way (with a barrier only after a clean run).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from minigrpo import interrupt
from minigrpo.dist import destroy_distributed, under_torchrun
from minigrpo.io import InputError

# Errors that describe the user's input, not a bug: their message names the file, row or key, so a
# traceback adds nothing. ConfigError, DataError, CheckpointError, ModelLoadError and the recipes' data
# errors all derive from io.InputError; anything else keeps its traceback.
INPUT_ERRORS: tuple[type[BaseException], ...] = (InputError,)


def _say(line: str) -> None:
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # every rank has the same line: print it once
        print(line, file=sys.stderr, flush=True)


def run_command(body: Callable[[], object]) -> int:
    """Run an entry point's body; return its exit code."""
    previous = interrupt.handle_signals()
    if under_torchrun():
        interrupt.exit_with_parent()
    finished, code = False, 0
    try:
        body()
        finished = True
    except INPUT_ERRORS as e:
        _say(f"error: {e}")
        code = 2
    except KeyboardInterrupt as e:  # interrupt.Interrupted, or a Ctrl-C that came before the handlers
        stop = e if isinstance(e, interrupt.Interrupted) else interrupt.Interrupted()
        _say(str(stop))
        code = stop.exit_code
    finally:
        try:
            destroy_distributed(clean=finished)
        finally:
            interrupt.restore(previous)
    if code and under_torchrun():
        # torchrun SIGTERMs the other workers as soon as one exits, and a worker still in interpreter
        # shutdown (signal handlers back to their defaults) would report "killed by SIGTERM" instead
        # of its own code: nothing is left to clean up, so leave now. Ranks other than 0 wait a moment
        # first: were one of them first out, torchrun could stop rank 0 before it printed the line.
        sys.stdout.flush()
        sys.stderr.flush()
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            time.sleep(interrupt.PEER_DELAY_S)
        os._exit(code)
    return code
