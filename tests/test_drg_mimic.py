"""MIMIC-IV preparation on a MIMIC-format fixture: every input row is kept or dropped by reason."""

import csv
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from minigrpo.io import DataError
from recipes.drg.prep.course import (BRIEF_TO_ADMISSION_MEDS, BRIEF_TO_DISCHARGE_MEDS, BROAD_HEADER,
                                extract_course)
from recipes.drg.prep.mimic import main, map_to_v34, normalize_description, prepare
from recipes.drg.records import read_cases, stratified_split
from recipes.drg.tables import load_tables

ROOT = Path(__file__).resolve().parents[1]
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
        main([f"--mimic.drgcodes={drg_path}", f"--mimic.discharge={note_path}",
              f"--mimic.out={tmp_path / name}", "--mimic.seed=42"])
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


# ---- damaged input: nothing lost silently, every bad file one clear error ----

DRG_HEADER = "subject_id,hadm_id,drg_type,drg_code,description,drg_severity,drg_mortality\n"
NOTE_HEADER = "note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n"


def drg_line(hadm):
    return f'{hadm},{hadm},HCFA,291,"HEART FAILURE & SHOCK, W MCC",,\n'


def note_record(hadm, text=None, close=True):
    """One discharge.csv record as MIMIC writes it: the text quoted, its quotes doubled."""
    text = note("Brief Hospital Course:", story(f"h{hadm}x")) if text is None else text
    quoted = text.replace('"', '""')
    return f'N{hadm},1,{hadm},DS,1,2180-01-01,2180-01-02,"{quoted}' + ('"\n' if close else "\n")


