"""Synthetic DRG generator: grouper-consistent labels, coverage, reproducibility, knobs."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipes.drg.records import RECORD_FIELDS, read_cases
from recipes.drg.rewards import make_reward
from recipes.drg.prep.synthetic import Generator, Grouper, generate, main, regroup
from recipes.drg.tables import load_tables

TABLES = load_tables()
# Distinct v34 DRGs the curated pools can reach (all covered by 2,000 cases with seed 0).
REACHABLE_DRGS = 100


@pytest.fixture(scope="module")
def medium():
    start = time.perf_counter()
    generator = Generator(seed=0, difficulty="medium")
    rows = generator.generate(2000)
    return rows, time.perf_counter() - start, generator


@pytest.fixture(scope="module")
def hard():
    return generate(400, seed=1, difficulty="hard")


def test_fast(medium):
    _, seconds, _ = medium
    assert seconds < 30, f"2,000 cases took {seconds:.1f}s"


def test_labels_agree_with_drgpy_regrouping(medium, hard):
    grouper = Grouper(TABLES)
    for row in medium[0] + hard:
        number = regroup(row["codes"], grouper)
        assert number == row["drg"], row["note_id"]
        entry = TABLES.by_number[number]
        assert (row["solution"], row["base_drg"], row["severity"]) == (
            entry.description, entry.base_drg, entry.severity)


def test_coverage(medium):
    rows, _, generator = medium
    reachable = {e.number for targets in generator.options.values() for e in targets.values()}
    assert len(reachable) == REACHABLE_DRGS
    assert len({r["drg"] for r in rows}) == REACHABLE_DRGS
    assert any(TABLES.by_number[r["drg"]].surgical for r in rows)
    assert {r["severity"] for r in rows} == {0, 1, 2, 3, 4}


def test_schema_and_cot(medium):
    strict = make_reward("strict")
    rows = medium[0][:200]
    for row in rows:
        assert set(RECORD_FIELDS) <= set(row) and set(row) <= set(RECORD_FIELDS) | {"codes", "cot"}
        assert len(row["problem"].split()) > 20
    rewards, comp = strict([r["cot"] for r in rows], rows)
    assert rewards == [2.0] * len(rows)  # the CoT ends in the right, well-formed answer


def test_cot_names_every_secondary_and_exclusions(hard):
    grouper = Grouper(TABLES)
    excluded_seen = 0
    for row in hard:
        for code in row["codes"]["secondary"]:
            assert f"({code})" in row["cot"]
            if grouper.secondary(code, row["codes"]["principal"]).excluded:
                excluded_seen += 1
                assert f"({code}) is a" in row["cot"] and "excluded" in row["cot"]
    assert excluded_seen > 0  # hard cases do contain CCs excluded by the principal


def test_reproducible_by_seed(tmp_path):
    paths = [tmp_path / f"{name}.jsonl" for name in ("a", "b", "c")]
    for path, seed in zip(paths, (7, 7, 8)):
        main([f"--synthetic.out={path}", "--synthetic.n=150", f"--synthetic.seed={seed}",
              "--synthetic.difficulty=hard"])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    assert len(read_cases(paths[0])) == 150


def test_label_space_restriction():
    rows = generate(300, seed=3, num_drgs=5)
    assert len({r["drg"] for r in rows}) == 5
    rows = generate(100, seed=3, principals=["J18", "I50"])
    assert {r["codes"]["principal"][:3] for r in rows} == {"J18", "I50"}
    assert {TABLES.by_number[r["drg"]].base_drg for r in rows} == {
        "SIMPLE PNEUMONIA AND PLEURISY", "HEART FAILURE AND SHOCK"}


def test_difficulty_knobs():
    easy = generate(200, seed=4, difficulty="easy")
    assert all(len(r["codes"]["procedures"]) <= 1 for r in easy)  # no non-O.R. distractors
    assert all("ruled out" not in r["problem"] and "considered" not in r["problem"] for r in easy)
    verbatim = generate(50, seed=4, paraphrase=0)
    assert any("unspecified" in r["problem"].lower() for r in verbatim)


@pytest.mark.parametrize("kwargs, match", [
    ({"difficulty": "extreme"}, "difficulty"),
    ({"num_drgs": 0}, "num_drgs"),
    ({"principals": ["ZZZ"]}, "ZZZ"),
    ({"paraphrase": 3}, "paraphrase"),
])
def test_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(1, **kwargs)


def test_cli_bad_knob_exits_with_message(tmp_path, capsys):
    assert main([f"--synthetic.out={tmp_path / 'x.jsonl'}", "--synthetic.n=5", "--synthetic.principals=ZZZ"]) == 2
    assert "ZZZ" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_records_are_json_roundtrip(tmp_path):
    path = tmp_path / "s.jsonl"
    main([f"--synthetic.out={path}", "--synthetic.n=5", "--synthetic.seed=0"])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["note_id"] for r in rows] == [f"synth-0-{i:06d}" for i in range(5)]


ROOT = Path(__file__).resolve().parents[1]


def run_synthetic(*args):
    """The real entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "recipes.drg.prep.synthetic", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_help_lists_every_key():
    r = run_synthetic("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert "--synthetic.out=" in r.stdout  # the usage, from the module docstring
    for key in ("out", "n", "seed", "difficulty", "num_drgs", "principals", "paraphrase"):
        assert f"\n    {key}: " in r.stdout, key
    assert "one of easy|medium|hard" in r.stdout


@pytest.mark.parametrize("args, key", [
    (["--synthetic.n=-3"], "synthetic.n"),
    (["--synthetic.n=5"], "synthetic.out"),
    (["--synthetic.paraphrase=3"], "synthetic.paraphrase"),
    (["--synthetic.difficulty=extreme"], "synthetic.difficulty"),
    (["--synthetic.num_drgs=100000"], "synthetic.num_drgs"),
    (["--synthetic.drgs=3"], "synthetic.drgs"),  # unknown key
])
def test_cli_bad_value_is_one_line_naming_the_key(tmp_path, args, key):
    out = tmp_path / "x.jsonl"
    r = run_synthetic(*([f"--synthetic.out={out}", "--synthetic.n=5"] if key != "synthetic.out" else []), *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and f"'{key}'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()
