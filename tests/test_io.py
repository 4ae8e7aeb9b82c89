"""JSONL input: every bad line is an error naming the file and the line, at the entry points too."""

import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.io import DataError, atomic_write_text, read_jsonl, truncate_jsonl, write_jsonl_atomic

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "content,message",
    [
        (b'{"a": 1}\n[1, 2, 3]\n', r"rows\.jsonl:2: expected a JSON object, got list"),
        (b'{"a": 1}\n\n{"a": "caf\xe9"}\n', r"rows\.jsonl:3: not UTF-8 text"),  # latin-1 byte, after a blank line
        (b'{"a": 1}\n{"a": \n', r"rows\.jsonl:2: not valid JSON"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_jsonl(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nothing.jsonl"):
        read_jsonl(tmp_path / "nothing.jsonl")


def test_atomic_writers_leave_no_partial_file(tmp_path):
    path = tmp_path / "out.jsonl"
    assert write_jsonl_atomic(path, [{"step": 1}, {"step": 2}, {"step": 3}]) == 3
    truncate_jsonl(path, 2)
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]

    def failing():
        yield {"step": 9}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, failing())
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]  # the old file is intact
    atomic_write_text(tmp_path / "a.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out.jsonl"]  # no temporary left


@pytest.mark.parametrize("content", [b'{"prompt": "a", "completion": "b"}\n[1]\n', b'{"prompt": "caf\xe9"}\n'])
def test_sft_entry_point_names_file_and_line(tiny_model_dir, tmp_path, content):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "minigrpo.sft", f"--model.path={tiny_model_dir}",
                           f"--data.train_file={data}", f"--run.output_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and f"{data}:" in last
    assert not (tmp_path / "run").exists()
