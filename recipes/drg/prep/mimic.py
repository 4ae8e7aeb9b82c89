"""MIMIC-IV preparation for DRG coding, as PAPER.md "Data" describes it.

    python -m recipes.drg.prep.mimic --mimic.drgcodes=hosp/drgcodes.csv.gz \
        --mimic.discharge=note/discharge.csv.gz --mimic.out=data/drg_mimic [--mimic.seed=42]
    python -m recipes.drg.prep.mimic --config prep.yaml     # the same keys under `mimic:` in a YAML file
    python -m recipes.drg.prep.mimic --help                 # every config key with its default

1. drgcodes (hadm_id, drg_type, drg_code, description): keep HCFA rows, normalise the
   description (W/O -> WITHOUT, " W " -> " WITH ", & -> AND, drop commas, " CATH " ->
   " CATHETERIZATION ", " PROC " -> " PROCEDURES "), map it to v34 exactly or through the rule
   table DRG34_Mapping.csv; drop what stays unmapped. The first HCFA row of an admission wins.
2. discharge (note_id, hadm_id, text): join on hadm_id; cut the brief hospital course
   (course.py); keep courses over 40 words; drop repeated course texts (first kept).
3. Drop DRGs with fewer than 2 cases; stratified 90/10 train/test split (mimic.seed, 42); SFT/GRPO
   splits of train 50/50, 75/25, 90/10, 95/5 and "DRG-Small" (20% of train), all stratified by DRG.

Every input row of both files is kept or dropped with a reason: report.json has the rows and lines
read per file and the count of each reason (they sum to the rows read), drops.jsonl one line per
dropped row with its file line. Malformed records, an unclosed quote among them, are dropped where
they begin and reading goes on after them (csv_rows.py). A file that cannot be read (missing, a
missing column, bad gzip, not UTF-8) stops the run before anything is written: one `error: ...`
line naming the file and line, exit code 2 (as does a missing or bad config key). Progress goes to
stderr, the report to stdout; outputs left empty get a warning. Every output is written to a
temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from minigrpo.cli import run_command
from minigrpo.config import check, load_config, section, split_cli
from minigrpo.help import print_help, wants_help
from minigrpo.io import DataError, write_json_atomic, write_jsonl_atomic
from recipes.drg.prep.course import extract_course
from recipes.drg.prep.csv_rows import MALFORMED_ROW, CsvRows, Row
from recipes.drg.records import make_record, stratified_split
from recipes.drg.tables import DrgTables, load_tables

DRG_COLUMNS = ("hadm_id", "drg_type", "drg_code", "description")
NOTE_COLUMNS = ("note_id", "hadm_id", "text")
MIN_WORDS = 40  # keep courses with more than 40 words
MIN_CASES = 2  # drop DRGs with fewer than 2 cases
TEST_FRACTION = 0.1
SFT_SHARES = (50, 75, 90, 95)  # percent of train used for SFT; the rest is GRPO
SMALL_FRACTION = 0.2  # DRG-Small


@dataclass(slots=True)
class MimicSettings:
    """The `mimic` section: the two MIMIC files, the output folder and the split seed."""

    drgcodes: str = ""  # hosp/drgcodes.csv(.gz) of MIMIC-IV (required)
    discharge: str = ""  # note/discharge.csv(.gz) of MIMIC-IV-Note (required)
    out: str = ""  # output folder: train/test, splits/, drops.jsonl, report.json (required)
    seed: int = 42  # seed of every stratified split


@dataclass(slots=True)
class MimicConfig:
    mimic: MimicSettings = section(MimicSettings)


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


class _Progress:
    """Rows read / kept / dropped of one input file, on stderr every `every` seconds and at the end."""

    def __init__(self, rows: CsvRows, kept: Callable[[], int], every: float):
        self.rows, self.kept, self.every = rows, kept, every
        self.start = self.last = time.monotonic()

    def __iter__(self) -> Iterator[Row]:
        for row in self.rows:
            yield row
            # Resumes once the caller has kept or dropped the row.
            if time.monotonic() - self.last >= self.every:
                self.last = time.monotonic()
                self.show(f"line {self.rows.lines:,}")

    def show(self, where: str) -> None:
        read, kept = self.rows.rows, self.kept()
        print(f"mimic: {self.rows.path.name}: {read:,} rows read, {kept:,} kept, {read - kept:,} dropped "
              f"({where}, {time.monotonic() - self.start:.1f} s)", file=sys.stderr, flush=True)


def prepare(drgcodes: Path, discharge: Path, out: Path, seed: int = 42,
            tables: DrgTables | None = None, progress_every: float = 10.0) -> dict:
    """Read both files, write the case files, drops.jsonl and report.json to `out`; return the report.

    A file that cannot be read (see csv_rows.py) raises DataError before anything is written."""
    tables = tables or load_tables()
    drg_rows = CsvRows(drgcodes, DRG_COLUMNS)
    note_rows = CsvRows(discharge, NOTE_COLUMNS, multiline=("text",))
    for rows in (drg_rows, note_rows):  # a bad header fails now, not after an hour of the other file
        rows.check()
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: the output folder is a file")
    drops: list[dict] = []
    drg_counts, note_counts = Counter(), Counter()

    def drop(source: str, counts: Counter, reason: str, line: int, ident, detail: str = ""):
        counts[reason] += 1
        drops.append({"file": source, "line": line, "id": ident, "reason": reason,
                      "detail": detail})

    # ---- 1. DRG labels per admission ----
    labels: dict[str, str] = {}
    progress = _Progress(drg_rows, lambda: drg_counts["kept"], progress_every)
    for row in progress:
        line, fields = row.line, row.fields
        if fields is None:
            drop("drgcodes", drg_counts, row.reason, line, None, row.detail)
            continue
        hadm = fields["hadm_id"].strip()
        if not hadm.isdigit():
            drop("drgcodes", drg_counts, MALFORMED_ROW, line, fields["hadm_id"], "hadm_id is not a number")
        elif fields["drg_type"].strip().upper() != "HCFA":
            drop("drgcodes", drg_counts, "not_hcfa", line, hadm, fields["drg_type"])
        elif (v34 := map_to_v34(fields["description"], tables)) is None:
            drop("drgcodes", drg_counts, "unmapped_description", line, hadm, fields["description"])
        elif hadm in labels:
            drop("drgcodes", drg_counts, "repeat_hcfa_for_admission", line, hadm,
                 f"{v34} (kept {labels[hadm]})")
        else:
            labels[hadm] = v34
            drg_counts["kept"] += 1
    progress.show("done")

    # ---- 2. notes -> brief hospital course ----
    cases: list[dict] = []
    lines: list[int] = []
    methods: list[str] = []
    seen_courses: set[bytes] = set()  # digests of whitespace-normalised courses
    progress = _Progress(note_rows, lambda: len(cases), progress_every)
    for row in progress:
        line, fields = row.line, row.fields
        if fields is None:
            drop("discharge", note_counts, row.reason, line, None, row.detail)
            continue
        note_id, hadm = fields["note_id"].strip(), fields["hadm_id"].strip()
        if not hadm.isdigit() or not note_id:
            drop("discharge", note_counts, MALFORMED_ROW, line, fields["note_id"],
                 "missing note_id or non-numeric hadm_id")
            continue
        if hadm not in labels:
            drop("discharge", note_counts, "no_hcfa_drg", line, note_id)
            continue
        course, method = extract_course(fields["text"])
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
    progress.kept = lambda: len(kept)
    progress.show(f"done; DRGs with under {MIN_CASES} cases dropped")
    for name, rows, counts in (("drgcodes", drg_rows, drg_counts), ("discharge", note_rows, note_counts)):
        if sum(counts.values()) != rows.rows:  # every row read is kept or dropped with a reason
            raise RuntimeError(f"{name}: {rows.rows} rows read but {sum(counts.values())} accounted for")

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
    empty = [name for name, rows in outputs.items() if not rows]
    if empty:
        print(f"warning: {len(empty)} of {len(outputs)} outputs have no rows ({', '.join(empty)}): "
              f"{len(kept)} cases over {len({c['drg'] for c in kept})} DRGs were kept", file=sys.stderr)

    report = {
        "inputs": {"drgcodes": str(drgcodes), "discharge": str(discharge), "seed": seed},
        "rows_read": {"drgcodes": drg_rows.rows, "discharge": note_rows.rows},  # = the sums below
        "lines_read": {"drgcodes": drg_rows.lines, "discharge": note_rows.lines},
        "drgcodes_rows": dict(sorted(drg_counts.items())),
        "discharge_rows": dict(sorted(note_counts.items())),
        "course_sources": dict(sorted(sources.items())),  # of kept notes
        "distinct_drgs": len({c["drg"] for c in kept}),
        "outputs": {name: len(rows) for name, rows in outputs.items()},
        "empty_outputs": empty,
    }
    for name, rows in outputs.items():
        write_jsonl_atomic(out / name, rows)
    write_jsonl_atomic(out / "drops.jsonl", drops)
    write_json_atomic(out / "report.json", report)
    return report


def run(cfg: MimicConfig) -> dict:
    """Check the keys, prepare, and print the report to stdout; returns the report."""
    settings = cfg.mimic
    for key in ("drgcodes", "discharge", "out"):
        check(bool(getattr(settings, key)), f"mimic.{key}", "is required")
    report = prepare(Path(settings.drgcodes), Path(settings.discharge), Path(settings.out), settings.seed)
    json.dump(report, sys.stdout, indent=2)
    print()
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        return print_help(__doc__, MimicConfig)
    return run_command(lambda: run(load_config(MimicConfig, *split_cli(argv))))


if __name__ == "__main__":
    sys.exit(main())
