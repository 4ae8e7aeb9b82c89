"""Small file helpers shared by every module that writes or reads run files.

- `atomic_write_text` / `atomic_write_bytes` / `write_json_atomic` / `write_jsonl_atomic`: write to a
  temporary file in the same folder, then `os.replace` it into place, so a reader (or a crash) never
  sees half a file.
- `read_jsonl`: one dict per non-blank line; a bad line is a `DataError` naming `file:line`.
- `append_jsonl` / `truncate_jsonl`: the step logs (`metrics.jsonl`, ...) and their cut on resume.
- `InputError`: the base of every error that describes the user's input (config, data, model folder,
  checkpoint). Entry points print its message as one line; any other exception keeps its traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Any, Iterable, Iterator


class InputError(ValueError):
    """Bad input from the user (a config key, a file, a row); the message names it."""


class DataError(InputError):
    """A data file or row the user supplied is unusable; the message names the file (and line)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False) -> Iterator[IO]:
    """A file to write `path` through: a temporary file in the same folder, renamed into place when
    the block ends without an error (removed otherwise), so a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write `data` to `path` atomically (see atomic_open)."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2, fsync: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent), fsync=fsync)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSONL atomically, streaming (a large file is never held in memory); the row count."""
    count = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(`file:line`, row) for every non-blank line; DataError naming file:line for a bad one."""
    if not os.path.isfile(path):
        raise DataError(f"file not found: {path}")
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported at its own line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})") from None
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every row of a JSONL file (see `iter_jsonl` for the errors)."""
    return [row for _, row in iter_jsonl(path)]


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> None:
    """Keep the rows of steps <= last_step (a resumed run redoes the rest); atomic, tolerant of a
    cut-off last line."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the crash
            if row.get("step", 0) <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))
