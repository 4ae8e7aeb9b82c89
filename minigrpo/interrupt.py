"""Stopping a run on purpose: Ctrl-C, SIGTERM, or the death of the torchrun launcher.

`handle_signals()` (installed by `cli.run_command`) turns SIGINT and SIGTERM into an `Interrupted`
exception in the main thread, so the run unwinds through its `finally` blocks and the entry point
prints one line (see `RunDir.interruptible` for the line's content) instead of a traceback per rank.

- A checkpoint save runs inside `deferred()`: a signal that arrives meanwhile is raised once the
  save is complete, so an interrupt never leaves half a checkpoint (saves are atomic anyway).
- A process that does not reach Python code again (blocked in a collective whose peer is gone) is
  ended `GRACE_S` seconds after the first signal; a second signal ends it at once.
- `exit_with_parent()`: a torchrun worker whose launcher dies (kill -9) gets SIGTERM, so workers
  never train on as orphans.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

GRACE_S = 30.0  # after the first signal, the process exits even if it is stuck outside Python
SIGNALS = (signal.SIGINT, signal.SIGTERM)
PEER_DELAY_S = 3.0  # under torchrun, how long ranks other than 0 wait before stopping, so rank 0 speaks first


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal; `str()` is the one line an entry point prints.

    `cause` says what stopped it ("interrupted (SIGINT)"); the message may add where (RunDir adds the
    step, the last checkpoint and how to resume)."""

    def __init__(self, signum: int = signal.SIGINT, cause: str = "", message: str = ""):
        self.signum = signum
        self.cause = cause or f"interrupted ({signal.Signals(signum).name})"
        super().__init__(message or self.cause)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_state: dict = {"deferring": 0, "pending": None, "received": 0, "last": None, "timer": None}
_reason: dict[int, str] = {}  # signum -> why it was sent, when we sent it ourselves


def _handler(signum: int, frame) -> None:
    _state["received"] += 1
    _state["last"] = signum
    if _state["received"] > 1:
        os._exit(128 + signum)  # asked twice: stop now (checkpoints are atomic)
    if _state["deferring"]:
        _state["pending"] = signum
        return
    _raise(signum)


def _raise(signum: int) -> None:
    timer = threading.Timer(GRACE_S, os._exit, (128 + signum,))  # in case the unwinding gets stuck
    timer.daemon = True
    timer.start()
    _state["timer"] = timer
    raise Interrupted(signum, _reason.get(signum, ""))


def handle_signals() -> dict:
    """Raise `Interrupted` on SIGINT / SIGTERM in the main thread; returns the previous handlers for
    `restore`. A SIGINT ignored by the parent (a background job) stays ignored. No-op off the main thread."""
    previous: dict = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if signum == signal.SIGINT and current == signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, _handler)
    _state.update(deferring=0, pending=None, received=0, last=None, timer=None)
    return previous


def received_signal() -> int | None:
    """The signal this process was asked to stop with (since handle_signals), if any."""
    return _state["pending"] or (_state["last"] if _state["received"] else None)


def restore(previous: dict) -> None:
    """Put back the handlers `handle_signals` replaced (and call off a pending forced exit: the run has
    unwound)."""
    if _state["timer"] is not None:
        _state["timer"].cancel()
    _state.update(deferring=0, pending=None, received=0, last=None, timer=None)
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextmanager
def deferred():
    """Hold SIGINT / SIGTERM until the block ends (every rank runs the same blocks: collectives stay paired)."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
    pending = _state["pending"]
    if pending is not None and not _state["deferring"]:
        _state["pending"] = None
        _raise(pending)


_watching = threading.Event()


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Send this process SIGTERM when its parent (the torchrun launcher) dies. Idempotent.

    A watchdog thread polls the parent pid: portable, and unlike PR_SET_PDEATHSIG it does not depend
    on which of the launcher's threads started the worker."""
    if _watching.is_set():
        return
    _watching.set()
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            # rank 0 stops first and says so; a rank that left first would make rank 0's next collective
            # fail with a gloo error instead of the one line
            time.sleep(PEER_DELAY_S)
        _reason[signal.SIGTERM] = f"stopped (the torchrun launcher, pid {parent}, died)"
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="minigrpo-parent-watchdog", daemon=True).start()
