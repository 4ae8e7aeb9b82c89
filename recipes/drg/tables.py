"""MS-DRG v34.0 tables, loaded once.

PAPER.md "Task": one hospital stay -> one of the 757 v34 descriptions (25 MDCs). A DRG is a
base DRG (principal diagnosis or procedure) plus a severity. The base and the severity come from
`data/drg_34_base_severity.csv`, never from splitting at the first "WITH": that split is wrong
for 137 descriptions (PAPER.md says 136; see `first_with_split` and tests/test_drg_rewards.py).

Files (data/README.md), all read relative to this module:
- `DRG_34.csv` (tab-separated): DRG, MDC, MS (P surgical / M medical), Description.
- `drg_34_base_severity.csv`: DRG, Description, cc_mcc, base_drg, base_drg_id.
- `DRG34_Mapping.csv`: raw (normalised) MIMIC-IV description -> v34 description, or "NaN"
  for a raw description that has no v34 equivalent.
- `ms_drg_corpora.csv`: 28 SFT "knowledge" rows (prompt, completion).
"""

from __future__ import annotations

import csv
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from minigrpo.io import DataError

DATA_DIR = Path(__file__).resolve().parent / "data"

# cc_mcc codes of drg_34_base_severity.csv (data/README.md).
WITHOUT_CC_MCC, WITH_CC, WITH_MCC, WITHOUT_MCC, NO_SPLIT = 0, 1, 2, 3, 4
SEVERITY_NAMES = {
    WITH_MCC: "WITH MCC",
    WITH_CC: "WITH CC OR WITH CC/MCC",
    WITHOUT_CC_MCC: "WITHOUT CC/MCC",
    WITHOUT_MCC: "WITHOUT MCC",
    NO_SPLIT: "NO SEVERITY SPLIT",
}


class TableError(DataError):
    """A v34 table is missing or malformed; the message names the file."""


@dataclass(frozen=True, slots=True)
class DrgEntry:
    number: int  # MS-DRG number, e.g. 291
    description: str  # upper-cased, stripped v34 title: the answer the model must give
    mdc: str  # "MDC 05"; "PRE" for pre-MDC DRGs (blank MDC); "No MDC" for 998/999
    surgical: bool | None  # MS column: P -> True, M -> False, blank -> None
    base_drg: str  # base DRG title from the base/severity table
    base_id: int  # base_drg_id: equal ids <=> same base DRG (340 of them)
    severity: int  # cc_mcc code, see SEVERITY_NAMES


@dataclass(frozen=True)
class DrgTables:
    by_description: dict[str, DrgEntry]
    by_number: dict[int, DrgEntry]
    mapping: dict[str, str | None]  # raw normalised description -> v34 description or None

    @property
    def descriptions(self) -> frozenset[str]:
        return frozenset(self.by_description)

    def lookup(self, text: str | None) -> DrgEntry | None:
        """Entry for an answer text (upper-cased, stripped), or None when it is not a v34 title."""
        if text is None:
            return None
        return self.by_description.get(normalize(text))


def normalize(text: str) -> str:
    return text.strip().upper()


def first_with_split(description: str) -> tuple[str, str] | None:
    """(principal, status) split of the reference code (rewards_dense.py `parse_code`).

    Splits at the first whole-word WITH/WITHOUT surrounded by whitespace; None when there is none.
    Kept only for `compat=True` scoring and for counting where it disagrees with the table.
    """
    code = normalize(description)
    parts = re.split(r"\s+(WITH|WITHOUT)\s+", code, maxsplit=1)
    if len(parts) < 3:
        return None
    return parts[0].strip(), f"{parts[1]} {parts[2]}".strip()


def _read_rows(path: Path, required: list[str], delimiter: str = ",") -> list[dict[str, str]]:
    if not path.is_file():
        raise TableError(f"missing DRG table file: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise TableError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = list(reader)
    if not rows:
        raise TableError(f"{path}: no rows")
    return rows


def _int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise TableError(f"{path}: line {line}: column {column!r} is not an integer: {value!r}")


@functools.lru_cache(maxsize=4)
def load_tables(data_dir: str | Path = DATA_DIR) -> DrgTables:
    """Read and cross-check the three v34 tables (cached per directory)."""
    data_dir = Path(data_dir)
    drg_path = data_dir / "DRG_34.csv"
    sev_path = data_dir / "drg_34_base_severity.csv"
    map_path = data_dir / "DRG34_Mapping.csv"

    meta: dict[int, tuple[str, bool | None, str]] = {}
    for i, row in enumerate(_read_rows(drg_path, ["DRG", "MDC", "MS", "Description"], "\t"), 2):
        number = _int(row["DRG"], drg_path, i, "DRG")
        mdc = (row["MDC"] or "").strip() or "PRE"
        kind = (row["MS"] or "").strip()
        surgical = {"P": True, "M": False, "": None}.get(kind)
        if kind not in ("P", "M", ""):
            raise TableError(f"{drg_path}: line {i}: MS must be P, M or blank, got {kind!r}")
        meta[number] = (mdc, surgical, normalize(row["Description"] or ""))

    entries: list[DrgEntry] = []
    columns = ["DRG", "Description", "cc_mcc", "base_drg", "base_drg_id"]
    for i, row in enumerate(_read_rows(sev_path, columns), 2):
        number = _int(row["DRG"], sev_path, i, "DRG")
        description = normalize(row["Description"] or "")
        severity = _int(row["cc_mcc"], sev_path, i, "cc_mcc")
        if severity not in SEVERITY_NAMES:
            raise TableError(f"{sev_path}: line {i}: unknown cc_mcc code {severity}")
        if number not in meta:
            raise TableError(f"{sev_path}: line {i}: DRG {number} is not in {drg_path.name}")
        mdc, surgical, title = meta[number]
        if title != description:
            raise TableError(f"{sev_path}: line {i}: DRG {number} title differs from {drg_path.name}")
        entries.append(DrgEntry(number, description, mdc, surgical, normalize(row["base_drg"]),
                                _int(row["base_drg_id"], sev_path, i, "base_drg_id"), severity))
    if len(entries) != len(meta):
        raise TableError(f"{sev_path}: {len(entries)} rows but {drg_path.name} has {len(meta)}")

    by_description = {e.description: e for e in entries}
    if len(by_description) != len(entries):
        raise TableError(f"{sev_path}: duplicate descriptions")

    mapping: dict[str, str | None] = {}
    for i, row in enumerate(_read_rows(map_path, ["raw_description", "DRG_34_description"]), 2):
        target = normalize(row["DRG_34_description"] or "")
        if target in ("", "NAN"):
            mapping[normalize(row["raw_description"])] = None
        elif target in by_description:
            mapping[normalize(row["raw_description"])] = target
        else:
            raise TableError(f"{map_path}: line {i}: target is not a v34 description: {target!r}")

    return DrgTables(by_description, {e.number: e for e in entries}, mapping)


def load_knowledge_rows(data_dir: str | Path = DATA_DIR) -> list[dict[str, str]]:
    """The 28 SFT "knowledge" rows (PAPER.md "Prompts"): v34 titles overall and per MDC."""
    path = Path(data_dir) / "ms_drg_corpora.csv"
    return [{"prompt": r["prompt"], "completion": r["completion"]}
            for r in _read_rows(path, ["prompt", "completion"])]
