"""MIMIC-IV preparation on a MIMIC-format fixture: every input row is kept or dropped by reason."""

import csv
import gzip
import json

import pytest

from minigrpo.io import DataError
from recipes.drg.prep.course import (BRIEF_TO_ADMISSION_MEDS, BRIEF_TO_DISCHARGE_MEDS, BROAD_HEADER,
                                extract_course)
from recipes.drg.prep.mimic import main, map_to_v34, normalize_description, prepare
from recipes.drg.records import read_cases, stratified_split
from recipes.drg.tables import load_tables

HF = "HEART FAILURE AND SHOCK WITH MCC"
PCI = "PERCUTANEOUS CARDIOVASCULAR PROCEDURES WITH DRUG-ELUTING STENT WITHOUT MCC"
SEPSIS = "SEPTICEMIA OR SEVERE SEPSIS WITHOUT MV >96 HOURS WITH MCC"


def story(topic, words=60):
    return " ".join(f"{topic}{i}" for i in range(words))


def note(header, body, end="Medications on Admission:\n1. aspirin"):
    return f"Name: ___\nChief Complaint: dyspnea\n\n{header}\n{body}\n\n{end}\n"


DRG_ROWS = [  # subject_id, hadm_id, drg_type, drg_code, description, drg_severity, drg_mortality
    ("1", "101", "HCFA", "291", "HEART FAILURE AND SHOCK W MCC", "", ""),         # kept
    ("1", "101", "APR", "194", "Heart Failure", "3", "2"),                        # not_hcfa
    ("2", "102", "HCFA", "291", "HEART FAILURE & SHOCK W MCC", "", ""),           # kept
    ("3", "103", "HCFA", "247", "PERC CARDIOVASC PROC W DRUG-ELUTING STENT W/O MCC", "", ""),
    ("4", "104", "HCFA", "247", "PERC CARDIOVASC PROC W DRUG-ELUTING STENT W/O MCC", "", ""),
    ("5", "105", "HCFA", "000", "SOMETHING NOT A DRG", "", ""),                  # unmapped
    ("6", "106", "HCFA", "641", "NUTRITIONAL AND MISC METABOLIC DISORDERS W/O MCC", "", ""),
    ("1", "101", "HCFA", "292", "HEART FAILURE AND SHOCK W CC", "", ""),          # repeat hadm
    ("7", "abc", "HCFA", "291", "HEART FAILURE AND SHOCK W MCC", "", ""),         # malformed
    ("7", "107", "HCFA", "194", "SIMPLE PNEUMONIA & PLEURISY W CC", "", ""),      # kept -> rare
    ("8", "108", "HCFA", "871", "SEPTICEMIA OR SEVERE SEPSIS W/O MV >96 HOURS W MCC", "", ""),
    ("9", "109", "HCFA", "871", "SEPTICEMIA OR SEVERE SEPSIS W/O MV >96 HOURS W MCC", "", ""),
    ("10", "110", "HCFA", "291", "HEART FAILURE AND SHOCK W MCC", "", ""),        # kept
    ("11", "111", "APR", "720", "Septicemia", "4", "4"),                          # not_hcfa
]
DRG_MALFORMED_SHORT = ["12", "112", "HCFA"]                                       # malformed

NOTES = [  # note_id, hadm_id, text
    ("N101", "101", note("Brief Hospital Course:", story("heart"))),
    ("N102", "102", note("BRIEF HOSPITAL COURSE:", story("lung"), "Discharge Medications:\n1. x")),
    ("N103", "103", note("Hospital Course:", story("stent"))),
    ("N104", "104", note("Brief  hospital\ncourse:", story("cath"))),
    ("N105", "105", note("Brief Hospital Course:", story("odd"))),        # no_hcfa_drg (unmapped)
    ("N106", "999", note("Brief Hospital Course:", story("orphan"))),     # no_hcfa_drg (no row)
    ("N107", "107", note("Brief Hospital Course:", story("pna"))),        # rare_drg
    ("N108", "108", note("Brief Hospital Course:", story("sepsis"))),
    ("N109", "109", note("Brief Hospital Course:", story("shock"))),
    ("N110a", "110", note("Brief Hospital Course:", story("heart").replace(" ", "\n  "))),  # dup
    ("N110b", "110", note("Brief Hospital Course:", story("brief", 40))),  # too short (40 words)
    ("N110c", "110", "Discharge summary without any course section. " * 10),  # no section
    ("N111", "111", note("Brief Hospital Course:", story("apr"))),        # no_hcfa_drg (APR only)
    ("N112", "", note("Brief Hospital Course:", story("nohadm"))),        # malformed
]


def write_fixture(tmp_path):
    drg_path = tmp_path / "drgcodes.csv.gz"
    with gzip.open(drg_path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["subject_id", "hadm_id", "drg_type", "drg_code", "description",
                    "drg_severity", "drg_mortality"])
        w.writerows(DRG_ROWS)
        w.writerow(DRG_MALFORMED_SHORT)
    note_path = tmp_path / "discharge.csv"
    with note_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
                    "storetime", "text"])
        for note_id, hadm, text in NOTES:
            w.writerow([note_id, "1", hadm, "DS", "1", "2180-01-01", "2180-01-02", text])
        w.writerow(["N113", "1", "113", "DS"])  # malformed: too few fields
    return drg_path, note_path


