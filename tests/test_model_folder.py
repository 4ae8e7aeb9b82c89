"""A model folder without tokenizer files is named as such, through the entry point, before any run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.model import TOKENIZER_FILES, ModelLoadError, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _without_tokenizer(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    for name in TOKENIZER_FILES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    return folder


def test_missing_tokenizer_files_are_the_error(tiny_model_dir, tmp_path):
    folder = _without_tokenizer(tiny_model_dir, tmp_path)
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(folder, require_chat_template=True)  # not "no chat template": the cause comes first


def test_entry_point_names_the_folder(tiny_model_dir, tmp_path):
    folder = _without_tokenizer(tiny_model_dir, tmp_path)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "examples.digits", f"--model.path={folder}",
                           f"--run.output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(folder) in last and "no tokenizer files" in last
    assert not out.exists()