def run_mimic(drgcodes, discharge, out):
    """The real entry point, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "recipes.drg.prep.mimic", f"--mimic.drgcodes={drgcodes}",
                           f"--mimic.discharge={discharge}", f"--mimic.out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def report_of(out):
    return json.loads((out / "report.json").read_text())


def drops_of(out):
    return [json.loads(line) for line in (out / "drops.jsonl").read_text().splitlines()]


def assert_every_row_accounted_for(report, drg_text, note_text):
    """kept + each drop reason = rows read, and every physical line of both files was read."""
    for name, text in (("drgcodes", drg_text), ("discharge", note_text)):
        assert sum(report[f"{name}_rows"].values()) == report["rows_read"][name]
        assert report["lines_read"][name] == len(text.splitlines())


def test_unclosed_quote_in_drgcodes_costs_its_line_only(tmp_path):
    # The new-user probe: line 62 has 3 fields, line 63 opens a quote it never closes, 60 good rows
    # follow. Before, the 60 rows vanished into one field and the run exited 0.
    drg_text = (DRG_HEADER + "".join(drg_line(100 + i) for i in range(60)) + "12,112,HCFA\n"
                + '1,5001,"HCFA,291,broken\n' + "".join(drg_line(200 + i) for i in range(60)))
    note_text = NOTE_HEADER + "".join(note_record(h) for h in (100, 101, 200, 259))
    (tmp_path / "drgcodes.csv").write_text(drg_text)
    (tmp_path / "discharge.csv").write_text(note_text)
    r = run_mimic(tmp_path / "drgcodes.csv", tmp_path / "discharge.csv", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = report_of(tmp_path / "out")
    assert report["rows_read"]["drgcodes"] == 122
    assert report["drgcodes_rows"] == {"kept": 120, "malformed_row": 1, "bad_quoting": 1}
    assert_every_row_accounted_for(report, drg_text, note_text)
    bad = {d["line"]: d for d in drops_of(tmp_path / "out") if d["file"] == "drgcodes"}
    assert sorted(bad) == [62, 63]
    assert bad[62]["reason"] == "malformed_row" and bad[63]["reason"] == "bad_quoting"
    assert "never closed" in bad[63]["detail"]
    kept = [c["hadm_id"] for c in read_cases(tmp_path / "out/train.jsonl") + read_cases(tmp_path / "out/test.jsonl")]
    assert sorted(kept) == [100, 101, 200, 259]  # labels from after the bad quote are used


def test_unclosed_quote_in_discharge_costs_that_note_only(tmp_path):
    """discharge.csv texts span lines legitimately, so a broken note is dropped from its first line to
    the line before the next record that parses, and the notes after it are kept."""
    stray = note("Brief Hospital Course:", story("h105x") + '\nhe said "no" to surgery')
    records = [note_record(101), note_record(102, close=False),  # its closing quote is lost
               note_record(103), note_record(104),
               note_record(105, stray).replace('""no""', '"no"'),  # a quote in the text not doubled
               note_record(106), note_record(107, close=False)]  # the file ends inside the text
    note_text = NOTE_HEADER + "".join(records)
    drg_text = DRG_HEADER + "".join(drg_line(h) for h in range(101, 108))
    (tmp_path / "drgcodes.csv").write_text(drg_text)
    (tmp_path / "discharge.csv").write_text(note_text)
    r = run_mimic(tmp_path / "drgcodes.csv", tmp_path / "discharge.csv", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = report_of(tmp_path / "out")
    assert report["discharge_rows"] == {"kept": 4, "bad_quoting": 3}
    assert_every_row_accounted_for(report, drg_text, note_text)
    starts = [i + 1 for i, line in enumerate(note_text.splitlines()) if line.startswith("N1")]
    bad = [d for d in drops_of(tmp_path / "out") if d["file"] == "discharge"]
    assert [d["line"] for d in bad] == [starts[1], starts[4], starts[6]]  # N102, N105, N107
    assert f"lines {starts[1]}-{starts[2] - 1} dropped" in bad[0]["detail"]
    assert "not doubled" in bad[1]["detail"] and f"lines {starts[4]}-{starts[5] - 1}" in bad[1]["detail"]
    assert "never closed" in bad[2]["detail"] and f"-{len(note_text.splitlines())} dropped" in bad[2]["detail"]
    cases = read_cases(tmp_path / "out/train.jsonl") + read_cases(tmp_path / "out/test.jsonl")
    assert sorted(c["note_id"] for c in cases) == ["N101", "N103", "N104", "N106"]
    assert all(c["problem"] == story(f"h{c['hadm_id']}x") for c in cases)


def good_inputs(tmp_path):
    drg_text = DRG_HEADER + "".join(drg_line(h) for h in range(101, 111))
    note_text = NOTE_HEADER + "".join(note_record(h) for h in range(101, 111))
    return drg_text, note_text


def bad_file(case, tmp_path):
    """(drgcodes, discharge, text the error must contain) for one kind of unreadable input."""
    drg_text, note_text = good_inputs(tmp_path)
    drg, notes = tmp_path / "drgcodes.csv", tmp_path / "discharge.csv"
    drg.write_text(drg_text)
    notes.write_text(note_text)
    if case == "fake_gz":  # plain text named .gz
        drg = tmp_path / "drgcodes.csv.gz"
        drg.write_text(drg_text)
        return drg, notes, f"{drg}: named .gz but not gzip"
    if case == "truncated_gz":
        notes = tmp_path / "discharge.csv.gz"
        packed = gzip.compress(note_text.encode())
        notes.write_bytes(packed[: len(packed) // 2])
        return drg, notes, f"{notes}:"
    if case == "gzip_named_csv":
        notes.write_bytes(gzip.compress(note_text.encode()))
        return drg, notes, f"{notes}: gzip data in a file not named .gz"
    if case == "latin1_drgcodes":  # line 5 holds a latin-1 byte
        lines = drg_text.splitlines(keepends=True)
        lines[4] = lines[4].replace("SHOCK", "CHOC\u00c9")
        drg.write_bytes("".join(lines).encode("latin-1"))
        return drg, notes, f"{drg}:5: not UTF-8 text (byte 0xc9"
    if case == "latin1_discharge":  # inside the text of the 3rd note, which spans lines
        third = note_text.index("N103,")
        line = note_text[:third].count("\n") + 2  # the record's line holds "Name: ___", the next this
        notes.write_bytes(note_text.replace("Complaint: dyspnea\n\nBrief Hospital Course:\nh103x0",
                                            "Complaint: dyspn\u00e9a\n\nBrief Hospital Course:\nh103x0"
                                            ).encode("latin-1"))
        return drg, notes, f"{notes}:{line}: not UTF-8 text (byte 0xe9 at column 23)"
    if case == "missing_column":
        notes.write_text(note_text.replace(",text\n", ",body\n", 1))
        return drg, notes, f"{notes}: missing column(s) text"
    if case == "empty_file":
        drg.write_text("")
        return drg, notes, f"{drg}: empty file"
    if case == "missing_file":
        return tmp_path / "nope.csv", notes, f"missing input file: {tmp_path / 'nope.csv'}"
    raise AssertionError(case)


def folder_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


BAD_FILES = ["fake_gz", "truncated_gz", "gzip_named_csv", "latin1_drgcodes", "latin1_discharge",
             "missing_column", "empty_file", "missing_file"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_is_one_error_line_and_exit_2(case, tmp_path):
    drg_text, note_text = good_inputs(tmp_path)
    (tmp_path / "good_drg.csv").write_text(drg_text)
    (tmp_path / "good_notes.csv").write_text(note_text)
    out = tmp_path / "out"  # a previous good run's output must stay byte-identical
    assert run_mimic(tmp_path / "good_drg.csv", tmp_path / "good_notes.csv", out).returncode == 0
    before = folder_digest(out)
    drg, notes, message = bad_file(case, tmp_path)
    r = run_mimic(drg, notes, out)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith("mimic: ")]  # progress lines
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert folder_digest(out) == before
    assert run_mimic(drg, notes, tmp_path / "fresh").returncode == 2
    assert not (tmp_path / "fresh").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path):
    drg_path, note_path = write_fixture(tmp_path)
    (tmp_path / "out").write_text("keep me")
    with pytest.raises(DataError, match="output folder is a file"):
        prepare(drg_path, note_path, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "keep me"


def test_truncated_gzip_names_the_line_reached(tmp_path):
    drg, notes, _ = bad_file("truncated_gz", tmp_path)
    with pytest.raises(DataError, match=r"discharge\.csv\.gz:\d+: the gzip data is damaged or cut short"):
        prepare(drg, notes, tmp_path / "out")


def test_empty_outputs_get_a_warning(tmp_path):
    drg_text = DRG_HEADER + drg_line(101) + drg_line(102)
    note_text = NOTE_HEADER + note_record(101) + note_record(102)
    (tmp_path / "drgcodes.csv").write_text(drg_text)
    (tmp_path / "discharge.csv").write_text(note_text)
    r = run_mimic(tmp_path / "drgcodes.csv", tmp_path / "discharge.csv", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = report_of(tmp_path / "out")
    empty = [name for name, rows in report["outputs"].items() if rows == 0]
    assert empty and report["empty_outputs"] == empty
    warning = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and all(name in warning[0] for name in empty)
    assert_every_row_accounted_for(report, drg_text, note_text)


def test_progress_shows_rows_read_kept_dropped(tmp_path, capsys):
    drg_path, note_path = write_fixture(tmp_path)
    prepare(drg_path, note_path, tmp_path / "out", progress_every=0.0)  # a line for every row
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mimic: ")]
    assert len(progress) > len(DRG_ROWS) + len(NOTES)
    assert progress[-1].startswith("mimic: discharge.csv: 15 rows read, 6 kept, 9 dropped (done")
    assert any(line.startswith("mimic: drgcodes.csv.gz: 15 rows read, 8 kept, 7 dropped (done")
               for line in progress)


# ---- de-identified headers: MIMIC-IV-Note writes a removed word as ___ ----

def deidentified(phrase):
    """Every form of `phrase` with one of its words removed by the de-identification."""
    words = phrase.split()
    return [" ".join("___" if j == i else w for j, w in enumerate(words)) for i in range(len(words))]


ADMISSION_MEDS = "1. lisinopril 10 mg daily"
DISCHARGE_MEDS = "1. metoprolol 25 mg twice daily"
END_FORMS = ([(form, BRIEF_TO_ADMISSION_MEDS) for form in deidentified("Medications on Admission")]
             + [(form, BRIEF_TO_DISCHARGE_MEDS) for form in deidentified("Discharge Medications")])


@pytest.mark.parametrize("end,method", END_FORMS)
def test_deidentified_end_marker_ends_the_course(end, method):
    body = story("x", 50)
    text = (f"Name: ___\n\nBrief Hospital Course:\n{body}\n\n{end}:\n{ADMISSION_MEDS}\n\n"
            f"Discharge Medications:\n{DISCHARGE_MEDS}\n\nDischarge Disposition:\nHome\n")
    if method == BRIEF_TO_DISCHARGE_MEDS:  # no admission list; the discharge list's header is de-identified
        text = (f"Name: ___\n\nBrief Hospital Course:\n{body}\n\n{end}:\n{DISCHARGE_MEDS}\n\n"
                "Discharge Disposition:\nHome\n")
    assert extract_course(text) == (body, method)  # before: the medication list ran into the course


HEADER_FORMS = ([(form, BRIEF_TO_ADMISSION_MEDS) for form in deidentified("Brief Hospital Course")]
                + list(dict.fromkeys((form, BROAD_HEADER) for phrase in (
                    "Hospital Course", "Summary of Hospital Course", "Hospital Course by Problem",
                    "Hospital Course by Systems") for form in deidentified(phrase))))


@pytest.mark.parametrize("header,method", HEADER_FORMS)
def test_deidentified_header_starts_the_course(header, method):
    body = story("y", 50)
    for layout in (f"{header}:\n{body}", f"  {header}: {body}", f"{header}\n{body}"):
        text = f"Name: ___\n\n{layout}\n\nMedications on Admission:\n1. aspirin\n"
        assert extract_course(text) == (body, method), layout


def test_deidentified_forms_only_as_header_lines():
    body = story("z", 50)
    prose = f"{body}\nseen by Dr. ___ on admission: stable\nthen ___ Medications were held"
    text = f"Brief Hospital Course:\n{prose}\n\n___ on Admission:\n1. aspirin\n"
    assert extract_course(text) == (prose, BRIEF_TO_ADMISSION_MEDS)  # mid-line forms do not end it
    assert extract_course(f"Brief Hospital Course:\n{body}\n___:\n1. aspirin\n") == (None, None)
    assert extract_course(f"Brief Hospital Course:\n{body}\n___ ___ Admission:\n1. aspirin\n") == (None, None)
    assert extract_course(f"his ___ course: good\n{body}\nMedications on Admission:\n") == (None, None)


def test_deidentified_headers_in_every_position_through_the_cli(tmp_path):
    """One note per de-identified header or end marker; each keeps exactly its course, and the report
    accounts for every row."""
    forms = [(f"Brief Hospital Course:", f"{end}:") for end, _ in END_FORMS]
    forms += [(f"{header}:", "Medications on Admission:") for header, _ in HEADER_FORMS]
    records, expected = [], {}
    for i, (header, end) in enumerate(forms):
        hadm = 300 + i
        meds = DISCHARGE_MEDS if end.endswith("Medications:") and "Admission" not in end else ADMISSION_MEDS
        text = (f"Name: ___\nChief Complaint: dyspnea\n\n{header}\n{story(f'c{hadm}x')}\n\n{end}\n{meds}\n\n"
                f"Discharge Medications:\n{DISCHARGE_MEDS}\n")
        records.append(note_record(hadm, text))
        expected[f"N{hadm}"] = story(f"c{hadm}x")
    drg_text = DRG_HEADER + "".join(drg_line(300 + i) for i in range(len(forms)))
    note_text = NOTE_HEADER + "".join(records)
    (tmp_path / "drgcodes.csv").write_text(drg_text)
    (tmp_path / "discharge.csv").write_text(note_text)
    r = run_mimic(tmp_path / "drgcodes.csv", tmp_path / "discharge.csv", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    report = report_of(tmp_path / "out")
    assert report["discharge_rows"] == {"kept": len(forms)}
    assert_every_row_accounted_for(report, drg_text, note_text)
    n_end = len(END_FORMS)
    n_brief_header = len(deidentified("Brief Hospital Course"))
    assert report["course_sources"] == {
        BRIEF_TO_ADMISSION_MEDS: len(deidentified("Medications on Admission")) + n_brief_header,
        BRIEF_TO_DISCHARGE_MEDS: len(deidentified("Discharge Medications")),
        BROAD_HEADER: len(HEADER_FORMS) - n_brief_header}
    assert n_end == 5
    cases = read_cases(tmp_path / "out/train.jsonl") + read_cases(tmp_path / "out/test.jsonl")
    assert {c["note_id"]: c["problem"] for c in cases} == expected  # no medication list leaked in


def test_cli_help_lists_every_key():
    r = subprocess.run([sys.executable, "-m", "recipes.drg.prep.mimic", "-h"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
    assert "--mimic.drgcodes=" in r.stdout  # the usage, from the module docstring
    for key in ("drgcodes", "discharge", "out", "seed"):
        assert f"\n    {key}: " in r.stdout, key


@pytest.mark.parametrize("args, key", [
    (["--mimic.seed=x"], "mimic.seed"),
    (["--mimic.discharge="], "mimic.discharge"),  # required
    (["--mimic.split=0.2"], "mimic.split"),  # unknown key
])
def test_cli_bad_value_is_one_line_naming_the_key(tmp_path, args, key):
    drg, notes = write_fixture(tmp_path)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "recipes.drg.prep.mimic", f"--mimic.drgcodes={drg}",
                        f"--mimic.discharge={notes}", f"--mimic.out={out}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and f"'{key}'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not out.exists()