def test_every_row_accounted_for(tmp_path):
    drg_path, note_path = write_fixture(tmp_path)
    out = tmp_path / "out"
    report = prepare(drg_path, note_path, out, seed=42)

    assert report["drgcodes_rows"] == {
        "kept": 8, "not_hcfa": 2, "unmapped_description": 2,
        "repeat_hcfa_for_admission": 1, "malformed_row": 2}
    assert sum(report["drgcodes_rows"].values()) == len(DRG_ROWS) + 1
    assert report["discharge_rows"] == {
        "kept": 6, "no_hcfa_drg": 3, "rare_drg": 1,
        "duplicate_course": 1, "course_too_short": 1, "no_course_section": 1, "malformed_row": 2}
    assert sum(report["discharge_rows"].values()) == len(NOTES) + 1
    assert report["course_sources"] == {BRIEF_TO_ADMISSION_MEDS: 4, BRIEF_TO_DISCHARGE_MEDS: 1,
                                        BROAD_HEADER: 1}

    drops = [json.loads(line) for line in (out / "drops.jsonl").read_text().splitlines()]
    assert len(drops) == 7 + 9
    by_id = {(d["file"], d["id"]): d["reason"] for d in drops}
    assert by_id[("discharge", "N110a")] == "duplicate_course"
    assert by_id[("discharge", "N110b")] == "course_too_short"
    assert by_id[("discharge", "N110c")] == "no_course_section"
    assert by_id[("discharge", "N107")] == "rare_drg"
    assert by_id[("drgcodes", "106")] == "unmapped_description"  # mapping rule says NaN

    train, test = read_cases(out / "train.jsonl"), read_cases(out / "test.jsonl")
    kept = {r["note_id"]: r for r in train + test}
    assert sorted(kept) == ["N101", "N102", "N103", "N104", "N108", "N109"]
    assert (len(train), len(test)) == (5, 1)
    assert kept["N103"]["solution"] == PCI and kept["N103"]["drg"] == 247
    assert kept["N103"]["base_drg"] == "PERCUTANEOUS CARDIOVASCULAR PROCEDURES WITH DRUG-ELUTING STENT"
    assert kept["N103"]["severity"] == 3 and kept["N103"]["hadm_id"] == 103
    assert kept["N101"]["problem"] == story("heart") and kept["N108"]["solution"] == SEPSIS
    assert set(kept["N101"]) == {"note_id", "hadm_id", "problem", "solution", "drg", "base_drg",
                                 "severity"}
    for share in (50, 75, 90, 95):
        sft = read_cases(out / f"splits/sft{share}_sft.jsonl")
        grpo = read_cases(out / f"splits/sft{share}_grpo.jsonl")
        assert sorted(r["note_id"] for r in sft + grpo) == sorted(r["note_id"] for r in train)
    assert not list(out.rglob("*.tmp"))


def test_cli_is_deterministic_and_reports(tmp_path, capsys):
    drg_path, note_path = write_fixture(tmp_path)
    for name in ("a", "b"):
        main(["--drgcodes", str(drg_path), "--discharge", str(note_path),
              "--out", str(tmp_path / name), "--seed", "42"])
    assert json.loads(capsys.readouterr().out.split("\n}\n")[0] + "}")["discharge_rows"]["kept"] == 6
    for name in ("train.jsonl", "test.jsonl", "splits/sft75_grpo.jsonl", "drops.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_missing_column_and_file_are_fatal(tmp_path):
    drg_path, note_path = write_fixture(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("note_id,hadm_id,body\nN1,1,x\n")
    with pytest.raises(DataError, match="missing column.*text"):
        prepare(drg_path, bad, tmp_path / "out")
    with pytest.raises(DataError, match="missing input file.*nope.csv"):
        prepare(tmp_path / "nope.csv", note_path, tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_normalisation_and_mapping():
    tables = load_tables()
    assert normalize_description(" Heart Failure & Shock w/o CC/MCC ") == \
        "HEART FAILURE AND SHOCK WITHOUT CC/MCC"
    assert normalize_description("CIRC DISORDERS EXCEPT AMI, W CARD CATH W MCC") == \
        "CIRC DISORDERS EXCEPT AMI WITH CARD CATHETERIZATION WITH MCC"
    assert map_to_v34("HEART FAILURE & SHOCK W MCC", tables) == HF
    assert map_to_v34("PERC CARDIOVASC PROC W DRUG-ELUTING STENT W/O MCC", tables) == PCI
    assert map_to_v34("NUTRITIONAL AND MISC METABOLIC DISORDERS W/O MCC", tables) is None


def test_course_extraction_rules():
    body = story("x", 5)
    assert extract_course(note("Brief Hospital Course:", body)) == (body, BRIEF_TO_ADMISSION_MEDS)
    assert extract_course(note("Brief Hospital Course:", body, "Discharge Medications:")) == (
        body, BRIEF_TO_DISCHARGE_MEDS)
    assert extract_course(note("Summary of hospital course:", body)) == (body, BROAD_HEADER)
    assert extract_course("Her hospital course was long. Medications on Admission: none") == (
        None, None)
    assert extract_course(note("Brief Hospital Course:", body, "Followup Instructions:")) == (
        None, None)


def test_stratified_split_counts():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2 + ["d"] * 3
    rest, part = stratified_split(labels, 0.1, seed=42)
    assert len(part) == 2 and sorted(rest + part) == list(range(20))  # ceil(0.1 * 20)
    assert sum(labels[i] == "a" for i in part) == 1  # floor(0.1 * 10)
    assert stratified_split(labels, 0.1, seed=42) == (rest, part)
    for label in "abcd":
        assert any(labels[i] == label for i in rest)  # never all of a label


def test_split_size_has_no_float_overshoot():
    labels = [i % 4 for i in range(18000)]
    assert len(stratified_split(labels, 1 - 95 / 100, seed=42)[1]) == 900  # 0.05 * 18000
