"""MIMIC-IV preparation for DRG coding, as PAPER.md "Data" describes it.

    python -m recipes.drg.prep.mimic --drgcodes hosp/drgcodes.csv.gz \
        --discharge note/discharge.csv.gz --out data/drg_mimic [--seed 42]

1. drgcodes (hadm_id, drg_type, drg_code, description): keep HCFA rows, normalise the
   description (W/O -> WITHOUT, " W " -> " WITH ", & -> AND, drop commas, " CATH " ->
   " CATHETERIZATION ", " PROC " -> " PROCEDURES "), map it to v34 exactly or through the rule
   table DRG34_Mapping.csv; drop what stays unmapped. The first HCFA row of an admission wins.
2. discharge (note_id, hadm_id, text): join on hadm_id; cut the brief hospital course
   (course.py); keep courses over 40 words; drop repeated course texts (first kept).
3. Drop DRGs with fewer than 2 cases; stratified 90/10 train/test split (seed 42); SFT/GRPO
   splits of train 50/50, 75/25, 90/10, 95/5 and "DRG-Small" (20% of train), all stratified by DRG.

Every input row of both files is kept or dropped with a reason: counts in report.json, one line
per dropped row in drops.jsonl. Malformed rows are dropped and reported; a missing column or file
stops the run (SystemExit naming it). Every output is written to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from recipes.drg.prep.course import extract_course
from recipes.drg.records import make_record, stratified_split, write_jsonl_atomic
from recipes.drg.tables import DrgTables, load_tables

DRG_COLUMNS = ("hadm_id", "drg_type", "drg_code", "description")
NOTE_COLUMNS = ("note_id", "hadm_id", "text")
MIN_WORDS = 40  # keep courses with more than 40 words
MIN_CASES = 2  # drop DRGs with fewer than 2 cases
TEST_FRACTION = 0.1
SFT_SHARES = (50, 75, 90, 95)  # percent of train used for SFT; the rest is GRPO
SMALL_FRACTION = 0.2  # DRG-Small

_REPLACEMENTS = (("W/O", "WITHOUT"), (" W ", " WITH "), ("&", "AND"), (",", ""),
                 (" CATH ", " CATHETERIZATION "), (" PROC ", " PROCEDURES "))


def normalize_description(raw: str) -> str:
    """The PAPER.md normalisation of a raw drgcodes description (upper-cased, stripped first)."""
    text = raw.strip().upper()
    for old, new in _REPLACEMENTS:
        text = text.replace(old, new)
    return text.strip()


def map_to_v34(raw: str, tables: DrgTables) -> str | None:
    """v34 description for a raw description: exact after normalising, else the rule table."""
    text = normalize_description(raw)
    if text in tables.by_description:
        return text
    return tables.mapping.get(text)


def _open_csv(path: Path):
    if not path.is_file():
        raise SystemExit(f"error: missing input file: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return path.open(newline="", encoding="utf-8")


def iter_rows(path: Path, required: tuple[str, ...]):
    """Yield (line, row or None, problem) for each data row; exit if a column is missing."""
    csv.field_size_limit(2**31 - 1)
    with _open_csv(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        missing = [c for c in required if c not in (header or [])]
        if missing:
            raise SystemExit(f"error: {path}: missing column(s) {', '.join(missing)}; "
                             f"header is {header}")
        index = {c: header.index(c) for c in required}
        while True:
            line = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield line, None, f"unparseable CSV ({e})"
                continue
            if len(fields) != len(header):
                yield line, None, f"{len(fields)} fields, header has {len(header)}"
                continue
            yield line, {c: fields[i] for c, i in index.items()}, None


def prepare(drgcodes: Path, discharge: Path, out: Path, seed: int = 42,
            tables: DrgTables | None = None) -> dict:
    tables = tables or load_tables()
    drops: list[dict] = []
    drg_counts, note_counts = Counter(), Counter()

    def drop(source: str, counts: Counter, reason: str, line: int, ident, detail: str = ""):
        counts[reason] += 1
        drops.append({"file": source, "line": line, "id": ident, "reason": reason,
                      "detail": detail})

    # ---- 1. DRG labels per admission ----
    labels: dict[str, str] = {}
    for line, row, problem in iter_rows(drgcodes, DRG_COLUMNS):
        if row is None or not row["hadm_id"].strip().isdigit():
            drop("drgcodes", drg_counts, "malformed_row", line, row and row["hadm_id"],
                 problem or "hadm_id is not a number")
            continue
        hadm = row["hadm_id"].strip()
        if row["drg_type"].strip().upper() != "HCFA":
            drop("drgcodes", drg_counts, "not_hcfa", line, hadm, row["drg_type"])
        elif (v34 := map_to_v34(row["description"], tables)) is None:
            drop("drgcodes", drg_counts, "unmapped_description", line, hadm, row["description"])
        elif hadm in labels:
            drop("drgcodes", drg_counts, "repeat_hcfa_for_admission", line, hadm,
                 f"{v34} (kept {labels[hadm]})")
        else:
            labels[hadm] = v34
            drg_counts["kept"] += 1

    # ---- 2. notes -> brief hospital course ----
    cases: list[dict] = []
    lines: list[int] = []
    methods: list[str] = []
    seen_courses: set[bytes] = set()  # digests of whitespace-normalised courses
    for line, row, problem in iter_rows(discharge, NOTE_COLUMNS):
        if row is None or not row["hadm_id"].strip().isdigit() or not row["note_id"].strip():
            drop("discharge", note_counts, "malformed_row", line, row and row["note_id"],
                 problem or "missing note_id or non-numeric hadm_id")
            continue
        note_id, hadm = row["note_id"].strip(), row["hadm_id"].strip()
        if hadm not in labels:
            drop("discharge", note_counts, "no_hcfa_drg", line, note_id)
            continue
        course, method = extract_course(row["text"])
        if course is None:
            drop("discharge", note_counts, "no_course_section", line, note_id)
            continue
        words = len(course.split())
        if words <= MIN_WORDS:
            drop("discharge", note_counts, "course_too_short", line, note_id, f"{words} words")
            continue
        key = hashlib.sha1(" ".join(course.split()).encode()).digest()
        if key in seen_courses:
            drop("discharge", note_counts, "duplicate_course", line, note_id)
            continue
        seen_courses.add(key)
        methods.append(method)
        cases.append(make_record(note_id, int(hadm), course, labels[hadm], tables))
        lines.append(line)

    # ---- 3. rare DRGs, then splits ----
    per_drg = Counter(c["drg"] for c in cases)
    kept, sources = [], Counter()
    for case, line, method in zip(cases, lines, methods):
        if per_drg[case["drg"]] < MIN_CASES:
            drop("discharge", note_counts, "rare_drg", line, case["note_id"], case["solution"])
        else:
            kept.append(case)
            sources[method] += 1
    note_counts["kept"] = len(kept)

    train_idx, test_idx = stratified_split([c["drg"] for c in kept], TEST_FRACTION, seed)
    train, test = [kept[i] for i in train_idx], [kept[i] for i in test_idx]
    outputs = {"train.jsonl": train, "test.jsonl": test}
    train_labels = [c["drg"] for c in train]
    for share in SFT_SHARES:
        sft_idx, grpo_idx = stratified_split(train_labels, (100 - share) / 100, seed)
        outputs[f"splits/sft{share}_sft.jsonl"] = [train[i] for i in sft_idx]
        outputs[f"splits/sft{share}_grpo.jsonl"] = [train[i] for i in grpo_idx]
    _, small_idx = stratified_split(train_labels, SMALL_FRACTION, seed)
    outputs["splits/small.jsonl"] = [train[i] for i in small_idx]

    report = {
        "inputs": {"drgcodes": str(drgcodes), "discharge": str(discharge), "seed": seed},
        "drgcodes_rows": dict(sorted(drg_counts.items())),
        "discharge_rows": dict(sorted(note_counts.items())),
        "course_sources": dict(sorted(sources.items())),  # of kept notes
        "distinct_drgs": len({c["drg"] for c in kept}),
        "outputs": {name: len(rows) for name, rows in outputs.items()},
    }
    for name, rows in outputs.items():
        write_jsonl_atomic(out / name, rows)
    write_jsonl_atomic(out / "drops.jsonl", drops)
    write_jsonl_atomic(out / "report.json", [report])  # one JSON line
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drgcodes", type=Path, required=True, help="hosp/drgcodes.csv(.gz)")
    parser.add_argument("--discharge", type=Path, required=True, help="note/discharge.csv(.gz)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    report = prepare(args.drgcodes, args.discharge, args.out, args.seed)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
