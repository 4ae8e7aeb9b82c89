"""DRG case records: the JSONL schema shared by MIMIC-IV and synthetic data, validated reads and
the stratified splitter used for every split of PAPER.md "Data" (files are written with
minigrpo.io.write_jsonl_atomic).

A record: note_id (str), hadm_id (int or str), problem (brief hospital course), solution (v34
description), drg (int), base_drg (str, from the base/severity table), severity (int cc_mcc
code, see tables.SEVERITY_NAMES). Synthetic records may add `codes` and `cot`.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from minigrpo.io import DataError, iter_jsonl, write_jsonl_atomic

from recipes.drg.tables import DrgTables, load_tables

# write_jsonl_atomic is minigrpo.io's, re-exported: the preparation scripts (prep/) write cases with it.
__all__ = ["RECORD_FIELDS", "make_record", "read_cases", "stratified_split", "write_jsonl_atomic"]

RECORD_FIELDS = ("note_id", "hadm_id", "problem", "solution", "drg", "base_drg", "severity")


def make_record(note_id: str, hadm_id, problem: str, solution: str,
                tables: DrgTables | None = None, **extra) -> dict:
    """A record with drg / base_drg / severity filled in from the v34 tables."""
    entry = (tables or load_tables()).lookup(solution)
    if entry is None:
        raise DataError(f"{note_id}: solution is not a v34 description: {solution!r}")
    return {"note_id": note_id, "hadm_id": hadm_id, "problem": problem,
            "solution": entry.description, "drg": entry.number, "base_drg": entry.base_drg,
            "severity": entry.severity, **extra}


def read_cases(path: str | Path, tables: DrgTables | None = None, require_rows: bool = False) -> list[dict]:
    """Read a JSONL case file; DataError naming the file, line and field of a bad row.

    `require_rows`: a file without a single case is an error too (the entry points' inputs).
    """
    if not Path(path).is_file():
        raise DataError(f"missing DRG case file: {path}")
    tables = tables or load_tables()
    rows = []
    for where, row in iter_jsonl(path):
        for field in ("problem", "solution"):
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise DataError(f"{where}: row has no {field!r}")
        if tables.lookup(row["solution"]) is None:
            raise DataError(f"{where}: solution is not a v34 description: {row['solution']!r}")
        rows.append(row)
    if require_rows and not rows:
        raise DataError(f"{path}: the file has no cases (it is empty)")
    return rows


def stratified_split(labels: Sequence, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (rest, part) with `part` ~ `fraction` of every label, like sklearn's stratified split.

    The part gets ceil(fraction * N) items overall: floor(fraction * n_label) per label, the
    remainder to the labels with the largest fractional parts (ties in seeded random order). A
    label never gives away all of its items. Within a label the items are seeded-shuffled.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    groups: dict = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    keys = sorted(groups, key=str)
    rng.shuffle(keys)
    want = math.ceil(round(fraction * len(labels), 6))  # round: 0.05 * 18000 is 900, not 901
    take = {k: math.floor(fraction * len(groups[k])) for k in keys}
    by_remainder = sorted(keys, key=lambda k: -(fraction * len(groups[k]) - take[k]))
    for k in by_remainder:
        if sum(take.values()) >= want:
            break
        if take[k] < len(groups[k]) - 1:
            take[k] += 1
    rest, part = [], []
    for k in sorted(groups, key=str):
        members = groups[k][:]
        rng.shuffle(members)
        part += members[:take[k]]
        rest += members[take[k]:]
    return sorted(rest), sorted(part)
