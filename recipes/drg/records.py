"""DRG case records: the JSONL schema shared by MIMIC-IV and synthetic data, atomic writes,
validated reads and the stratified splitter used for every split of PAPER.md "Data".

A record: note_id (str), hadm_id (int or str), problem (brief hospital course), solution (v34
description), drg (int), base_drg (str, from the base/severity table), severity (int cc_mcc
code, see tables.SEVERITY_NAMES). Synthetic records may add `codes` and `cot`.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from recipes.drg.tables import DrgTables, load_tables

RECORD_FIELDS = ("note_id", "hadm_id", "problem", "solution", "drg", "base_drg", "severity")


def make_record(note_id: str, hadm_id, problem: str, solution: str,
                tables: DrgTables | None = None, **extra) -> dict:
    """A record with drg / base_drg / severity filled in from the v34 tables."""
    entry = (tables or load_tables()).lookup(solution)
    if entry is None:
        raise ValueError(f"{note_id}: solution is not a v34 description: {solution!r}")
    return {"note_id": note_id, "hadm_id": hadm_id, "problem": problem,
            "solution": entry.description, "drg": entry.number, "base_drg": entry.base_drg,
            "severity": entry.severity, **extra}


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def read_cases(path: str | Path, tables: DrgTables | None = None) -> list[dict]:
    """Read a JSONL case file; ValueError naming the file, line and field of a bad row."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing DRG case file: {path}")
    tables = tables or load_tables()
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            for field in ("problem", "solution"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise ValueError(f"{path}:{line_no}: row has no {field!r}")
            if tables.lookup(row["solution"]) is None:
                raise ValueError(f"{path}:{line_no}: solution is not a v34 description: "
                                 f"{row['solution']!r}")
            rows.append(row)
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
